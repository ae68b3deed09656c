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


@pytest.fixture(scope="session")
def trained_job(tmp_path_factory):
    """A finished tiny main job: two parents and two children at spawn epochs 0 and 1.

    ResNet-8 with batch norm on 6x6x1 synthetic data, 3 epochs of 6 steps. Measurement stages
    are tested on it by calling them with `job`, `spawn_steps` and `num_children`.
    """
    from tfntk import storage
    from tfntk.data import datasets
    from tfntk.experiments import common
    from tfntk.training import loop

    data = datasets.load_dataset(
        "synthetic", seed=0, synthetic_shape=(6, 6, 1), synthetic_classes=4, synthetic_train=96, synthetic_test=48
    )
    training = loop.TrainingConfig(
        learning_rate=0.05, epochs=3.0, batch_size=16, lr_drop_epochs=(2.0,),
        snapshot_schedule=((1.0, 0.5),), export_saved_model=False,
    )
    run = storage.RunDir(str(tmp_path_factory.mktemp("trained_job")))
    job = common.Job(run, data, training, "resnet", {"depth": 8, "batch_norm": True}, 0, tf.distribute.get_strategy())
    spawn_steps = [0, 6]
    job.extra_snapshot_steps = tuple(spawn_steps)
    parents = [job.train_parent(index) for index in range(2)]
    for spawn_step in spawn_steps:
        for child in range(2):
            job.train_child(parents[0], spawn_step, child)
    common.write_learning_curves(job, spawn_steps, 2)
    return job, spawn_steps, 2
