"""The main job: train two parents, spawn children, and measure basin fate.

Stages, each skipped when its output exists so that rerunning the command resumes:

1. train parent 0 and an independent parent 1 (different initialisation and data order);
2. for every spawn epoch, train `num_children` children from parent 0's snapshot at that
   epoch to the parent's final step, each with its own data-order seed;
3. measure, at the end of training, the error barrier, function-space distance and weight
   distance between every pair of children of a spawn epoch and between the two parents;
4. collect learning curves, then run the measurement stages in `_stages()` (function-space
   motion, kernel dynamics, curvature, linearized training, landscape sections);
5. write TensorBoard summaries, draw the figures from the tables and write `report.html`.

Every setting, the stages' included, is checked before the first training step.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import gin
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from tfntk import config as tfntk_config
from tfntk import storage
from tfntk.data import datasets
from tfntk.experiments import common
from tfntk.measures import basins, evaluation
from tfntk.reporting import figures, html, tensorboard
from tfntk.training import loop
from tfntk.training.snapshots import CorruptCheckpointError, SnapshotStore


class InvalidSettingError(ValueError):
    """A setting is out of range (for example a spawn epoch past the end of training)."""


RUN_ERRORS = (
    InvalidSettingError,
    datasets.DatasetNotFoundError,
    CorruptCheckpointError,
    loop.NonFiniteLossError,
)


@gin.configurable
def main_job(
    run_dir: str,
    command: str = "",
    dataset: str = "digits",
    data_dir: Optional[str] = None,
    model: str = "simple_cnn",
    model_kwargs: Optional[dict] = None,
    seed: int = 0,
    spawn_epochs: Sequence[float] = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0),
    num_children: int = 2,
    barrier_alphas: int = 11,
    barrier_train_examples: Optional[int] = 2000,
    deterministic: bool = True,
    strategy: str = "auto",
) -> None:
    """Runs the main job in `run_dir`, resuming whatever an earlier call left there.

    Args:
      run_dir: the run directory (created when absent).
      command: the command line, saved in `command.txt`.
      dataset: "digits", "mnist1d", "cifar10", "cifar100" or "synthetic".
      data_dir: tensorflow-datasets directory for CIFAR; default `$TFDS_DATA_DIR`.
      model: "simple_cnn", "resnet20", "wide_resnet" or "mlp".
      model_kwargs: extra keyword arguments of the model builder, e.g. {"batch_norm": False}.
      seed: base seed; the parents' and children's seeds are derived from it.
      spawn_epochs: parent epochs at which children are spawned (rounded to the nearest step).
      num_children: children per spawn epoch (at least 2 for pairwise measures).
      barrier_alphas: points of the interpolation grid from 0 to 1, ends included.
      barrier_train_examples: training examples (a fixed stratified subset) used for the
        train-split barrier and the batch-norm recomputation; None uses all.
      deterministic: enable TensorFlow op determinism so that resumed runs are bit-exact.
      strategy: "auto", "mirrored" or "default"; see `loop.make_strategy`.
    """
    started = time.time()
    logging.info("Phase: setup of %s", run_dir)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    run = storage.RunDir(run_dir)
    data = datasets.load_dataset(dataset, data_dir=data_dir, seed=seed) if dataset in datasets.DATASET_NAMES else None
    try:
        if data is None:
            raise ValueError(f"Unknown main_job.dataset {dataset!r}; use one of {', '.join(datasets.DATASET_NAMES)}.")
        training = loop.TrainingConfig()
        training.validate(data.num_train)
        job = common.Job(run, data, training, model, dict(model_kwargs or {}), seed, loop.make_strategy(strategy))
        job.new_model()
        spawn_steps = _validate(job, spawn_epochs, num_children, barrier_alphas)
        _check_finished_parents(job)
        for stage in _stages():
            stage.measure(job, spawn_steps, num_children, validate_only=True)
    except (ValueError, TypeError) as error:
        raise InvalidSettingError(" ".join(str(error).split())) from error
    job.extra_snapshot_steps = tuple(spawn_steps)

    storage.makedirs(run_dir)
    storage.write_text_atomic(run.command_txt, command + "\n")
    tfntk_config.save_operative_config(run.config_gin)

    logging.info("Phase: training parents (%d steps each)", job.total_steps)
    parents = [job.train_parent(index) for index in range(2)]

    for spawn_step in spawn_steps:
        spawn_epoch = spawn_step / job.steps_per_epoch
        logging.info("Phase: training %d children spawned at epoch %.3f", num_children, spawn_epoch)
        for child in range(num_children):
            job.train_child(parents[0], spawn_step, child)

    logging.info("Phase: basin measures (error barriers, function-space and weight distances)")
    _measure_basins(job, spawn_steps, num_children, np.linspace(0.0, 1.0, barrier_alphas), barrier_train_examples)

    curves = common.write_learning_curves(job, spawn_steps, num_children)
    for stage in _stages():
        try:
            stage.measure(job, spawn_steps, num_children)
        except ValueError as error:
            # Settings were checked before training; what remains is data-dependent (for example
            # a cached analysis subset of another size). Trained runs and tables are kept.
            raise InvalidSettingError(" ".join(str(error).split())) from error

    logging.info("Phase: TensorBoard summaries, figures and report")
    tfntk_config.save_operative_config(run.config_gin)
    tensorboard.write_hparams(run_dir, curves)
    tensorboard.write_text(run_dir, "parent_0", "config/operative_gin", _markdown_code(storage.read_text(run.config_gin)))
    figures.draw_all(run_dir)
    html.write_report(run_dir)
    logging.info("Main job finished in %.1f s; tables in %s", time.time() - started, storage.join(run_dir, "tables"))


def _stages() -> list:
    """Returns the measurement stages that run after the basin measures, in order.

    Each module has a gin-configurable `measure(job, spawn_steps, num_children, *, enabled=True,
    ...)` that skips work whose output exists.
    """
    # pylint: disable=import-outside-toplevel
    from tfntk.experiments import curvature, kernel_dynamics, linearized, motion, sections

    return [motion, kernel_dynamics, curvature, linearized, sections]


def _check_finished_parents(job: "common.Job") -> None:
    """Raises if a finished parent in the run directory ends at another step than the settings.

    A finished run is never trained further, so resuming it under changed training settings would
    measure the old parents while `config.gin` claimed the new settings.
    """
    for index in range(2):
        store = SnapshotStore(job.parent_paths(index))
        if not store.is_done():
            continue
        final_step = int(store.read()["step"].max())
        if final_step != job.total_steps:
            raise ValueError(
                f"Parent {index} in {job.run.root} finished at step {final_step}, but the settings "
                f"give {job.total_steps} steps (TrainingConfig.epochs {job.training.epochs}). Use a "
                "new --run_dir, or restore the training settings the run was made with."
            )


def _validate(job: "common.Job", spawn_epochs, num_children: int, barrier_alphas: int) -> list[int]:
    """Checks the settings before any training; returns the spawn steps."""
    final_epoch = job.training.epochs
    for epoch in spawn_epochs:
        if not 0 <= float(epoch) < final_epoch:
            raise InvalidSettingError(
                f"Invalid spawn epoch {epoch}: it must be at least 0 and before the final epoch "
                f"{final_epoch}; change main_job.spawn_epochs or TrainingConfig.epochs."
            )
    if num_children < 2:
        raise InvalidSettingError(f"Invalid main_job.num_children {num_children}; use 2 or more to compare children.")
    if barrier_alphas < 2:
        raise InvalidSettingError(f"Invalid main_job.barrier_alphas {barrier_alphas}; use 2 or more (the ends).")
    steps = sorted({int(round(float(e) * job.steps_per_epoch)) for e in spawn_epochs})
    for epoch in spawn_epochs:
        step = int(round(float(epoch) * job.steps_per_epoch))
        if abs(step / job.steps_per_epoch - float(epoch)) > 1e-9:
            logging.info("Spawn epoch %g is rounded to step %d (epoch %.3f), the nearest optimizer step.",
                         float(epoch), step, step / job.steps_per_epoch)
    return steps


def _measure_basins(job, spawn_steps, num_children, alphas, barrier_train_examples) -> None:
    """Writes `error_barrier`, `interpolation` and `pair_distance` tables (one stage)."""
    run = job.run
    if all(storage.exists(run.table(name)) for name in ("error_barrier", "interpolation", "pair_distance")):
        logging.info("Basin measures exist; skipping.")
        return

    model = job.new_model()
    train_x, train_y = job.train_subset(barrier_train_examples)
    batch_norm_x = train_x if evaluation.has_batch_norm(model) else None

    barrier_rows = []
    curve_rows = []
    distance_rows = []
    for spawn_epoch, pair, run_a, run_b in job.pairs(spawn_steps, num_children):
        weights_a = job.final_weights(model, run_a)
        weights_b = job.final_weights(model, run_b)
        common_keys = {"spawn_epoch": spawn_epoch, "pair": pair, "run_a": run_a.name, "run_b": run_b.name}

        for split, x, y in (("test", job.data.x_test, job.data.y_test), ("train", train_x, train_y)):
            result = basins.error_barrier(model, weights_a, weights_b, x, y, alphas, batch_norm_x)
            barrier_rows.append(
                dict(common_keys, split=split, barrier=result.barrier, alpha_at_max=result.alpha_at_max,
                     error_a=result.errors[-1], error_b=result.errors[0])
            )
            for alpha, error, loss in zip(result.alphas, result.errors, result.losses):
                curve_rows.append(dict(common_keys, split=split, alpha=alpha, error=error, loss=loss))

        predictions_a = np.argmax(evaluation.logits(model, weights_a, job.data.x_test), axis=-1)
        predictions_b = np.argmax(evaluation.logits(model, weights_b, job.data.x_test), axis=-1)
        distance_rows.append(dict(common_keys, measure="function_space_distance", value=basins.function_space_distance(
            predictions_a, predictions_b, job.data.y_test, job.data.num_classes)))
        distance_rows.append(dict(common_keys, measure="weight_l2_distance", value=basins.weight_distance(weights_a, weights_b)))
        when = "independent parents" if pair == "parents" else f"spawn epoch {spawn_epoch:.3f}"
        logging.info("Measured %s and %s (%s): test error barrier %.4f", run_a.name, run_b.name, when,
                     barrier_rows[-2]["barrier"])

    storage.write_csv_atomic(run.table("interpolation"), pd.DataFrame(curve_rows))
    storage.write_csv_atomic(run.table("pair_distance"), pd.DataFrame(distance_rows))
    storage.write_csv_atomic(run.table("error_barrier"), pd.DataFrame(barrier_rows))


def _markdown_code(text: str) -> str:
    """Indents text so TensorBoard's markdown renderer shows it as a code block."""
    return "\n".join("    " + line for line in text.splitlines())
