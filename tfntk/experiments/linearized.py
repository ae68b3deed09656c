"""Linearized and low-learning-rate training from onset epochs of parent 0.

For every onset epoch (rounded to the nearest snapshot of parent 0), this stage

1. Taylor-expands the parent's network at its snapshot weights (order 1, the linearized model,
   and optionally order 2) and trains the expansion with SGD with momentum, recording train and
   test error after every epoch. The order-1 expansion is a kernel machine whose kernel, the
   empirical NTK at the onset, was learned by the parent until then. At onset 0 it is the
   standard NTK at initialisation. The error of the nonlinear network with the trained weights
   plugged back in is recorded beside it.
2. trains the nonlinear network from the same snapshot at a low constant learning rate, several
   times with different data orders, and records its error.

The baseline follows Fort et al. (2020): the expansion trains at learning rate 1e-3 with
momentum 0.9 and no weight decay, its error is read at the best stopping epoch by test error,
and the low-learning-rate children train at 1e-3, two data orders, averaged. The nonlinear
advantage at an onset is the linearized error minus the low-learning-rate error. The default
numbers of epochs are small, sized for the quick digits preset, far below the paper's 200
linearized and up to 1000 low-learning-rate epochs.

Every run is a resumable work unit under `linearized/onset_<EPOCH>/<name>/`: `order_<k>` for
the expansions and `low_lr_seed_<i>` for the low-learning-rate children. Tables
(`linearized_curves`, `linearized`, `nonlinear_advantage`) are rebuilt from the runs' CSV files
and rewritten only when their content changes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from typing import Optional, Sequence

import gin
import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from tfntk import linearize, storage
from tfntk.data import pipeline
from tfntk.experiments import common
from tfntk.measures import evaluation
from tfntk.training import loop
from tfntk.training.snapshots import SnapshotStore

# Keys mixed into `common.derive_seed` (0 to 2 are taken by parents and children).
LOW_LR_SEED_KEY = 3
LINEARIZED_SEED_KEY = 4

SUPPORTED_ORDERS = (1, 2)

CURVE_COLUMNS = (
    "epoch_after_onset",
    "epoch",
    "step",
    "learning_rate",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "plugged_back_train_error",
    "plugged_back_test_error",
    "wall_time_s",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Settings of the stage. `measure` documents their meaning and defaults."""

    onset_epochs: tuple
    orders: tuple
    learning_rate: float
    momentum: float
    epochs: int
    weight_decay: float
    batch_size: int
    low_lr_learning_rate: float
    low_lr_epochs: int
    low_lr_seeds: int

    def validate(self, job: common.Job) -> None:
        """Raises ValueError naming the first invalid setting and how to fix it."""
        final_epoch = job.total_steps / job.steps_per_epoch
        if not self.onset_epochs:
            raise ValueError("linearized.measure.onset_epochs is empty; list at least one onset epoch, e.g. (0.0,).")
        for epoch in self.onset_epochs:
            if not _is_number(epoch) or not 0 <= float(epoch) <= final_epoch:
                raise ValueError(
                    f"Invalid linearized.measure.onset_epochs value {epoch!r}: onset epochs must lie "
                    f"between 0 and the parent's final epoch {final_epoch:g}; remove it or raise "
                    "TrainingConfig.epochs."
                )
        if not self.orders or any(order not in SUPPORTED_ORDERS for order in self.orders):
            raise ValueError(f"Invalid linearized.measure.orders {self.orders!r}; use (1,) or (1, 2).")
        for name in ("learning_rate", "low_lr_learning_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ValueError(f"Invalid linearized.measure.{name} {value!r}; use a positive number such as 1e-3.")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"Invalid linearized.measure.momentum {self.momentum!r}; use a number at least 0 and below 1.")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"Invalid linearized.measure.weight_decay {self.weight_decay!r}; use 0 or more.")
        for name, minimum in (("epochs", 1), ("low_lr_epochs", 1), ("low_lr_seeds", 0)):
            value = getattr(self, name)
            if not _is_whole(value) or value < minimum:
                raise ValueError(f"Invalid linearized.measure.{name} {value!r}; use a whole number of at least {minimum}.")
        replicas = job.strategy.num_replicas_in_sync
        if not _is_whole(self.batch_size) or not 0 < self.batch_size <= job.data.num_train or self.batch_size % replicas:
            raise ValueError(
                f"Invalid linearized.measure.batch_size {self.batch_size!r}; use a whole number from 1 to "
                f"{job.data.num_train} (the training examples) divisible by the {replicas} replicas."
            )


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@gin.configurable(module="linearized")
def measure(
    job: common.Job,
    spawn_steps: list[int],
    num_children: int,
    *,
    enabled: bool = True,
    validate_only: bool = False,
    onset_epochs: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0),
    orders: Sequence[int] = (1,),
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    epochs: int = 4,
    weight_decay: float = 0.0,
    batch_size: Optional[int] = None,
    low_lr_learning_rate: float = 1e-3,
    low_lr_epochs: int = 4,
    low_lr_seeds: int = 2,
) -> None:
    """Trains Taylor-expanded and low-learning-rate networks from parent 0's onset epochs.

    Writes the tables `linearized_curves`, `linearized` and `nonlinear_advantage` (the last only
    when `low_lr_seeds > 0`), and TensorBoard scalars per run. Finished runs are skipped and
    interrupted ones resume from their last epoch. Raising `epochs` or `low_lr_epochs` later
    continues the existing runs; lowering them makes the tables read the runs' earlier rows.

    Args:
      job: the main job, with parent 0 trained.
      spawn_steps: the main job's spawn steps; onsets at these steps get the children's test
        error barrier (from `tables/error_barrier.csv`) in `nonlinear_advantage`.
      num_children: children per spawn epoch (unused here; the barrier is averaged over the
        child pairs found in the table).
      enabled: False skips the stage.
      validate_only: check the settings and return before any work (the main job does this
        before training, so a bad setting costs no training time).
      onset_epochs: parent epochs at which the expansions and the low-learning-rate children
        start, each rounded to the nearest step at which parent 0 has a snapshot. Onset 0 is
        the standard NTK at initialisation. An onset past the parent's final epoch raises.
      orders: Taylor orders to train, 1 (linearized) and optionally 2.
      learning_rate: SGD learning rate of the expansions (1e-3 as in the paper).
      momentum: SGD momentum of the expansions.
      epochs: training epochs of each expansion after its onset.
      weight_decay: coefficient of the L2 penalty `0.5 * weight_decay * |w|^2` on the
        expansion's weights w (it pulls w toward zero, not toward the onset weights).
      batch_size: batch size of the expansions; None uses `TrainingConfig.batch_size`.
      low_lr_learning_rate: constant learning rate of the low-learning-rate children.
      low_lr_epochs: epochs of each low-learning-rate child after its onset.
      low_lr_seeds: low-learning-rate children per onset, each with its own data order; their
        final errors are averaged. 0 skips them and the `nonlinear_advantage` table.
    """
    del num_children
    if not enabled:
        logging.info("Linearized training is disabled; skipping.")
        return

    settings = Settings(
        onset_epochs=tuple(onset_epochs),
        orders=tuple(orders),
        learning_rate=learning_rate,
        momentum=momentum,
        epochs=epochs,
        weight_decay=weight_decay,
        batch_size=job.training.batch_size if batch_size is None else batch_size,
        low_lr_learning_rate=low_lr_learning_rate,
        low_lr_epochs=low_lr_epochs,
        low_lr_seeds=low_lr_seeds,
    )
    settings.validate(job)
    if validate_only:
        return
    onset_steps = onset_steps_for(job, settings.onset_epochs)
    started = time.time()

    for order in settings.orders:
        logging.info(
            "Phase: order-%d Taylor training from %d onset epochs (%d epochs each, learning rate %g)",
            order, len(onset_steps), settings.epochs, settings.learning_rate,
        )
        trainer = TaylorTrainer(job, order, settings)
        for done, onset_step in enumerate(onset_steps):
            trainer.train(onset_step)
            logging.info("Order-%d runs done: %d of %d (%.1f s so far)", order, done + 1, len(onset_steps), time.time() - started)

    if settings.low_lr_seeds:
        logging.info(
            "Phase: low-learning-rate training from %d onset epochs (%d seeds, %d epochs each, learning rate %g)",
            len(onset_steps), settings.low_lr_seeds, settings.low_lr_epochs, settings.low_lr_learning_rate,
        )
        for done, onset_step in enumerate(onset_steps):
            for seed in range(settings.low_lr_seeds):
                train_low_lr(job, onset_step, seed, settings)
            logging.info("Low-learning-rate onsets done: %d of %d (%.1f s so far)", done + 1, len(onset_steps), time.time() - started)

    logging.info("Phase: linearized tables")
    write_tables(job, onset_steps, spawn_steps, settings)
    logging.info("Linearized stage finished in %.1f s", time.time() - started)


