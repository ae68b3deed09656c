"""The paper's measurements as pure functions of (model, weights, data): no files, no runs."""
