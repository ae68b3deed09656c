"""Kernel dynamics stage: the empirical NTK, ReLU patterns and logit gradient centroids over training.

On a fixed stratified subset S of m training inputs (the analysis subset), the stage measures at
each selected snapshot w, with the model in inference mode:

  - the empirical NTK Gram matrix on S, by default the logit-traced (m, m) matrix
    `sum_k J_k(x_i) . J_k(x_j)`, or with `trace_logits=False` the full (m, m, K, K) one;
  - the ReLU on/off pattern of every ReLU unit on S;
  - the K logit gradient centroids `mu_k = (1/m) sum_i grad_w f_k(x_i)`, a (K, d) array.

Two snapshots are compared by kernel distance `1 - <K1, K2>_F / (|K1|_F |K2|_F)`, ReLU activation
distance (the fraction of (input, unit) on/off entries that differ) and centroid alignment (the
mean over classes of the cosine between the two centroids of a class).

Outputs:
  tables/snapshot_pairs.csv   every pair of measured snapshots of each selected parent, for the
                              three measures (heatmaps between training epochs)
  tables/kernel_velocity.csv  kernel distance between the snapshots at t and near t + dt, divided
                              by their epoch difference
  tables/pair_kernel.csv      the three measures between the two children of each spawn epoch at
                              the end of training, and between the two independent parents
  tensorboard/<parent run>/   ntk/kernel_velocity scalars at optimizer steps, and the images
                              ntk/kernel_distance_heatmap, ntk/relu_distance_heatmap and
                              ntk/centroid_alignment_heatmap
  analysis/subset.npz         the analysis subset: training-set indices, inputs and labels
  analysis/ntk/<run>/step_<STEP>.npz   per-snapshot cache (see below)

Every table has a `kernel` column, "traced (m, m)" or "full (m, m, K, K)", saying which Gram
matrix the kernel distances were computed from.

Snapshot selection: each selected parent contributes `max_snapshots` snapshots evenly spaced in
snapshot index, so the first and the last are always included. Parent 0 also contributes the
children's spawn steps. Each of these then brings its velocity partner: the later snapshot whose
epoch is nearest to t + dt, accepted when it lies within `velocity_tolerance` of t + dt. At most
`2 * (max_snapshots + number of spawn steps)` snapshots are therefore measured, and all of them
appear in the heatmaps.

Caching and resuming: each snapshot's Gram matrix, ReLU pattern (bits packed with `np.packbits`)
and centroids (float32) are written to its cache file as soon as they are measured, with a key of
the analysis subset and `trace_logits`. A cache with another key is measured again and
overwritten. Centroids are cached only when K * d is at most `centroid_cache_max_floats`;
otherwise they are recomputed from the snapshot's weights whenever an alignment needs them. The
stage is skipped when all three tables contain every planned row for the requested `kernel`.
Extending the selection (for example a larger `max_snapshots`) measures only the new snapshots.
The analysis subset is saved on the first call and must match on later calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Callable, Optional, Sequence

import gin
import numpy as np
import pandas as pd
from absl import logging

from tfntk import storage
from tfntk.autodiff import ntk
from tfntk.data import subsets
from tfntk.experiments import common
from tfntk.measures import centroids as centroid_measures
from tfntk.measures import kernel as kernel_measures
from tfntk.measures import relu as relu_measures
from tfntk.reporting import kernel_figures, tensorboard
from tfntk.training.snapshots import SnapshotStore

PAIRS_TABLE = "snapshot_pairs"
VELOCITY_TABLE = "kernel_velocity"
PAIR_KERNEL_TABLE = "pair_kernel"
MEASURES = ("kernel_distance", "relu_distance", "centroid_alignment")
KERNEL_TRACED = "traced (m, m)"
KERNEL_FULL = "full (m, m, K, K)"
SUBSET_FILE = "subset.npz"
PROGRESS_EVERY_SECONDS = 10.0

_PAIRS_COLUMNS = ["run", "step_a", "epoch_a", "step_b", "epoch_b", "measure", "value", "kernel"]
_VELOCITY_COLUMNS = ["run", "step", "epoch", "partner_step", "partner_epoch", "dt_epochs", "velocity", "kernel"]
_PAIR_KERNEL_COLUMNS = ["spawn_epoch", "pair", "run_a", "run_b", "measure", "value", "kernel"]


def kernel_label(trace_logits: bool) -> str:
    """Returns the `kernel` column value: "traced (m, m)" or "full (m, m, K, K)"."""
    return KERNEL_TRACED if trace_logits else KERNEL_FULL


def velocity_partner(epochs: Sequence[float], index: int, dt: float, tolerance: float) -> Optional[int]:
    """Finds the snapshot that pairs with snapshot `index` for the kernel velocity.

    The partner is the later snapshot whose epoch is nearest to `epochs[index] + dt`. It is
    accepted when it lies within `tolerance` epochs of that target, the rule of
    `tfntk.measures.kernel.kernel_velocity`.

    Args:
      epochs: strictly increasing snapshot epochs.
      index: position of the earlier snapshot in `epochs`.
      dt: target epoch separation.
      tolerance: largest accepted distance, in epochs, from the target.

    Returns:
      The partner's position in `epochs`, or None when no later snapshot is within tolerance.
    """
    times = np.asarray(epochs, dtype=np.float64)
    later = np.arange(index + 1, len(times))
    if later.size == 0:
        return None
    partner = int(later[np.argmin(np.abs(times[later] - (times[index] + dt)))])
    if abs(times[partner] - (times[index] + dt)) > tolerance:
        return None
    return partner


def select_snapshot_steps(
    steps: Sequence[int],
    epochs: Sequence[float],
    max_snapshots: Optional[int],
    required_steps: Sequence[int] = (),
    dt: float = kernel_measures.DEFAULT_VELOCITY_DT,
    tolerance: Optional[float] = None,
) -> list[int]:
    """Chooses the snapshots of one run to measure: a spread, the required ones and their partners.

    Args:
      steps: the run's snapshot steps, strictly increasing.
      epochs: their epochs.
      max_snapshots: how many snapshots to spread over training, evenly in snapshot index
        (`round(linspace(0, n - 1, max_snapshots))`, so the first and the last are included);
        None takes every snapshot.
      required_steps: steps always measured (for example the spawn steps); those that are not
        snapshots of the run are ignored.
      dt: kernel velocity separation in epochs.
      tolerance: accepted distance of a partner from t + dt in epochs; None means dt / 2.

    Returns:
      The chosen steps, their velocity partners (see `velocity_partner`) included, in increasing
      order.
    """
    steps = [int(step) for step in steps]
    tolerance = dt / 2 if tolerance is None else float(tolerance)
    if max_snapshots is None or len(steps) <= max_snapshots:
        positions = set(range(len(steps)))
    else:
        positions = set(np.round(np.linspace(0, len(steps) - 1, max_snapshots)).astype(int).tolist())
    position_of = {step: position for position, step in enumerate(steps)}
    positions.update(position_of[int(step)] for step in required_steps if int(step) in position_of)

    chosen = set(positions)
    for position in positions:
        partner = velocity_partner(epochs, position, dt, tolerance)
        if partner is not None:
            chosen.add(partner)
    return [steps[position] for position in sorted(chosen)]


def centroid_alignment_matrix(
    load: Callable[[int], np.ndarray], count: int, memory_bytes: float = 2 * 2**30
) -> np.ndarray:
    """Computes the centroid alignment between every pair of `count` centroid arrays.

    Entry [a, b] is `(1/K) sum_k cos(mu_k(a), mu_k(b))`, as `centroids.centroid_alignment`
    returns, but the inner products of each class come from one float64 matrix product per pair
    of panels instead of one pass over the centroids per pair of arrays. About `memory_bytes` of
    loaded arrays are held at a time (a row panel and a column panel, each at least one array),
    so `load` is called once per array when all of them fit, and about
    `count * (count / panel + 1) / 2` times otherwise.

    Args:
      load: returns the (K, d) centroids of array `i`, for i in [0, count).
      count: number of arrays, at least 1.
      memory_bytes: memory for the arrays held at once, in bytes.

    Returns:
      A float64 (count, count) symmetric matrix with ones on the diagonal.

    Raises:
      ValueError: if a centroid is zero or the arrays differ in shape.
    """
    first = np.asarray(load(0))
    panel = max(1, int(memory_bytes // (2 * first.nbytes)))
    num_classes = first.shape[0]
    inner = np.zeros((num_classes, count, count))

    def load_panel(indices: range) -> list:
        arrays = [first if i == 0 else np.asarray(load(i)) for i in indices]
        if any(a.shape != first.shape for a in arrays):
            raise ValueError(f"Centroid arrays must all have shape {first.shape}.")
        return arrays

    for row_start in range(0, count, panel):
        rows = range(row_start, min(row_start + panel, count))
        row_arrays = load_panel(rows)
        for column_start in range(row_start, count, panel):
            columns = range(column_start, min(column_start + panel, count))
            column_arrays = row_arrays if column_start == row_start else load_panel(columns)
            for k in range(num_classes):
                row_matrix = np.stack([a[k] for a in row_arrays]).astype(np.float64)
                column_matrix = np.stack([a[k] for a in column_arrays]).astype(np.float64)
                block = row_matrix @ column_matrix.T
                inner[k, rows.start:rows.stop, columns.start:columns.stop] = block
                inner[k, columns.start:columns.stop, rows.start:rows.stop] = block.T

    norms = np.sqrt(np.diagonal(inner, axis1=1, axis2=2))  # (K, count)
    if np.any(norms == 0):
        classes, arrays = np.nonzero(norms == 0)
        raise ValueError(
            f"Centroid alignment is undefined because centroid {int(classes[0])} of array "
            f"{int(arrays[0])} is zero."
        )
    cosines = inner / (norms[:, :, None] * norms[:, None, :])
    return np.mean(cosines, axis=0)


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    paths: storage.RunPaths
    step: int
    epoch: float

    @property
    def run(self) -> str:
        return self.paths.name


@dataclasses.dataclass
class _ParentPlan:
    """The measured snapshots of one parent and the velocity pairs among them."""

    snapshots: list
    velocity_pairs: list  # (earlier position, partner position) in `snapshots`


@gin.configurable(module="kernel_dynamics")
def measure(
    job: common.Job,
    spawn_steps: list[int],
    num_children: int,
    *,
    enabled: bool = True,
    validate_only: bool = False,
    analysis_examples: int = 100,
    trace_logits: bool = True,
    implementation: str = "jacobian",
    batch_size: Optional[int] = None,
    max_snapshots: Optional[int] = 12,
    velocity_dt: float = kernel_measures.DEFAULT_VELOCITY_DT,
    velocity_tolerance: Optional[float] = None,
    parents: Sequence[int] = (0,),
    centroid_cache_max_floats: int = 50_000_000,
    centroid_memory_gib: float = 2.0,
) -> None:
    """Measures the NTK, ReLU patterns and logit gradient centroids over training.

    Args:
      job: the experiment whose runs are measured.
      spawn_steps: the children's spawn steps; also measured on parent 0 so that the kernel
        velocity is known at every spawn epoch.
      num_children: children per spawn epoch; every pair of them is compared.
      enabled: False skips the stage.
      validate_only: check the settings and return before any work (the main job does this
        before training, so a bad setting costs no training time).
      analysis_examples: size m of the analysis subset, a stratified subset of the training set
        drawn with the job's seed (`tfntk.data.subsets.stratified_subset`). A smaller training
        set is used whole.
      trace_logits: True computes the logit-traced (m, m) Gram matrix, False the full
        (m, m, K, K) one (K^2 times the memory and time of the kernel distances).
      implementation: "jacobian" or "ntvp"; see `tfntk.autodiff.ntk.NtkImplementation`.
      batch_size: inputs per NTK block; None uses `empirical_ntk`'s default. It changes only
        memory and speed, not the result.
      max_snapshots: snapshots per parent spread over training (at least 2), before the spawn
        steps and velocity partners are added; None measures every snapshot.
      velocity_dt: kernel velocity separation, in epochs.
      velocity_tolerance: accepted distance of a velocity partner from t + dt, in epochs; None
        means velocity_dt / 2.
      parents: parents whose snapshots are compared (heatmaps and velocity), each in
        [0, common.NUM_PARENTS).
      centroid_cache_max_floats: largest K * d for which centroids are stored in the snapshot
        cache, where 50M float32 values take 200 MB per snapshot. Larger ones are recomputed.
      centroid_memory_gib: memory, in GiB, for centroids kept between measuring and comparing
        snapshots, and again for the panels of `centroid_alignment_matrix`. Centroids that do
        not fit are read from their cache files (or recomputed) when compared.

    Raises:
      ValueError: naming the first invalid setting, or when the saved analysis subset differs.
    """
    if not enabled:
        logging.info("Kernel dynamics stage disabled; skipping.")
        return
    _validate(job, analysis_examples, trace_logits, implementation, batch_size, max_snapshots, velocity_dt,
              velocity_tolerance, parents, centroid_cache_max_floats, centroid_memory_gib)
    if validate_only:
        return
    tolerance = velocity_dt / 2 if velocity_tolerance is None else float(velocity_tolerance)
    label = kernel_label(trace_logits)

    indices, x = load_analysis_subset(job, min(int(analysis_examples), job.data.num_train))
    plans = {
        index: _plan_parent(job, index, spawn_steps if index == 0 else (), max_snapshots, velocity_dt, tolerance)
        for index in parents
    }
    pairs = [
        (spawn_epoch, pair, _final_snapshot(job, run_a), _final_snapshot(job, run_b))
        for spawn_epoch, pair, run_a, run_b in job.pairs(spawn_steps, num_children)
    ]
    if _tables_complete(job, plans, pairs, label):
        logging.info("Kernel dynamics tables exist for every planned snapshot and pair; skipping.")
        return

    started = time.time()
    memory_bytes = centroid_memory_gib * 2**30
    cache = _SnapshotCache(job, x, indices, trace_logits, implementation, batch_size, centroid_cache_max_floats,
                           memory_bytes)
    distinct = {(s.run, s.step) for plan in plans.values() for s in plan.snapshots}
    distinct |= {(s.run, s.step) for _, _, a, b in pairs for s in (a, b)}
    logging.info(
        "Phase: kernel dynamics (%s NTK, ReLU patterns, logit gradient centroids) at %d snapshots of "
        "parents %s and %d end-of-training pairs, on %d training examples", label, len(distinct),
        list(parents), len(pairs), len(indices),
    )

    pair_rows, velocity_rows = [], []
    for plan in plans.values():
        new_pair_rows, new_velocity_rows = _compare_parent_snapshots(cache, plan, label, memory_bytes)
        pair_rows.extend(new_pair_rows)
        velocity_rows.extend(new_velocity_rows)
    kernel_rows = _compare_pairs(cache, pairs, label)

    pairs_table = pd.DataFrame(pair_rows, columns=_PAIRS_COLUMNS)
    velocity_table = pd.DataFrame(velocity_rows, columns=_VELOCITY_COLUMNS)
    storage.write_csv_atomic(job.run.table(PAIR_KERNEL_TABLE), pd.DataFrame(kernel_rows, columns=_PAIR_KERNEL_COLUMNS))
    storage.write_csv_atomic(job.run.table(VELOCITY_TABLE), velocity_table)
    storage.write_csv_atomic(job.run.table(PAIRS_TABLE), pairs_table)
    _write_tensorboard(job, pairs_table, velocity_table)
    logging.info(
        "Kernel dynamics stage finished in %.1f s (%d snapshots measured, %d read from the cache)",
        time.time() - started, cache.measured, cache.reused,
    )


def _validate(job, analysis_examples, trace_logits, implementation, batch_size, max_snapshots, velocity_dt,
              velocity_tolerance, parents, centroid_cache_max_floats, centroid_memory_gib) -> None:
    """Raises ValueError naming the first invalid setting and how to fix it."""
    prefix = "Invalid kernel_dynamics.measure."
    if not _is_int(analysis_examples) or analysis_examples < 2:
        raise ValueError(f"{prefix}analysis_examples {analysis_examples!r}; use an integer of 2 or more.")
    if not isinstance(trace_logits, (bool, np.bool_)):
        raise ValueError(f"{prefix}trace_logits {trace_logits!r}; use True or False.")
    choices = [choice.value for choice in ntk.NtkImplementation]
    if implementation not in choices and implementation not in list(ntk.NtkImplementation):
        raise ValueError(f"{prefix}implementation {implementation!r}; use one of {choices}.")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"{prefix}batch_size {batch_size!r}; use a positive integer or None.")
    if max_snapshots is not None and (not _is_int(max_snapshots) or max_snapshots < 2):
        raise ValueError(
            f"{prefix}max_snapshots {max_snapshots!r}; use 2 or more (the first and last snapshot are "
            "always measured) or None for every snapshot."
        )
    if not _is_number(velocity_dt) or not velocity_dt > 0:
        raise ValueError(f"{prefix}velocity_dt {velocity_dt!r}; use a positive number of epochs such as 0.4.")
    if velocity_tolerance is not None and (not _is_number(velocity_tolerance) or not velocity_tolerance >= 0):
        raise ValueError(
            f"{prefix}velocity_tolerance {velocity_tolerance!r}; use 0 or more epochs, or None for velocity_dt / 2."
        )
    if not parents or len(set(parents)) != len(parents):
        raise ValueError(f"{prefix}parents {parents!r}; use distinct parent indices.")
    for index in parents:
        if not _is_int(index) or not 0 <= index < common.NUM_PARENTS:
            raise ValueError(f"{prefix}parents entry {index!r}; use 0 to {common.NUM_PARENTS - 1}.")
    if not _is_int(centroid_cache_max_floats) or centroid_cache_max_floats < 0:
        raise ValueError(
            f"{prefix}centroid_cache_max_floats {centroid_cache_max_floats!r}; use 0 (never cache) or more."
        )
    if not _is_number(centroid_memory_gib) or not centroid_memory_gib > 0:
        raise ValueError(f"{prefix}centroid_memory_gib {centroid_memory_gib!r}; use a positive number of GiB.")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def load_analysis_subset(job: common.Job, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the analysis subset's training-set indices and inputs, saving them on first use.

    The subset is `stratified_subset(job.data.y_train, size, seed=job.seed)`, stored at
    `analysis/subset.npz` (indices, x, y). A saved subset is reused as it is.

    NOTE: any other stage that reads or writes `analysis/subset.npz` must use the same size, or
    the second one to run raises.

    Raises:
      ValueError: if the saved subset has another size or its inputs differ from the training set.
    """
    path = job.run.analysis(SUBSET_FILE)
    if storage.exists(path):
        saved = storage.load_npz(path)
        indices = saved["indices"].astype(np.int64)
        if len(indices) != size:
            raise ValueError(
                f"The analysis subset saved in {path} has {len(indices)} examples but "
                f"kernel_dynamics.measure.analysis_examples is {size}; set it to {len(indices)}, or delete "
                f"{path} and {job.run.analysis('ntk')} to measure on a new subset."
            )
        if indices.size and (indices.min() < 0 or indices.max() >= job.data.num_train
                             or not np.array_equal(saved["x"], job.data.x_train[indices])):
            raise ValueError(
                f"The analysis subset saved in {path} does not match the training set of this job; "
                "check the dataset settings, or delete the file and the ntk caches beside it."
            )
        return indices, saved["x"]

    indices = subsets.stratified_subset(job.data.y_train, size, seed=job.seed)
    x = job.data.x_train[indices]
    storage.save_npz_atomic(path, indices=indices, x=x, y=job.data.y_train[indices], seed=np.int64(job.seed))
    return indices, x