def onset_steps_for(job: common.Job, onset_epochs: Sequence[float]) -> list[int]:
    """Returns the sorted, distinct parent-0 snapshot steps nearest to `onset_epochs`.

    Ties go to the earlier snapshot. Raises ValueError when parent 0 has not finished training.
    """
    parent = SnapshotStore(job.parent_paths(0))
    if not parent.is_done():
        raise ValueError(
            f"Parent {job.parent_paths(0).name} has not finished training (no DONE marker in "
            f"{job.parent_paths(0).root}); train the parents (the main job) before the linearized stage."
        )
    table = parent.read()
    snapshot_steps = np.sort(table["step"].to_numpy(dtype=np.int64))
    steps = []
    for epoch in onset_epochs:
        target = float(epoch) * job.steps_per_epoch
        nearest = int(snapshot_steps[np.argmin(np.abs(snapshot_steps - target))])
        if abs(nearest - target) > 1e-6:
            logging.info(
                "Onset epoch %g has no snapshot; using the nearest, step %d (epoch %.3f).",
                float(epoch), nearest, nearest / job.steps_per_epoch,
            )
        steps.append(nearest)
    return sorted(set(steps))


def onset_epoch_of(job: common.Job, onset_step: int) -> float:
    return onset_step / job.steps_per_epoch


