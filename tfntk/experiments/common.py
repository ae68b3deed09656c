"""Shared pieces of every protocol: building models, training parents and children, loading weights."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tfntk import models, storage
from tfntk.autodiff import functional
from tfntk.data import subsets
from tfntk.data.datasets import Dataset
from tfntk.training import loop, schedules
from tfntk.training.snapshots import CorruptCheckpointError, SnapshotStore

NUM_PARENTS = 2


def derive_seed(*keys: int) -> int:
    """Returns a seed in [0, 2**31) that depends on every key, for parents' and children's runs."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] % (2**31))


@dataclasses.dataclass
class Job:
    """One experiment's dataset, model family, training settings and run directory."""

    run: storage.RunDir
    data: Dataset
    training: loop.TrainingConfig
    model_name: str
    model_kwargs: dict
    seed: int
    strategy: tf.distribute.Strategy
    extra_snapshot_steps: tuple = ()
    child_snapshot_every_epochs: Optional[float] = 1.0 / 3.0

    def __post_init__(self):
        self.trainer = loop.Trainer(self.data, self.training, self.strategy)
        self.steps_per_epoch = self.trainer.steps_per_epoch
        self.total_steps = self.training.total_steps(self.data.num_train)

    def build_model(self, seed: int = 0) -> keras.Model:
        return models.build_model(self.model_name, self.data.input_shape, self.data.num_classes, seed=seed, **self.model_kwargs)

    def new_model(self) -> keras.Model:
        """A model of the job's architecture, used as the function evaluated at loaded weights."""
        return self.build_model(seed=0)

    def snapshot_steps(self) -> list[int]:
        steps = schedules.snapshot_steps(
            self.total_steps,
            self.steps_per_epoch,
            self.training.snapshot_schedule,
            self.training.snapshot_every_epochs_after,
        )
        return sorted(set(steps) | set(self.extra_snapshot_steps))

    def child_snapshot_steps(self) -> list[int]:
        """Returns the parent's snapshot steps plus one every `child_snapshot_every_epochs`.

        The regular grid lets children of one spawn epoch be compared at the same steps while
        they train (every third of an epoch by default).
        """
        steps = set(self.snapshot_steps())
        if self.child_snapshot_every_epochs:
            count = int(np.floor(self.total_steps / (self.child_snapshot_every_epochs * self.steps_per_epoch) + 1e-9))
            steps.update(int(round(i * self.child_snapshot_every_epochs * self.steps_per_epoch)) for i in range(count + 1))
        return sorted(s for s in steps if s <= self.total_steps)

    def parent_paths(self, index: int) -> storage.RunPaths:
        return self.run.parent(index)

    def child_paths(self, spawn_step: int, child: int) -> storage.RunPaths:
        return self.run.child(spawn_step / self.steps_per_epoch, child)

    def train_parent(self, index: int) -> storage.RunPaths:
        paths = self.parent_paths(index)
        init_seed = derive_seed(self.seed, 0, index)
        spec = loop.RunSpec(
            paths=paths,
            tensorboard_dir=self.run.tensorboard(paths.name),
            build_model=lambda: self.build_model(init_seed),
            init_seed=init_seed,
            data_seed=derive_seed(self.seed, 1, index),
            final_step=self.total_steps,
            snapshot_steps=self.snapshot_steps(),
        )
        self.trainer.train_run(spec)
        return paths

    def train_child(self, parent: storage.RunPaths, spawn_step: int, child: int) -> storage.RunPaths:
        paths = self.child_paths(spawn_step, child)
        spec = loop.RunSpec(
            paths=paths,
            tensorboard_dir=self.run.tensorboard(paths.name),
            build_model=lambda: self.build_model(0),
            init_seed=0,
            data_seed=derive_seed(self.seed, 2, spawn_step, child),
            final_step=self.total_steps,
            snapshot_steps=[s for s in self.child_snapshot_steps() if s >= spawn_step],
            init_checkpoint=self.checkpoint_at(parent, spawn_step),
        )
        self.trainer.train_run(spec)
        return paths

    def checkpoint_at(self, paths: storage.RunPaths, step: int) -> str:
        table = SnapshotStore(paths).read()
        rows = table[table["step"] == step]
        if rows.empty:
            raise ValueError(f"Run {paths.name} has no snapshot at step {step}; available steps: {table['step'].tolist()}.")
        return str(rows.iloc[0]["checkpoint"])

    def weights_at(self, model: keras.Model, paths: storage.RunPaths, step: Optional[int] = None) -> functional.Weights:
        """Loads the weights of the run's snapshot at `step` (default: its last) into tensors."""
        table = SnapshotStore(paths).read()
        row = table.iloc[-1] if step is None else table[table["step"] == step].iloc[0]
        checkpoint = tf.train.Checkpoint(model=model)
        prefix = str(row["checkpoint"])
        try:
            checkpoint.read(prefix).expect_partial()
        except tf.errors.OpError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CorruptCheckpointError(
                f"Cannot read checkpoint {prefix} of run {paths.name} ({first_line}); the run "
                "directory is incomplete, so rerun it in a new --run_dir."
            ) from error
        return functional.current_weights(model)

    def final_weights(self, model: keras.Model, paths: storage.RunPaths) -> functional.Weights:
        return self.weights_at(model, paths, None)

    def train_subset(self, size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
        """Returns a fixed stratified training subset (all of it when `size` is None or larger)."""
        if size is None or size >= self.data.num_train:
            return self.data.x_train, self.data.y_train
        indices = subsets.stratified_subset(self.data.y_train, size, seed=self.seed)
        return self.data.x_train[indices], self.data.y_train[indices]

    def pairs(self, spawn_steps, num_children) -> Iterator[tuple[float, str, storage.RunPaths, storage.RunPaths]]:
        """Yields (spawn epoch or NaN, pair kind, run a, run b) for children and the two parents."""
        for spawn_step in spawn_steps:
            for a, b in _combinations(num_children):
                yield (spawn_step / self.steps_per_epoch, "children",
                       self.child_paths(spawn_step, a), self.child_paths(spawn_step, b))
        yield float("nan"), "parents", self.parent_paths(0), self.parent_paths(1)


def _combinations(count: int):
    return list(itertools.combinations(range(count), 2))


def write_learning_curves(job: Job, spawn_steps, num_children) -> pd.DataFrame:
    """Collects every run's `snapshots.csv` into `tables/learning_curves.csv`."""
    frames = []
    for index in range(NUM_PARENTS):
        frames.append(_tagged(job.parent_paths(index), "parent", float("nan"), index))
    for spawn_step in spawn_steps:
        for child in range(num_children):
            frames.append(_tagged(job.child_paths(spawn_step, child), "child", spawn_step / job.steps_per_epoch, child))
    table = pd.concat(frames, ignore_index=True)
    storage.write_csv_atomic(job.run.table("learning_curves"), table)
    return table


def _tagged(paths: storage.RunPaths, role: str, spawn_epoch: float, index: int) -> pd.DataFrame:
    table = SnapshotStore(paths).read().drop(columns=["checkpoint"])
    table.insert(0, "index", index)
    table.insert(0, "spawn_epoch", spawn_epoch)
    table.insert(0, "role", role)
    table.insert(0, "run", paths.name)
    return table
