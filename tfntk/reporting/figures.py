"""Figures of the main job, drawn from `tables/*.csv` only (no model is rebuilt).

Every figure is written as PNG and PDF under `figures/`.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from absl import logging  # noqa: E402

from tfntk import storage  # noqa: E402


def read_table(run_dir: str, name: str):
    """Returns `tables/<name>.csv` as a DataFrame, or None when the table was not written."""
    path = storage.RunDir(run_dir).table(name)
    return storage.read_csv(path) if storage.exists(path) else None


def save_figure(figure, run_dir: str, name: str) -> None:
    run = storage.RunDir(run_dir)
    for extension in ("png", "pdf"):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=extension, dpi=150, bbox_inches="tight")
        storage.write_bytes_atomic(run.figure(name, extension), buffer.getvalue())
    plt.close(figure)
    logging.info("Wrote figure %s", run.figure(name))


def learning_rate_drops(curves: pd.DataFrame) -> list[float]:
    """Epochs at which parent 0's learning rate decreases, read from its learning curve."""
    parent = curves[(curves["role"] == "parent") & (curves["index"] == 0)].sort_values("epoch")
    rates = parent["learning_rate"].to_numpy()
    epochs = parent["epoch"].to_numpy()
    return [float(epochs[i]) for i in range(1, len(rates)) if rates[i] < rates[i - 1] * (1 - 1e-9)]


def mark_drops(axis, drops, orientation: str = "vertical") -> None:
    for index, epoch in enumerate(drops):
        label = "learning-rate drop" if index == 0 else None
        if orientation in ("vertical", "both"):
            axis.axvline(epoch, color="black", linestyle="--", linewidth=0.8, label=label)
        if orientation == "both":
            axis.axhline(epoch, color="black", linestyle="--", linewidth=0.8)


def format_spawn_axis(axis, epochs) -> None:
    """Symmetric-log x axis (linear below 1 epoch) with a tick at every spawn epoch."""
    epochs = sorted({float(e) for e in epochs if np.isfinite(e)})
    axis.set_xscale("symlog", linthresh=1.0)
    if epochs:
        axis.set_xticks(epochs)
        axis.set_xticklabels([f"{e:g}" if e >= 1 or e == 0 else f"{e:.2g}" for e in epochs], fontsize=7)
        axis.minorticks_off()
    axis.set_xlabel("spawn epoch")


def draw_learning_curves(axis, curves: pd.DataFrame) -> None:
    for index, parent in curves[curves["role"] == "parent"].groupby("index"):
        parent = parent.sort_values("epoch")
        axis.plot(parent["epoch"], parent["test_error"], label=f"parent {index} test", linewidth=1.5)
        axis.plot(parent["epoch"], parent["train_error"], label=f"parent {index} train", linewidth=1.0, linestyle=":")
    mark_drops(axis, learning_rate_drops(curves))
    axis.set_xlabel("epoch")
    axis.set_ylabel("error rate")
    axis.set_title("Parent learning curves")
    axis.legend(fontsize=7)


def draw_barrier_vs_spawn(axis, barriers: pd.DataFrame) -> None:
    children = barriers[barriers["pair"] == "children"]
    parents = barriers[barriers["pair"] == "parents"]
    for split, marker in (("test", "o"), ("train", "s")):
        rows = children[children["split"] == split].groupby("spawn_epoch")["barrier"].mean()
        line = axis.plot(rows.index, rows.values, marker=marker, label=f"children, {split}")
        level = parents[parents["split"] == split]["barrier"]
        if not level.empty:
            axis.axhline(float(level.mean()), color=line[0].get_color(), linestyle=":", label=f"independent parents, {split}")
    format_spawn_axis(axis, children["spawn_epoch"])
    axis.set_ylabel("error barrier (error rate)")
    axis.set_title("Error barrier between children at the end")
    axis.legend(fontsize=7)


def draw_distance_vs_spawn(axis, distances: pd.DataFrame, measure: str, ylabel: str, title: str) -> None:
    rows = distances[distances["measure"] == measure]
    children = rows[rows["pair"] == "children"].groupby("spawn_epoch")["value"].mean()
    parents = rows[rows["pair"] == "parents"]["value"]
    axis.plot(children.index, children.values, marker="o", label="children")
    if not parents.empty:
        axis.axhline(float(parents.mean()), color="gray", linestyle=":", label="independent parents")
    format_spawn_axis(axis, children.index)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=7)


def draw_basin_fate(run_dir: str) -> bool:
    """Learning curves, error barrier and child distances against spawn epoch; False if no data."""
    curves = read_table(run_dir, "learning_curves")
    barriers = read_table(run_dir, "error_barrier")
    distances = read_table(run_dir, "pair_distance")
    if curves is None or barriers is None or distances is None:
        return False
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.4), layout="constrained")
    draw_learning_curves(axes[0], curves)
    draw_barrier_vs_spawn(axes[1], barriers)
    draw_distance_vs_spawn(axes[2], distances, "function_space_distance",
                           "function-space distance (1 = independent errors)", "Children: function-space distance")
    draw_distance_vs_spawn(axes[3], distances, "weight_l2_distance", "L2 weight distance", "Children: weight distance")
    figure.suptitle("Basin fate: how early do children end in the same basin?")
    save_figure(figure, run_dir, "basin_fate")
    return True


# Modules under tfntk.reporting with a `draw(run_dir) -> list[str]` for one measurement stage.
STAGE_FIGURE_MODULES = (
    "motion_figures", "kernel_figures", "curvature_figures", "linearized_figures", "sections_figures",
)


def draw_all(run_dir: str) -> list[str]:
    """Draws every figure whose tables exist; returns their names."""
    # pylint: disable=import-outside-toplevel
    import importlib

    from tfntk.reporting import integrated

    drawn = []
    for name, draw in (("basin_fate", draw_basin_fate), ("integrated", integrated.draw_integrated),
                       ("appendix", integrated.draw_appendix)):
        if draw(run_dir):
            drawn.append(name)
    for module_name in STAGE_FIGURE_MODULES:
        module = importlib.import_module(f"tfntk.reporting.{module_name}")
        drawn.extend(module.draw(run_dir))
    return drawn