def linearized_paths(job: common.Job, onset_step: int, order: int) -> storage.RunPaths:
    return job.run.linearized(onset_epoch_of(job, onset_step), f"order_{order}")


def low_lr_paths(job: common.Job, onset_step: int, seed: int) -> storage.RunPaths:
    return job.run.linearized(onset_epoch_of(job, onset_step), f"low_lr_seed_{seed}")


def linearized_data_seed(job: common.Job, onset_step: int, order: int) -> int:
    return common.derive_seed(job.seed, LINEARIZED_SEED_KEY, onset_step, order)


def low_lr_data_seed(job: common.Job, onset_step: int, seed: int) -> int:
    return common.derive_seed(job.seed, LOW_LR_SEED_KEY, onset_step, seed)


# Taylor-expanded training.


class TaylorTrainer:
    """Trains the order-`order` expansion of the job's network from any onset of parent 0.

    One `TaylorModel`, optimizer and traced training step serve every onset: before each run
    the expansion point, the weights and the optimizer state are reassigned, so the step is
    traced once per order rather than once per run.

    Each run's `snapshots.csv` has one row per epoch after the onset (0 is the onset itself),
    with the columns of `CURVE_COLUMNS`. `step` and `epoch` count in the parent's steps and
    epochs (onset step plus epochs after onset times the parent's steps per epoch), so curves
    line up with the parent's. Train error is measured on the parent's train-error examples
    (`TrainingConfig.eval_train_examples`). The run's latest checkpoint (expansion and
    optimizer) is kept for resuming, older ones are deleted.
    """

    def __init__(self, job: common.Job, order: int, settings: Settings):
        self.job = job
        self.order = order
        self.settings = settings
        self.strategy = job.strategy
        self.steps_per_epoch = pipeline.steps_per_epoch(job.data.num_train, settings.batch_size)
        self.eval_train = job.trainer.eval_train
        self.eval_batch_size = job.training.eval_batch_size

        with self.strategy.scope():
            self.base = job.new_model()
            self.model = linearize.linearize(self.base, order=order, name=f"order_{order}_expansion")
            self.optimizer = keras.optimizers.SGD(learning_rate=settings.learning_rate, momentum=settings.momentum)
            self.optimizer.build(self.model.trainable_variables)
        self.initial_optimizer_state = [tf.identity(v.value) for v in self.optimizer.variables]
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        self.run_epoch = self._make_epoch_fn()
        self.predict = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)

    def _make_epoch_fn(self):
        """Returns a tf.function that runs `num_steps` SGD steps and returns the mean batch loss."""
        return loop.make_train_steps(
            self.model, self.optimizer, self.strategy, self.settings.batch_size, float(self.settings.weight_decay)
        )

    def train(self, onset_step: int) -> pd.DataFrame:
        """Trains the expansion around parent 0's snapshot at `onset_step`; returns its curve.

        Skips a run whose curve already reaches `settings.epochs`, and resumes an interrupted
        or shorter one from its last epoch.
        """
        job, epochs = self.job, self.settings.epochs
        paths = linearized_paths(job, onset_step, self.order)
        curve = read_curve(paths)
        if not curve.empty and curve["epoch_after_onset"].max() >= epochs:
            logging.info("Run %s has %d epochs; skipping.", paths.name, epochs)
            _mark_done(paths)
            return curve[curve["epoch_after_onset"] <= epochs]

        started = time.time()
        self._reset(onset_step)
        writer = tf.summary.create_file_writer(job.run.tensorboard(paths.name))
        if curve.empty:
            curve = self._record_epoch(paths, onset_step, 0, curve, started, writer)
        else:
            last = int(curve["epoch_after_onset"].max())
            SnapshotStore(paths).restore(self.checkpoint, paths.checkpoint_prefix(self._step_at(onset_step, last)))
            logging.info("Resuming %s after epoch %d of %d.", paths.name, last, epochs)
        if storage.exists(paths.done_marker):
            tf.io.gfile.remove(paths.done_marker)

        data_seed = linearized_data_seed(job, onset_step, self.order)
        last_log = time.time()
        for epoch in range(int(curve["epoch_after_onset"].max()) + 1, epochs + 1):
            batches = pipeline.train_batches(job.data, self.settings.batch_size, data_seed, epoch - 1)
            iterator = iter(self.strategy.experimental_distribute_dataset(batches))
            batch_loss = float(self.run_epoch(iterator, tf.constant(self.steps_per_epoch, tf.int64)))
            if not math.isfinite(batch_loss):
                raise loop.NonFiniteLossError(
                    f"Training loss of {paths.name} became {batch_loss} in epoch {epoch} after the onset; "
                    f"lower linearized.measure.learning_rate (now {self.settings.learning_rate}). The run "
                    f"keeps its epochs up to {epoch - 1}."
                )
            curve = self._record_epoch(paths, onset_step, epoch, curve, started, writer)
            if time.time() - last_log >= job.training.log_every_seconds or epoch == epochs:
                row = curve.iloc[-1]
                logging.info(
                    "%s epoch %d/%d: batch loss %.4f, train error %.4f, test error %.4f, %.1f s",
                    paths.name, epoch, epochs, batch_loss, row["train_error"], row["test_error"], time.time() - started,
                )
                last_log = time.time()
        writer.close()
        _mark_done(paths)
        return curve

    def _step_at(self, onset_step: int, epoch_after_onset: int) -> int:
        return onset_step + int(round(epoch_after_onset * self.job.steps_per_epoch))

    def _reset(self, onset_step: int) -> None:
        """Sets the expansion point and the weights to the onset snapshot; zeroes the optimizer."""
        weights = self.job.weights_at(self.base, self.job.parent_paths(0), onset_step)
        for variables, values in (
            (self.model.w, weights.trainable),
            (self.model.w0, weights.trainable),
            (self.model.state, weights.non_trainable),
        ):
            for variable, value in zip(variables, values):
                variable.assign(value)
        for variable, value in zip(self.optimizer.variables, self.initial_optimizer_state):
            variable.assign(value)

    def _record_epoch(self, paths, onset_step, epoch_after_onset, curve, started, writer) -> pd.DataFrame:
        """Checkpoints, evaluates and appends the row of `epoch_after_onset`; returns the curve."""
        job = self.job
        step = self._step_at(onset_step, epoch_after_onset)
        store = SnapshotStore(paths)
        store.write_checkpoint(self.checkpoint, step)

        train_loss, train_error = loop.evaluate(self.predict, *self.eval_train, self.eval_batch_size)
        test_loss, test_error = loop.evaluate(self.predict, job.data.x_test, job.data.y_test, self.eval_batch_size)
        plugged_back = linearize.plug_back(self.model)
        _, plugged_train_error = evaluation.loss_and_error(
            evaluation.logits(self.base, plugged_back, self.eval_train[0], self.eval_batch_size), self.eval_train[1]
        )
        _, plugged_test_error = evaluation.loss_and_error(
            evaluation.logits(self.base, plugged_back, job.data.x_test, self.eval_batch_size), job.data.y_test
        )
        row = {
            "epoch_after_onset": epoch_after_onset,
            "epoch": step / job.steps_per_epoch,
            "step": step,
            "learning_rate": self.settings.learning_rate,
            "train_loss": train_loss,
            "train_error": train_error,
            "test_loss": test_loss,
            "test_error": test_error,
            "plugged_back_train_error": plugged_train_error,
            "plugged_back_test_error": plugged_test_error,
            "wall_time_s": time.time() - started,
        }
        previous_step = None if curve.empty else int(curve["step"].iloc[-1])
        curve = pd.DataFrame([row]) if curve.empty else pd.concat([curve, pd.DataFrame([row])], ignore_index=True)
        storage.write_csv_atomic(paths.snapshots_csv, curve)

        # The new row is written, so the previous checkpoint is no longer needed to resume.
        if previous_step is not None:
            for path in tf.io.gfile.glob(paths.checkpoint_prefix(previous_step) + ".*"):
                tf.io.gfile.remove(path)

        with writer.as_default(step=step):
            for key in ("train_loss", "test_loss", "train_error", "test_error"):
                tf.summary.scalar(key.replace("_", "/", 1), row[key])
            tf.summary.scalar("plugged_back/test_error", plugged_test_error)
            tf.summary.scalar("epoch", row["epoch"])
        writer.flush()
        return curve


