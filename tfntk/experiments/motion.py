"""Function-space motion of parents and children over training.

Three measurements, each written as a table and resumable:

1. `children_over_time`: the test-set function-space distance, test-set error barrier and L2
   weight distance between the two networks of every pair of children of a spawn epoch, and
   of the two independent parents. They are measured at steps where both networks have a
   snapshot, one per third of an epoch by default (the children's snapshot grid, see
   `grid_steps`), and cached per spawn epoch under `analysis/motion/`.
2. `final_child_distance`: mean and standard deviation of those distances over each pair's last
   `last_snapshots` common snapshots, joined with the final test error barrier of
   `tables/error_barrier.csv` when the main job has written it.
3. `tsne`: one common t-SNE embedding of the test-set class probabilities of the parents and the
   children at snapshots spread over their training. Each run's probabilities are cached as an
   npz file, so the embedding can be recomputed without TensorFlow work.
"""

from __future__ import annotations

import time
from typing import Optional

import gin
import keras
import numpy as np
import pandas as pd
from absl import logging
from sklearn import manifold
from threadpoolctl import threadpool_limits

from tfntk import storage
from tfntk.data import subsets
from tfntk.experiments import common
from tfntk.measures import basins, evaluation
from tfntk.reporting import tensorboard
from tfntk.training.snapshots import SnapshotStore

OVER_TIME_TABLE = "children_over_time"
FINAL_TABLE = "final_child_distance"
TSNE_TABLE = "tsne"
OVER_TIME_MEASURES = ("function_space_distance", "error_barrier", "weight_l2_distance")
TENSORBOARD_MEASURES = ("function_space_distance", "error_barrier")
PROGRESS_EVERY_SECONDS = 10.0
MAX_TSNE_PERPLEXITY = 30.0


@gin.configurable(module="motion")
def measure(
    job: common.Job,
    spawn_steps: list[int],
    num_children: int,
    *,
    enabled: bool = True,
    validate_only: bool = False,
    every_epochs: Optional[float] = 1.0 / 3.0,
    barrier_alphas: int = 5,
    batch_norm_train_examples: Optional[int] = 1000,
    last_snapshots: int = 3,
    tsne_test_examples: int = 200,
    tsne_snapshots_per_run: int = 16,
    tsne_perplexity: Optional[float] = None,
    tsne_seed: int = 0,
    tsne_threads: int = 1,
    write_tensorboard: bool = True,
) -> None:
    """Writes the `children_over_time`, `final_child_distance` and `tsne` tables of a finished job.

    Args:
      job: the finished main job (both parents and every child trained to the final step).
      spawn_steps: parent steps at which children were spawned.
      num_children: children per spawn epoch; every pair of them is compared.
      enabled: False skips the stage.
      validate_only: check the settings and return before any work (the main job does this
        before training, so a bad setting costs no training time).
      every_epochs: spacing, in epochs, of the steps measured over time: of the snapshots two runs
        share, the one nearest to each multiple of `every_epochs` is measured, plus the first and
        the last (see `grid_steps`). The default matches the children's snapshot grid, so the
        children are measured on that grid; None measures every common snapshot.
      barrier_alphas: points of the interpolation grid of the error barrier over time, from 0
        to 1 with both ends. Fewer than the main job's final barrier because it runs at every
        common snapshot.
      batch_norm_train_examples: size of the fixed stratified training subset on which the
        batch-norm statistics of every interpolated network are recomputed (models with batch
        norm only); None uses the whole training set.
      last_snapshots: number of a pair's last common snapshots averaged in `final_child_distance`.
      tsne_test_examples: size of the fixed stratified test subset whose class probabilities
        form each network's t-SNE input, a vector of `tsne_test_examples * K` values; capped
        at the size of the test set.
      tsne_snapshots_per_run: maximum snapshots per run in the embedding, spread evenly in
        epochs from the run's first snapshot to its last (both always included).
      tsne_perplexity: t-SNE perplexity; None uses `min(30, (N - 1) / 3)` for N points.
      tsne_seed: `random_state` of t-SNE.
      tsne_threads: OpenMP threads of the t-SNE fit. One suits a few hundred points. On a
        2-core machine shared with other jobs, scikit-learn 1.9's default thread count made a
        224-point fit take 47 s instead of 4 s.
      write_tensorboard: write the distances over time as TensorBoard scalars.
    """
    if not enabled:
        logging.info("Motion stage disabled; skipping.")
        return
    tsne_test_examples = min(tsne_test_examples, job.data.num_test)
    _validate(job, spawn_steps, num_children, every_epochs, barrier_alphas, last_snapshots, tsne_test_examples,
              tsne_snapshots_per_run, tsne_perplexity, tsne_threads)
    if validate_only:
        return
    started = time.time()

    logging.info("Phase: function-space motion of children over time (%d spawn epochs)", len(spawn_steps))
    over_time, rewritten = write_children_over_time(
        job, spawn_steps, num_children, every_epochs, barrier_alphas, batch_norm_train_examples, write_tensorboard
    )

    logging.info("Phase: final child distances over the last %d snapshots", last_snapshots)
    write_final_child_distance(job, over_time, last_snapshots, force=rewritten)

    logging.info("Phase: t-SNE of parents and children in function space")
    write_tsne(job, spawn_steps, num_children, tsne_test_examples, tsne_snapshots_per_run, tsne_perplexity, tsne_seed,
               tsne_threads)
    logging.info("Motion stage finished in %.1f s", time.time() - started)


