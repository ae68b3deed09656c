"""Learning-rate schedules and snapshot schedules, both defined in epochs."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf


class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-constant learning rate: `base * factor ** (number of drops at or before step)`.

    Args:
      base_learning_rate: learning rate before the first drop.
      drop_steps: optimizer steps at which the rate is multiplied by `factor`. The update with
        iteration index `drop_steps[i]` (0-based) is the first to use the lower rate.
      factor: multiplier per drop, for example 0.1.
    """

    def __init__(self, base_learning_rate: float, drop_steps: Sequence[int] = (), factor: float = 0.1):
        self.base_learning_rate = float(base_learning_rate)
        self.drop_steps = [int(s) for s in drop_steps]
        self.factor = float(factor)

    def __call__(self, step):
        step = tf.cast(step, tf.int64)
        drops = tf.zeros([], tf.float32)
        for drop_step in self.drop_steps:
            drops += tf.cast(step >= drop_step, tf.float32)
        return self.base_learning_rate * tf.pow(self.factor, drops)

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "drop_steps": self.drop_steps,
            "factor": self.factor,
        }


def drop_steps(drop_epochs: Sequence[float], steps_per_epoch: int) -> list[int]:
    return [int(round(epoch * steps_per_epoch)) for epoch in drop_epochs]


def learning_rate_at_epoch(
    base_learning_rate: float, drop_epochs: Sequence[float], factor: float, epoch: float
) -> float:
    """Returns the learning rate in use at `epoch`, the lower one when `epoch` is a drop."""
    drops = sum(1 for drop in drop_epochs if epoch >= drop)
    return float(base_learning_rate * factor**drops)


def snapshot_steps(
    total_steps: int,
    steps_per_epoch: int,
    dense_schedule: Sequence[Sequence[float]] = ((2.0, 0.1), (10.0, 0.4)),
    every_epochs_after: float = 1.0,
) -> list[int]:
    """Returns the sorted optimizer steps at which a run saves snapshots.

    Args:
      total_steps: the run's final step; always included, as is step 0.
      steps_per_epoch: optimizer steps per epoch.
      dense_schedule: `(until_epoch, every_epochs)` pairs in increasing `until_epoch`: a snapshot
        every `every_epochs` until `until_epoch`. The default is every 0.1 epoch for the first two
        epochs, then every 0.4 epoch until epoch 10.
      every_epochs_after: spacing in epochs after the last `until_epoch`.

    Epochs are rounded to the nearest step, so with few steps per epoch neighbouring snapshots
    may coincide; duplicates are dropped.
    """
    epochs = []
    start = 0.0
    for until, every in list(dense_schedule) + [(np.inf, every_epochs_after)]:
        if every <= 0:
            raise ValueError(f"Invalid snapshot spacing {every} epochs; use a positive number.")
        count = 0
        while True:
            epoch = start + count * every
            if epoch >= until - 1e-9 or epoch * steps_per_epoch > total_steps:
                break
            epochs.append(epoch)
            count += 1
        if np.isinf(until):
            break
        start = max(start, float(until))
    steps = {int(round(epoch * steps_per_epoch)) for epoch in epochs}
    steps = {s for s in steps if 0 <= s <= total_steps}
    steps.update({0, total_steps})
    return sorted(steps)