def _plan_parent(job, index, required_steps, max_snapshots, dt, tolerance) -> _ParentPlan:
    paths = job.parent_paths(index)
    table = SnapshotStore(paths).read()
    if table.empty:
        raise ValueError(f"Parent {index} has no snapshots in {paths.snapshots_csv}; train it first.")
    table = table.sort_values("step")
    steps = table["step"].astype(int).tolist()
    epochs = [step / job.steps_per_epoch for step in steps]
    chosen = select_snapshot_steps(steps, epochs, max_snapshots, required_steps, dt, tolerance)

    snapshots = [_Snapshot(paths, step, step / job.steps_per_epoch) for step in chosen]
    position_in_chosen = {step: position for position, step in enumerate(chosen)}
    velocity_pairs = []
    for position, step in enumerate(chosen):
        partner = velocity_partner(epochs, steps.index(step), dt, tolerance)
        if partner is not None and steps[partner] in position_in_chosen:
            velocity_pairs.append((position, position_in_chosen[steps[partner]]))
    return _ParentPlan(snapshots, velocity_pairs)


def _final_snapshot(job: common.Job, paths: storage.RunPaths) -> _Snapshot:
    table = SnapshotStore(paths).read()
    if table.empty:
        raise ValueError(f"Run {paths.name} has no snapshots in {paths.snapshots_csv}; train it first.")
    step = int(table["step"].max())
    return _Snapshot(paths, step, step / job.steps_per_epoch)


