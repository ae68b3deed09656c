"""Figures of the kernel dynamics stage, drawn from tables only.

  kernel_heatmaps      per measured parent: kernel distance, ReLU activation distance and centroid
                       alignment between every pair of its snapshots (`snapshot_pairs`), one cell
                       per snapshot, dashed lines at learning-rate drops on both axes
  kernel_velocity      kernel velocity against epoch, log scale (`kernel_velocity`)
  barrier_vs_velocity  test error barrier between children (`error_barrier`) against parent 0's
                       kernel velocity at their spawn epoch, one point per spawn epoch
  children_kernel      the three measures between children at the end of training against spawn
                       epoch, with the level of the two independent parents (`pair_kernel`)

Learning-rate drops are read from `learning_curves` when that table exists.
"""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tfntk import storage  # noqa: E402
from tfntk.reporting import figures  # noqa: E402

MEASURE_LABELS = {
    "kernel_distance": "kernel distance",
    "relu_distance": "ReLU activation distance",
    "centroid_alignment": "logit gradient centroid alignment",
}
# Value of a snapshot compared with itself: 0 for the distances, 1 for the alignment.
SELF_VALUES = {"kernel_distance": 0.0, "relu_distance": 0.0, "centroid_alignment": 1.0}
MAX_TICKS = 8


def draw(run_dir: str) -> list[str]:
    """Draws every kernel dynamics figure whose tables exist; returns their names."""
    curves = figures.read_table(run_dir, "learning_curves")
    drops = figures.learning_rate_drops(curves) if curves is not None and not curves.empty else []
    pairs = figures.read_table(run_dir, "snapshot_pairs")
    velocity = figures.read_table(run_dir, "kernel_velocity")
    pair_kernel = figures.read_table(run_dir, "pair_kernel")
    barriers = figures.read_table(run_dir, "error_barrier")

    drawn = []
    if pairs is not None and not pairs.empty:
        drawn.append(draw_heatmaps(run_dir, pairs, drops))
    if velocity is not None and not velocity.empty:
        drawn.append(draw_velocity(run_dir, velocity, drops))
        spawn_parent = storage.RunDir(run_dir).parent(0).name
        if barriers is not None and draw_barrier_vs_velocity(run_dir, barriers, velocity, spawn_parent):
            drawn.append("barrier_vs_velocity")
    if pair_kernel is not None and not pair_kernel.empty:
        drawn.append(draw_children_kernel(run_dir, pair_kernel))
    return drawn


def close(figure) -> None:
    plt.close(figure)


def heatmap_matrix(rows: pd.DataFrame, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """Builds one run's symmetric matrix of one measure from its `snapshot_pairs` rows.

    Returns:
      (epochs, matrix): the snapshots' epochs in step order, shape (n,), and the (n, n) values,
      with the self-comparison value (0, or 1 for the alignment) on the diagonal and NaN where a
      pair is missing.
    """
    ends = pd.concat([
        rows[["step_a", "epoch_a"]].set_axis(["step", "epoch"], axis=1),
        rows[["step_b", "epoch_b"]].set_axis(["step", "epoch"], axis=1),
    ]).drop_duplicates("step").sort_values("step")
    position = {int(step): i for i, step in enumerate(ends["step"])}
    matrix = np.full((len(position), len(position)), np.nan)
    for step_a, step_b, value in zip(rows["step_a"], rows["step_b"], rows["value"]):
        matrix[position[int(step_a)], position[int(step_b)]] = value
        matrix[position[int(step_b)], position[int(step_a)]] = value
    np.fill_diagonal(matrix, SELF_VALUES.get(measure, np.nan))
    return ends["epoch"].to_numpy(dtype=float), matrix


def draw_heatmap(axis, rows: pd.DataFrame, measure: str, drops: Sequence[float], title: Optional[str] = None):
    """Draws one run's heatmap of `measure` between snapshots; returns the image for a colorbar.

    Cells are equally sized, one per snapshot in step order, and the ticks show their epochs, so
    the densely sampled early epochs stay visible. A learning-rate drop is drawn at its epoch
    interpolated between the neighbouring snapshots' cells.
    """
    epochs, matrix = heatmap_matrix(rows, measure)
    image = axis.imshow(matrix, origin="lower", cmap="viridis_r" if measure == "centroid_alignment" else "viridis",
                        interpolation="nearest", aspect="auto")
    ticks = np.unique(np.round(np.linspace(0, len(epochs) - 1, min(MAX_TICKS, len(epochs)))).astype(int))
    labels = [f"{epochs[t]:.3g}" for t in ticks]
    axis.set_xticks(ticks, labels, rotation=45)
    axis.set_yticks(ticks, labels)
    for index, drop in enumerate(d for d in drops if epochs[0] <= d <= epochs[-1]):
        position = float(np.interp(drop, epochs, np.arange(len(epochs))))
        axis.axvline(position, color="white", linestyle="--", linewidth=1.0,
                     label="learning-rate drop" if index == 0 else None)
        axis.axhline(position, color="white", linestyle="--", linewidth=1.0)
    axis.set_xlabel("epoch (one cell per snapshot)")
    axis.set_ylabel("epoch (one cell per snapshot)")
    axis.set_title(title or MEASURE_LABELS.get(measure, measure))
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, loc="upper left")
    return image


def heatmap_figure(rows: pd.DataFrame, measure: str, drops: Sequence[float]):
    """Returns a one-panel figure of one run's heatmap (used for TensorBoard images)."""
    figure, axis = plt.subplots(figsize=(5.5, 4.8))
    image = draw_heatmap(axis, rows, measure, drops)
    figure.colorbar(image, ax=axis, label=MEASURE_LABELS.get(measure, measure))
    return figure


