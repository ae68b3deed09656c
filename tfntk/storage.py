"""The run directory: every path of a run is built here, and every write is atomic.

Layout (relative to the run directory):

    config.gin, command.txt
    parents/<i>/                       one independently initialised network each
      checkpoints/ckpt-<step>.*        tf.train.Checkpoint per snapshot
      snapshots.csv                    one row per snapshot
      saved_model/epoch_<NNN>/         SavedModel export at whole epochs
    children/spawn_<EPOCH>/child_<i>/  same layout, EPOCH formatted by `format_epoch`
    linearized/onset_<EPOCH>/<run>/    linearized and low-learning-rate runs
    analysis/                          inputs and caches shared by the measures
    tables/<name>.csv                  long-format measurement tables
    tensorboard/<run>/                 event files
    figures/<name>.png and .pdf
    report.html

All file access goes through `tf.io.gfile`, so a run directory may live on any file system
TensorFlow supports (for example `gs://`).
"""

from __future__ import annotations

import io
import os
import uuid

import pandas as pd
import tensorflow as tf


def format_epoch(epoch: float) -> str:
    """Formats an epoch for use in a path: fixed width, three decimals (2.5 -> '0002.500')."""
    return f"{float(epoch):08.3f}"


def join(*parts: str) -> str:
    return os.path.join(*parts)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def makedirs(path: str) -> None:
    tf.io.gfile.makedirs(path)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it over `path`.

    A reader sees either the previous file or the complete new one, never a partial write.
    """
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(temporary, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def write_csv_atomic(path: str, frame: pd.DataFrame) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.9g")
    write_text_atomic(path, buffer.getvalue())


def read_csv(path: str) -> pd.DataFrame:
    with tf.io.gfile.GFile(path, "r") as f:
        return pd.read_csv(f)


def save_npz_atomic(path: str, **arrays) -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def load_npz(path: str) -> dict:
    import numpy as np

    with tf.io.gfile.GFile(path, "rb") as f:
        with np.load(io.BytesIO(f.read())) as data:
            return {key: data[key] for key in data.files}


class RunPaths:
    """Paths of one training run (a parent, a child or a linearized run).

    Args:
      root: the run's own directory, for example `<run_dir>/parents/0`.
      name: the run's name in tables and TensorBoard, for example `parent_0`.
    """

    def __init__(self, root: str, name: str):
        self.root = root
        self.name = name

    @property
    def checkpoints(self) -> str:
        return join(self.root, "checkpoints")

    @property
    def snapshots_csv(self) -> str:
        return join(self.root, "snapshots.csv")

    @property
    def done_marker(self) -> str:
        """Written last, when the run has trained to its final step and exported."""
        return join(self.root, "DONE")

    def saved_model(self, epoch: int) -> str:
        return join(self.root, "saved_model", f"epoch_{int(epoch):03d}")

    def checkpoint_prefix(self, step: int) -> str:
        return join(self.checkpoints, f"ckpt-{int(step):08d}")


class RunDir:
    """Builds every path of an experiment's run directory."""

    def __init__(self, root: str):
        self.root = root

    @property
    def config_gin(self) -> str:
        return join(self.root, "config.gin")

    @property
    def command_txt(self) -> str:
        return join(self.root, "command.txt")

    @property
    def report_html(self) -> str:
        return join(self.root, "report.html")

    def parent(self, index: int) -> RunPaths:
        return RunPaths(join(self.root, "parents", str(index)), f"parent_{index}")

    def child(self, spawn_epoch: float, index: int) -> RunPaths:
        spawn = format_epoch(spawn_epoch)
        return RunPaths(
            join(self.root, "children", f"spawn_{spawn}", f"child_{index}"),
            f"spawn_{spawn}_child_{index}",
        )

    def linearized(self, onset_epoch: float, name: str) -> RunPaths:
        onset = format_epoch(onset_epoch)
        return RunPaths(join(self.root, "linearized", f"onset_{onset}", name), f"onset_{onset}_{name}")

    def analysis(self, name: str) -> str:
        return join(self.root, "analysis", name)

    def ntk_snapshot(self, run_name: str, step: int) -> str:
        """Returns the path of one snapshot's cached NTK Gram matrix, ReLU pattern and centroids."""
        return self.analysis(join("ntk", run_name, f"step_{int(step):08d}.npz"))

    def table(self, name: str) -> str:
        return join(self.root, "tables", f"{name}.csv")

    def tensorboard(self, run_name: str) -> str:
        return join(self.root, "tensorboard", run_name)

    def figure(self, name: str, extension: str = "png") -> str:
        return join(self.root, "figures", f"{name}.{extension}")
