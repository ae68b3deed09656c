"""A strategy-aware custom training loop with dense snapshots and automatic resume.

One `train_run` call trains one network (a parent or a child) to its final step. Work between
two snapshots runs inside one `tf.function` call that loops over the steps, so Python overhead
is paid once per snapshot, not once per step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import gin
import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from tfntk import storage
from tfntk.data import pipeline
from tfntk.data.datasets import Dataset
from tfntk.training import schedules
from tfntk.training.snapshots import SnapshotStore


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and snapshot settings of a run; the defaults are the quick digits baseline.

    Attributes:
      optimizer: "sgd" (with `momentum`, Nesterov off) or "adam" (Keras defaults otherwise).
      learning_rate: base learning rate.
      momentum: SGD momentum; ignored by Adam.
      weight_decay: coefficient of the L2 penalty `0.5 * weight_decay * |w|^2` added to the loss
        for every trainable variable (coupled weight decay, as in PyTorch's SGD and Adam).
      lr_drop_epochs: epochs at which the learning rate is multiplied by `lr_drop_factor`.
      lr_drop_factor: multiplier per drop.
      epochs: total training epochs of the parent; children train to the same final step.
      batch_size: global batch size, split evenly over replicas.
      snapshot_schedule: `(until_epoch, every_epochs)` pairs; see `schedules.snapshot_steps`.
      snapshot_every_epochs_after: snapshot spacing after the last `until_epoch`.
      export_saved_model: export a SavedModel at every whole epoch that is a snapshot.
      eval_batch_size: batch size of the loss and error evaluation at each snapshot.
      eval_train_examples: number of training examples (the first ones, fixed) on which the
        train loss and error of each snapshot are measured; None uses all of them. Evaluation
        at dense snapshots costs more than training itself when it covers a large training set.
      log_every_seconds: minimum time between two progress lines of one run.
    """

    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_drop_epochs: tuple = ()
    lr_drop_factor: float = 0.1
    epochs: float = 10.0
    batch_size: int = 128
    snapshot_schedule: tuple = ((2.0, 0.1), (10.0, 0.4))
    snapshot_every_epochs_after: float = 1.0
    export_saved_model: bool = True
    eval_batch_size: int = 1000
    eval_train_examples: Optional[int] = 2000
    log_every_seconds: float = 10.0

    def validate(self, num_train_examples: int) -> None:
        """Raises ValueError naming the first invalid setting and how to fix it."""
        numbers = ("learning_rate", "momentum", "weight_decay", "lr_drop_factor", "epochs", "batch_size")
        for name in numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Invalid TrainingConfig.{name} {value!r}; use a number.")
        if not isinstance(self.batch_size, int):
            raise ValueError(f"Invalid TrainingConfig.batch_size {self.batch_size!r}; use a whole number.")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"Invalid TrainingConfig.optimizer {self.optimizer!r}; use 'sgd' or 'adam'.")
        if not self.learning_rate > 0:
            raise ValueError(f"Invalid TrainingConfig.learning_rate {self.learning_rate}; use a positive number.")
        if not self.epochs > 0:
            raise ValueError(f"Invalid TrainingConfig.epochs {self.epochs}; use a positive number.")
        if not 0 < self.batch_size <= num_train_examples:
            raise ValueError(
                f"Invalid TrainingConfig.batch_size {self.batch_size}; use 1 to {num_train_examples} "
                "(the number of training examples)."
            )
        if self.weight_decay < 0:
            raise ValueError(f"Invalid TrainingConfig.weight_decay {self.weight_decay}; use 0 or more.")
        if any(not 0 < epoch for epoch in self.lr_drop_epochs):
            raise ValueError(f"Invalid TrainingConfig.lr_drop_epochs {self.lr_drop_epochs}; use positive epochs.")

    def steps_per_epoch(self, num_train_examples: int) -> int:
        return pipeline.steps_per_epoch(num_train_examples, self.batch_size)

    def total_steps(self, num_train_examples: int) -> int:
        return int(round(self.epochs * self.steps_per_epoch(num_train_examples)))

    def learning_rate_at_epoch(self, epoch: float) -> float:
        return schedules.learning_rate_at_epoch(
            self.learning_rate, self.lr_drop_epochs, self.lr_drop_factor, epoch
        )


def make_optimizer(config: TrainingConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    schedule = schedules.StepDecay(
        config.learning_rate,
        schedules.drop_steps(config.lr_drop_epochs, steps_per_epoch),
        config.lr_drop_factor,
    )
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum)
    return keras.optimizers.Adam(learning_rate=schedule)