def _tables_complete(job, plans: dict, pairs: list, label: str) -> bool:
    """Returns whether all three tables exist and contain every planned row computed with `label`."""
    tables = {}
    for name in (PAIRS_TABLE, VELOCITY_TABLE, PAIR_KERNEL_TABLE):
        path = job.run.table(name)
        if not storage.exists(path):
            return False
        table = storage.read_csv(path)
        tables[name] = table[table["kernel"] == label] if "kernel" in table.columns else table.iloc[:0]

    pair_rows = tables[PAIRS_TABLE]
    have_pairs = set(zip(pair_rows["run"], pair_rows["step_a"].astype(int), pair_rows["step_b"].astype(int),
                         pair_rows["measure"]))
    velocity_rows = tables[VELOCITY_TABLE]
    have_velocities = set(zip(velocity_rows["run"], velocity_rows["step"].astype(int)))
    kernel_rows = tables[PAIR_KERNEL_TABLE]
    have_kernel_pairs = set(zip(kernel_rows["run_a"], kernel_rows["run_b"], kernel_rows["measure"]))

    for plan in plans.values():
        snapshots = plan.snapshots
        for a in range(len(snapshots)):
            for b in range(a + 1, len(snapshots)):
                if any((snapshots[a].run, snapshots[a].step, snapshots[b].step, m) not in have_pairs for m in MEASURES):
                    return False
        if any((snapshots[a].run, snapshots[a].step) not in have_velocities for a, _ in plan.velocity_pairs):
            return False
    return all((a.run, b.run, m) in have_kernel_pairs for _, _, a, b in pairs for m in MEASURES)


