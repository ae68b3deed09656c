"""The integrated multi-panel figure of learning (Figures 2 to 4 of Fort et al., 2020) and the
appendix panels, drawn from tables only."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from tfntk.reporting import figures


def heatmap_matrix(pairs: pd.DataFrame, run: str, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (epochs (S,), symmetric matrix (S, S)) of `measure` between snapshots of `run`."""
    rows = pairs[(pairs["run"] == run) & (pairs["measure"] == measure)]
    epochs = np.unique(np.concatenate([rows["epoch_a"].to_numpy(), rows["epoch_b"].to_numpy()]))
    index = {epoch: i for i, epoch in enumerate(epochs)}
    matrix = np.full((len(epochs), len(epochs)), np.nan)
    for epoch_a, epoch_b, value in zip(rows["epoch_a"], rows["epoch_b"], rows["value"]):
        matrix[index[epoch_a], index[epoch_b]] = value
        matrix[index[epoch_b], index[epoch_a]] = value
    diagonal = 1.0 if measure == "centroid_alignment" else 0.0
    np.fill_diagonal(matrix, np.where(np.isnan(np.diag(matrix)), diagonal, np.diag(matrix)))
    return epochs, matrix


def draw_heatmap(axis, pairs: pd.DataFrame, run: str, measure: str, title: str, drops) -> None:
    """Draws a snapshot-by-snapshot heatmap on epoch axes, learning-rate drops dashed."""
    epochs, matrix = heatmap_matrix(pairs, run, measure)
    if len(epochs) == 0:
        axis.set_visible(False)
        return
    edges = np.concatenate([[epochs[0]], 0.5 * (epochs[1:] + epochs[:-1]), [epochs[-1]]])
    mesh = axis.pcolormesh(edges, edges, matrix, cmap="viridis", shading="flat")
    plt.colorbar(mesh, ax=axis, label=measure.replace("_", " "))
    figures.mark_drops(axis, drops, orientation="both")
    axis.set_xlabel("epoch")
    axis.set_ylabel("epoch")
    axis.set_title(title)


def _children_vs_spawn(axis, table: pd.DataFrame, measure: str, label: str, marker: str) -> None:
    rows = table[(table["measure"] == measure) & (table["pair"] == "children")]
    by_spawn = rows.groupby("spawn_epoch")["value"].mean()
    line = axis.plot(by_spawn.index, by_spawn.values, marker=marker, label=f"{label}, children")
    parents = table[(table["measure"] == measure) & (table["pair"] == "parents")]["value"]
    if not parents.empty:
        axis.axhline(float(parents.mean()), color=line[0].get_color(), linestyle=":", label=f"{label}, independent parents")


def draw_integrated(run_dir: str) -> bool:
    """Panels A to E: learning curves, error barrier, ReLU and kernel heatmaps, child distances."""
    curves = figures.read_table(run_dir, "learning_curves")
    barriers = figures.read_table(run_dir, "error_barrier")
    distances = figures.read_table(run_dir, "pair_distance")
    pairs = figures.read_table(run_dir, "snapshot_pairs")
    kernel = figures.read_table(run_dir, "pair_kernel")
    if any(table is None for table in (curves, barriers, distances, pairs, kernel)):
        return False
    drops = figures.learning_rate_drops(curves)
    figure, axes = plt.subplots(1, 5, figsize=(28, 4.8), layout="constrained")
    figures.draw_learning_curves(axes[0], curves)
    axes[0].set_title("(A) Parent learning curves")
    figures.draw_barrier_vs_spawn(axes[1], barriers)
    axes[1].set_title("(B) Error barrier between children")
    draw_heatmap(axes[2], pairs, "parent_0", "relu_distance", "(C) ReLU activation distance, parent 0", drops)
    draw_heatmap(axes[3], pairs, "parent_0", "kernel_distance", "(D) Kernel distance, parent 0", drops)
    combined = pd.concat([distances, kernel], ignore_index=True)
    for measure, label, marker in (("relu_distance", "ReLU", "s"), ("function_space_distance", "function space", "o"),
                                   ("kernel_distance", "kernel", "^")):
        _children_vs_spawn(axes[4], combined, measure, label, marker)
    figures.format_spawn_axis(axes[4], combined["spawn_epoch"])
    axes[4].set_ylabel("distance between children at the end")
    axes[4].set_title("(E) Child distances against spawn epoch")
    axes[4].legend(fontsize=7)
    figure.suptitle("An integrated view of learning")
    figures.save_figure(figure, run_dir, "integrated")
    return True


def draw_appendix(run_dir: str) -> bool:
    """Top Hessian eigenvalue against 2 / lr, centroid alignment and weight distance."""
    hessian = figures.read_table(run_dir, "hessian")
    kernel = figures.read_table(run_dir, "pair_kernel")
    distances = figures.read_table(run_dir, "pair_distance")
    curves = figures.read_table(run_dir, "learning_curves")
    if hessian is None or kernel is None or distances is None or curves is None:
        return False
    figure, axes = plt.subplots(1, 3, figsize=(17, 4.4), layout="constrained")

    top = hessian[(hessian["index"] == 0)]
    for run, rows in top.groupby("run"):
        rows = rows.sort_values("epoch")
        axes[0].plot(rows["epoch"], rows["eigenvalue"], marker="o", label=f"top eigenvalue, {run}")
        axes[0].plot(rows["epoch"], rows["two_over_lr"], linestyle="--", color="gray", drawstyle="steps-post",
                     label="2 / learning rate")
    figures.mark_drops(axes[0], figures.learning_rate_drops(curves))
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("eigenvalue of the training-loss Hessian")
    axes[0].set_title("Top Hessian eigenvalue against 2 / lr")
    axes[0].legend(fontsize=7)

    _children_vs_spawn(axes[1], kernel, "centroid_alignment", "centroid alignment", "o")
    figures.format_spawn_axis(axes[1], kernel["spawn_epoch"])
    axes[1].set_ylabel("mean cosine similarity of class centroids")
    axes[1].set_title("Logit gradient centroid alignment")
    axes[1].legend(fontsize=7)

    _children_vs_spawn(axes[2], distances, "weight_l2_distance", "L2 weight distance", "o")
    figures.format_spawn_axis(axes[2], distances["spawn_epoch"])
    axes[2].set_ylabel("L2 distance between weights")
    axes[2].set_title("Weight distance between children")
    axes[2].legend(fontsize=7)
    figures.save_figure(figure, run_dir, "appendix")
    return True