def _validate(job, spawn_steps, num_children, every_epochs, barrier_alphas, last_snapshots, tsne_test_examples,
              tsne_snapshots_per_run, tsne_perplexity, tsne_threads) -> None:
    """Raises ValueError naming the first invalid setting, before any work."""
    if num_children < 2:
        raise ValueError(f"Invalid num_children {num_children}; the motion stage compares pairs, so use 2 or more.")
    if every_epochs is not None and not every_epochs > 0:
        raise ValueError(f"Invalid motion.measure.every_epochs {every_epochs}; use a positive number or None.")
    if barrier_alphas < 2:
        raise ValueError(f"Invalid motion.measure.barrier_alphas {barrier_alphas}; use 2 or more (the two ends).")
    if last_snapshots < 1:
        raise ValueError(f"Invalid motion.measure.last_snapshots {last_snapshots}; use 1 or more.")
    if not 2 <= tsne_test_examples <= job.data.num_test:
        raise ValueError(
            f"Invalid motion.measure.tsne_test_examples {tsne_test_examples}; use 2 to {job.data.num_test} "
            "(the number of test examples)."
        )
    if tsne_snapshots_per_run < 2:
        raise ValueError(
            f"Invalid motion.measure.tsne_snapshots_per_run {tsne_snapshots_per_run}; use 2 or more "
            "(the first and last snapshot)."
        )
    if tsne_perplexity is not None and not tsne_perplexity > 0:
        raise ValueError(f"Invalid motion.measure.tsne_perplexity {tsne_perplexity}; use a positive number or None.")
    if tsne_threads < 1:
        raise ValueError(f"Invalid motion.measure.tsne_threads {tsne_threads}; use 1 or more.")
    for spawn_step in spawn_steps:
        if not 0 <= spawn_step < job.total_steps:
            raise ValueError(f"Invalid spawn step {spawn_step}; use steps from 0 to {job.total_steps - 1}.")


# ----------------------------------------------------------------------------------------------
# 1. Distances between two networks at every common snapshot.


def common_steps(run_a: storage.RunPaths, run_b: storage.RunPaths) -> list[int]:
    """Returns the sorted steps at which both finished runs have a snapshot.

    Raises:
      ValueError: when either run has not trained to its final step (no `DONE` marker).
    """
    for paths in (run_a, run_b):
        if not SnapshotStore(paths).is_done():
            raise ValueError(
                f"Run {paths.name} at {paths.root} is not finished; run the main job to completion "
                "before the motion stage."
            )
    steps_a = SnapshotStore(run_a).read()["step"].astype(int)
    steps_b = SnapshotStore(run_b).read()["step"].astype(int)
    return sorted(set(steps_a) & set(steps_b))