def read_curve(paths: storage.RunPaths) -> pd.DataFrame:
    """Returns a Taylor run's per-epoch table, empty (with its columns) when none was written."""
    if not storage.exists(paths.snapshots_csv):
        return pd.DataFrame(columns=list(CURVE_COLUMNS))
    return storage.read_csv(paths.snapshots_csv)


def _mark_done(paths: storage.RunPaths) -> None:
    if not storage.exists(paths.done_marker):
        storage.write_text_atomic(paths.done_marker, "done\n")


# Low-learning-rate nonlinear training.


def train_low_lr(job: common.Job, onset_step: int, seed: int, settings: Settings) -> pd.DataFrame:
    """Trains a child of parent 0 from `onset_step` at the low learning rate; returns its snapshots.

    The child restores the parent's whole checkpoint, so it keeps the parent's optimizer state:
    its iteration count, and for SGD its momentum buffer, which still carries the parent's
    larger steps and decays within about 1 / (1 - momentum) steps. It trains with the job's
    optimizer, batch size and weight decay at the constant rate `settings.low_lr_learning_rate`,
    with a snapshot after every epoch.
    """
    paths = low_lr_paths(job, onset_step, seed)
    final_step = onset_step + settings.low_lr_epochs * job.steps_per_epoch
    store = SnapshotStore(paths)
    if store.is_done() and int(store.read()["step"].max()) < final_step:
        logging.info("Run %s is shorter than %d epochs; continuing it.", paths.name, settings.low_lr_epochs)
        tf.io.gfile.remove(paths.done_marker)

    config = dataclasses.replace(
        job.training,
        learning_rate=settings.low_lr_learning_rate,
        lr_drop_epochs=(),
        epochs=final_step / job.steps_per_epoch,
        export_saved_model=False,
    )
    spec = loop.RunSpec(
        paths=paths,
        tensorboard_dir=job.run.tensorboard(paths.name),
        build_model=lambda: job.build_model(0),
        init_seed=0,
        data_seed=low_lr_data_seed(job, onset_step, seed),
        final_step=final_step,
        snapshot_steps=[onset_step + k * job.steps_per_epoch for k in range(1, settings.low_lr_epochs + 1)],
        init_checkpoint=job.checkpoint_at(job.parent_paths(0), onset_step),
    )
    table = loop.Trainer(job.data, config, job.strategy).train_run(spec)
    return table[table["step"] <= final_step]


