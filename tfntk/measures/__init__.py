"""Measurements of Fort et al. (2020) as pure functions of (model, weights, data): no files, no runs."""
