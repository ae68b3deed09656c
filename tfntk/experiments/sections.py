"""2D sections of the loss landscape through a parent's snapshot and two of its children.

For one spawn epoch the section is the plane in trainable-weight space through three networks:
parent 0 at the spawn step (w_p, the origin) and children 0 and 1 at the end of training (c0 and
c1). Its orthonormal basis comes from Gram-Schmidt on the flattened trainable weights,

    u1 = (c0 - w_p) / |c0 - w_p|,    u2 = the part of (c1 - w_p) orthogonal to u1, normalised,

so the point (a, b) of the section is w_p + a u1 + b u2, with a and b in units of L2 weight
distance. Child 0 lies at (|c0 - w_p|, 0) and child 1 at some b > 0.

On a grid of (a, b) points the stage measures the network's test error and loss, its
function-space distance to child 0, and the test error of two order-1 Taylor models evaluated at
the same weights: the model linearized at the parent (w0 = w_p) and the one linearized at child 0
(w0 = c0), f(x; w0) + J(x; w0) (w - w0). Every snapshot of the parent from the spawn step on
(optionally from step 0) and of both children is projected onto the plane, together with its
distance off the plane, so that the figure can draw their paths.

Batch norm: when the model has batch norm, every network of the section is evaluated with
batch-norm statistics recomputed on a fixed training subset, as for the error barrier. That holds
for each grid point, for child 0 as the reference of the function-space distance, and for the two
expansion points of the Taylor models. Without batch norm every network takes the parent's
non-trainable state at the spawn step. The table column `non_trainable_state` records which.

Work units: every grid row (one value of a) is cached under
`analysis/sections/spawn_<EPOCH>/row_<i>.npz`, the tangent-plane errors in `tangent.npz` and the
projected paths in `paths.npz`, so an interrupted stage resumes where it stopped. A cached unit is
used only when its grid coordinates and settings match the current ones.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Optional, Sequence

import gin
import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from tfntk import storage
from tfntk.autodiff import functional, taylor
from tfntk.autodiff.functional import Weights
from tfntk.data import subsets
from tfntk.experiments import common
from tfntk.measures import basins, evaluation
from tfntk.reporting import sections_figures, tensorboard
from tfntk.training.snapshots import SnapshotStore

MEASURES = (
    "test_error",
    "test_loss",
    "function_space_distance_to_child_0",
    "tangent_error_at_parent",
    "tangent_error_at_child_0",
)
TABLES = ("sections", "section_paths", "section_points")
PATH_ROLES = ("parent", "child_0", "child_1")

_LOG_EVERY_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Plane:
    """The affine plane `origin + a * u1 + b * u2` in flattened trainable-weight space.

    Attributes:
      origin: shape (d,), float64.
      u1, u2: orthonormal directions, shape (d,), float64.
    """

    origin: np.ndarray
    u1: np.ndarray
    u2: np.ndarray

    def point(self, a: float, b: float) -> np.ndarray:
        """Returns the weight vector at plane coordinates (a, b), shape (d,)."""
        return self.origin + a * self.u1 + b * self.u2

    def project(self, vector: np.ndarray) -> tuple[float, float, float]:
        """Returns (a, b, off-plane distance) of a weight vector of shape (d,).

        (a, b) are the coordinates of its orthogonal projection onto the plane and the off-plane
        distance is the L2 norm of what the projection leaves out.
        """
        offset = np.asarray(vector, dtype=np.float64) - self.origin
        a = float(offset @ self.u1)
        b = float(offset @ self.u2)
        residual = offset - a * self.u1 - b * self.u2
        return a, b, float(np.linalg.norm(residual))


def plane_through(origin: np.ndarray, first: np.ndarray, second: np.ndarray) -> Plane:
    """Builds the plane through three weight vectors by Gram-Schmidt.

    Args:
      origin: the vector at (0, 0), shape (d,).
      first: a vector that lands on the positive a axis, shape (d,).
      second: a vector that lands at b > 0, shape (d,).

    Raises:
      ValueError: when the three vectors do not span a plane (first equals origin, or second
        lies on the line through origin and first).
    """
    origin = np.asarray(origin, dtype=np.float64)
    to_first = np.asarray(first, dtype=np.float64) - origin
    to_second = np.asarray(second, dtype=np.float64) - origin
    scale = max(np.linalg.norm(to_first), np.linalg.norm(to_second), 1e-30)

    first_norm = np.linalg.norm(to_first)
    if first_norm <= 1e-9 * scale:
        raise ValueError(
            f"Cannot build a section: the first point is at distance {first_norm:.3g} from the "
            "origin; pass three distinct networks."
        )
    u1 = to_first / first_norm

    orthogonal = to_second - (to_second @ u1) * u1
    orthogonal_norm = np.linalg.norm(orthogonal)
    if orthogonal_norm <= 1e-9 * scale:
        raise ValueError(
            f"Cannot build a section: the second point is {orthogonal_norm:.3g} off the line "
            "through the other two; pass three networks that are not collinear."
        )
    return Plane(origin, u1, orthogonal / orthogonal_norm)


def grid_axes(coordinates: np.ndarray, resolution: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns the grid's a and b values, each of shape (resolution,).

    Each axis spans the points' range on it, widened on both sides by `margin` times that range.

    Args:
      coordinates: (a, b) of the points the grid must contain, shape (p, 2).
      resolution: number of values per axis, at least 2.
      margin: widening as a fraction of each axis' range, at least 0.
    """
    coordinates = np.asarray(coordinates, dtype=np.float64)
    axes = []
    for column in range(2):
        low, high = coordinates[:, column].min(), coordinates[:, column].max()
        span = high - low
        axes.append(np.linspace(low - margin * span, high + margin * span, resolution))
    return axes[0], axes[1]