# Tables.


def write_tables(job: common.Job, onset_steps: list[int], spawn_steps: Sequence[int], settings: Settings) -> None:
    """Builds the stage's tables from the runs' files and writes those whose content changed."""
    curves = curves_table(job, onset_steps, settings)
    parent = SnapshotStore(job.parent_paths(0)).read()
    summary = summary_table(curves, parent, onset_steps, job.steps_per_epoch)
    tables = {"linearized_curves": curves, "linearized": summary}
    if settings.low_lr_seeds:
        barriers_path = job.run.table("error_barrier")
        barriers = storage.read_csv(barriers_path) if storage.exists(barriers_path) else None
        tables["nonlinear_advantage"] = advantage_table(summary, barriers, spawn_steps, job.steps_per_epoch)
    for name, table in tables.items():
        if _write_if_changed(job.run.table(name), table):
            logging.info("Wrote table %s (%d rows)", name, len(table))
        else:
            logging.info("Table %s is unchanged.", name)


def curves_table(job: common.Job, onset_steps: list[int], settings: Settings) -> pd.DataFrame:
    """Builds the `linearized_curves` table: one row per run and epoch after its onset.

    Columns: onset_epoch, onset_step, variant ("order_1", "order_2" or "low_lr"), seed (the
    low-learning-rate child's index, 0 for expansions), run, epoch_after_onset, epoch, step,
    learning_rate, train_loss, train_error, test_loss, test_error, plugged_back_train_error and
    plugged_back_test_error (NaN for low-learning-rate runs).
    """
    frames = []
    for onset_step in onset_steps:
        onset_epoch = onset_epoch_of(job, onset_step)
        for order in settings.orders:
            paths = linearized_paths(job, onset_step, order)
            curve = read_curve(paths)
            curve = curve[curve["epoch_after_onset"] <= settings.epochs]
            frames.append(_tag(curve, onset_epoch, onset_step, f"order_{order}", 0, paths.name))
        for seed in range(settings.low_lr_seeds):
            paths = low_lr_paths(job, onset_step, seed)
            table = SnapshotStore(paths).read()
            final_step = onset_step + settings.low_lr_epochs * job.steps_per_epoch
            table = table[table["step"] <= final_step].drop(columns=["checkpoint"])
            table.insert(0, "epoch_after_onset", (table["step"] - onset_step) / job.steps_per_epoch)
            frames.append(_tag(table, onset_epoch, onset_step, "low_lr", seed, paths.name))

    columns = ["onset_epoch", "onset_step", "variant", "seed", "run"] + [c for c in CURVE_COLUMNS if c != "wall_time_s"]
    table = pd.concat(frames, ignore_index=True)
    return table.reindex(columns=columns)


