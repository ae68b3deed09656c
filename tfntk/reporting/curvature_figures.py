"""The `curvature` figure, drawn from the `hessian` and `escape_threshold` tables only.

Left: the top Hessian eigenvalues of each measured parent against epoch, with `2 / lr` (the
largest top eigenvalue at which gradient descent stays in a quadratic basin). Right: the escape
threshold of SGD steps (mean and standard deviation over minibatches) and its gradient-descent
form `lr * lambda_max - 2`, where positive values predict that a step leaves the basin. Both
panels mark learning-rate drops (read from `learning_curves` when present). Eigenvalues whose
solver did not reach its tolerance are circled in red.
"""

from __future__ import annotations

from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tfntk.reporting import figures  # noqa: E402

FIGURE_NAME = "curvature"


def draw(run_dir: str) -> list[str]:
    """Draws `figures/curvature.png` and `.pdf` and returns ["curvature"], or [] without the tables."""
    eigenvalues = figures.read_table(run_dir, "hessian")
    if eigenvalues is None or eigenvalues.empty:
        return []
    thresholds = figures.read_table(run_dir, "escape_threshold")
    curves = figures.read_table(run_dir, "learning_curves")
    drops = _learning_rate_drops(eigenvalues, curves)

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    draw_eigenvalues(left, eigenvalues, curves, drops)
    if thresholds is not None and not thresholds.empty:
        draw_escape_thresholds(right, thresholds, drops)
    else:
        right.set_axis_off()
    figure.suptitle(_title(eigenvalues))
    figures.save_figure(figure, run_dir, FIGURE_NAME)
    return [FIGURE_NAME]


def draw_eigenvalues(axis, eigenvalues: pd.DataFrame, curves: Optional[pd.DataFrame], drops: list[float]) -> None:
    """Plots each run's top-k eigenvalues against epoch, `2 / lr`, drops and unconverged points."""
    colors = _run_colors(eigenvalues["run"])
    markers = ("o", "s", "^", "v", "D")
    for (run, index), rows in eigenvalues.groupby(["run", "index"]):
        rows = rows.sort_values("epoch")
        axis.plot(
            rows["epoch"], rows["eigenvalue"], marker=markers[int(index) % len(markers)], markersize=4,
            color=colors[run], alpha=1.0 if index == 0 else 0.55, linewidth=1.5 if index == 0 else 1.0,
            label=f"{run}: eigenvalue {int(index) + 1}",
        )

    epochs, two_over_lr = _two_over_lr(eigenvalues, curves)
    axis.plot(epochs, two_over_lr, color="gray", linewidth=1.5, drawstyle="steps-post", label="2 / learning rate")

    _mark_unconverged(axis, eigenvalues)
    figures.mark_drops(axis, drops)
    _set_value_scale(axis, np.concatenate([eigenvalues["eigenvalue"].to_numpy(), two_over_lr]))
    axis.set_xlabel("epoch")
    axis.set_ylabel("Hessian eigenvalue of the training loss")
    axis.set_title("Top Hessian eigenvalues against 2 / learning rate")
    axis.legend(fontsize=7)


def draw_escape_thresholds(axis, thresholds: pd.DataFrame, drops: list[float]) -> None:
    """Plots each run's SGD escape threshold (mean, std band) and GD form against epoch."""
    colors = _run_colors(thresholds["run"])
    for run, rows in thresholds.groupby("run"):
        rows = rows.sort_values("epoch")
        mean, std = rows["escape_mean"].to_numpy(), rows["escape_std"].to_numpy()
        minibatches = int(rows["minibatches"].iloc[0])
        axis.plot(rows["epoch"], mean, marker="o", markersize=4, color=colors[run],
                  label=f"{run}: SGD, mean over {minibatches} minibatches")
        axis.fill_between(rows["epoch"], mean - std, mean + std, color=colors[run], alpha=0.2,
                          label=f"{run}: SGD, +- 1 std")
        axis.plot(rows["epoch"], rows["gd_escape_threshold"], linestyle="--", color=colors[run],
                  label=f"{run}: GD, lr * lambda_max - 2")
    axis.axhline(0.0, color="black", linewidth=0.8)
    figures.mark_drops(axis, drops)
    values = np.concatenate([thresholds["escape_mean"].to_numpy(), thresholds["gd_escape_threshold"].to_numpy()])
    if np.nanmax(np.abs(values)) > 20:
        axis.set_yscale("symlog", linthresh=1.0)
    axis.set_xlabel("epoch")
    axis.set_ylabel("escape threshold (> 0: the step leaves the basin)")
    axis.set_title("Escape threshold of one optimizer step")
    axis.legend(fontsize=7)


def _title(eigenvalues: pd.DataFrame) -> str:
    first = eigenvalues.iloc[0]
    decay = f"weight decay {first['weight_decay']:g}" if bool(first["weight_decay_included"]) else "no weight decay"
    return (f"Curvature over training: loss on {int(first['examples'])} training examples, batch norm in "
            f"{first['bn_mode']} mode, {decay}, {first['method']} solver")


def _run_colors(runs: pd.Series) -> dict:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {run: cycle[i % len(cycle)] for i, run in enumerate(sorted(runs.unique()))}


def _two_over_lr(eigenvalues: pd.DataFrame, curves: Optional[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """Returns `2 / lr` at every snapshot of the first measured run, from its learning curve when
    available (so the line steps exactly at the drops) and else from the measured snapshots."""
    run = sorted(eigenvalues["run"].unique())[0]
    rows = None
    if curves is not None and "run" in curves.columns:
        rows = curves[curves["run"] == run]
    if rows is None or rows.empty:
        rows = eigenvalues[(eigenvalues["run"] == run) & (eigenvalues["index"] == 0)]
    rows = rows.sort_values("epoch")
    return rows["epoch"].to_numpy(), 2.0 / rows["learning_rate"].to_numpy()


def _learning_rate_drops(eigenvalues: pd.DataFrame, curves: Optional[pd.DataFrame]) -> list[float]:
    """Returns the epochs of learning-rate drops from `learning_curves`, or else from the snapshots."""
    if curves is not None and not curves.empty:
        return figures.learning_rate_drops(curves)
    run = sorted(eigenvalues["run"].unique())[0]
    rows = eigenvalues[(eigenvalues["run"] == run) & (eigenvalues["index"] == 0)].sort_values("epoch")
    rates, epochs = rows["learning_rate"].to_numpy(), rows["epoch"].to_numpy()
    return [float(epochs[i]) for i in range(1, len(rates)) if rates[i] < rates[i - 1] * (1 - 1e-9)]


def _mark_unconverged(axis, eigenvalues: pd.DataFrame) -> None:
    unconverged = eigenvalues[~eigenvalues["converged"].astype(bool)]
    if unconverged.empty:
        return
    axis.scatter(unconverged["epoch"], unconverged["eigenvalue"], s=80, facecolors="none", edgecolors="red",
                 linewidths=1.5, zorder=5, label="not converged (residual > tol)")


def _set_value_scale(axis, values: np.ndarray) -> None:
    """Uses a log scale when every value is positive, and a symmetric log scale otherwise."""
    values = values[np.isfinite(values)]
    if values.size and np.all(values > 0):
        axis.set_yscale("log")
    elif values.size:
        magnitudes = np.abs(values[values != 0])
        threshold = max(float(np.min(magnitudes)), 1e-3 * float(np.max(magnitudes))) if magnitudes.size else 1.0
        axis.set_yscale("symlog", linthresh=threshold)
