"""Curvature stage: top Hessian eigenvalues and the escape threshold over a parent's training.

For each selected snapshot of each selected parent, the stage measures, on a fixed stratified
subset of the training set:

  - the top-k eigenvalues of the Hessian of the mean training loss, with their residual norms
    `|H v - lambda v|`, and `2 / lr`, the largest top eigenvalue for which full-batch gradient
    descent at learning rate lr stays inside a quadratic basin;
  - the escape threshold `T = (lr <D, H D> - 2 <D, g>) / |g|^2` of plain SGD steps D, one per
    minibatch of the training batch size drawn from the same subset, g the subset's gradient;
  - its gradient-descent form `lr * lambda_max - 2`.

Both escape thresholds follow `tfntk.measures.escape`: positive means the second-order model
predicts that the step raises the loss (it leaves the basin), negative that it descends. The
form `2 - lr * lambda_max`, as some texts write it, is the negation of the column here.

The loss is the mean cross-entropy over the subset, with the training run's L2 penalty
`0.5 * weight_decay * |w|^2` on every trainable variable unless configured otherwise. Batch norm
uses its moving statistics by default (`bn_mode="inference"`). Inputs are not augmented.

NOTE: both thresholds describe plain SGD steps of size lr. With momentum beta, the training
loop's heavy-ball steps stay stable on a quadratic up to `lambda_max = 2 (1 + beta) / lr`, so
`2 / lr` is conservative for such runs.

Outputs:
  tables/hessian.csv           one row per (run, snapshot, eigenvalue index)
  tables/escape_threshold.csv  one row per (run, snapshot)
  tensorboard/<parent run>/    hessian/top_eigenvalue, hessian/two_over_lr,
                               hessian/escape_threshold, hessian/gd_escape_threshold
  analysis/hessian/<run>/      step_<STEP>.npz per snapshot, eigenvectors.npz (warm start)

Resuming: each snapshot's result is cached as soon as it is measured, together with a key of
the settings, and is reused when the key matches. The latest eigenvectors of each parent are
cached too, so a resumed stage warm-starts from the last snapshot it measured. The tables are written
once every selected snapshot is measured. The stage is skipped when both tables contain every
selected snapshot and each snapshot's cache has the current settings. After a change of
settings, only the snapshots whose cache differs are measured again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Optional, Sequence

import gin
import keras
import numpy as np
import pandas as pd
from absl import logging

from tfntk import storage
from tfntk.autodiff import hvp
from tfntk.experiments import common
from tfntk.measures import escape, hessian
from tfntk.reporting import tensorboard
from tfntk.training.snapshots import SnapshotStore

HESSIAN_TABLE = "hessian"
ESCAPE_TABLE = "escape_threshold"

# The per-example loss of the training loop (`tfntk.training.loop`).
CROSS_ENTROPY = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)


@dataclasses.dataclass(frozen=True)
class CurvatureSettings:
    """Settings that determine a snapshot's result, described in `measure`."""

    k: int
    method: str
    tol: float
    max_iterations: int
    examples: int
    batch_size: int
    bn_mode: str
    weight_decay: float
    escape_minibatches: int
    escape_batch_size: int
    seed: int

    def key(self) -> str:
        """Returns the settings as a JSON string, stored with each cached snapshot."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def select_snapshot_steps(steps: Sequence[int], max_snapshots: Optional[int]) -> list[int]:
    """Chooses up to `max_snapshots` of a run's snapshot steps, spread over training.

    The choice is evenly spaced in snapshot index, `round(linspace(0, n - 1, max_snapshots))`,
    so it always contains the first and the last snapshot and follows the density of the
    snapshot schedule (which is denser early in training, where curvature changes fastest).

    Args:
      steps: the run's snapshot steps, in any order, without repeats.
      max_snapshots: the number to keep (at least 2), or None to keep every snapshot.

    Returns:
      The chosen steps in increasing order; all of them when there are at most `max_snapshots`.
    """
    steps = sorted(int(step) for step in steps)
    if max_snapshots is None or len(steps) <= max_snapshots:
        return steps
    positions = np.round(np.linspace(0, len(steps) - 1, max_snapshots)).astype(int)
    return [steps[position] for position in sorted(set(positions))]


def escape_minibatch_indices(num_examples: int, count: int, batch_size: int, seed: int) -> np.ndarray:
    """Draws the minibatches of the escape threshold as SGD would: shuffled passes over the data.

    Consecutive chunks of `batch_size` are taken from a random permutation of the examples, and a
    new permutation follows when one is used up, so no minibatch repeats an example, and when
    `count * batch_size <= num_examples` no two minibatches share one.

    Args:
      num_examples: size of the subset the minibatches are drawn from.
      count: number of minibatches.
      batch_size: examples per minibatch, at most `num_examples`.
      seed: seed of `np.random.default_rng`.

    Returns:
      int64 indices into the subset, shape (count, batch_size).
    """
    if not 0 < batch_size <= num_examples:
        raise ValueError(
            f"Invalid escape minibatch size {batch_size} for {num_examples} examples; use a "
            "training batch size of at most curvature.measure.examples."
        )
    rng = np.random.default_rng(seed)
    per_pass = num_examples // batch_size
    chunks = []
    while len(chunks) < count:
        order = rng.permutation(num_examples)
        chunks.extend(order[i * batch_size:(i + 1) * batch_size] for i in range(per_pass))
    return np.asarray(chunks[:count], dtype=np.int64)


@gin.configurable(module="curvature")
def measure(
    job: common.Job,
    spawn_steps: list[int],
    num_children: int,
    *,
    enabled: bool = True,
    validate_only: bool = False,
    parents: Sequence[int] = (0,),
    max_snapshots: Optional[int] = 12,
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iterations: int = 80,
    examples: Optional[int] = 512,
    batch_size: int = 512,
    bn_mode: str = "inference",
    weight_decay: Optional[float] = None,
    escape_minibatches: int = 8,
    seed: int = 0,
) -> None:
    """Measures top Hessian eigenvalues and escape thresholds at parent snapshots.

    Args:
      job: the experiment whose parents are measured.
      spawn_steps: unused; part of every stage's signature.
      num_children: unused; part of every stage's signature.
      enabled: False skips the stage.
      validate_only: check the settings and return before any work (the main job does this
        before training, so a bad setting costs no training time).
      parents: indices of the parents to measure, each in [0, common.NUM_PARENTS).
      max_snapshots: snapshots per parent (at least 2), chosen by `select_snapshot_steps`; None
        measures every snapshot.
      k: number of top Hessian eigenvalues.
      method: eigenvalue solver, "lanczos" or "power" (see `hessian.hessian_top_eigenvalues`).
      tol: relative residual tolerance, `|H v - lambda v| <= tol * |lambda|`.
      max_iterations: solver iterations (Hessian-vector products per eigenvalue for "power").
      examples: size of the fixed stratified training subset (`job.train_subset`) over which the
        loss is taken; None uses the whole training set.
      batch_size: examples per batch when summing the loss over the subset. It changes memory
        and speed but not the result (except in bn_mode="train"), and it is part of the cache
        key. One batch of 512 digit images is fastest on CPU. Lower it for large models,
        because a Hessian-vector product keeps several times the activations of a training step
        in memory.
      bn_mode: "inference" (batch norm with moving statistics) or "train" (with the statistics of
        each batch of `batch_size`).
      weight_decay: L2 coefficient included in the loss; None uses the run's
        `job.training.weight_decay`, 0 leaves the penalty out.
      escape_minibatches: number of minibatches, of the training batch size, over which the
        escape threshold's mean and standard deviation are taken. The same minibatches are used
        at every snapshot.
      seed: seed of the solver's random start vectors and of the escape minibatches.

    Raises:
      ValueError: naming the first invalid setting.
    """
    if not enabled:
        logging.info("Curvature stage disabled; skipping.")
        return
    del spawn_steps, num_children
    _validate(parents, max_snapshots, k, method, tol, max_iterations, examples, batch_size, bn_mode,
              weight_decay, escape_minibatches)
    if validate_only:
        return

    x, y = job.train_subset(examples)
    settings = CurvatureSettings(
        k=int(k), method=method, tol=float(tol), max_iterations=int(max_iterations),
        examples=len(y), batch_size=int(batch_size), bn_mode=bn_mode,
        weight_decay=float(job.training.weight_decay if weight_decay is None else weight_decay),
        escape_minibatches=int(escape_minibatches), escape_batch_size=int(job.training.batch_size),
        seed=int(seed),
    )
    data = _MeasurementData.build(x, y, batch_size, settings)
    plan = {index: _planned_snapshots(job, index, max_snapshots) for index in parents}
    if _tables_complete(job, plan, settings.key()):
        logging.info("Curvature tables exist for every selected snapshot and these settings; skipping.")
        return

    started = time.time()
    total = sum(len(snapshots) for snapshots in plan.values())
    logging.info(
        "Phase: curvature (top-%d Hessian eigenvalues by %s and escape thresholds) at %d "
        "snapshots of parents %s on %d training examples", k, method, total, list(parents),
        settings.examples,
    )
    model = job.new_model()
    # One loss for every snapshot and parent, so that its tf.functions are traced only once.
    training_loss = hvp.TrainingLoss(
        model,
        hvp.LossSpec(CROSS_ENTROPY, bn_mode=settings.bn_mode, weight_decay=settings.weight_decay),
        data.batches,
    )
    hessian_rows, escape_rows = [], []
    for index, snapshots in plan.items():
        new_hessian_rows, new_escape_rows = _measure_parent(
            job, training_loss, index, snapshots, data, settings
        )
        hessian_rows.extend(new_hessian_rows)
        escape_rows.extend(new_escape_rows)

    hessian_table = pd.DataFrame(hessian_rows)
    escape_table = pd.DataFrame(escape_rows)
    storage.write_csv_atomic(job.run.table(ESCAPE_TABLE), escape_table)
    storage.write_csv_atomic(job.run.table(HESSIAN_TABLE), hessian_table)
    _write_tensorboard(job, hessian_table, escape_table)
    logging.info("Curvature stage finished in %.1f s", time.time() - started)


def _validate(parents, max_snapshots, k, method, tol, max_iterations, examples, batch_size, bn_mode,
              weight_decay, escape_minibatches) -> None:
    """Raises ValueError naming the first invalid setting and how to fix it."""
    if not parents or len(set(parents)) != len(parents):
        raise ValueError(f"Invalid curvature.measure.parents {parents!r}; use distinct parent indices.")
    for index in parents:
        if not _is_int(index) or not 0 <= index < common.NUM_PARENTS:
            raise ValueError(
                f"Invalid curvature.measure.parents entry {index!r}; use 0 to {common.NUM_PARENTS - 1}."
            )
    if max_snapshots is not None and (not _is_int(max_snapshots) or max_snapshots < 2):
        raise ValueError(
            f"Invalid curvature.measure.max_snapshots {max_snapshots!r}; use 2 or more (the first "
            "and last snapshot are always measured) or None for every snapshot."
        )
    positive_ints = {"k": k, "max_iterations": max_iterations, "batch_size": batch_size,
                     "escape_minibatches": escape_minibatches}
    for name, value in positive_ints.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"Invalid curvature.measure.{name} {value!r}; use a positive integer.")
    if examples is not None and (not _is_int(examples) or examples < 1):
        raise ValueError(
            f"Invalid curvature.measure.examples {examples!r}; use a positive integer or None for "
            "the whole training set."
        )
    if method not in hessian.METHODS:
        raise ValueError(f"Invalid curvature.measure.method {method!r}; use one of {hessian.METHODS}.")
    if method == "lanczos" and max_iterations < k:
        raise ValueError(
            f"Invalid curvature.measure.max_iterations {max_iterations}; Lanczos needs at least k={k}."
        )
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"Invalid curvature.measure.tol {tol!r}; use a positive number such as 1e-3.")
    if bn_mode not in hvp.BN_MODES:
        raise ValueError(f"Invalid curvature.measure.bn_mode {bn_mode!r}; use one of {hvp.BN_MODES}.")
    if weight_decay is not None and (not isinstance(weight_decay, (int, float)) or not weight_decay >= 0):
        raise ValueError(
            f"Invalid curvature.measure.weight_decay {weight_decay!r}; use 0 or more, or None for "
            "the run's TrainingConfig.weight_decay."
        )


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass
class _Snapshot:
    run: str
    step: int
    epoch: float
    learning_rate: float


def _planned_snapshots(job: common.Job, index: int, max_snapshots: Optional[int]) -> list[_Snapshot]:
    paths = job.parent_paths(index)
    table = SnapshotStore(paths).read()
    if table.empty:
        raise ValueError(f"Parent {index} has no snapshots in {paths.snapshots_csv}; train it first.")
    table = table.set_index("step")
    return [
        _Snapshot(paths.name, step, float(table.loc[step, "epoch"]), float(table.loc[step, "learning_rate"]))
        for step in select_snapshot_steps(table.index, max_snapshots)
    ]


def _tables_complete(job: common.Job, plan: dict, key: str) -> bool:
    """Checks that both tables contain every planned (run, step), each cached with settings `key`."""
    snapshots = [snapshot for planned_snapshots in plan.values() for snapshot in planned_snapshots]
    for snapshot in snapshots:
        if _load_cache(_cache_path(job, snapshot.run, snapshot.step), key) is None:
            return False
    planned = {(snapshot.run, snapshot.step) for snapshot in snapshots}
    for name in (HESSIAN_TABLE, ESCAPE_TABLE):
        path = job.run.table(name)
        if not storage.exists(path):
            return False
        table = storage.read_csv(path)
        if not planned <= set(zip(table["run"], table["step"].astype(int))):
            return False
    return True


@dataclasses.dataclass
class _MeasurementData:
    """The loss batches over the subset and the escape-threshold minibatches drawn from it."""

    batches: list
    minibatches: list

    @classmethod
    def build(cls, x: np.ndarray, y: np.ndarray, batch_size: int, settings: CurvatureSettings):
        batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]
        indices = escape_minibatch_indices(
            len(y), settings.escape_minibatches, settings.escape_batch_size, settings.seed
        )
        return cls(batches, [(x[chunk], y[chunk]) for chunk in indices])


def _cache_path(job: common.Job, run: str, step: int) -> str:
    return job.run.analysis(f"hessian/{run}/step_{step:08d}.npz")


def _eigenvectors_path(job: common.Job, run: str) -> str:
    return job.run.analysis(f"hessian/{run}/eigenvectors.npz")


def _measure_parent(job, training_loss, index, snapshots, data, settings) -> tuple[list, list]:
    """Measures (or reads from the cache) every planned snapshot of one parent, in step order."""
    model = training_loss.model
    paths = job.parent_paths(index)
    key = settings.key()
    initial_vectors = _load_eigenvectors(job, paths.name, model)
    hessian_rows, escape_rows = [], []
    measured, measuring_time = 0, 0.0

    for done, snapshot in enumerate(snapshots, start=1):
        cache = _load_cache(_cache_path(job, snapshot.run, snapshot.step), key)
        if cache is None:
            snapshot_started = time.time()
            weights = job.weights_at(model, paths, snapshot.step)
            cache, eigenvectors = _measure_snapshot(
                training_loss, weights, data, snapshot, settings, initial_vectors
            )
            storage.save_npz_atomic(
                _eigenvectors_path(job, snapshot.run), step=snapshot.step, vectors=eigenvectors
            )
            storage.save_npz_atomic(_cache_path(job, snapshot.run, snapshot.step), settings=key, **cache)
            initial_vectors = _split_vectors(eigenvectors, model)
            measured += 1
            measuring_time += time.time() - snapshot_started
            logging.info(
                "Curvature %s epoch %.3f: lambda_max %.4g (2/lr %.4g, %s), escape threshold %.3f "
                "+- %.3f; %d/%d snapshots, %.1f s per measured snapshot",
                snapshot.run, snapshot.epoch, cache["eigenvalues"][0], 2.0 / snapshot.learning_rate,
                "converged" if cache["converged"][0] else "NOT converged", cache["escape_values"].mean(),
                cache["escape_values"].std(), done, len(snapshots), measuring_time / measured,
            )
        hessian_rows.extend(_hessian_rows(cache, snapshot, settings))
        escape_rows.append(_escape_row(cache, snapshot, settings))
    return hessian_rows, escape_rows


def _measure_snapshot(
    training_loss, weights, data, snapshot, settings, initial_vectors
) -> tuple[dict, np.ndarray]:
    """Computes one snapshot's eigenpairs and escape thresholds on `training_loss` at `weights`.

    Returns:
      (cache, eigenvectors): the arrays stored for the snapshot, and the unit eigenvectors as a
      (k, d) array of the model's dtype.
    """
    result = hessian.hessian_top_eigenvalues_of_loss(
        training_loss, k=settings.k, method=settings.method, tol=settings.tol,
        max_iterations=settings.max_iterations, initial_vectors=initial_vectors, weights=weights,
        seed=settings.seed,
    )
    threshold = escape.escape_threshold_of_loss(
        training_loss, data.minibatches, snapshot.learning_rate, weights=weights
    )
    cache = {
        "eigenvalues": result.eigenvalues,
        "residual_norms": result.residual_norms,
        "converged": result.converged,
        "iterations": np.int64(len(result.top_eigenvalue_history)),
        "hessian_vector_products": np.int64(result.num_hvps),
        "escape_values": threshold.values,
        "gradient_norm_squared": np.float64(threshold.gradient_norm_squared),
    }
    eigenvectors = np.stack(
        [np.concatenate([np.asarray(t).reshape(-1) for t in vector]) for vector in result.eigenvectors]
    )
    return cache, eigenvectors


def _load_cache(path: str, key: str) -> Optional[dict]:
    """Returns a snapshot's cached arrays, or None when absent or computed with other settings."""
    if not storage.exists(path):
        return None
    cache = storage.load_npz(path)
    if str(cache.pop("settings")) != key:
        logging.info("Cached curvature result %s has other settings; measuring again.", path)
        return None
    return cache


