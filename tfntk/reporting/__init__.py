"""Figures, TensorBoard images and the HTML report, drawn from a run directory's tables alone."""
