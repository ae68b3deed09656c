"""Figures of the motion stage, drawn from `tables/*.csv` only (no model is rebuilt).

- `children_over_time`: function-space distance and error barrier between children against
  epoch, one colour per spawn epoch, raw (thin) and moving-averaged (thick), with the two
  independent parents for reference.
- `final_child_distance`: final child distance against spawn epoch with its spread over the last
  snapshots, and against the final test error barrier.
- `tsne`: the common t-SNE embedding, one panel per highlighted run or child pair.
"""

from __future__ import annotations

import gin
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tfntk.reporting import figures  # noqa: E402

PARENTS_COLOUR = "black"
BACKGROUND_COLOUR = "0.85"
OVER_TIME_PANELS = (
    ("function_space_distance", "function-space distance (1 = independent errors)", "Function-space distance"),
    ("error_barrier", "test error barrier (error rate)", "Error barrier"),
)


def moving_average(epochs: np.ndarray, values: np.ndarray, half_width_epochs: float) -> np.ndarray:
    """Averages, at each point, the finite values within `half_width_epochs` of its epoch.

    Args:
      epochs: shape (n,), in epochs; need not be evenly spaced.
      values: shape (n,); NaN values are left out of every average.
      half_width_epochs: W of the window [epoch - W, epoch + W]; 0 returns the values.

    Returns:
      Shape (n,); NaN where the window contains no finite value.
    """
    epochs = np.asarray(epochs, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    inside = np.abs(epochs[:, None] - epochs[None, :]) <= half_width_epochs + 1e-12
    finite = np.isfinite(values)[None, :]
    weights = (inside & finite).astype(np.float64)
    counts = weights.sum(axis=1)
    sums = (weights * np.where(np.isfinite(values), values, 0.0)[None, :]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _spawn_colours(spawn_epochs) -> dict:
    palette = plt.get_cmap("viridis")
    spawn_epochs = sorted(spawn_epochs)
    positions = np.linspace(0.0, 0.9, max(len(spawn_epochs), 1))
    return {epoch: palette(position) for epoch, position in zip(spawn_epochs, positions)}


def _pair_mean_curve(rows: pd.DataFrame) -> pd.DataFrame:
    """Averages the pairs of one group at each step: columns epoch, value."""
    return rows.groupby("step", as_index=False).agg(epoch=("epoch", "first"), value=("value", "mean"))


def draw_over_time_panel(axis, over_time: pd.DataFrame, measure: str, half_width_epochs: float, drops) -> None:
    rows = over_time[over_time["measure"] == measure]
    children = rows[rows["pair"] == "children"]
    colours = _spawn_colours(children["spawn_epoch"].unique())
    curves = [(f"spawn epoch {epoch:.3g}", colours[epoch], group) for epoch, group in children.groupby("spawn_epoch")]
    parents = rows[rows["pair"] == "parents"]
    if not parents.empty:
        curves.append(("independent parents", PARENTS_COLOUR, parents))

    for label, colour, group in curves:
        curve = _pair_mean_curve(group)
        axis.plot(curve["epoch"], curve["value"], color=colour, linewidth=0.7, alpha=0.35)
        smoothed = moving_average(curve["epoch"], curve["value"], half_width_epochs)
        axis.plot(curve["epoch"], smoothed, color=colour, linewidth=2.0, label=label)
    figures.mark_drops(axis, drops)
    axis.set_xlabel("epoch")


def draw_children_over_time(run_dir: str, half_width_epochs: float) -> bool:
    """Draws the children's distances against epoch; returns False if the table is missing."""
    over_time = figures.read_table(run_dir, "children_over_time")
    if over_time is None:
        return False
    curves = figures.read_table(run_dir, "learning_curves")
    drops = figures.learning_rate_drops(curves) if curves is not None else []

    figure, axes = plt.subplots(1, len(OVER_TIME_PANELS), figsize=(6.5 * len(OVER_TIME_PANELS), 4.2))
    for axis, (measure, ylabel, title) in zip(axes, OVER_TIME_PANELS):
        draw_over_time_panel(axis, over_time, measure, half_width_epochs, drops)
        axis.set_ylabel(ylabel)
        axis.set_title(f"{title} between children")
        axis.legend(fontsize=7)
    figure.suptitle(f"Children over training: thin raw, thick moving average over +-{half_width_epochs:g} epochs")
    figures.save_figure(figure, run_dir, "children_over_time")
    return True


def pooled_spread(final: pd.DataFrame) -> pd.DataFrame:
    """Pools the pairs of each spawn epoch: columns spawn_epoch, mean, std.

    The mean is the mean of the pairs' means and the standard deviation is the population
    standard deviation of all the pooled values, `sqrt(mean(std^2) + var(means))`, which is
    exact when every pair averages the same number of snapshots.
    """
    rows = []
    for spawn_epoch, group in final.groupby("spawn_epoch"):
        means = group["mean"].to_numpy(dtype=np.float64)
        stds = group["std"].to_numpy(dtype=np.float64)
        rows.append({"spawn_epoch": spawn_epoch, "mean": float(np.mean(means)),
                     "std": float(np.sqrt(np.mean(stds**2) + np.var(means)))})
    return pd.DataFrame(rows, columns=["spawn_epoch", "mean", "std"])


def draw_distance_vs_spawn(axis, distances: pd.DataFrame) -> None:
    children = pooled_spread(distances[distances["pair"] == "children"])
    axis.errorbar(children["spawn_epoch"], children["mean"], yerr=children["std"], marker="o", capsize=3,
                  color="tab:red", label="children")
    parents = distances[distances["pair"] == "parents"]
    if not parents.empty:
        level = float(parents["mean"].mean())
        spread = float(parents["std"].mean())
        axis.axhline(level, color="tab:purple", linestyle="--", label="independent parents")
        axis.axhspan(level - spread, level + spread, color="tab:purple", alpha=0.15)
    axis.set_xscale("symlog", linthresh=1.0)
    axis.set_xticks(children["spawn_epoch"], [f"{epoch:.3g}" for epoch in children["spawn_epoch"]])
    axis.set_xlabel("spawn epoch (symmetric log scale)")
    axis.set_ylabel("final function-space distance")
    axis.set_title("Final child distance against spawn epoch")
    axis.legend(fontsize=7)


def draw_distance_vs_barrier(axis, distances: pd.DataFrame) -> None:
    joined = distances.dropna(subset=["final_test_error_barrier"])
    if joined.empty:
        axis.text(0.5, 0.5, "no final error barrier table", ha="center", va="center", transform=axis.transAxes)
    children = joined[joined["pair"] == "children"]
    colours = _spawn_colours(children["spawn_epoch"].unique())
    for spawn_epoch, group in children.groupby("spawn_epoch"):
        axis.errorbar(group["final_test_error_barrier"], group["mean"], yerr=group["std"], marker="o", capsize=3,
                      linestyle="none", color=colours[spawn_epoch], label=f"children, spawn epoch {spawn_epoch:.3g}")
    parents = joined[joined["pair"] == "parents"]
    if not parents.empty:
        axis.errorbar(parents["final_test_error_barrier"], parents["mean"], yerr=parents["std"], marker="s",
                      capsize=3, linestyle="none", color="tab:purple", label="independent parents")
    axis.set_xlabel("final test error barrier (error rate)")
    axis.set_ylabel("final function-space distance")
    axis.set_title("Final child distance against error barrier")
    if not joined.empty:
        axis.legend(fontsize=7)


def draw_final_child_distance(run_dir: str) -> bool:
    """Draws the final distance against spawn epoch and error barrier; returns False if the table is missing."""
    final = figures.read_table(run_dir, "final_child_distance")
    if final is None:
        return False
    distances = final[final["measure"] == "function_space_distance"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    draw_distance_vs_spawn(axes[0], distances)
    draw_distance_vs_barrier(axes[1], distances)
    count = int(final["last_snapshots"].iloc[0]) if "last_snapshots" in final else 0
    figure.suptitle(f"Final function-space distance; error bars: std over the last {count} snapshots")
    figures.save_figure(figure, run_dir, "final_child_distance")
    return True


def tsne_highlights(tsne: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """Returns (panel title, run names): parent 0, parent 1 and the children of an early, middle and late spawn epoch."""
    panels = []
    for run, group in tsne[tsne["role"] == "parent"].groupby("run"):
        panels.append((f"parent {int(group['index'].iloc[0])}", [run]))
    children = tsne[tsne["role"] == "child"]
    spawn_epochs = sorted(children["spawn_epoch"].unique())
    if spawn_epochs:
        chosen = sorted({0, len(spawn_epochs) // 2, len(spawn_epochs) - 1})
        for position in chosen:
            epoch = spawn_epochs[position]
            runs = children[children["spawn_epoch"] == epoch].sort_values("index")["run"].unique()[:2]
            panels.append((f"children spawned at epoch {epoch:.3g}", list(runs)))
    return panels


def draw_tsne_panel(axis, tsne: pd.DataFrame, title: str, runs: list[str], norm):
    """Draws every point in grey and the paths of `runs` coloured by epoch; returns the colour scatter."""
    axis.scatter(tsne["x"], tsne["y"], s=5, color=BACKGROUND_COLOUR)
    scatter = None
    for position, run in enumerate(runs):
        points = tsne[tsne["run"] == run].sort_values("step")
        path_label = f"child {int(points['index'].iloc[0])}" if len(runs) > 1 else None
        axis.plot(points["x"], points["y"], color="0.35", linewidth=0.7, linestyle=("-", "--")[position % 2],
                  label=path_label)
        scatter = axis.scatter(points["x"], points["y"], c=points["epoch"], cmap="viridis", norm=norm, s=14)
        axis.scatter(points["x"].iloc[:1], points["y"].iloc[:1], marker="o", s=60, facecolors="none",
                     edgecolors="black", label="start" if position == 0 else None)
        axis.scatter(points["x"].iloc[-1:], points["y"].iloc[-1:], marker="*", s=120, color="tab:red",
                     edgecolors="black", label="end" if position == 0 else None)

    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_xlabel("t-SNE 1")
    axis.set_ylabel("t-SNE 2")
    axis.legend(fontsize=7, loc="best")
    return scatter


def draw_tsne(run_dir: str) -> bool:
    """Draws a row of panels of the common t-SNE embedding; returns False if the table is missing."""
    tsne = figures.read_table(run_dir, "tsne")
    if tsne is None:
        return False
    panels = tsne_highlights(tsne)
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=float(tsne["epoch"].max()))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)

    scatters = [draw_tsne_panel(axis, tsne, title, runs, norm) for axis, (title, runs) in zip(axes[0], panels)]
    if any(scatter is not None for scatter in scatters):
        colour_scale = matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis")
        figure.colorbar(colour_scale, ax=axes[0].tolist(), label="epoch", fraction=0.02)
    perplexity = float(tsne["perplexity"].iloc[0]) if "perplexity" in tsne else float("nan")
    figure.suptitle(f"Test-set class probabilities in one t-SNE embedding (perplexity {perplexity:.3g}); "
                    "grey: all other snapshots")
    figures.save_figure(figure, run_dir, "tsne")
    return True


@gin.configurable(module="motion_figures")
def draw(run_dir: str, smoothing_epochs: float = 1.0) -> list[str]:
    """Draws every motion figure whose table exists; returns their names.

    Args:
      run_dir: the run directory.
      smoothing_epochs: half-width W, in epochs, of the moving average over [epoch - W, epoch + W]
        in `children_over_time`. 1 suits the 10-epoch quick preset; a 160-epoch run reads
        better with about 5.
    """
    if smoothing_epochs < 0:
        raise ValueError(f"Invalid motion_figures.draw.smoothing_epochs {smoothing_epochs}; use 0 or more.")
    drawn = []
    for name, draw_one in (
        ("children_over_time", lambda: draw_children_over_time(run_dir, smoothing_epochs)),
        ("final_child_distance", lambda: draw_final_child_distance(run_dir)),
        ("tsne", lambda: draw_tsne(run_dir)),
    ):
        if draw_one():
            drawn.append(name)
    return drawn
