"""Protocols that compose training and measures and write the run directory's tables."""