def grid_steps(steps, steps_per_epoch: float, every_epochs: Optional[float]) -> list[int]:
    """Thins sorted snapshot steps to about one per `every_epochs`, aligned to multiples of it.

    Keeps the first and the last step and, for each grid epoch `i * every_epochs` between them,
    the step nearest to it (the earlier one on ties) if it lies within half a spacing. Steps that
    lie exactly on the grid are therefore all kept. None keeps every step.
    """
    steps = sorted(int(step) for step in steps)
    if every_epochs is None or len(steps) <= 2:
        return steps
    epochs = np.asarray(steps, dtype=np.float64) / steps_per_epoch
    first = int(np.ceil(epochs[0] / every_epochs - 1e-9))
    last = int(np.floor(epochs[-1] / every_epochs + 1e-9))
    kept = {steps[0], steps[-1]}
    for target in np.arange(first, last + 1) * every_epochs:
        # Rounded so that rounding noise cannot break a tie in favour of the later step.
        distances = np.round(np.abs(epochs - target), 9)
        nearest = int(np.argmin(distances))
        if distances[nearest] <= 0.5 * every_epochs + 1e-9:
            kept.add(steps[nearest])
    return sorted(kept)


def measure_pair_over_time(
    job: common.Job,
    model: keras.Model,
    run_a: storage.RunPaths,
    run_b: storage.RunPaths,
    alphas: np.ndarray,
    batch_norm_x: Optional[np.ndarray],
    every_epochs: Optional[float] = 1.0 / 3.0,
) -> list[dict]:
    """Measures two runs on the test set at their common snapshots, thinned by `grid_steps`.

    Returns one dict per (step, measure) with keys step, epoch, measure, value; the measures are
    `OVER_TIME_MEASURES`. The function-space distance compares the networks with their own
    batch-norm statistics, while the error barrier recomputes them on `batch_norm_x` for every
    interpolated network, the two ends included.
    """
    x_test, y_test = job.data.x_test, job.data.y_test
    steps = grid_steps(common_steps(run_a, run_b), job.steps_per_epoch, every_epochs)
    rows = []
    started = last_log = time.time()
    for done, step in enumerate(steps, start=1):
        weights_a = job.weights_at(model, run_a, step)
        weights_b = job.weights_at(model, run_b, step)

        predictions_a = np.argmax(evaluation.logits(model, weights_a, x_test), axis=-1)
        predictions_b = np.argmax(evaluation.logits(model, weights_b, x_test), axis=-1)
        values = {
            "function_space_distance": basins.function_space_distance(
                predictions_a, predictions_b, y_test, job.data.num_classes),
            "error_barrier": basins.error_barrier(model, weights_a, weights_b, x_test, y_test, alphas, batch_norm_x).barrier,
            "weight_l2_distance": basins.weight_distance(weights_a, weights_b),
        }
        for name in OVER_TIME_MEASURES:
            rows.append({"step": step, "epoch": step / job.steps_per_epoch, "measure": name, "value": values[name]})

        if time.time() - last_log >= PROGRESS_EVERY_SECONDS:
            last_log = time.time()
            logging.info("Motion: %s~%s, %d of %d steps (%.2f steps/s)", run_a.name, run_b.name, done, len(steps),
                         done / (last_log - started))
    return rows


