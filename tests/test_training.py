"""Training loop: determinism of children, resume, spawning, and distribution."""

import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfntk import models, storage
from tfntk.autodiff import functional
from tfntk.measures import basins
from tfntk.training import loop, schedules
from tfntk.training.snapshots import SNAPSHOT_COLUMNS, CorruptCheckpointError, SnapshotStore

CONFIG = loop.TrainingConfig(
    optimizer="sgd",
    learning_rate=0.05,
    momentum=0.9,
    weight_decay=1e-4,
    lr_drop_epochs=(2.0,),
    epochs=3.0,
    batch_size=16,
    snapshot_schedule=((1.0, 0.5),),
    export_saved_model=False,
)


def _builder(seed=0, batch_norm=False):
    def build():
        return models.build_model("resnet", (6, 6, 1), 4, seed=seed, depth=8, batch_norm=batch_norm)

    return build


def _spec(root, name, trainer, data_seed, build=None, init_checkpoint=None, final_step=None):
    paths = storage.RunPaths(os.path.join(root, name), name)
    total = final_step if final_step is not None else CONFIG.total_steps(96)
    return loop.RunSpec(
        paths=paths,
        tensorboard_dir=os.path.join(root, "tensorboard", name),
        build_model=build or _builder(),
        init_seed=0,
        data_seed=data_seed,
        final_step=total,
        snapshot_steps=schedules.snapshot_steps(total, trainer.steps_per_epoch, CONFIG.snapshot_schedule),
        init_checkpoint=init_checkpoint,
    )


def _final_weights(spec):
    model = spec.build_model()
    prefix = SnapshotStore(spec.paths).read().iloc[-1]["checkpoint"]
    tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    return model, functional.current_weights(model)


def _assert_same_weights(a, b):
    for x, y in zip(a.trainable + a.non_trainable, b.trainable + b.non_trainable):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


@pytest.fixture(scope="module")
def parent(tmp_path_factory, synthetic_data):
    root = str(tmp_path_factory.mktemp("parent"))
    trainer = loop.Trainer(synthetic_data, CONFIG)
    spec = _spec(root, "parent", trainer, data_seed=11, build=_builder(batch_norm=True))
    trainer.train_run(spec)
    return root, trainer, spec


def test_snapshot_table_and_schedule(parent):
    _, trainer, spec = parent
    table = SnapshotStore(spec.paths).read()
    assert trainer.steps_per_epoch == 6
    assert table["step"].tolist() == [0, 3, 6, 12, 18]
    np.testing.assert_allclose(table["epoch"], table["step"] / 6)
    assert tuple(table.columns) == SNAPSHOT_COLUMNS
    assert table["learning_rate"].tolist() == [0.05, 0.05, 0.05, 0.005, 0.005]
    assert table["test_error"].iloc[-1] < table["test_error"].iloc[0]
    assert SnapshotStore(spec.paths).is_done()


def test_children_same_seed_identical(parent, synthetic_data):
    root, trainer, parent_spec = parent
    start = SnapshotStore(parent_spec.paths).read().set_index("step").loc[6, "checkpoint"]
    specs = [
        _spec(root, f"same_{i}", trainer, data_seed=5, build=_builder(batch_norm=True), init_checkpoint=start)
        for i in range(2)
    ]
    for spec in specs:
        trainer.train_run(spec)
    model, weights_a = _final_weights(specs[0])
    _, weights_b = _final_weights(specs[1])
    _assert_same_weights(weights_a, weights_b)

    result = basins.error_barrier(
        model, weights_a, weights_b, synthetic_data.x_test, synthetic_data.y_test,
        batch_norm_x=synthetic_data.x_train,
    )
    assert result.barrier == 0.0
    assert basins.weight_distance(weights_a, weights_b) == 0.0


def test_children_different_seeds_differ(parent):
    root, trainer, parent_spec = parent
    start = SnapshotStore(parent_spec.paths).read().set_index("step").loc[6, "checkpoint"]
    specs = [
        _spec(root, f"seed_{seed}", trainer, data_seed=seed, build=_builder(batch_norm=True), init_checkpoint=start)
        for seed in (1, 2)
    ]
    for spec in specs:
        trainer.train_run(spec)
    _, weights_a = _final_weights(specs[0])
    _, weights_b = _final_weights(specs[1])
    assert basins.weight_distance(weights_a, weights_b) > 1e-3


def test_child_with_parent_seed_replays_parent(parent):
    root, trainer, parent_spec = parent
    snapshots = SnapshotStore(parent_spec.paths).read().set_index("step")
    spec = _spec(
        root, "replay", trainer, data_seed=11, build=_builder(batch_norm=True),
        init_checkpoint=snapshots.loc[3, "checkpoint"], final_step=6,
    )
    trainer.train_run(spec)
    _, child = _final_weights(spec)

    model = parent_spec.build_model()
    tf.train.Checkpoint(model=model).read(snapshots.loc[6, "checkpoint"]).expect_partial()
    _assert_same_weights(child, functional.current_weights(model))


