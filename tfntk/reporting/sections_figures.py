"""Figures of the loss-landscape sections, drawn from the tables `sections`, `section_paths` and
`section_points` only (no model is rebuilt).

There is one figure `sections_<EPOCH>` per spawn epoch with four contour maps: the test error, the
function-space distance to child 0, and the test errors of the order-1 Taylor models linearized
at the parent and at child 0. Each map marks the three networks that span the plane and draws the
training paths of the parent and both children projected onto it.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tfntk import storage  # noqa: E402
from tfntk.reporting import figures  # noqa: E402

# (measure, panel title, colour-bar label)
PANELS = (
    ("test_error", "Network: test error", "test error rate"),
    ("function_space_distance_to_child_0", "Network: function-space distance to child 0",
     "function-space distance (1 = independent errors)"),
    ("tangent_error_at_parent", "Order-1 Taylor model at the parent: test error", "test error rate"),
    ("tangent_error_at_child_0", "Order-1 Taylor model at child 0: test error", "test error rate"),
)
ERROR_MEASURES = ("test_error", "tangent_error_at_parent", "tangent_error_at_child_0")

# (colour, marker, label) of the three networks and of their paths.
STYLES = {
    "parent": ("black", "*", "parent 0"),
    "child_0": ("tab:blue", "o", "child 0"),
    "child_1": ("tab:orange", "o", "child 1"),
}
A_LABEL = "direction to child 0 (L2 weight distance)"
B_LABEL = "orthogonal direction toward child 1 (L2 weight distance)"


def grid_values(sections: pd.DataFrame, spawn_epoch: float, measure: str):
    """Returns (a values (A,), b values (B,), values (A, B)) of one measure at one spawn epoch."""
    rows = sections[np.isclose(sections["spawn_epoch"], spawn_epoch) & (sections["measure"] == measure)]
    a_values = rows.groupby("a_index")["a"].first().sort_index().to_numpy()
    b_values = rows.groupby("b_index")["b"].first().sort_index().to_numpy()
    values = np.full((len(a_values), len(b_values)), np.nan)
    values[rows["a_index"].to_numpy(), rows["b_index"].to_numpy()] = rows["value"].to_numpy()
    return a_values, b_values, values


def _levels(maximum: float) -> np.ndarray:
    """Returns about 20 contour levels from 0 to a round number at or above `maximum`."""
    top = maximum if np.isfinite(maximum) and maximum > 0 else 1.0
    step = ticker.MaxNLocator(5).tick_values(0.0, top)[1] / 4
    return np.arange(0.0, top + step, step)


def _draw_paths(axis, paths: pd.DataFrame, points: pd.DataFrame, with_labels: bool) -> None:
    for role, (colour, marker, name) in STYLES.items():
        run_path = paths[paths["role"] == role].sort_values("step")
        if not run_path.empty:
            off_plane = float(run_path["off_plane_distance"].iloc[-1])
            label = f"{name} path (last snapshot {off_plane:.2f} off the plane)" if with_labels else None
            axis.plot(run_path["a"], run_path["b"], color=colour, linewidth=1.0, marker=".", markersize=3, label=label)

        point = points[points["point"] == role]
        if not point.empty:
            where = "at the spawn step" if role == "parent" else "at the end"
            axis.plot(point["a"], point["b"], linestyle="none", marker=marker, markersize=12 if marker == "*" else 8,
                      markerfacecolor=colour, markeredgecolor="white", label=f"{name} {where}" if with_labels else None)


def section_figure(sections: pd.DataFrame, paths: pd.DataFrame, points: pd.DataFrame, spawn_epoch: float):
    """Draws the four contour panels of one spawn epoch's section and returns the figure."""
    paths = paths[np.isclose(paths["spawn_epoch"], spawn_epoch)]
    points = points[np.isclose(points["spawn_epoch"], spawn_epoch)]
    rows = sections[np.isclose(sections["spawn_epoch"], spawn_epoch)]
    error_max = float(np.nanmax(rows[rows["measure"].isin(ERROR_MEASURES)]["value"].to_numpy(dtype=float)))

    figure, axes = plt.subplots(2, 2, figsize=(12.5, 11.0), layout="constrained")
    axes = axes.ravel()
    for index, (axis, (measure, title, unit)) in enumerate(zip(axes, PANELS)):
        a_values, b_values, values = grid_values(sections, spawn_epoch, measure)
        if measure in ERROR_MEASURES:
            maximum = error_max
        else:
            maximum = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        contours = axis.contourf(a_values, b_values, values.T, levels=_levels(maximum), cmap="viridis", extend="max")
        figure.colorbar(contours, ax=axis, label=unit, ticks=ticker.MaxNLocator(6))

        _draw_paths(axis, paths, points, with_labels=index == 0)
        axis.set_xlim(a_values[0], a_values[-1])
        axis.set_ylim(b_values[0], b_values[-1])
        axis.set_aspect("equal", adjustable="box")
        axis.set_xlabel(A_LABEL)
        axis.set_ylabel(B_LABEL)
        axis.set_title(title, fontsize=10)

    state = rows["non_trainable_state"].iloc[0] if "non_trainable_state" in rows and not rows.empty else "unknown"
    examples = int(rows["test_examples"].iloc[0]) if "test_examples" in rows and not rows.empty else 0
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=9)
    figure.suptitle(
        f"Section through parent 0 at spawn epoch {spawn_epoch:.3f} and children 0 and 1 at the end\n"
        f"{examples} test examples; non-trainable state: {state}",
        fontsize=11,
    )
    return figure


def close(figure) -> None:
    plt.close(figure)


def draw(run_dir: str) -> list[str]:
    """Draws `sections_<EPOCH>` for every spawn epoch in the tables and returns the figure names."""
    sections = figures.read_table(run_dir, "sections")
    paths = figures.read_table(run_dir, "section_paths")
    points = figures.read_table(run_dir, "section_points")
    if sections is None or paths is None or points is None:
        return []

    names = []
    for spawn_epoch in sorted(sections["spawn_epoch"].unique()):
        name = f"sections_{storage.format_epoch(spawn_epoch)}"
        figures.save_figure(section_figure(sections, paths, points, float(spawn_epoch)), run_dir, name)
        names.append(name)
    return names