class _SnapshotCache:
    """Measures snapshots on the analysis subset, through their per-snapshot cache files.

    Each cache file contains `gram`, `relu_bits` and `relu_shape`, `centroids` when K * d is at most
    the cap, and `key`, a JSON string of the analysis subset and `trace_logits`. Gram matrices and
    ReLU patterns read or measured in this process are also kept in memory, and so are centroids
    up to `centroid_memory_bytes`.
    """

    def __init__(self, job, x, indices, trace_logits, implementation, batch_size, centroid_cache_max_floats,
                 centroid_memory_bytes):
        self.job = job
        self.model = job.new_model()
        self.x = x
        self.trace_logits = bool(trace_logits)
        self.implementation = implementation
        self.batch_size = batch_size
        self.store_centroids = self._centroid_floats() <= centroid_cache_max_floats
        self.key = json.dumps({
            "examples": int(len(indices)),
            "subset_sha1": hashlib.sha1(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest(),
            "trace_logits": self.trace_logits,
        }, sort_keys=True)
        self.measured = 0
        self.reused = 0
        self._grams_and_patterns = {}
        self._centroids = {}
        self._centroid_bytes_left = centroid_memory_bytes
        self._measuring_seconds = 0.0
        self._last_log = time.time()
        if not self.store_centroids:
            logging.info(
                "Logit gradient centroids have %d floats (K * d), over centroid_cache_max_floats=%d: they are "
                "not cached and are recomputed when compared.", self._centroid_floats(), centroid_cache_max_floats,
            )

    def _centroid_floats(self) -> int:
        num_weights = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)
        return num_weights * int(self.model.outputs[0].shape[-1])

    def gram_and_patterns(self, snapshot: _Snapshot) -> tuple[np.ndarray, np.ndarray]:
        """Returns the snapshot's Gram matrix and bool ReLU pattern (m, units), measuring if needed."""
        key = (snapshot.run, snapshot.step)
        if key not in self._grams_and_patterns:
            arrays = self._load(snapshot)
            if arrays is None:
                arrays = self._measure(snapshot)
            else:
                self.reused += 1
            count = int(np.prod(arrays["relu_shape"]))
            patterns = np.unpackbits(arrays["relu_bits"], count=count).reshape(arrays["relu_shape"]).astype(bool)
            self._grams_and_patterns[key] = (arrays["gram"], patterns)
            if "centroids" in arrays:
                self._remember_centroids(key, arrays["centroids"])
        return self._grams_and_patterns[key]

    def centroids(self, snapshot: _Snapshot) -> np.ndarray:
        """Returns the snapshot's (K, d) float32 centroids: from memory, the cache, or recomputed."""
        key = (snapshot.run, snapshot.step)
        if key in self._centroids:
            return self._centroids[key]
        arrays = self._load(snapshot)
        if arrays is not None and "centroids" in arrays:
            return arrays["centroids"]
        return self._compute_centroids(snapshot)

    def _remember_centroids(self, key, centroids: np.ndarray) -> None:
        if centroids.nbytes <= self._centroid_bytes_left:
            self._centroids[key] = centroids
            self._centroid_bytes_left -= centroids.nbytes

    def _compute_centroids(self, snapshot: _Snapshot, weights=None) -> np.ndarray:
        if weights is None:
            weights = self.job.weights_at(self.model, snapshot.paths, snapshot.step)
        centroids = centroid_measures.logit_gradient_centroids(self.model, self.x, weights=weights)
        return centroids.astype(np.float32)

    def _load(self, snapshot: _Snapshot) -> Optional[dict]:
        path = self.job.run.ntk_snapshot(snapshot.run, snapshot.step)
        if not storage.exists(path):
            return None
        arrays = storage.load_npz(path)
        if str(arrays["key"]) != self.key:
            logging.info("Cached NTK measures %s were computed with other settings; measuring again.", path)
            return None
        return arrays

    def _measure(self, snapshot: _Snapshot) -> dict:
        started = time.time()
        weights = self.job.weights_at(self.model, snapshot.paths, snapshot.step)
        gram = kernel_measures.ntk_gram(
            self.model, self.x, weights=weights, trace_logits=self.trace_logits,
            implementation=self.implementation, batch_size=self.batch_size,
        )
        patterns = relu_measures.relu_patterns(self.model, self.x, weights=weights)
        arrays = {
            "gram": gram.astype(np.float32),
            "relu_bits": np.packbits(patterns.reshape(-1)),
            "relu_shape": np.asarray(patterns.shape, dtype=np.int64),
            "key": np.asarray(self.key),
        }
        centroids = self._compute_centroids(snapshot, weights)
        if self.store_centroids:
            arrays["centroids"] = centroids
        else:
            self._remember_centroids((snapshot.run, snapshot.step), centroids)
        storage.save_npz_atomic(self.job.run.ntk_snapshot(snapshot.run, snapshot.step), **arrays)

        self.measured += 1
        self._measuring_seconds += time.time() - started
        if time.time() - self._last_log >= PROGRESS_EVERY_SECONDS:
            self._last_log = time.time()
            logging.info(
                "Kernel dynamics: measured %s epoch %.3f; %d snapshots measured, %.2f s each, %d read from the cache",
                snapshot.run, snapshot.epoch, self.measured, self._measuring_seconds / self.measured, self.reused,
            )
        return arrays


