"""The linearized stage: Taylor-expanded and low-learning-rate training from onset epochs."""

import dataclasses
import os
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfntk import linearize, storage
from tfntk.data import pipeline
from tfntk.experiments import linearized
from tfntk.reporting import linearized_figures
from tfntk.training.snapshots import SnapshotStore

from stage_helpers import copy_run, read_table

# Onset 0.4 falls between the fixture's parent snapshots at steps 0, 3 and 6 (6 steps per
# epoch), so it is rounded to step 3, epoch 0.5. Step 6 is a spawn step, step 3 is not.
SETTINGS = dict(
    onset_epochs=(1.0, 0.4),
    orders=(1, 2),
    epochs=2,
    low_lr_epochs=1,
    low_lr_seeds=2,
    batch_size=16,
)
ONSET_STEPS = [3, 6]


@pytest.fixture(scope="module")
def stage(trained_job):
    job, spawn_steps, num_children = trained_job
    linearized.measure(job, spawn_steps, num_children, **SETTINGS)
    return job, spawn_steps


def _parent_row(job, step):
    parent = SnapshotStore(job.parent_paths(0)).read()
    return parent[parent["step"] == step].iloc[0]


def test_curves_table_rows(stage):
    job, _ = stage
    curves = read_table(job, "linearized_curves")

    assert sorted(curves["onset_step"].unique()) == ONSET_STEPS
    np.testing.assert_allclose(sorted(curves["onset_epoch"].unique()), [0.5, 1.0])
    for onset_step in ONSET_STEPS:
        runs = curves[curves["onset_step"] == onset_step]
        for variant in ("order_1", "order_2"):
            assert runs[runs["variant"] == variant]["epoch_after_onset"].tolist() == [0, 1, 2]
        low_lr = runs[runs["variant"] == "low_lr"]
        assert sorted(low_lr["seed"].unique()) == [0, 1]
        assert low_lr["epoch_after_onset"].tolist() == [0, 1, 0, 1]
        assert low_lr["plugged_back_test_error"].isna().all()
    assert len(curves) == 2 * (3 + 3 + 4)
    assert curves["run"].str.startswith("onset_0000.500_").sum() == 10


def test_epoch_zero_is_parent_at_onset(stage):
    job, _ = stage
    curves = read_table(job, "linearized_curves")

    for onset_step in ONSET_STEPS:
        parent = _parent_row(job, onset_step)
        rows = curves[(curves["onset_step"] == onset_step) & (curves["epoch_after_onset"] == 0)]
        assert len(rows) == 4
        for _, row in rows.iterrows():
            assert row["test_error"] == pytest.approx(parent["test_error"])
            assert row["train_error"] == pytest.approx(parent["train_error"])
            assert row["test_loss"] == pytest.approx(parent["test_loss"], rel=1e-5)
            assert row["train_loss"] == pytest.approx(parent["train_loss"], rel=1e-5)
            assert row["epoch"] == pytest.approx(onset_step / job.steps_per_epoch)


def test_order1_matches_eager_training(stage):
    job, _ = stage
    onset_step, epochs = 6, SETTINGS["epochs"]
    base = job.new_model()
    expansion = linearize.linearize(base, job.weights_at(base, job.parent_paths(0), onset_step))
    optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
    seed = linearized.linearized_data_seed(job, onset_step, 1)

    for epoch in range(epochs):
        for x, y in pipeline.train_batches(job.data, SETTINGS["batch_size"], seed, epoch):
            with tf.GradientTape() as tape:
                logits = expansion(x)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            variables = expansion.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, [v.value for v in variables]), variables))

    logits = expansion(tf.constant(job.data.x_test)).numpy()
    test_loss = np.mean(keras.losses.sparse_categorical_crossentropy(job.data.y_test, logits, from_logits=True))
    test_error = np.mean(np.argmax(logits, axis=-1) != job.data.y_test)
    curve = linearized.read_curve(linearized.linearized_paths(job, onset_step, 1))
    last = curve.iloc[-1]
    assert last["test_loss"] == pytest.approx(test_loss, rel=1e-4)
    assert last["test_error"] == pytest.approx(test_error)

    restored = linearize.linearize(job.new_model(), expansion.expansion_point)
    paths = linearized.linearized_paths(job, onset_step, 1)
    tf.train.Checkpoint(model=restored).read(paths.checkpoint_prefix(int(last["step"]))).expect_partial()
    for ours, theirs in zip(restored.w, expansion.w):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)
    assert np.abs(restored.w[0].numpy() - restored.w0[0].numpy()).max() > 0


def test_only_latest_checkpoint_kept(stage):
    job, _ = stage
    paths = linearized.linearized_paths(job, 3, 2)
    files = sorted(tf.io.gfile.listdir(paths.checkpoints))
    last_step = int(linearized.read_curve(paths)["step"].iloc[-1])
    assert all(name.startswith(os.path.basename(paths.checkpoint_prefix(last_step))) for name in files)
    assert storage.exists(paths.done_marker)