def tangent_errors(
    base_logits: np.ndarray,
    jvp_u1: np.ndarray,
    jvp_u2: np.ndarray,
    a_offsets: np.ndarray,
    b_offsets: np.ndarray,
    labels: np.ndarray,
) -> np.ndarray:
    """Error rates of an order-1 Taylor model on a grid of displacements in the plane.

    Because the displacement from the expansion point w0 to the grid point is
    `da * u1 + db * u2`, the linearized logits there are `f + da * J u1 + db * J u2`.

    Args:
      base_logits: f(x; w0), shape (n, K).
      jvp_u1, jvp_u2: J(x; w0) u1 and J(x; w0) u2, shape (n, K).
      a_offsets: da values, shape (A,).
      b_offsets: db values, shape (B,).
      labels: integer labels, shape (n,).

    Returns:
      Error rates, shape (A, B).
    """
    errors = np.empty((len(a_offsets), len(b_offsets)))
    b_column = np.asarray(b_offsets, dtype=np.float32)[:, None, None]
    for i, da in enumerate(a_offsets):
        logits = base_logits[None] + np.float32(da) * jvp_u1[None] + b_column * jvp_u2[None]
        errors[i] = np.mean(np.argmax(logits, axis=-1) != labels[None], axis=-1)
    return errors


@dataclasses.dataclass
class _Section:
    """The plane of one spawn epoch, the three networks that span it, and its grid."""

    spawn_step: int
    spawn_epoch: float
    parent_weights: Weights
    plane: Plane
    points: dict  # role -> (run name, step, a, b)
    child_0: np.ndarray
    a_values: np.ndarray
    b_values: np.ndarray


class _Evaluator:
    """Evaluates networks of the section at flattened trainable weights.

    Args:
      model: the architecture.
      template: weights whose shapes, and whose non-trainable state when there is no batch
        norm, every evaluated network takes.
      x_test, y_test: the evaluation inputs (n, ...) and labels (n,).
      batch_norm_x: training inputs for the batch-norm recomputation, or None without batch norm.
    """

    def __init__(self, model, template: Weights, x_test, y_test, batch_norm_x):
        self.model = model
        self.template = template
        self.x_test = x_test
        self.y_test = y_test
        self.batch_norm_x = batch_norm_x

    def weights(self, flat: np.ndarray) -> Weights:
        """Returns the network at `flat` (shape (d,)) with the state it is evaluated with."""
        trainable = functional.unflatten(tf.constant(flat, dtype=tf.float32), self.template.trainable)
        point = Weights(trainable, list(self.template.non_trainable))
        if self.batch_norm_x is not None:
            point = evaluation.recompute_batch_norm_statistics(self.model, point, self.batch_norm_x)
        return point

    def logits(self, flat: np.ndarray) -> np.ndarray:
        """Returns test logits of shape (n, K) at `flat`."""
        return evaluation.logits(self.model, self.weights(flat), self.x_test)