def test_resume_equals_uninterrupted(tmp_path, synthetic_data):
    trainer = loop.Trainer(synthetic_data, CONFIG)
    full = _spec(str(tmp_path), "full", trainer, data_seed=3)
    trainer.train_run(full)

    interrupted = _spec(str(tmp_path), "interrupted", trainer, data_seed=3)

    def stop_at(step):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train_run(interrupted, on_snapshot=stop_at)
    assert not SnapshotStore(interrupted.paths).is_done()
    assert SnapshotStore(interrupted.paths).read()["step"].tolist() == [0, 3, 6, 12]

    loop.Trainer(synthetic_data, CONFIG).train_run(interrupted)
    _, a = _final_weights(full)
    _, b = _final_weights(interrupted)
    _assert_same_weights(a, b)
    columns = ["step", "train_loss", "train_error", "test_loss", "test_error"]
    pd.testing.assert_frame_equal(
        SnapshotStore(full.paths).read()[columns], SnapshotStore(interrupted.paths).read()[columns]
    )


def test_nan_loss_keeps_snapshots(tmp_path, synthetic_data):
    config = loop.TrainingConfig(**{**CONFIG.__dict__, "learning_rate": 1e12, "weight_decay": 0.0})
    trainer = loop.Trainer(synthetic_data, config)
    spec = _spec(str(tmp_path), "diverge", trainer, data_seed=0)
    with pytest.raises(loop.NonFiniteLossError, match="learning_rate"):
        trainer.train_run(spec)
    table = SnapshotStore(spec.paths).read()
    assert not table.empty
    assert np.isfinite(table["train_loss"]).all()


def test_corrupt_checkpoint_error(tmp_path, synthetic_data):
    trainer = loop.Trainer(synthetic_data, CONFIG)
    spec = _spec(str(tmp_path), "corrupt", trainer, data_seed=0)

    def stop_at(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train_run(spec, on_snapshot=stop_at)
    prefix = SnapshotStore(spec.paths).read().iloc[-1]["checkpoint"]
    data_file = [f for f in os.listdir(spec.paths.checkpoints) if f.startswith(os.path.basename(prefix) + ".data")][0]
    with open(os.path.join(spec.paths.checkpoints, data_file), "wb") as f:
        f.write(b"not a checkpoint")
    before = sorted(os.listdir(spec.paths.checkpoints))
    with pytest.raises(CorruptCheckpointError, match="Cannot read checkpoint"):
        trainer.train_run(spec)
    assert sorted(os.listdir(spec.paths.checkpoints)) == before
    assert SnapshotStore(spec.paths).read()["step"].tolist() == [0, 3, 6]


def test_step_decay_schedule():
    schedule = schedules.StepDecay(0.1, [10, 20], 0.1)
    rates = [float(schedule(step)) for step in (0, 9, 10, 19, 20, 100)]
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_invalid_config_rejected(synthetic_data):
    with pytest.raises(ValueError, match="batch_size"):
        loop.Trainer(synthetic_data, loop.TrainingConfig(batch_size=1000))
    with pytest.raises(ValueError, match="optimizer"):
        loop.Trainer(synthetic_data, loop.TrainingConfig(optimizer="rmsprop", batch_size=16))


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from tfntk import models
    from tfntk.data import datasets
    from tfntk.training import loop

    data = datasets.load_dataset("synthetic", seed=0, synthetic_shape=(6, 6, 1), synthetic_classes=4,
                                 synthetic_train=96, synthetic_test=48)
    config = loop.TrainingConfig(learning_rate=0.05, batch_size=16, epochs=1.0, weight_decay=1e-3,
                                 export_saved_model=False)
    results = []
    for strategy in (tf.distribute.get_strategy(), tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])):
        trainer = loop.Trainer(data, config, strategy)
        model, optimizer, _ = trainer.build(lambda: models.build_model("mlp", (6, 6, 1), 4, seed=0, hidden=(16,)))
        run_steps = trainer._make_step_fn(model, optimizer)
        trainer._train_until(run_steps, data_seed=1, step=0, boundary=3)
        results.append([v.numpy() for v in model.trainable_variables])
    assert results[0][0].shape == results[1][0].shape
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(*results))
    moved = max(float(np.max(np.abs(a))) for a in results[0])
    print("MAX_DIFFERENCE", difference, moved)
    assert difference < 1e-5, difference
    """
)


def test_mirrored_matches_single_replica():
    environment = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MAX_DIFFERENCE" in result.stdout


def test_copied_run_reads_own_checkpoints(trained_job, tmp_path):
    job, _, _ = trained_job
    copy = dataclasses.replace(job, run=storage.RunDir(str(tmp_path / "run")))
    shutil.copytree(os.path.join(job.run.root, "parents"), os.path.join(copy.run.root, "parents"))
    model = job.new_model()

    table = SnapshotStore(copy.parent_paths(0)).read()
    assert all(prefix.startswith(str(tmp_path)) for prefix in table["checkpoint"])
    original = functional.flatten(job.weights_at(model, job.parent_paths(0)).trainable).numpy()
    copied = functional.flatten(copy.weights_at(model, copy.parent_paths(0)).trainable).numpy()
    np.testing.assert_array_equal(copied, original)

    for name in glob.glob(os.path.join(copy.parent_paths(0).checkpoints, "*")):
        os.remove(name)
    with pytest.raises(CorruptCheckpointError, match="Cannot read checkpoint .* new --run_dir"):
        copy.weights_at(model, copy.parent_paths(0))