def _tag(table: pd.DataFrame, onset_epoch: float, onset_step: int, variant: str, seed: int, run: str) -> pd.DataFrame:
    table = table.copy()
    table.insert(0, "run", run)
    table.insert(0, "seed", seed)
    table.insert(0, "variant", variant)
    table.insert(0, "onset_step", onset_step)
    table.insert(0, "onset_epoch", onset_epoch)
    return table


def best_stopping_row(curve: pd.DataFrame) -> pd.Series:
    """Returns the row of lowest test error among epochs after the onset >= 1 (earliest on ties).

    The onset itself (epoch 0) is excluded, because it is the parent's network, not a trained
    expansion.
    """
    trained = curve[curve["epoch_after_onset"] >= 1].sort_values("epoch_after_onset")
    if trained.empty:
        raise ValueError("The curve has no epoch after its onset; train at least one epoch.")
    return trained.loc[trained["test_error"].idxmin()]


def summary_table(curves: pd.DataFrame, parent: pd.DataFrame, onset_steps: list[int], steps_per_epoch: int) -> pd.DataFrame:
    """Builds the `linearized` table of the errors compared at every onset.

    One row per (onset, kind, split), split "test" or "train". Kinds and how `error` is read:
      parent_at_onset: parent 0's snapshot at the onset step.
      parent_final: parent 0's last snapshot (the same value at every onset).
      linearized_order_<k>: the order-k expansion at its best stopping epoch, the epoch after
        the onset with the lowest test error (`best_stopping_row`); both splits at that epoch.
      plugged_back_order_<k>: the nonlinear network at the order-k expansion's weights, at the
        same epoch.
      low_lr_nonlinear: the mean over seeds of each low-learning-rate child's final error, with
        `error_std` their standard deviation (ddof 0, so half the difference for two seeds).
    Other columns: `loss` (NaN where not measured), `seeds`, `best_epoch_after_onset` (NaN for
    parent and low-learning-rate rows), `final_error` (at the run's last epoch) and `stopping`.
    """
    rows = []
    final = parent.sort_values("step").iloc[-1]
    for onset_step in onset_steps:
        at_onset = parent[parent["step"] == onset_step].iloc[0]
        keys = {"onset_epoch": onset_step / steps_per_epoch, "onset_step": onset_step}
        for split in ("test", "train"):
            rows.append(dict(keys, kind="parent_at_onset", split=split, error=at_onset[f"{split}_error"],
                             loss=at_onset[f"{split}_loss"], error_std=np.nan, seeds=1,
                             best_epoch_after_onset=np.nan, final_error=at_onset[f"{split}_error"], stopping="onset snapshot"))
            rows.append(dict(keys, kind="parent_final", split=split, error=final[f"{split}_error"],
                             loss=final[f"{split}_loss"], error_std=np.nan, seeds=1,
                             best_epoch_after_onset=np.nan, final_error=final[f"{split}_error"], stopping="final snapshot"))

        runs = curves[curves["onset_step"] == onset_step]
        for variant, curve in runs[runs["variant"] != "low_lr"].groupby("variant", sort=True):
            rows.extend(_taylor_rows(keys, variant, curve))
        low_lr = runs[runs["variant"] == "low_lr"]
        if not low_lr.empty:
            rows.extend(_low_lr_rows(keys, low_lr))
    return pd.DataFrame(rows)