def _load_eigenvectors(job: common.Job, run: str, model: keras.Model) -> Optional[list]:
    """Returns the parent's latest cached eigenvectors as warm-start vectors, or None."""
    path = _eigenvectors_path(job, run)
    if not storage.exists(path):
        return None
    vectors = storage.load_npz(path)["vectors"]
    dimension = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    if vectors.ndim != 2 or vectors.shape[1] != dimension:
        logging.info("Cached eigenvectors %s do not match the model; starting cold.", path)
        return None
    return _split_vectors(vectors, model)


def _split_vectors(vectors: np.ndarray, model: keras.Model) -> list:
    """Splits (k, d) flat vectors into k lists of arrays shaped like the trainable variables."""
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    boundaries = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]
    return [
        [part.reshape(shape) for part, shape in zip(np.split(vector, boundaries), shapes)]
        for vector in vectors
    ]


def _hessian_rows(cache: dict, snapshot: _Snapshot, settings: CurvatureSettings) -> list[dict]:
    rows = []
    for index, eigenvalue in enumerate(cache["eigenvalues"]):
        rows.append({
            "run": snapshot.run,
            "step": snapshot.step,
            "epoch": snapshot.epoch,
            "learning_rate": snapshot.learning_rate,
            "index": index,
            "eigenvalue": float(eigenvalue),
            "residual_norm": float(cache["residual_norms"][index]),
            "iterations": int(cache["iterations"]),
            "hessian_vector_products": int(cache["hessian_vector_products"]),
            "converged": bool(cache["converged"][index]),
            "two_over_lr": 2.0 / snapshot.learning_rate,
            "method": settings.method,
            "tol": settings.tol,
            "bn_mode": settings.bn_mode,
            "weight_decay_included": settings.weight_decay > 0,
            "weight_decay": settings.weight_decay,
            "examples": settings.examples,
        })
    return rows