@gin.configurable
def make_strategy(kind: str = "auto") -> tf.distribute.Strategy:
    """Returns the distribution strategy.

    Args:
      kind: "auto" uses `MirroredStrategy` when more than one GPU is visible and the default
        strategy otherwise. "mirrored" always uses `MirroredStrategy`, over every visible GPU or,
        without GPUs, over all logical CPUs. "default" never distributes.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "default" or (kind == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    if kind in ("auto", "mirrored"):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise ValueError(f"Invalid strategy kind {kind!r}; use 'auto', 'mirrored' or 'default'.")


def evaluate(predict_fn, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Returns (mean cross-entropy loss, error rate) of `predict_fn` logits on (x, y)."""
    loss_sum = 0.0
    wrong = 0
    for x_batch, y_batch in pipeline.eval_batches(x, y, batch_size):
        logits = predict_fn(x_batch)
        losses = keras.losses.sparse_categorical_crossentropy(y_batch, logits, from_logits=True)
        loss_sum += float(tf.reduce_sum(tf.cast(losses, tf.float64)))
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int64)
        wrong += int(tf.reduce_sum(tf.cast(predictions != y_batch, tf.int64)))
    return loss_sum / len(y), wrong / len(y)


def make_train_steps(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    global_batch_size: int,
    weight_decay: float,
):
    """Returns `run_steps(iterator, num_steps) -> mean batch loss`, a `tf.function` of SGD steps.

    Each step minimises the mean cross-entropy of the global batch plus the L2 penalty
    `0.5 * weight_decay * |w|^2`, with the batch split over the strategy's replicas. The
    iterator yields distributed (x, y) batches; the returned loss excludes the penalty.
    """
    global_batch = float(global_batch_size)
    replicas = float(strategy.num_replicas_in_sync)
    variables = model.trainable_variables

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            data_loss = tf.reduce_sum(per_example) / global_batch
            total = data_loss
            if weight_decay > 0:
                penalty = 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(v.value)) for v in variables])
                total += penalty / replicas
        gradients = tape.gradient(total, [v.value for v in variables])
        optimizer.apply_gradients(zip(gradients, variables))
        return data_loss

    @tf.function
    def run_steps(iterator, num_steps):
        loss_sum = tf.constant(0.0, tf.float32)
        for _ in tf.range(num_steps):
            x, y = next(iterator)
            per_replica = strategy.run(replica_step, args=(x, y))
            loss_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return loss_sum / tf.cast(num_steps, tf.float32)

    return run_steps


@dataclasses.dataclass
class RunSpec:
    """Settings of one training run.

    Attributes:
      paths: where the run lives.
      tensorboard_dir: where its TensorBoard event files go.
      build_model: returns a freshly initialised model (called inside the strategy scope).
      init_seed: seed of the initial weights (unused when `init_checkpoint` is set).
      data_seed: seed of the data order and augmentation.
      init_checkpoint: checkpoint prefix to start from (a child's spawn point), or None.
      final_step: the step at which training stops.
      snapshot_steps: steps at which snapshots are saved (the start and the final step are added).
    """

    paths: storage.RunPaths
    tensorboard_dir: str
    build_model: Callable[[], keras.Model]
    init_seed: int
    data_seed: int
    final_step: int
    snapshot_steps: Sequence[int]
    init_checkpoint: Optional[str] = None