def _taylor_rows(keys: dict, variant: str, curve: pd.DataFrame) -> list[dict]:
    order = variant.split("_")[-1]
    best = best_stopping_row(curve)
    last = curve.sort_values("epoch_after_onset").iloc[-1]
    rows = []
    for split in ("test", "train"):
        rows.append(dict(keys, kind=f"linearized_order_{order}", split=split, error=best[f"{split}_error"],
                         loss=best[f"{split}_loss"], error_std=np.nan, seeds=1,
                         best_epoch_after_onset=best["epoch_after_onset"], final_error=last[f"{split}_error"],
                         stopping="best test error"))
        rows.append(dict(keys, kind=f"plugged_back_order_{order}", split=split,
                         error=best[f"plugged_back_{split}_error"], loss=np.nan, error_std=np.nan, seeds=1,
                         best_epoch_after_onset=best["epoch_after_onset"],
                         final_error=last[f"plugged_back_{split}_error"], stopping="best test error of the expansion"))
    return rows


def _low_lr_rows(keys: dict, low_lr: pd.DataFrame) -> list[dict]:
    finals = low_lr.sort_values("step").groupby("seed").tail(1)
    rows = []
    for split in ("test", "train"):
        errors = finals[f"{split}_error"].to_numpy(dtype=np.float64)
        rows.append(dict(keys, kind="low_lr_nonlinear", split=split, error=float(errors.mean()),
                         loss=float(finals[f"{split}_loss"].mean()), error_std=float(errors.std()),
                         seeds=len(errors), best_epoch_after_onset=np.nan, final_error=float(errors.mean()),
                         stopping="final epoch, mean over seeds"))
    return rows