def write_children_over_time(
    job: common.Job,
    spawn_steps: list[int],
    num_children: int,
    every_epochs: Optional[float] = 1.0 / 3.0,
    barrier_alphas: int = 5,
    batch_norm_train_examples: Optional[int] = 1000,
    write_tensorboard: bool = True,
) -> tuple[pd.DataFrame, bool]:
    """Writes `tables/children_over_time.csv` from per-spawn-epoch caches; returns (table, rewritten).

    Each group of pairs (the children of one spawn epoch, or the two parents) is measured once and
    cached as `analysis/motion/over_time_<group>.csv`. A cache is reused when it contains the
    same pairs and settings, so an interrupted stage resumes at the first missing group. The
    table is rewritten, and `rewritten` is True, when a group was measured in this call or the
    existing table covers other pairs.

    Columns: spawn_epoch (NaN for the parents), pair ("children" or "parents"), run_a, run_b,
    step, epoch, measure, value, split ("test"), every_epochs (0 when every common snapshot is
    measured), barrier_alphas, batch_norm_examples (0 for models without batch norm).
    """
    model = job.new_model()
    alphas = np.linspace(0.0, 1.0, barrier_alphas)
    batch_norm_x = job.train_subset(batch_norm_train_examples)[0] if evaluation.has_batch_norm(model) else None
    settings = {"split": "test", "every_epochs": every_epochs or 0.0, "barrier_alphas": barrier_alphas,
                "batch_norm_examples": 0 if batch_norm_x is None else len(batch_norm_x)}

    frames = []
    recomputed = False
    for group, pairs in _pair_groups(job, spawn_steps, num_children).items():
        cache_path = job.run.analysis(f"motion/over_time_{group}.csv")
        cached = _read_over_time_cache(cache_path, pairs, settings)
        if cached is not None:
            logging.info("Motion over time of %s is cached; skipping.", group)
            frames.append(cached)
            continue

        started = time.time()
        rows = []
        for spawn_epoch, pair, run_a, run_b in pairs:
            pair_rows = measure_pair_over_time(job, model, run_a, run_b, alphas, batch_norm_x, every_epochs)
            keys = {"spawn_epoch": spawn_epoch, "pair": pair, "run_a": run_a.name, "run_b": run_b.name}
            rows.extend(dict(keys, **row, **settings) for row in pair_rows)
        frame = pd.DataFrame(rows)
        if write_tensorboard:
            _write_tensorboard(job, frame, num_children)
        storage.write_csv_atomic(cache_path, frame)
        recomputed = True

        num_steps = frame["step"].nunique()
        elapsed = time.time() - started
        logging.info("Motion over time of %s: %d pairs x %d steps in %.1f s (%.2f steps/s)", group, len(pairs),
                     num_steps, elapsed, len(pairs) * num_steps / max(elapsed, 1e-9))
        frames.append(frame)

    table = pd.concat(frames, ignore_index=True)
    path = job.run.table(OVER_TIME_TABLE)
    rewritten = recomputed or not _same_rows(path, table, ["run_a", "run_b", "step", "measure"])
    if rewritten:
        storage.write_csv_atomic(path, table)
    return table, rewritten


def _same_rows(path: str, table: pd.DataFrame, keys: list[str]) -> bool:
    """Returns whether the table at `path` exists and has the same `keys` columns as `table`, row by row."""
    if not storage.exists(path):
        return False
    existing = storage.read_csv(path)
    if len(existing) != len(table):
        return False
    return all((existing[key].to_numpy() == table[key].to_numpy()).all() for key in keys)


def _pair_groups(job: common.Job, spawn_steps, num_children) -> dict[str, list]:
    """Groups `job.pairs` by cache name: `spawn_<EPOCH>` per spawn epoch, then `parents`."""
    groups: dict[str, list] = {}
    for spawn_epoch, pair, run_a, run_b in job.pairs(spawn_steps, num_children):
        group = "parents" if pair == "parents" else f"spawn_{storage.format_epoch(spawn_epoch)}"
        groups.setdefault(group, []).append((spawn_epoch, pair, run_a, run_b))
    return groups