@gin.configurable(module="sections")
def measure(
    job: common.Job,
    spawn_steps: Sequence[int],
    num_children: int,
    *,
    enabled: bool = True,
    validate_only: bool = False,
    spawn_epochs: Optional[Sequence[float]] = None,
    resolution: int = 21,
    margin: float = 0.3,
    test_examples: Optional[int] = None,
    batch_norm_examples: Optional[int] = 1000,
    parent_path_before_spawn: bool = False,
) -> None:
    """Writes the tables `sections`, `section_paths` and `section_points`.

    Tables (long format, one row per value):
      sections: spawn_epoch, a_index, b_index, a, b, measure (one of `MEASURES`), value,
        test_examples, non_trainable_state.
      section_paths: spawn_epoch, role, run, step, epoch, a, b, off_plane_distance.
      section_points: spawn_epoch, point (parent, child_0, child_1), run, step, a, b.
    Coordinates a and b are in L2 weight distance. The stage also writes the section figure of
    every spawn epoch to TensorBoard under parent 0's run, tag `sections/spawn_<EPOCH>`. Existing
    tables are kept when they cover the same spawn epochs, resolution and number of test
    examples; delete them to apply another margin or batch-norm subset.

    Args:
      job: the finished main job.
      spawn_steps: the job's spawn steps.
      num_children: children per spawn epoch; the section uses children 0 and 1.
      enabled: False skips the stage.
      validate_only: check the settings and return before any work (the main job does this
        before training, so a bad setting costs no training time).
      spawn_epochs: spawn epochs to cut sections at, each rounded to the nearest step like the
        main job's spawn epochs and required to be one of `spawn_steps`. None takes the
        earliest and the latest spawn epoch whose children 0 and 1 finished.
      resolution: grid points per axis (resolution x resolution points). With the default 21,
        the quick digits preset (SimpleCNN, 360 test images, two spawn epochs) took 24 s of CPU
        time on a 2-core machine, paths and TensorBoard images included.
      margin: the grid spans the three networks' range on each axis, widened on both sides by
        this fraction of the range.
      test_examples: size of the fixed stratified test subset; None uses the whole test set.
      batch_norm_examples: size of the fixed stratified training subset on which batch-norm
        statistics are recomputed; None uses the whole training set. Unused without batch norm.
      parent_path_before_spawn: also project the parent's snapshots before the spawn step.
    """
    if not enabled:
        logging.info("Sections are disabled; skipping.")
        return
    _validate_settings(resolution, margin, test_examples, batch_norm_examples)
    if validate_only:
        return
    selected = select_spawn_steps(job, spawn_steps, num_children, spawn_epochs)
    if not selected:
        logging.info("Sections: no spawn epoch has two finished children; skipping.")
        return
    x_test, y_test = _test_subset(job, test_examples)
    if _tables_complete(job, selected, resolution, len(y_test)):
        logging.info("Section tables exist for spawn epochs %s; skipping.",
                     [step / job.steps_per_epoch for step in selected])
        return

    started = time.time()
    logging.info("Phase: sections at spawn epochs %s (%d x %d grid)",
                 [round(step / job.steps_per_epoch, 3) for step in selected], resolution, resolution)
    model = job.new_model()
    batch_norm_x = job.train_subset(batch_norm_examples)[0] if evaluation.has_batch_norm(model) else None
    state = (f"batch-norm statistics recomputed on {len(batch_norm_x)} training examples"
             if batch_norm_x is not None else "parent's at the spawn step")

    frames = {name: [] for name in TABLES}
    for spawn_step in selected:
        section = _build_section(job, model, spawn_step, resolution, margin)
        evaluator = _Evaluator(model, section.parent_weights, x_test, y_test, batch_norm_x)
        settings = {"test_examples": len(y_test), "batch_norm_examples": -1 if batch_norm_x is None else len(batch_norm_x)}

        grid = _grid_values(job, section, evaluator, settings)
        grid.update(_tangent_values(job, section, evaluator, settings))
        sections = _sections_frame(section, grid, len(y_test), state)
        paths = _paths_frame(job, model, section, parent_path_before_spawn)
        points = _points_frame(section)
        _write_tensorboard_image(job, section, sections, paths, points)

        frames["sections"].append(sections)
        frames["section_paths"].append(paths)
        frames["section_points"].append(points)

    for name in TABLES:
        storage.write_csv_atomic(job.run.table(name), pd.concat(frames[name], ignore_index=True))
    logging.info("Sections finished in %.1f s", time.time() - started)