def barriers_by_spawn_step(barriers: Optional[pd.DataFrame], steps_per_epoch: int) -> dict:
    """Returns {spawn step: (mean test error barrier over child pairs, number of pairs)}."""
    if barriers is None or barriers.empty:
        return {}
    children = barriers[(barriers["pair"] == "children") & (barriers["split"] == "test")]
    result = {}
    for spawn_epoch, rows in children.groupby("spawn_epoch"):
        step = int(round(float(spawn_epoch) * steps_per_epoch))
        result[step] = (float(rows["barrier"].mean()), len(rows))
    return result


def advantage_table(summary: pd.DataFrame, barriers: Optional[pd.DataFrame], spawn_steps: Sequence[int],
                    steps_per_epoch: int) -> pd.DataFrame:
    """Builds the `nonlinear_advantage` table, on the test split.

    One row per (onset, order, linearized_stopping): `linearized_stopping` "best" uses the
    expansion's best stopping epoch and "final" its last epoch. advantage = linearized_error -
    low_lr_error, positive when low-learning-rate nonlinear training does better.
    `error_barrier` is the mean test error barrier between the children spawned at the onset
    step (NaN when the onset is not a spawn step or `tables/error_barrier.csv` is missing), and
    `error_barrier_pairs` the number of child pairs averaged.
    """
    barrier_at = barriers_by_spawn_step(barriers, steps_per_epoch)
    spawn_steps = {int(s) for s in spawn_steps}
    test = summary[summary["split"] == "test"]
    rows = []
    for onset_step, onset_rows in test.groupby("onset_step", sort=True):
        low_lr = onset_rows[onset_rows["kind"] == "low_lr_nonlinear"]
        if low_lr.empty:
            continue
        low_lr = low_lr.iloc[0]
        barrier, pairs = barrier_at.get(int(onset_step), (np.nan, 0)) if int(onset_step) in spawn_steps else (np.nan, 0)
        taylor = onset_rows[onset_rows["kind"].str.startswith("linearized_order_")]
        for _, row in taylor.sort_values("kind").iterrows():
            for stopping, linearized_error in (("best", row["error"]), ("final", row["final_error"])):
                rows.append({
                    "onset_epoch": row["onset_epoch"],
                    "onset_step": int(onset_step),
                    "order": int(row["kind"].split("_")[-1]),
                    "linearized_stopping": stopping,
                    "split": "test",
                    "linearized_error": linearized_error,
                    "low_lr_error": low_lr["error"],
                    "low_lr_error_std": low_lr["error_std"],
                    "advantage": linearized_error - low_lr["error"],
                    "error_barrier": barrier,
                    "error_barrier_pairs": pairs,
                })
    return pd.DataFrame(rows)


def _write_if_changed(path: str, table: pd.DataFrame) -> bool:
    """Writes `table` with `storage.write_csv_atomic` unless the file already has that text."""
    buffer = io.StringIO()
    # The same format as storage.write_csv_atomic, so equal tables give equal text.
    table.to_csv(buffer, index=False, float_format="%.9g")
    if storage.exists(path) and storage.read_text(path) == buffer.getvalue():
        return False
    storage.write_csv_atomic(path, table)
    return True