def _read_over_time_cache(path: str, pairs, settings: dict) -> Optional[pd.DataFrame]:
    """Returns the cached group when it covers exactly `pairs` with `settings`, else None."""
    if not storage.exists(path):
        return None
    frame = storage.read_csv(path)
    expected_pairs = {(run_a.name, run_b.name) for _, _, run_a, run_b in pairs}
    cached_pairs = set(zip(frame["run_a"], frame["run_b"]))
    same_settings = all(
        np.allclose(frame[key], value) if isinstance(value, float) else (frame[key] == value).all()
        for key, value in settings.items()
    )
    if cached_pairs != expected_pairs or not same_settings:
        logging.info("Cache %s has other pairs or settings; measuring again.", path)
        return None
    return frame


def _write_tensorboard(job: common.Job, frame: pd.DataFrame, num_children: int) -> None:
    """Writes each pair's distances as scalars under its first run's name, at the training steps.

    Children use the tags `children/<measure>`. With more than two children, child i is compared
    with several later siblings, so the pair (i, j) uses `children/<measure>/vs_child_<j>` for
    every j other than i + 1. The parents use `parents/<measure>` under parent 0.
    """
    for (pair, run_a, run_b), rows in frame.groupby(["pair", "run_a", "run_b"], sort=False):
        for name in TENSORBOARD_MEASURES:
            series = rows[rows["measure"] == name].sort_values("step")
            tag = f"{pair}/{name}"
            if pair == "children" and num_children > 2:
                index_a = int(run_a.rsplit("_", 1)[-1])
                index_b = int(run_b.rsplit("_", 1)[-1])
                if index_b != index_a + 1:
                    tag = f"{tag}/vs_child_{index_b}"
            tensorboard.write_scalars(job.run.root, run_a, tag, series["step"], series["value"])


# ----------------------------------------------------------------------------------------------
# 2. Final distances with their spread over the last snapshots.


def final_distances(over_time: pd.DataFrame, last_snapshots: int) -> pd.DataFrame:
    """Summarises each pair's measures over its last `last_snapshots` common steps.

    Args:
      over_time: the `children_over_time` table.
      last_snapshots: how many of each pair's last common steps to average.

    Returns:
      One row per (pair, measure) with columns spawn_epoch, pair, run_a, run_b, measure, mean,
      std (population standard deviation, ddof 0), count, first_epoch (the earliest epoch
      averaged) and last_epoch.
    """
    rows = []
    keys = ["pair", "run_a", "run_b", "measure"]
    for (pair, run_a, run_b, name), group in over_time.groupby(keys, sort=False):
        last = group.sort_values("step").tail(last_snapshots)
        values = last["value"].to_numpy(dtype=np.float64)
        rows.append({
            "spawn_epoch": float(group["spawn_epoch"].iloc[0]),
            "pair": pair,
            "run_a": run_a,
            "run_b": run_b,
            "measure": name,
            "mean": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
            "std": float(np.nanstd(values)) if np.isfinite(values).any() else float("nan"),
            "count": int(np.isfinite(values).sum()),
            "first_epoch": float(last["epoch"].min()),
            "last_epoch": float(last["epoch"].max()),
        })
    return pd.DataFrame(rows)


def write_final_child_distance(
    job: common.Job, over_time: pd.DataFrame, last_snapshots: int = 3, force: bool = False
) -> pd.DataFrame:
    """Writes `tables/final_child_distance.csv`: `final_distances` plus the final test error barrier.

    The column `final_test_error_barrier` is the `barrier` of the pair's test-split row in
    `tables/error_barrier.csv` (the main job's barrier at the final step, on its own alpha
    grid), NaN while that table is absent. The table is rewritten when `force` is set, when it
    is missing, when `last_snapshots` changed, or when the barrier table appeared since.
    """
    path = job.run.table(FINAL_TABLE)
    barriers = _final_test_barriers(job)
    if storage.exists(path) and not force:
        existing = storage.read_csv(path)
        same_window = (existing["last_snapshots"] == last_snapshots).all()
        barrier_joined = existing["final_test_error_barrier"].notna().any() or barriers is None
        if same_window and barrier_joined:
            logging.info("Table %s exists; skipping.", FINAL_TABLE)
            return existing

    table = final_distances(over_time, last_snapshots)
    table["last_snapshots"] = last_snapshots
    if barriers is None:
        logging.warning("No tables/error_barrier.csv yet; final_test_error_barrier is NaN until it exists.")
        table["final_test_error_barrier"] = float("nan")
    else:
        table = table.merge(barriers, on=["run_a", "run_b"], how="left")
    storage.write_csv_atomic(path, table)
    return table


