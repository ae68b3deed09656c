"""Figures of the linearized stage, drawn from its tables only.

`linearized`: error against onset epoch, test and train panels: parent 0's error at the onset,
its final error, the Taylor expansions at their best stopping epoch, the nonlinear network with
the expansion's weights plugged back in, and the low-learning-rate children.

`nonlinear_advantage`: linearized error against low-learning-rate error (above the unity line
the nonlinear network does better), the advantage against onset epoch, and the advantage
against the children's error barrier at the onsets that are also spawn epochs.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tfntk.reporting import figures  # noqa: E402

ORDER_COLORS = {1: "tab:green", 2: "tab:olive"}
LOW_LR_COLOR = "tab:blue"
PARENT_COLOR = "tab:red"
PARENT_FINAL_COLOR = "tab:purple"


def draw(run_dir: str) -> list[str]:
    """Draws every figure of the stage whose tables exist; returns their names."""
    drawn = []
    summary = figures.read_table(run_dir, "linearized")
    if summary is not None and not summary.empty:
        curves = figures.read_table(run_dir, "learning_curves")
        drops = figures.learning_rate_drops(curves) if curves is not None else []
        draw_error_against_onset(run_dir, summary, drops)
        drawn.append("linearized")
    advantage = figures.read_table(run_dir, "nonlinear_advantage")
    if advantage is not None and not advantage.empty:
        draw_nonlinear_advantage(run_dir, advantage)
        drawn.append("nonlinear_advantage")
    return drawn


def _taylor_orders(summary: pd.DataFrame) -> list[int]:
    kinds = summary["kind"].unique()
    return sorted(int(kind.split("_")[-1]) for kind in kinds if kind.startswith("linearized_order_"))


def _series(summary: pd.DataFrame, kind: str, split: str) -> pd.DataFrame:
    rows = summary[(summary["kind"] == kind) & (summary["split"] == split)]
    return rows.sort_values("onset_epoch")


def draw_error_against_onset(run_dir: str, summary: pd.DataFrame, drops: list[float]) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for axis, split in zip(axes, ("test", "train")):
        _draw_split(axis, summary, split, drops)
    figure.suptitle("Taylor-expanded and low-learning-rate training from onset epochs of parent 0")
    figures.save_figure(figure, run_dir, "linearized")


def _draw_split(axis, summary: pd.DataFrame, split: str, drops: list[float]) -> None:
    parent = _series(summary, "parent_at_onset", split)
    axis.plot(parent["onset_epoch"], parent["error"], color=PARENT_COLOR, marker="o", label="parent at onset")

    final = _series(summary, "parent_final", split)
    if not final.empty:
        axis.axhline(float(final["error"].iloc[0]), color=PARENT_FINAL_COLOR, linestyle="--", label="parent, final")

    for order in _taylor_orders(summary):
        color = ORDER_COLORS.get(order, "tab:gray")
        label = "linearized (order 1)" if order == 1 else f"Taylor order {order}"
        taylor = _series(summary, f"linearized_order_{order}", split)
        axis.plot(taylor["onset_epoch"], taylor["error"], color=color, marker="s", label=f"{label}, best stopping")
        plugged = _series(summary, f"plugged_back_order_{order}", split)
        if not plugged.empty:
            axis.plot(plugged["onset_epoch"], plugged["error"], color=color, marker="x", linestyle=":",
                      label=f"network with order-{order} weights plugged back")

    low_lr = _series(summary, "low_lr_nonlinear", split)
    if not low_lr.empty:
        seeds = int(low_lr["seeds"].max())
        axis.errorbar(low_lr["onset_epoch"], low_lr["error"], yerr=low_lr["error_std"], color=LOW_LR_COLOR,
                      marker="^", capsize=3, label=f"low learning rate, final (mean of {seeds})")

    figures.mark_drops(axis, [d for d in drops if d <= summary["onset_epoch"].max()])
    _onset_axis(axis, summary["onset_epoch"])
    axis.set_ylabel(f"{split} error rate")
    axis.set_title(f"{split.capitalize()} error against onset epoch")
    axis.legend(fontsize=7)


def _onset_axis(axis, onset_epochs: pd.Series) -> None:
    """Makes `axis` a symmetric-log onset-epoch axis (linear below 1 epoch) with a tick per onset."""
    ticks = np.unique(onset_epochs.to_numpy(dtype=np.float64))
    axis.set_xscale("symlog", linthresh=1.0)
    axis.set_xticks(ticks)
    axis.set_xticklabels([f"{tick:g}" for tick in ticks], fontsize=7)
    axis.set_xlabel("onset epoch")


def draw_nonlinear_advantage(run_dir: str, advantage: pd.DataFrame) -> None:
    rows = advantage[advantage["linearized_stopping"] == "best"]
    figure, axes = plt.subplots(1, 3, figsize=(17, 5.0), constrained_layout=True)
    for order, order_rows in rows.groupby("order"):
        order_rows = order_rows.sort_values("onset_epoch")
        color = ORDER_COLORS.get(int(order), "tab:gray")
        label = "linearized (order 1)" if int(order) == 1 else f"Taylor order {int(order)}"
        _draw_unity(axes[0], order_rows, color, label)
        axes[1].plot(order_rows["onset_epoch"], order_rows["advantage"], color=color, marker="o", label=label)
        _draw_against_barrier(axes[2], order_rows, color, label)

    axes[1].axhline(0.0, color="black", linewidth=0.8)
    _onset_axis(axes[1], rows["onset_epoch"])
    axes[1].set_ylabel("nonlinear advantage (error rate)")
    axes[1].set_title("Advantage against onset epoch")
    axes[1].legend(fontsize=7)
    figure.suptitle("Nonlinear advantage: linearized minus low-learning-rate test error (best stopping)")
    figures.save_figure(figure, run_dir, "nonlinear_advantage")


def _draw_unity(axis, rows: pd.DataFrame, color: str, label: str) -> None:
    axis.plot(rows["low_lr_error"], rows["linearized_error"], color=color, marker="o", linewidth=0.8, label=label)
    for _, row in rows.iterrows():
        axis.annotate(f"{row['onset_epoch']:g}", (row["low_lr_error"], row["linearized_error"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
    values = np.concatenate([rows["low_lr_error"].to_numpy(), rows["linearized_error"].to_numpy()])
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    axis.plot([low, high], [low, high], color="black", linestyle="--", linewidth=0.8, label="unity")
    axis.set_xlabel("low-learning-rate test error")
    axis.set_ylabel("linearized test error")
    axis.set_title("Linearized against low-learning-rate error\n(labels: onset epoch)")
    axis.legend(fontsize=7)


def _draw_against_barrier(axis, rows: pd.DataFrame, color: str, label: str) -> None:
    rows = rows[np.isfinite(rows["error_barrier"])]
    axis.scatter(rows["error_barrier"], rows["advantage"], color=color, label=label)
    for _, row in rows.iterrows():
        axis.annotate(f"{row['onset_epoch']:g}", (row["error_barrier"], row["advantage"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("test error barrier between children (error rate)")
    axis.set_ylabel("nonlinear advantage (error rate)")
    axis.set_title("Advantage against error barrier\n(labels: onset = spawn epoch)")
    if rows.empty:
        axis.text(0.5, 0.5, "no onset is a spawn epoch\nwith a measured barrier", ha="center", va="center",
                  transform=axis.transAxes, fontsize=8)
    else:
        axis.legend(fontsize=7)