def select_spawn_steps(
    job: common.Job, spawn_steps: Sequence[int], num_children: int, spawn_epochs: Optional[Sequence[float]]
) -> list[int]:
    """Returns the spawn steps to cut sections at, or raises ValueError naming a bad setting."""
    if num_children < 2:
        raise ValueError(f"Invalid num_children {num_children}; a section needs children 0 and 1, so use 2 or more.")
    finished = [step for step in sorted(spawn_steps) if _children_finished(job, step)]

    if spawn_epochs is None:
        return sorted({finished[0], finished[-1]}) if finished else []

    selected = []
    for epoch in spawn_epochs:
        step = int(round(float(epoch) * job.steps_per_epoch))
        if step not in spawn_steps:
            available = [round(s / job.steps_per_epoch, 3) for s in sorted(spawn_steps)]
            raise ValueError(
                f"Invalid sections.measure.spawn_epochs entry {epoch}: it is not one of the job's spawn "
                f"epochs {available}; pick from those or add it to main_job.spawn_epochs."
            )
        if step not in finished:
            raise ValueError(
                f"Invalid sections.measure.spawn_epochs entry {epoch}: children 0 and 1 of that spawn "
                "epoch have not finished training; finish the main job first."
            )
        selected.append(step)
    return sorted(set(selected))


def _children_finished(job: common.Job, spawn_step: int) -> bool:
    return all(SnapshotStore(job.child_paths(spawn_step, child)).is_done() for child in (0, 1))


def _validate_settings(resolution, margin, test_examples, batch_norm_examples) -> None:
    if int(resolution) != resolution or resolution < 2:
        raise ValueError(f"Invalid sections.measure.resolution {resolution}; use an integer of 2 or more.")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"Invalid sections.measure.margin {margin}; use a finite fraction of 0 or more.")
    for name, value in (("test_examples", test_examples), ("batch_norm_examples", batch_norm_examples)):
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f"Invalid sections.measure.{name} {value}; use a positive integer or None for all.")


def _tables_complete(job: common.Job, selected: list[int], resolution: int, test_examples: int) -> bool:
    """True when all three tables exist and hold exactly these spawn epochs and grid settings."""
    if not all(storage.exists(job.run.table(name)) for name in TABLES):
        return False
    table = storage.read_csv(job.run.table("sections"))
    expected = {round(step / job.steps_per_epoch, 6) for step in selected}
    present = {round(float(epoch), 6) for epoch in table["spawn_epoch"].unique()}
    same_grid = int(table["a_index"].max()) + 1 == resolution and (table["test_examples"] == test_examples).all()
    return present == expected and same_grid


