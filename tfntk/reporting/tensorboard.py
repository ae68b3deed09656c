"""TensorBoard writers for measurement stages: scalars, images and text under `tensorboard/<run>/`."""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
import tensorflow as tf

from tfntk import storage


def figure_to_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_scalars(run_dir: str, run_name: str, tag: str, steps: Iterable[int], values: Iterable[float]) -> None:
    """Writes one scalar series; `steps` are optimizer steps (TensorBoard's x axis)."""
    writer = tf.summary.create_file_writer(storage.RunDir(run_dir).tensorboard(run_name))
    with writer.as_default():
        for step, value in zip(steps, values):
            if np.isfinite(value):
                tf.summary.scalar(tag, float(value), step=int(step))
    writer.close()


def write_image(run_dir: str, run_name: str, tag: str, png: bytes, step: int = 0) -> None:
    """Writes one PNG image (for example a heatmap) under `tag`."""
    writer = tf.summary.create_file_writer(storage.RunDir(run_dir).tensorboard(run_name))
    with writer.as_default():
        image = tf.io.decode_png(png, channels=4)[tf.newaxis]
        tf.summary.image(tag, image, step=step)
    writer.close()


def write_text(run_dir: str, run_name: str, tag: str, text: str, step: int = 0) -> None:
    writer = tf.summary.create_file_writer(storage.RunDir(run_dir).tensorboard(run_name))
    with writer.as_default():
        tf.summary.text(tag, text, step=step)
    writer.close()


def write_hparams(run_dir: str, curves) -> None:
    """Writes an hparams table across parent and child runs from `tables/learning_curves.csv`.

    Each run's hyperparameters are its role, index and spawn epoch (-1 for parents). Its metrics
    are the final test and train error, written at the final step as the scalars
    `hparams/final_test_error` and `hparams/final_train_error`.
    """
    # pylint: disable=import-outside-toplevel
    from tensorboard.plugins.hparams import api as hp

    role = hp.HParam("role", hp.Discrete(["parent", "child"]))
    index = hp.HParam("index", hp.IntInterval(0, 1000))
    spawn_epoch = hp.HParam("spawn_epoch", hp.RealInterval(-1.0, 1e6))
    metrics = [hp.Metric("hparams/final_test_error", display_name="final test error"),
               hp.Metric("hparams/final_train_error", display_name="final train error")]
    root = storage.join(run_dir, "tensorboard")
    with tf.summary.create_file_writer(root).as_default():
        hp.hparams_config(hparams=[role, index, spawn_epoch], metrics=metrics)

    for run_name, rows in curves.groupby("run"):
        last = rows.sort_values("step").iloc[-1]
        spawn = float(last["spawn_epoch"]) if np.isfinite(last["spawn_epoch"]) else -1.0
        writer = tf.summary.create_file_writer(storage.RunDir(run_dir).tensorboard(run_name))
        with writer.as_default():
            hp.hparams({role: str(last["role"]), index: int(last["index"]), spawn_epoch: spawn}, trial_id=run_name)
            tf.summary.scalar("hparams/final_test_error", float(last["test_error"]), step=int(last["step"]))
            tf.summary.scalar("hparams/final_train_error", float(last["train_error"]), step=int(last["step"]))
        writer.close()