def draw_heatmaps(run_dir: str, pairs: pd.DataFrame, drops: Sequence[float]) -> str:
    """Draws `kernel_heatmaps`: one row per run, one column per measure."""
    runs = sorted(pairs["run"].unique())
    figure, axes = plt.subplots(len(runs), 3, figsize=(17, 4.8 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        run_rows = pairs[pairs["run"] == run]
        for column, measure in enumerate(("kernel_distance", "relu_distance", "centroid_alignment")):
            axis = axes[row, column]
            measure_rows = run_rows[run_rows["measure"] == measure]
            if measure_rows.empty:
                axis.set_axis_off()
                continue
            image = draw_heatmap(axis, measure_rows, measure, drops, f"{run}: {MEASURE_LABELS[measure]}")
            figure.colorbar(image, ax=axis, label=MEASURE_LABELS[measure])
    figure.suptitle(f"Change of the network between pairs of training epochs (NTK {_kernel_kinds(pairs)})")
    figure.tight_layout()
    figures.save_figure(figure, run_dir, "kernel_heatmaps")
    return "kernel_heatmaps"


def draw_velocity(run_dir: str, velocity: pd.DataFrame, drops: Sequence[float]) -> str:
    """Draws `kernel_velocity`: kernel velocity against epoch for every measured run."""
    figure, axis = plt.subplots(figsize=(7, 4.4))
    for run, rows in velocity.groupby("run"):
        rows = rows.sort_values("epoch")
        axis.plot(rows["epoch"], rows["velocity"], marker="o", markersize=3, label=run)
    if np.all(velocity["velocity"].to_numpy() > 0):
        axis.set_yscale("log")
    figures.mark_drops(axis, drops)
    dt = float(np.median(velocity["dt_epochs"]))
    axis.set_xlabel("epoch")
    axis.set_ylabel("kernel velocity (kernel distance per epoch)")
    axis.set_title(f"Kernel velocity, dt about {dt:.2g} epochs (NTK {_kernel_kinds(velocity)})")
    axis.legend(fontsize=7)
    figures.save_figure(figure, run_dir, "kernel_velocity")
    return "kernel_velocity"


def velocity_at(velocity: pd.DataFrame, run: str, epochs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the run's kernel velocity at `epochs` and whether each value was measured there.

    Epochs without a velocity row (within 1e-6 epochs) get a linear interpolation between the
    neighbouring measured epochs.
    """
    rows = velocity[velocity["run"] == run].sort_values("epoch")
    measured_epochs = rows["epoch"].to_numpy(dtype=float)
    values = rows["velocity"].to_numpy(dtype=float)
    exact = np.array([np.any(np.isclose(measured_epochs, e, rtol=0, atol=1e-6)) for e in epochs], dtype=bool)
    return np.interp(epochs, measured_epochs, values), exact


def draw_barrier_vs_velocity(run_dir: str, barriers: pd.DataFrame, velocity: pd.DataFrame, spawn_parent: str) -> bool:
    """Draws `barrier_vs_velocity`; returns False when a table lacks the needed rows."""
    children = barriers[(barriers["pair"] == "children") & (barriers["split"] == "test")]
    if children.empty or not (velocity["run"] == spawn_parent).any():
        return False
    barrier = children.groupby("spawn_epoch")["barrier"].mean()
    spawn_epochs = barrier.index.to_numpy(dtype=float)
    velocities, exact = velocity_at(velocity, spawn_parent, spawn_epochs)

    figure, axis = plt.subplots(figsize=(6.5, 4.6))
    axis.plot(velocities, barrier.to_numpy(), color="gray", linewidth=0.8, zorder=1, label="in spawn-epoch order")
    axis.scatter(velocities[exact], barrier.to_numpy()[exact], zorder=2, label="velocity measured at the spawn epoch")
    if not exact.all():
        axis.scatter(velocities[~exact], barrier.to_numpy()[~exact], facecolors="none", edgecolors="C0", zorder=2,
                     label="velocity interpolated between snapshots")
    for x, y, epoch in zip(velocities, barrier.to_numpy(), spawn_epochs):
        axis.annotate(f"{epoch:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if np.all(velocities > 0):
        axis.set_xscale("log")
    axis.set_xlabel(f"kernel velocity of {spawn_parent} at the spawn epoch (kernel distance per epoch)")
    axis.set_ylabel("test error barrier between children (error rate)")
    axis.set_title("Error barrier against kernel velocity (labels: spawn epoch)")
    axis.legend(fontsize=7)
    figures.save_figure(figure, run_dir, "barrier_vs_velocity")
    return True


def draw_children_kernel(run_dir: str, pair_kernel: pd.DataFrame) -> str:
    """Draws `children_kernel`: the three measures between children against spawn epoch."""
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    for axis, measure in zip(axes, ("kernel_distance", "relu_distance", "centroid_alignment")):
        figures.draw_distance_vs_spawn(axis, pair_kernel, measure, MEASURE_LABELS[measure],
                                       f"Children at the end: {MEASURE_LABELS[measure]}")
    figure.suptitle(f"Children at the end of training against spawn epoch (NTK {_kernel_kinds(pair_kernel)})")
    figures.save_figure(figure, run_dir, "children_kernel")
    return "children_kernel"


def _kernel_kinds(table: pd.DataFrame) -> str:
    if "kernel" not in table.columns:
        return "kind unknown"
    return ", ".join(sorted(str(kind) for kind in table["kernel"].dropna().unique()))