def _escape_row(cache: dict, snapshot: _Snapshot, settings: CurvatureSettings) -> dict:
    values = cache["escape_values"]
    return {
        "run": snapshot.run,
        "step": snapshot.step,
        "epoch": snapshot.epoch,
        "learning_rate": snapshot.learning_rate,
        "escape_mean": float(np.mean(values)),
        "escape_std": float(np.std(values)),
        "minibatches": len(values),
        "minibatch_size": settings.escape_batch_size,
        "gd_escape_threshold": escape.gd_escape_threshold(snapshot.learning_rate, float(cache["eigenvalues"][0])),
        "gradient_norm": float(np.sqrt(cache["gradient_norm_squared"])),
        "bn_mode": settings.bn_mode,
        "weight_decay_included": settings.weight_decay > 0,
        "examples": settings.examples,
    }


def _write_tensorboard(job: common.Job, hessian_table: pd.DataFrame, escape_table: pd.DataFrame) -> None:
    """Writes the four `hessian/*` scalar series of every measured run at its snapshot steps."""
    top = hessian_table[hessian_table["index"] == 0]
    for run, rows in top.groupby("run"):
        tensorboard.write_scalars(job.run.root, run, "hessian/top_eigenvalue", rows["step"], rows["eigenvalue"])
        tensorboard.write_scalars(job.run.root, run, "hessian/two_over_lr", rows["step"], rows["two_over_lr"])
    for run, rows in escape_table.groupby("run"):
        tensorboard.write_scalars(job.run.root, run, "hessian/escape_threshold", rows["step"], rows["escape_mean"])
        tensorboard.write_scalars(
            job.run.root, run, "hessian/gd_escape_threshold", rows["step"], rows["gd_escape_threshold"]
        )
