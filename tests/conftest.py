"""Shared fixtures: CPU only, op determinism, tiny synthetic data."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.experimental.enable_op_determinism()


@pytest.fixture(scope="session")
def synthetic_data():
    from tfntk.data import datasets

    return datasets.load_dataset(
        "synthetic", seed=0, synthetic_shape=(6, 6, 1), synthetic_classes=4, synthetic_train=96, synthetic_test=48
    )