def _compare_parent_snapshots(cache: _SnapshotCache, plan: _ParentPlan, label: str, memory_bytes: float):
    """Returns the `snapshot_pairs` and `kernel_velocity` rows of one parent."""
    snapshots = plan.snapshots
    grams, patterns = zip(*(cache.gram_and_patterns(snapshot) for snapshot in snapshots))
    alignments = centroid_alignment_matrix(
        lambda i: cache.centroids(snapshots[i]), len(snapshots), memory_bytes=memory_bytes
    )

    pair_rows = []
    distances = {}
    for a in range(len(snapshots)):
        for b in range(a + 1, len(snapshots)):
            distances[a, b] = kernel_measures.kernel_distance(grams[a], grams[b])
            values = {
                "kernel_distance": distances[a, b],
                "relu_distance": relu_measures.relu_distance(patterns[a], patterns[b]),
                "centroid_alignment": float(alignments[a, b]),
            }
            for measure_name in MEASURES:
                pair_rows.append({
                    "run": snapshots[a].run, "step_a": snapshots[a].step, "epoch_a": snapshots[a].epoch,
                    "step_b": snapshots[b].step, "epoch_b": snapshots[b].epoch, "measure": measure_name,
                    "value": values[measure_name], "kernel": label,
                })

    velocity_rows = []
    for a, b in plan.velocity_pairs:
        dt_epochs = snapshots[b].epoch - snapshots[a].epoch
        velocity_rows.append({
            "run": snapshots[a].run, "step": snapshots[a].step, "epoch": snapshots[a].epoch,
            "partner_step": snapshots[b].step, "partner_epoch": snapshots[b].epoch, "dt_epochs": dt_epochs,
            "velocity": distances[a, b] / dt_epochs, "kernel": label,
        })
    return pair_rows, velocity_rows