def test_low_lr_runs_start_at_parent(stage):
    job, _ = stage
    for onset_step in ONSET_STEPS:
        parent = _parent_row(job, onset_step)
        for seed in range(2):
            table = SnapshotStore(linearized.low_lr_paths(job, onset_step, seed)).read()
            assert table["step"].tolist() == [onset_step, onset_step + job.steps_per_epoch]
            assert table["test_error"].iloc[0] == pytest.approx(parent["test_error"])
            np.testing.assert_allclose(table["learning_rate"], 1e-3)


def test_summary_reads_best_and_final(stage):
    job, _ = stage
    curves = read_table(job, "linearized_curves")
    summary = read_table(job, "linearized")

    assert len(summary) == 2 * (4 + 4 * 2 + 2)
    for onset_step in ONSET_STEPS:
        rows = summary[(summary["onset_step"] == onset_step) & (summary["split"] == "test")]
        for order in (1, 2):
            curve = curves[(curves["onset_step"] == onset_step) & (curves["variant"] == f"order_{order}")]
            trained = curve[curve["epoch_after_onset"] >= 1]
            best_index = trained["test_error"].to_numpy().argmin()
            row = rows[rows["kind"] == f"linearized_order_{order}"].iloc[0]
            assert row["error"] == pytest.approx(trained["test_error"].min())
            assert row["best_epoch_after_onset"] == trained["epoch_after_onset"].iloc[best_index]
            assert row["final_error"] == pytest.approx(curve["test_error"].iloc[-1])
            plugged = rows[rows["kind"] == f"plugged_back_order_{order}"].iloc[0]
            assert plugged["error"] == pytest.approx(trained["plugged_back_test_error"].iloc[best_index])

        finals = curves[(curves["onset_step"] == onset_step) & (curves["variant"] == "low_lr")
                        & (curves["epoch_after_onset"] == 1)]["test_error"].to_numpy()
        low_lr = rows[rows["kind"] == "low_lr_nonlinear"].iloc[0]
        assert low_lr["error"] == pytest.approx(finals.mean())
        assert low_lr["error_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2)
        assert low_lr["seeds"] == 2

        parent = _parent_row(job, onset_step)
        assert rows[rows["kind"] == "parent_at_onset"]["error"].iloc[0] == pytest.approx(parent["test_error"])
        final = SnapshotStore(job.parent_paths(0)).read().iloc[-1]
        assert rows[rows["kind"] == "parent_final"]["error"].iloc[0] == pytest.approx(final["test_error"])


def test_advantage_is_difference(stage):
    job, spawn_steps = stage
    summary = read_table(job, "linearized")
    advantage = read_table(job, "nonlinear_advantage")

    assert len(advantage) == 2 * 2 * 2
    np.testing.assert_allclose(advantage["advantage"], advantage["linearized_error"] - advantage["low_lr_error"], atol=1e-8)
    best = advantage[(advantage["linearized_stopping"] == "best") & (advantage["order"] == 1)]
    expected = summary[(summary["kind"] == "linearized_order_1") & (summary["split"] == "test")]
    np.testing.assert_allclose(best["linearized_error"], expected["error"])

    barriers_path = job.run.table("error_barrier")
    barriers = storage.read_csv(barriers_path) if storage.exists(barriers_path) else None
    expected_barriers = linearized.barriers_by_spawn_step(barriers, job.steps_per_epoch)
    for _, row in advantage.iterrows():
        if row["onset_step"] in spawn_steps and row["onset_step"] in expected_barriers:
            assert row["error_barrier"] == pytest.approx(expected_barriers[row["onset_step"]][0])
        else:
            assert np.isnan(row["error_barrier"])
    # Step 3 is not a spawn step.
    assert advantage[advantage["onset_step"] == 3]["error_barrier"].isna().all()


def test_barrier_join_by_spawn_step():
    summary = pd.DataFrame([
        dict(onset_epoch=e, onset_step=s, kind=k, split="test", error=v, final_error=f, error_std=0.01)
        for e, s in ((0.0, 0), (0.5, 5))
        for k, v, f in (("linearized_order_1", 0.4, 0.5), ("low_lr_nonlinear", 0.3, 0.3))
    ])
    barriers = pd.DataFrame([
        dict(spawn_epoch=0.0, pair="children", split="test", barrier=0.2),
        dict(spawn_epoch=0.0, pair="children", split="test", barrier=0.4),
        dict(spawn_epoch=0.0, pair="children", split="train", barrier=9.0),
        dict(spawn_epoch=np.nan, pair="parents", split="test", barrier=9.0),
        dict(spawn_epoch=0.5, pair="children", split="test", barrier=0.1),
    ])

    table = linearized.advantage_table(summary, barriers, spawn_steps=[0], steps_per_epoch=10)
    best = table[table["linearized_stopping"] == "best"].set_index("onset_step")
    assert best.loc[0, "error_barrier"] == pytest.approx(0.3)
    assert best.loc[0, "error_barrier_pairs"] == 2
    assert np.isnan(best.loc[5, "error_barrier"])  # step 5 is not among the spawn steps
    assert best.loc[0, "advantage"] == pytest.approx(0.1)
    final = table[table["linearized_stopping"] == "final"].set_index("onset_step")
    assert final.loc[0, "advantage"] == pytest.approx(0.2)
    assert linearized.advantage_table(summary, None, [0], 10)["error_barrier"].isna().all()


def test_best_stopping_skips_onset():
    curve = pd.DataFrame({"epoch_after_onset": [0, 1, 2, 3], "test_error": [0.1, 0.5, 0.3, 0.3]})
    assert linearized.best_stopping_row(curve)["epoch_after_onset"] == 2
    with pytest.raises(ValueError, match="no epoch after its onset"):
        linearized.best_stopping_row(curve.iloc[:1])


def test_second_call_changes_nothing(stage):
    job, spawn_steps = stage
    roots = [os.path.join(job.run.root, "linearized"), os.path.join(job.run.root, "tables")]
    before = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                before[path] = os.stat(path).st_mtime_ns

    linearized.measure(job, spawn_steps, 2, **SETTINGS)

    after = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                after[path] = os.stat(path).st_mtime_ns
    assert after == before


def test_extends_finished_runs(stage, tmp_path):
    job, spawn_steps = stage
    copy = copy_run(job, tmp_path, parents_only=True)
    settings = dict(SETTINGS, onset_epochs=(1.0,), orders=(1,), low_lr_seeds=1)

    linearized.measure(copy, spawn_steps, 2, **dict(settings, epochs=1))
    paths = linearized.linearized_paths(copy, 6, 1)
    assert linearized.read_curve(paths)["epoch_after_onset"].tolist() == [0, 1]
    assert storage.exists(paths.done_marker)

    linearized.measure(copy, spawn_steps, 2, **dict(settings, epochs=2, low_lr_epochs=2))
    resumed = linearized.read_curve(paths)
    uninterrupted = linearized.read_curve(linearized.linearized_paths(job, 6, 1))
    for column in ("train_loss", "test_loss", "train_error", "test_error", "plugged_back_test_error"):
        np.testing.assert_allclose(resumed[column], uninterrupted[column], rtol=1e-6, err_msg=column)
    low_lr = SnapshotStore(linearized.low_lr_paths(copy, 6, 0)).read()
    assert low_lr["step"].tolist() == [6, 12, 18]

    # Fewer epochs than were trained: the tables read the earlier rows and nothing trains.
    linearized.measure(copy, spawn_steps, 2, **dict(settings, epochs=1, low_lr_epochs=1))
    curves = storage.read_csv(copy.run.table("linearized_curves"))
    assert curves[curves["variant"] == "order_1"]["epoch_after_onset"].tolist() == [0, 1]
    assert curves[curves["variant"] == "low_lr"]["epoch_after_onset"].tolist() == [0, 1]
    assert len(linearized.read_curve(paths)) == 3


def test_disabled_writes_nothing(stage, tmp_path):
    job, spawn_steps = stage
    copy = copy_run(job, tmp_path, parents_only=True)
    linearized.measure(copy, spawn_steps, 2, enabled=False)
    assert sorted(os.listdir(tmp_path)) == ["parents"]


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(onset_epochs=(1.0, 3.5)), "onset_epochs value 3.5"),
        (dict(onset_epochs=(-1.0,)), "onset_epochs value -1.0"),
        (dict(onset_epochs=()), "onset_epochs is empty"),
        (dict(orders=(3,)), r"orders \(3,\)"),
        (dict(learning_rate=0.0), "learning_rate 0.0"),
        (dict(low_lr_learning_rate=-1.0), "low_lr_learning_rate -1.0"),
        (dict(momentum=1.0), "momentum 1.0"),
        (dict(epochs=0), "epochs 0"),
        (dict(epochs=2.5), "epochs 2.5"),
        (dict(low_lr_seeds=-1), "low_lr_seeds -1"),
        (dict(batch_size=1000), "batch_size 1000"),
        (dict(weight_decay=-1e-4), "weight_decay -0.0001"),
    ],
)
def test_invalid_settings_raise(stage, tmp_path, override, message):
    job, spawn_steps = stage
    copy = copy_run(job, tmp_path, parents_only=True)
    with pytest.raises(ValueError, match=message):
        linearized.measure(copy, spawn_steps, 2, **dict(SETTINGS, **override))
    assert sorted(os.listdir(tmp_path)) == ["parents"]


def test_missing_parent_raises(stage, tmp_path):
    job, spawn_steps = stage
    empty = dataclasses.replace(job, run=storage.RunDir(str(tmp_path)))
    with pytest.raises(ValueError, match="parent_0 has not finished training"):
        linearized.measure(empty, spawn_steps, 2, **SETTINGS)


def test_figures_from_tables_only(stage, tmp_path):
    job, _ = stage
    shutil.copytree(os.path.join(job.run.root, "tables"), os.path.join(tmp_path, "tables"))

    drawn = linearized_figures.draw(str(tmp_path))

    assert drawn == ["linearized", "nonlinear_advantage"]
    run = storage.RunDir(str(tmp_path))
    for name in drawn:
        for extension in ("png", "pdf"):
            assert os.path.getsize(run.figure(name, extension)) > 1000
    assert linearized_figures.draw(str(tmp_path / "empty")) == []