class Trainer:
    """Trains runs of one model family on one dataset under one strategy."""

    def __init__(
        self,
        dataset: Dataset,
        config: TrainingConfig,
        strategy: Optional[tf.distribute.Strategy] = None,
    ):
        config.validate(len(dataset.y_train))
        self.dataset = dataset
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.steps_per_epoch = config.steps_per_epoch(len(dataset.y_train))
        if config.batch_size % self.strategy.num_replicas_in_sync:
            raise ValueError(
                f"Invalid TrainingConfig.batch_size {config.batch_size}: it must be divisible by "
                f"the {self.strategy.num_replicas_in_sync} replicas."
            )
        count = config.eval_train_examples or len(dataset.y_train)
        self.eval_train = (dataset.x_train[:count], dataset.y_train[:count])

    def build(self, build_model: Callable[[], keras.Model]):
        """Builds the model, optimizer and checkpoint inside the strategy scope."""
        with self.strategy.scope():
            model = build_model()
            optimizer = make_optimizer(self.config, self.steps_per_epoch)
            optimizer.build(model.trainable_variables)
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            data_seed = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_seed")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, data_seed=data_seed)
        return model, optimizer, checkpoint

    def _make_step_fn(self, model, optimizer):
        return make_train_steps(model, optimizer, self.strategy, self.config.batch_size, self.config.weight_decay)

    def _snapshot_row(self, model, predict_fn, step: int, checkpoint_path: str, started: float) -> dict:
        epoch = step / self.steps_per_epoch
        train_loss, train_error = evaluate(predict_fn, *self.eval_train, self.config.eval_batch_size)
        test_loss, test_error = evaluate(
            predict_fn, self.dataset.x_test, self.dataset.y_test, self.config.eval_batch_size
        )
        return {
            "step": step,
            "epoch": epoch,
            "checkpoint": checkpoint_path,
            "learning_rate": self.config.learning_rate_at_epoch(epoch),
            "train_loss": train_loss,
            "train_error": train_error,
            "test_loss": test_loss,
            "test_error": test_error,
            "wall_time_s": time.time() - started,
        }

    def train_run(self, spec: RunSpec, on_snapshot: Optional[Callable[[int], None]] = None) -> pd.DataFrame:
        """Trains `spec` to its final step, resuming from its last snapshot; returns `snapshots.csv`.

        A run whose `DONE` marker exists is skipped. `on_snapshot(step)` is called after each
        snapshot is stored (tests use it to interrupt a run).
        """
        store = SnapshotStore(spec.paths)
        if store.is_done():
            logging.info("Run %s is complete; skipping.", spec.paths.name)
            return store.read()

        started = time.time()
        model, optimizer, checkpoint = self.build(spec.build_model)
        table = store.read()
        if not table.empty:
            last = table.iloc[-1]
            store.restore(checkpoint, str(last["checkpoint"]))
            logging.info("Resuming %s at step %d (epoch %.3f).", spec.paths.name, int(last["step"]), last["epoch"])
        elif spec.init_checkpoint is not None:
            store.restore(checkpoint, spec.init_checkpoint)
        checkpoint.data_seed.assign(spec.data_seed)
        step = int(checkpoint.step.numpy())
        if step > spec.final_step:
            raise ValueError(
                f"Run {spec.paths.name} starts at step {step}, past its final step {spec.final_step}; "
                "lower the spawn epoch or raise TrainingConfig.epochs."
            )

        self._iterator_position = None
        predict_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        run_steps = self._make_step_fn(model, optimizer)
        boundaries = sorted({s for s in spec.snapshot_steps if step < s <= spec.final_step} | {spec.final_step})
        writer = tf.summary.create_file_writer(spec.tensorboard_dir)

        if table.empty:
            table = self._store_snapshot(store, checkpoint, model, predict_fn, step, started, writer)
            if on_snapshot:
                on_snapshot(step)

        last_log = time.time()
        examples_since_log = 0
        for boundary in boundaries:
            if boundary <= step:
                continue
            loss = self._train_until(run_steps, spec.data_seed, step, boundary)
            examples_since_log += (boundary - step) * self.config.batch_size
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"Training loss of {spec.paths.name} became {loss} before step {boundary} "
                    f"(epoch {boundary / self.steps_per_epoch:.3f}); lower TrainingConfig.learning_rate "
                    "(now "
                    f"{self.config.learning_rate}). The run keeps its snapshots up to step {step}."
                )
            step = boundary
            checkpoint.step.assign(step)
            table = self._store_snapshot(store, checkpoint, model, predict_fn, step, started, writer, loss)
            if on_snapshot:
                on_snapshot(step)
            now = time.time()
            if now - last_log >= self.config.log_every_seconds or step == spec.final_step:
                row = table.iloc[-1]
                logging.info(
                    "%s epoch %.2f/%.2f step %d: batch loss %.4f, train error %.4f, test error %.4f, "
                    "%.0f examples/s",
                    spec.paths.name, row["epoch"], spec.final_step / self.steps_per_epoch, step, loss,
                    row["train_error"], row["test_error"], examples_since_log / max(now - last_log, 1e-9),
                )
                last_log = now
                examples_since_log = 0

        writer.close()
        store.mark_done()
        return table

    def _train_until(self, run_steps, data_seed: int, step: int, boundary: int) -> float:
        """Runs optimizer steps from `step` to `boundary`, one epoch's iterator at a time.

        An epoch's iterator is kept across snapshot boundaries and rebuilt only at a new epoch
        or when `step` is not where it stopped (a resume), so building the input pipeline costs
        once per epoch, not once per snapshot.
        """
        losses = []
        counts = []
        while step < boundary:
            epoch, batch = divmod(step, self.steps_per_epoch)
            num_steps = min(boundary - step, self.steps_per_epoch - batch)
            iterator = self._epoch_iterator(data_seed, epoch, batch)
            losses.append(float(run_steps(iterator, tf.constant(num_steps, tf.int64))))
            self._iterator_position = (data_seed, epoch, batch + num_steps)
            counts.append(num_steps)
            step += num_steps
        return float(np.average(losses, weights=counts))

    def _epoch_iterator(self, data_seed: int, epoch: int, batch: int):
        if getattr(self, "_iterator_position", None) == (data_seed, epoch, batch):
            return self._iterator
        batches = pipeline.train_batches(self.dataset, self.config.batch_size, data_seed, epoch, start_batch=batch)
        self._iterator = iter(self.strategy.experimental_distribute_dataset(batches))
        self._iterator_position = (data_seed, epoch, batch)
        return self._iterator

    def _store_snapshot(self, store, checkpoint, model, predict_fn, step, started, writer, batch_loss=None):
        prefix = store.write_checkpoint(checkpoint, step)
        row = self._snapshot_row(model, predict_fn, step, prefix, started)
        table = store.append(row)
        with writer.as_default(step=step):
            for key in ("train_loss", "test_loss", "train_error", "test_error", "learning_rate"):
                tf.summary.scalar(key.replace("_", "/", 1) if key != "learning_rate" else key, row[key])
            tf.summary.scalar("epoch", row["epoch"])
            if batch_loss is not None:
                tf.summary.scalar("train/batch_loss", batch_loss)
        writer.flush()
        if self.config.export_saved_model and step % self.steps_per_epoch == 0:
            store.export_saved_model(model, step // self.steps_per_epoch)
        return table