def _test_subset(job: common.Job, size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    if size is None or size >= len(job.data.y_test):
        return job.data.x_test, job.data.y_test
    indices = subsets.stratified_subset(job.data.y_test, size, seed=job.seed)
    return job.data.x_test[indices], job.data.y_test[indices]


def _flat(weights: Weights) -> np.ndarray:
    return functional.flatten(weights.trainable).numpy().astype(np.float64)


def _build_section(job: common.Job, model: keras.Model, spawn_step: int, resolution: int, margin: float) -> _Section:
    """Loads the parent at the spawn step and the two children's final weights; builds the grid."""
    parent_paths = job.parent_paths(0)
    child_paths = [job.child_paths(spawn_step, child) for child in (0, 1)]
    parent_weights = job.weights_at(model, parent_paths, spawn_step)
    parent = _flat(parent_weights)
    children = [_flat(job.final_weights(model, paths)) for paths in child_paths]
    plane = plane_through(parent, children[0], children[1])

    points = {"parent": (parent_paths.name, spawn_step, 0.0, 0.0)}
    for role, paths, weights in zip(PATH_ROLES[1:], child_paths, children):
        a, b, _ = plane.project(weights)
        final_step = int(SnapshotStore(paths).read()["step"].iloc[-1])
        points[role] = (paths.name, final_step, a, b)

    coordinates = np.array([point[2:] for point in points.values()])
    a_values, b_values = grid_axes(coordinates, resolution, margin)
    return _Section(spawn_step, spawn_step / job.steps_per_epoch, parent_weights, plane, points, children[0],
                    a_values, b_values)


def _unit_path(job: common.Job, section: _Section, name: str) -> str:
    return job.run.analysis(storage.join("sections", f"spawn_{storage.format_epoch(section.spawn_epoch)}", name))


def _load_unit(path: str, expected: dict) -> Optional[dict]:
    """Returns a cached work unit when it exists and was computed with the `expected` arrays."""
    if not storage.exists(path):
        return None
    cached = storage.load_npz(path)
    for key, value in expected.items():
        if key not in cached or np.shape(cached[key]) != np.shape(value) or not np.allclose(cached[key], value, rtol=1e-9, atol=1e-12):
            logging.info("Cached %s was computed with other settings (%s); recomputing it.", path, key)
            return None
    return cached


def _grid_values(job: common.Job, section: _Section, evaluator: _Evaluator, settings: dict) -> dict:
    """Returns test error, test loss and function-space distance to child 0 on the grid, each (A, B)."""
    y = evaluator.y_test
    num_classes = job.data.num_classes
    child_predictions = np.argmax(evaluator.logits(section.child_0), axis=-1)
    names = MEASURES[:3]
    values = {name: np.empty((len(section.a_values), len(section.b_values))) for name in names}

    started = last_log = time.time()
    computed = 0
    for i, a in enumerate(section.a_values):
        path = _unit_path(job, section, f"row_{i:03d}.npz")
        expected = dict(settings, a=a, b_values=section.b_values)
        row = _load_unit(path, expected)
        if row is None:
            row = {name: [] for name in names}
            for b in section.b_values:
                logits = evaluator.logits(section.plane.point(a, b))
                loss, error = evaluation.loss_and_error(logits, y)
                distance = basins.function_space_distance(np.argmax(logits, axis=-1), child_predictions, y, num_classes)
                row["test_loss"].append(loss)
                row["test_error"].append(error)
                row["function_space_distance_to_child_0"].append(distance)
            storage.save_npz_atomic(path, **expected, **{name: np.asarray(row[name]) for name in names})
            computed += 1

        for name in names:
            values[name][i] = row[name]
        if computed and (time.time() - last_log > _LOG_EVERY_SECONDS or i + 1 == len(section.a_values)):
            last_log = time.time()
            rate = computed * len(section.b_values) / (last_log - started)
            logging.info("Sections at spawn epoch %.3f: %d of %d grid rows done (%d computed, %.1f points/s)",
                         section.spawn_epoch, i + 1, len(section.a_values), computed, rate)
    return values


# One traced JVP per model, reused for every expansion point and direction.
_JVP_FNS = weakref.WeakKeyDictionary()


def _jvp_fn(model: keras.Model):
    if model not in _JVP_FNS:

        @tf.function(reduce_retracing=True)
        def call(trainable, non_trainable, tangents, x):
            return taylor.jvp(model, Weights(trainable, non_trainable), tangents, x)

        _JVP_FNS[model] = call
    return _JVP_FNS[model]


def _taylor_terms(evaluator: _Evaluator, expansion_point: Weights, plane: Plane, batch_size: int = 1000):
    """Returns f(x; w0), J(x; w0) u1 and J(x; w0) u2 on the test inputs, each (n, K)."""
    call = _jvp_fn(evaluator.model)
    directions = [functional.unflatten(tf.constant(u, dtype=tf.float32), expansion_point.trainable)
                  for u in (plane.u1, plane.u2)]
    parts = {"f": [], "u1": [], "u2": []}
    for start in range(0, len(evaluator.x_test), batch_size):
        x = tf.constant(evaluator.x_test[start : start + batch_size])
        for key, direction in zip(("u1", "u2"), directions):
            logits, jvp = call(expansion_point.trainable, expansion_point.non_trainable, direction, x)
            parts[key].append(jvp.numpy())
        parts["f"].append(logits.numpy())
    return tuple(np.concatenate(parts[key], axis=0) for key in ("f", "u1", "u2"))


def _tangent_values(job: common.Job, section: _Section, evaluator: _Evaluator, settings: dict) -> dict:
    """Returns the test errors of the Taylor models at the parent and at child 0 on the grid, each (A, B)."""
    path = _unit_path(job, section, "tangent.npz")
    expected = dict(settings, a_values=section.a_values, b_values=section.b_values)
    cached = _load_unit(path, expected)
    if cached is not None:
        return {name: cached[name] for name in MEASURES[3:]}

    values = {}
    expansions = (("tangent_error_at_parent", "parent", section.plane.origin),
                  ("tangent_error_at_child_0", "child_0", section.child_0))
    for name, role, flat in expansions:
        _, _, a0, b0 = section.points[role]
        f, jvp_u1, jvp_u2 = _taylor_terms(evaluator, evaluator.weights(flat), section.plane)
        values[name] = tangent_errors(f, jvp_u1, jvp_u2, section.a_values - a0, section.b_values - b0, evaluator.y_test)
    storage.save_npz_atomic(path, **expected, **values)
    return values


def _sections_frame(section: _Section, values: dict, test_examples: int, state: str) -> pd.DataFrame:
    a_index, b_index = np.meshgrid(np.arange(len(section.a_values)), np.arange(len(section.b_values)), indexing="ij")
    frames = []
    for name in MEASURES:
        frames.append(pd.DataFrame({
            "spawn_epoch": section.spawn_epoch,
            "a_index": a_index.ravel(),
            "b_index": b_index.ravel(),
            "a": section.a_values[a_index.ravel()],
            "b": section.b_values[b_index.ravel()],
            "measure": name,
            "value": np.asarray(values[name]).ravel(),
            "test_examples": test_examples,
            "non_trainable_state": state,
        }))
    return pd.concat(frames, ignore_index=True)


def _paths_frame(job: common.Job, model: keras.Model, section: _Section, before_spawn: bool) -> pd.DataFrame:
    """Projects the snapshots of the parent and of children 0 and 1 onto the plane (cached)."""
    runs = [("parent", job.parent_paths(0), 0 if before_spawn else section.spawn_step)]
    runs += [(f"child_{child}", job.child_paths(section.spawn_step, child), section.spawn_step) for child in (0, 1)]
    first_steps = np.array([first for _, _, first in runs])

    path = _unit_path(job, section, "paths.npz")
    cached = _load_unit(path, {"first_steps": first_steps})
    if cached is not None:
        frame = pd.DataFrame({column: cached[column] for column in _PATH_COLUMNS[1:]})
        frame.insert(0, "spawn_epoch", section.spawn_epoch)
        return frame

    rows = []
    for role, paths, first_step in runs:
        snapshots = SnapshotStore(paths).read()
        for step, epoch in zip(snapshots["step"], snapshots["epoch"]):
            if step < first_step:
                continue
            a, b, off_plane = section.plane.project(_flat(job.weights_at(model, paths, int(step))))
            rows.append(dict(spawn_epoch=section.spawn_epoch, role=role, run=paths.name, step=int(step),
                             epoch=float(epoch), a=a, b=b, off_plane_distance=off_plane))
    frame = pd.DataFrame(rows, columns=_PATH_COLUMNS)

    arrays = {column: frame[column].to_numpy() for column in _PATH_COLUMNS[1:]}
    arrays["role"] = arrays["role"].astype(str)
    arrays["run"] = arrays["run"].astype(str)
    storage.save_npz_atomic(path, first_steps=first_steps, **arrays)
    return frame


_PATH_COLUMNS = ["spawn_epoch", "role", "run", "step", "epoch", "a", "b", "off_plane_distance"]


def _points_frame(section: _Section) -> pd.DataFrame:
    rows = [dict(spawn_epoch=section.spawn_epoch, point=role, run=run, step=step, a=a, b=b)
            for role, (run, step, a, b) in section.points.items()]
    return pd.DataFrame(rows)


def _write_tensorboard_image(job, section, sections, paths, points) -> None:
    figure = sections_figures.section_figure(sections, paths, points, section.spawn_epoch)
    png = tensorboard.figure_to_png(figure)
    sections_figures.close(figure)
    tag = f"sections/spawn_{storage.format_epoch(section.spawn_epoch)}"
    tensorboard.write_image(job.run.root, job.parent_paths(0).name, tag, png, step=section.spawn_step)