def _final_test_barriers(job: common.Job) -> Optional[pd.DataFrame]:
    """Returns (run_a, run_b, final_test_error_barrier) from the main job's barrier table, or None."""
    path = job.run.table("error_barrier")
    if not storage.exists(path):
        return None
    barriers = storage.read_csv(path)
    barriers = barriers[barriers["split"] == "test"][["run_a", "run_b", "barrier"]]
    return barriers.rename(columns={"barrier": "final_test_error_barrier"})


# ----------------------------------------------------------------------------------------------
# 3. A common t-SNE embedding of the networks' test-set probabilities.


def spread_steps(steps, epochs, count: int) -> list[int]:
    """Picks at most `count` steps spread evenly in epochs from the first to the last.

    For each of `count` evenly spaced target epochs the nearest snapshot is taken, the earlier
    one on ties. Repeats are dropped, so fewer steps come back when snapshots are sparse.

    Args:
      steps: snapshot steps, shape (S,), sorted.
      epochs: their epochs, shape (S,).
      count: at least 2.
    """
    steps = np.asarray(steps)
    epochs = np.asarray(epochs, dtype=np.float64)
    targets = np.linspace(epochs[0], epochs[-1], count)
    nearest = [int(np.argmin(np.abs(epochs - target))) for target in targets]
    return sorted({int(steps[i]) for i in nearest})


def tsne_test_indices(job: common.Job, size: int) -> np.ndarray:
    """Returns the fixed stratified test subset of the t-SNE inputs, int64 indices of shape (size,)."""
    return subsets.stratified_subset(job.data.y_test, size, seed=job.seed)


def run_probabilities(
    job: common.Job, model: keras.Model, paths: storage.RunPaths, steps: list[int], test_indices: np.ndarray
) -> np.ndarray:
    """Returns softmax probabilities of shape (len(steps), n, K) on the test subset, cached per run.

    The cache `analysis/motion/probabilities/<run>.npz` contains arrays `steps`, `test_indices` and
    `probabilities` (float32). It is reused when it was computed on the same subset and contains
    every requested step. Otherwise the requested steps are computed and replace the cache.
    """
    path = job.run.analysis(f"motion/probabilities/{paths.name}.npz")
    if storage.exists(path):
        cached = storage.load_npz(path)
        position = {int(step): i for i, step in enumerate(cached["steps"])}
        if np.array_equal(cached["test_indices"], test_indices) and all(step in position for step in steps):
            return cached["probabilities"][[position[step] for step in steps]]

    x = job.data.x_test[test_indices]
    probabilities = []
    for step in steps:
        logits = evaluation.logits(model, job.weights_at(model, paths, step), x)
        probabilities.append(_softmax(logits))
    probabilities = np.stack(probabilities).astype(np.float32)
    storage.save_npz_atomic(path, steps=np.asarray(steps, dtype=np.int64), test_indices=test_indices,
                            probabilities=probabilities)
    return probabilities


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def default_perplexity(num_points: int) -> float:
    """`min(30, (N - 1) / 3)`: scikit-learn's default, lowered so that it stays below N points."""
    return min(MAX_TSNE_PERPLEXITY, (num_points - 1) / 3.0)