def _compare_pairs(cache: _SnapshotCache, pairs: list, label: str) -> list[dict]:
    """Returns the `pair_kernel` rows: the three measures between each pair's final snapshots."""
    rows = []
    for spawn_epoch, pair, snapshot_a, snapshot_b in pairs:
        gram_a, patterns_a = cache.gram_and_patterns(snapshot_a)
        gram_b, patterns_b = cache.gram_and_patterns(snapshot_b)
        values = {
            "kernel_distance": kernel_measures.kernel_distance(gram_a, gram_b),
            "relu_distance": relu_measures.relu_distance(patterns_a, patterns_b),
            "centroid_alignment": centroid_measures.centroid_alignment(
                cache.centroids(snapshot_a), cache.centroids(snapshot_b)),
        }
        for measure_name in MEASURES:
            rows.append({
                "spawn_epoch": spawn_epoch, "pair": pair, "run_a": snapshot_a.run, "run_b": snapshot_b.run,
                "measure": measure_name, "value": values[measure_name], "kernel": label,
            })
        logging.info(
            "Kernel dynamics %s %s~%s: kernel distance %.4f, ReLU distance %.4f, centroid alignment %.4f",
            pair, snapshot_a.run, snapshot_b.run, *(values[m] for m in MEASURES),
        )
    return rows


def _write_tensorboard(job: common.Job, pairs_table: pd.DataFrame, velocity_table: pd.DataFrame) -> None:
    """Writes each parent's `ntk/kernel_velocity` scalars and its three heatmap images."""
    for run, rows in velocity_table.groupby("run"):
        tensorboard.write_scalars(job.run.root, run, "ntk/kernel_velocity", rows["step"], rows["velocity"])

    drops = [float(e) for e in job.training.lr_drop_epochs if 0 < float(e) < job.training.epochs]
    for run, rows in pairs_table.groupby("run"):
        last_step = int(max(rows["step_a"].max(), rows["step_b"].max()))
        for measure_name in MEASURES:
            figure = kernel_figures.heatmap_figure(rows[rows["measure"] == measure_name], measure_name, drops)
            png = tensorboard.figure_to_png(figure)
            kernel_figures.close(figure)
            tensorboard.write_image(job.run.root, run, f"ntk/{measure_name}_heatmap", png, step=last_step)
