"""The snapshot store of one run: checkpoints, `snapshots.csv` and SavedModel exports.

A snapshot is a `tf.train.Checkpoint` of the model, the optimizer (its iteration count drives the
learning-rate schedule), the step and the data seed. The step and the seed are the data position:
epoch `step // steps_per_epoch`, batch `step % steps_per_epoch` of the order drawn from the seed.
"""

from __future__ import annotations

import dataclasses
import os

import pandas as pd
import tensorflow as tf
from absl import logging

from tfntk import storage

SNAPSHOT_COLUMNS = (
    "step",
    "epoch",
    "checkpoint",
    "learning_rate",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "wall_time_s",
)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint listed in `snapshots.csv` is missing or cannot be read."""


@dataclasses.dataclass
class SnapshotStore:
    """Reads and writes the snapshots of the run at `paths`."""

    paths: storage.RunPaths

    def is_done(self) -> bool:
        return storage.exists(self.paths.done_marker)

    def mark_done(self) -> None:
        storage.write_text_atomic(self.paths.done_marker, "done\n")

    def read(self) -> pd.DataFrame:
        """Returns the snapshot table, empty (with its columns) when none was written yet.

        Checkpoint prefixes are resolved inside this run's `checkpoints/` folder, whatever folder
        they were written from, so a copied or moved run directory reads its own checkpoints.
        """
        if not storage.exists(self.paths.snapshots_csv):
            return pd.DataFrame(columns=list(SNAPSHOT_COLUMNS))
        table = storage.read_csv(self.paths.snapshots_csv)
        table["checkpoint"] = [
            storage.join(self.paths.checkpoints, os.path.basename(str(prefix)))
            for prefix in table["checkpoint"]
        ]
        return table

    def append(self, row: dict) -> pd.DataFrame:
        """Adds one row and rewrites `snapshots.csv` atomically; returns the new table."""
        table = self.read()
        table = table[table["step"] < row["step"]]
        new_row = pd.DataFrame([{column: row[column] for column in SNAPSHOT_COLUMNS}])
        table = new_row if table.empty else pd.concat([table, new_row], ignore_index=True)
        storage.write_csv_atomic(self.paths.snapshots_csv, table)
        return table

    def write_checkpoint(self, checkpoint: tf.train.Checkpoint, step: int) -> str:
        """Writes a checkpoint for `step` and returns its path prefix.

        `tf.train.Checkpoint.write` writes the data files before the index file, so a killed
        write leaves no readable checkpoint at this prefix. A snapshot counts only once its row
        in `snapshots.csv`, written after the checkpoint, exists.
        """
        storage.makedirs(self.paths.checkpoints)
        return checkpoint.write(self.paths.checkpoint_prefix(step))

    @staticmethod
    def restore(checkpoint: tf.train.Checkpoint, prefix: str) -> None:
        """Restores every object of `checkpoint` from `prefix`, or raises `CorruptCheckpointError`."""
        try:
            status = checkpoint.read(prefix)
            status.assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError, IndexError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CorruptCheckpointError(
                f"Cannot read checkpoint {prefix} ({first_line}); delete that checkpoint and its "
                "row and later rows in snapshots.csv to resume from the previous snapshot, or "
                "delete the run's directory to start it again."
            ) from error
        logging.info("Restored checkpoint %s", prefix)

    def export_saved_model(self, model, epoch: int) -> str:
        """Exports the model's serving function as a SavedModel for a whole epoch."""
        path = self.paths.saved_model(epoch)
        if storage.exists(path):
            return path
        temporary = path + ".tmp"
        if storage.exists(temporary):
            tf.io.gfile.rmtree(temporary)
        model.export(temporary, format="tf_saved_model", verbose=False)
        tf.io.gfile.rename(temporary, path, overwrite=False)
        return path