def write_tsne(
    job: common.Job,
    spawn_steps: list[int],
    num_children: int,
    test_examples: int = 200,
    snapshots_per_run: int = 16,
    perplexity: Optional[float] = None,
    seed: int = 0,
    threads: int = 1,
) -> pd.DataFrame:
    """Writes `tables/tsne.csv`: one 2-D t-SNE embedding of every selected snapshot of every run.

    Each point is the flattened (test_examples * K) vector of a network's class probabilities
    on the fixed test subset. The embedding is scikit-learn's `TSNE` with Euclidean distance,
    PCA initialisation, `random_state=seed` and `threads` OpenMP threads. Columns: run, role ("parent" or "child"), index,
    spawn_epoch (NaN for parents), step, epoch, x, y, test_examples, snapshots_per_run,
    perplexity, seed. An existing table with the same settings is kept.

    Raises:
      ValueError: when `perplexity` is not below the number of points.
    """
    runs = _tsne_runs(job, spawn_steps, num_children)
    selections = []
    for role, index, spawn_epoch, paths in runs:
        table = SnapshotStore(paths).read()
        steps = spread_steps(table["step"].to_numpy(), table["epoch"].to_numpy(), snapshots_per_run)
        selections.append((role, index, spawn_epoch, paths, steps))
    num_points = sum(len(steps) for *_, steps in selections)
    perplexity = default_perplexity(num_points) if perplexity is None else float(perplexity)
    if not perplexity < num_points:
        raise ValueError(
            f"Invalid motion.measure.tsne_perplexity {perplexity}; it must be below the number of "
            f"points {num_points}, so lower it or raise tsne_snapshots_per_run."
        )
    settings = {"test_examples": test_examples, "snapshots_per_run": snapshots_per_run,
                "perplexity": perplexity, "seed": seed}

    path = job.run.table(TSNE_TABLE)
    expected = pd.DataFrame({"run": [paths.name for *_, paths, steps in selections for _ in steps],
                             "step": [step for *_, steps in selections for step in steps]})
    if _same_rows(path, expected, ["run", "step"]):
        existing = storage.read_csv(path)
        if all(np.allclose(existing[key], value) for key, value in settings.items()):
            logging.info("Table %s exists; skipping.", TSNE_TABLE)
            return existing

    model = job.new_model()
    indices = tsne_test_indices(job, test_examples)
    vectors = []
    rows = []
    started = time.time()
    for role, index, spawn_epoch, paths, steps in selections:
        probabilities = run_probabilities(job, model, paths, steps, indices)
        vectors.append(probabilities.reshape(len(steps), -1))
        for step in steps:
            rows.append({"run": paths.name, "role": role, "index": index, "spawn_epoch": spawn_epoch,
                         "step": step, "epoch": step / job.steps_per_epoch})
    logging.info("Motion: probabilities of %d snapshots of %d runs in %.1f s", num_points, len(runs),
                 time.time() - started)

    points = np.concatenate(vectors, axis=0).astype(np.float64)
    started = time.time()
    with threadpool_limits(limits=threads, user_api="openmp"):
        tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        embedding = tsne.fit_transform(points)
    logging.info("Motion: t-SNE of %d points of dimension %d in %.1f s", points.shape[0], points.shape[1],
                 time.time() - started)
    table = pd.DataFrame(rows)
    table["x"] = embedding[:, 0]
    table["y"] = embedding[:, 1]
    for key, value in settings.items():
        table[key] = value
    storage.write_csv_atomic(path, table)
    return table


def _tsne_runs(job: common.Job, spawn_steps, num_children) -> list[tuple]:
    """Returns (role, index, spawn epoch or NaN, paths) for the parents, then every child."""
    runs = [("parent", index, float("nan"), job.parent_paths(index)) for index in range(common.NUM_PARENTS)]
    for spawn_step in spawn_steps:
        for child in range(num_children):
            runs.append(("child", child, spawn_step / job.steps_per_epoch, job.child_paths(spawn_step, child)))
    for *_, paths in runs:
        if not SnapshotStore(paths).is_done():
            raise ValueError(f"Run {paths.name} at {paths.root} is not finished; run the main job to completion "
                             "before the motion stage.")
    return runs
