"""Motion stage: children's distances over time, final child distance, t-SNE, figures."""

import dataclasses
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfntk import storage
from tfntk.experiments import motion
from tfntk.measures import basins, evaluation
from tfntk.reporting import motion_figures
from tfntk.training.snapshots import SnapshotStore

from stage_helpers import copy_run, read_table

SETTINGS = dict(barrier_alphas=3, last_snapshots=3, tsne_test_examples=24, tsne_snapshots_per_run=4)
TABLES = ("children_over_time", "final_child_distance", "tsne")


@pytest.fixture(scope="module")
def measured(trained_job):
    job, spawn_steps, num_children = trained_job
    motion.measure(job, spawn_steps, num_children, **SETTINGS)
    return job, spawn_steps, num_children


def _forbid_weights(monkeypatch, job):
    def fail(*args, **kwargs):
        raise AssertionError("the stage loaded weights although its outputs were cached")

    monkeypatch.setattr(job, "weights_at", fail)


def _files_with_times(root):
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            found[path] = os.stat(path).st_mtime_ns
    return found


def test_over_time_rows_cover_common_steps(measured):
    job, spawn_steps, num_children = measured
    table = read_table(job, "children_over_time")
    assert set(table["measure"]) == set(motion.OVER_TIME_MEASURES)
    assert (table["split"] == "test").all()
    assert (table["barrier_alphas"] == 3).all()
    assert (table["batch_norm_examples"] == job.data.num_train).all()

    for spawn_epoch, pair, run_a, run_b in job.pairs(spawn_steps, num_children):
        rows = table[(table["run_a"] == run_a.name) & (table["run_b"] == run_b.name)]
        steps_a = set(SnapshotStore(run_a).read()["step"])
        steps_b = set(SnapshotStore(run_b).read()["step"])
        expected = motion.grid_steps(steps_a & steps_b, job.steps_per_epoch, 1 / 3)
        assert sorted(rows["step"].unique()) == expected
        assert len(rows) == len(expected) * len(motion.OVER_TIME_MEASURES)
        assert (rows["pair"] == pair).all()
        np.testing.assert_allclose(rows["epoch"], rows["step"] / job.steps_per_epoch)


def test_children_measured_on_their_grid(measured):
    job, _, _ = measured
    table = read_table(job, "children_over_time")
    children = table[(table["pair"] == "children") & (table["spawn_epoch"] == 0.0)]
    parents = table[table["pair"] == "parents"]
    # Six steps per epoch: the children's snapshot grid is every second step, and the parents'
    # own snapshots at steps 0, 3, 6, 12 and 18 are each nearest to a grid point.
    assert sorted(children["step"].unique()) == list(range(0, 19, 2))
    assert sorted(parents["step"].unique()) == [0, 3, 6, 12, 18]


def test_grid_steps_closed_form():
    steps = [0, 1, 2, 3, 5, 6, 9, 12]
    # Three steps per epoch, one per epoch: targets at steps 0, 3, 6, 9 and 12.
    assert motion.grid_steps(steps, 3.0, 1.0) == [0, 3, 6, 9, 12]
    # Targets 0, 6 and 12 keep themselves, and the last step is always kept.
    assert motion.grid_steps(steps[:-1], 3.0, 2.0) == [0, 6, 9]
    # Off-grid snapshots: the nearest within half a spacing (1.5 steps) is kept, the earlier on ties.
    assert motion.grid_steps([1, 4, 8, 13], 3.0, 1.0) == [1, 4, 8, 13]
    assert motion.grid_steps([0, 5, 13], 3.0, 1.0) == [0, 5, 13]
    assert motion.grid_steps([0, 2, 4, 6], 3.0, 1.0) == [0, 2, 6]
    assert motion.grid_steps(steps, 3.0, None) == steps


def test_children_start_identical(measured):
    job, spawn_steps, _ = measured
    table = read_table(job, "children_over_time")
    for spawn_step in spawn_steps:
        rows = table[(table["pair"] == "children") & (table["step"] == spawn_step)
                     & np.isclose(table["spawn_epoch"], spawn_step / job.steps_per_epoch)]
        values = dict(zip(rows["measure"], rows["value"]))
        assert values["weight_l2_distance"] == 0.0
        assert values["error_barrier"] == 0.0


def test_over_time_values_match_measures(measured):
    job, _, _ = measured
    table = read_table(job, "children_over_time")
    row = table[(table["pair"] == "children") & (table["spawn_epoch"] == 0.0) & (table["step"] == 12)]
    run_a, run_b = job.child_paths(0, 0), job.child_paths(0, 1)
    model = job.new_model()
    weights_a = job.weights_at(model, run_a, 12)
    weights_b = job.weights_at(model, run_b, 12)
    x, y = job.data.x_test, job.data.y_test

    predictions_a = np.argmax(evaluation.logits(model, weights_a, x), axis=-1)
    predictions_b = np.argmax(evaluation.logits(model, weights_b, x), axis=-1)
    distance = basins.function_space_distance(predictions_a, predictions_b, y, job.data.num_classes)
    barrier = basins.error_barrier(model, weights_a, weights_b, x, y, np.linspace(0, 1, 3), job.data.x_train).barrier
    values = dict(zip(row["measure"], row["value"]))
    assert values["function_space_distance"] == pytest.approx(distance, rel=1e-6, nan_ok=True)
    assert values["error_barrier"] == pytest.approx(barrier, abs=1e-9)
    assert values["weight_l2_distance"] == pytest.approx(basins.weight_distance(weights_a, weights_b), rel=1e-5)


def test_final_distance_summarises_last_steps(measured):
    job, spawn_steps, num_children = measured
    over_time = read_table(job, "children_over_time")
    final = read_table(job, "final_child_distance")
    assert len(final) == (len(spawn_steps) + 1) * len(motion.OVER_TIME_MEASURES)
    assert final["final_test_error_barrier"].isna().all()

    for _, row in final.iterrows():
        rows = over_time[(over_time["run_a"] == row["run_a"]) & (over_time["run_b"] == row["run_b"])
                         & (over_time["measure"] == row["measure"])].sort_values("step")
        last = rows["value"].to_numpy()[-3:]
        assert row["mean"] == pytest.approx(np.nanmean(last), nan_ok=True, rel=1e-6)
        assert row["std"] == pytest.approx(np.nanstd(last), nan_ok=True, rel=1e-6, abs=1e-9)
        assert row["count"] == np.isfinite(last).sum()
        assert row["last_epoch"] == pytest.approx(rows["epoch"].max())
    parents = final[final["pair"] == "parents"]
    assert parents["spawn_epoch"].isna().all()


def test_final_distances_closed_form():
    over_time = pd.DataFrame({
        "spawn_epoch": 1.0, "pair": "children", "run_a": "a", "run_b": "b", "measure": "function_space_distance",
        "step": [4, 1, 2, 3], "epoch": [4.0, 1.0, 2.0, 3.0], "value": [0.4, 9.0, 0.2, np.nan],
    })
    final = motion.final_distances(over_time, 3)
    assert final["mean"].iloc[0] == pytest.approx(0.3)
    assert final["std"].iloc[0] == pytest.approx(0.1)
    assert final["count"].iloc[0] == 2
    assert final["first_epoch"].iloc[0] == 2.0


def test_tsne_table_and_probability_cache(measured):
    job, spawn_steps, num_children = measured
    tsne = read_table(job, "tsne")
    assert set(tsne.columns) >= {"run", "role", "index", "spawn_epoch", "step", "epoch", "x", "y"}
    assert tsne["run"].nunique() == 2 + len(spawn_steps) * num_children
    assert np.isfinite(tsne[["x", "y"]].to_numpy()).all()

    paths = job.child_paths(spawn_steps[-1], 1)
    rows = tsne[tsne["run"] == paths.name]
    snapshots = SnapshotStore(paths).read()
    assert 2 <= len(rows) <= SETTINGS["tsne_snapshots_per_run"]
    assert rows["step"].min() == snapshots["step"].min()
    assert rows["step"].max() == snapshots["step"].max()

    cache = storage.load_npz(job.run.analysis(f"motion/probabilities/{paths.name}.npz"))
    indices = motion.tsne_test_indices(job, SETTINGS["tsne_test_examples"])
    np.testing.assert_array_equal(cache["test_indices"], indices)
    assert cache["probabilities"].shape == (len(rows), 24, job.data.num_classes)
    model = job.new_model()
    step = int(rows["step"].max())
    logits = evaluation.logits(model, job.weights_at(model, paths, step), job.data.x_test[indices])
    expected = tf.nn.softmax(logits).numpy()
    position = list(cache["steps"]).index(step)
    np.testing.assert_allclose(cache["probabilities"][position], expected, rtol=1e-5, atol=1e-6)


def test_spread_steps_closed_form():
    steps = [0, 1, 2, 3, 6, 12, 18]
    epochs = np.asarray(steps) / 6.0
    # Targets 0, 1, 2, 3 epochs: nearest snapshots are steps 0, 6, 12, 18.
    assert motion.spread_steps(steps, epochs, 4) == [0, 6, 12, 18]
    assert motion.spread_steps(steps, epochs, 2) == [0, 18]
    assert motion.spread_steps([5], [1.0], 3) == [5]


def test_second_call_skips_work(measured, monkeypatch):
    job, spawn_steps, num_children = measured
    before = _files_with_times(job.run.root)
    _forbid_weights(monkeypatch, job)
    motion.measure(job, spawn_steps, num_children, **SETTINGS)
    assert _files_with_times(job.run.root) == before


def test_caches_rebuild_tables_without_weights(measured, tmp_path, monkeypatch):
    job, spawn_steps, num_children = measured
    copy = copy_run(job, tmp_path / "run")
    originals = {name: read_table(copy, name) for name in TABLES}
    for name in TABLES:
        os.remove(copy.run.table(name))

    _forbid_weights(monkeypatch, copy)
    motion.measure(copy, spawn_steps, num_children, **SETTINGS)
    for name in TABLES:
        pd.testing.assert_frame_equal(read_table(copy, name), originals[name], check_exact=False, atol=1e-4)


def test_final_table_joins_error_barrier(measured, tmp_path):
    job, spawn_steps, num_children = measured
    copy = copy_run(job, tmp_path / "run")
    barrier_rows = []
    for number, (spawn_epoch, pair, run_a, run_b) in enumerate(copy.pairs(spawn_steps, num_children)):
        for split in ("test", "train"):
            barrier_rows.append({"spawn_epoch": spawn_epoch, "pair": pair, "run_a": run_a.name, "run_b": run_b.name,
                                 "split": split, "barrier": number / 10 + (split == "train")})
    storage.write_csv_atomic(copy.run.table("error_barrier"), pd.DataFrame(barrier_rows))

    motion.measure(copy, spawn_steps, num_children, **SETTINGS)
    final = read_table(copy, "final_child_distance")
    for number, (_, _, run_a, run_b) in enumerate(copy.pairs(spawn_steps, num_children)):
        rows = final[(final["run_a"] == run_a.name) & (final["run_b"] == run_b.name)]
        np.testing.assert_allclose(rows["final_test_error_barrier"], number / 10)


def test_changed_alphas_remeasure(measured, tmp_path):
    job, spawn_steps, num_children = measured
    copy = copy_run(job, tmp_path / "run")
    motion.measure(copy, spawn_steps[1:], num_children, **dict(SETTINGS, barrier_alphas=2, every_epochs=None))
    table = read_table(copy, "children_over_time")
    assert (table["barrier_alphas"] == 2).all()
    assert (table["every_epochs"] == 0.0).all()
    children = table[table["pair"] == "children"]
    assert sorted(children["step"].unique()) == sorted(SnapshotStore(copy.child_paths(spawn_steps[1], 0)).read()["step"])
    assert set(table["pair"]) == {"children", "parents"}
    assert table["spawn_epoch"].dropna().unique().tolist() == [1.0]


def test_fewer_spawn_epochs_reuse_caches(measured, tmp_path, monkeypatch):
    job, spawn_steps, num_children = measured
    copy = copy_run(job, tmp_path / "run")
    _forbid_weights(monkeypatch, copy)
    motion.measure(copy, spawn_steps[1:], num_children, **SETTINGS)

    later_epoch = spawn_steps[1] / copy.steps_per_epoch
    for name in TABLES:
        table = read_table(copy, name)
        assert set(table["spawn_epoch"].dropna()) == {later_epoch}
    tsne = read_table(copy, "tsne")
    assert tsne["run"].nunique() == 2 + num_children


def test_tensorboard_scalars_at_steps(measured):
    job, _, _ = measured
    table = read_table(job, "children_over_time")
    run_a = job.child_paths(0, 0)
    expected = table[(table["run_a"] == run_a.name) & (table["measure"] == "function_space_distance")]
    expected = expected[np.isfinite(expected["value"])]

    found = {}
    for path in tf.io.gfile.glob(os.path.join(job.run.tensorboard(run_a.name), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "children/function_space_distance":
                    found[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(found) == sorted(expected["step"])
    for step, value in zip(expected["step"], expected["value"]):
        assert found[step] == pytest.approx(value, rel=1e-6)


def test_figures_from_tables_only(measured, tmp_path):
    job, _, _ = measured
    tables_only = tmp_path / "tables_only"
    shutil.copytree(os.path.join(job.run.root, "tables"), tables_only / "tables")
    assert motion_figures.draw(str(tables_only)) == list(TABLES)
    for name in TABLES:
        assert (tables_only / "figures" / f"{name}.png").exists()
        assert (tables_only / "figures" / f"{name}.pdf").exists()


def test_figures_skip_missing_tables(tmp_path):
    assert motion_figures.draw(str(tmp_path)) == []


def test_moving_average_closed_form():
    epochs = np.array([0.0, 0.5, 1.0, 3.0])
    values = np.array([1.0, np.nan, 3.0, 10.0])
    np.testing.assert_allclose(motion_figures.moving_average(epochs, values, 1.0), [2.0, 2.0, 2.0, 10.0])
    np.testing.assert_array_equal(motion_figures.moving_average(epochs, values, 0.0), values)


def test_pooled_spread_matches_pooled_values():
    values = {0.0: [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]}
    final = pd.DataFrame([{"spawn_epoch": 0.0, "mean": np.mean(v), "std": np.std(v)} for v in values[0.0]])
    pooled = motion_figures.pooled_spread(final)
    assert pooled["mean"].iloc[0] == pytest.approx(np.mean(values[0.0]))
    assert pooled["std"].iloc[0] == pytest.approx(np.std(values[0.0]))


@pytest.mark.parametrize("setting, value", [
    ("every_epochs", 0.0),
    ("barrier_alphas", 1),
    ("last_snapshots", 0),
    ("tsne_test_examples", 1),
    ("tsne_snapshots_per_run", 1),
    ("tsne_perplexity", 0.0),
    ("tsne_threads", 0),
])
def test_bad_setting_raises(trained_job, setting, value):
    job, spawn_steps, num_children = trained_job
    with pytest.raises(ValueError, match=f"{setting} {value}"):
        motion.measure(job, spawn_steps, num_children, **dict(SETTINGS, **{setting: value}))


def test_bad_pairs_and_perplexity_raise(measured, tmp_path):
    job, spawn_steps, _ = measured
    with pytest.raises(ValueError, match="num_children 1"):
        motion.measure(job, spawn_steps, 1)
    copy = copy_run(job, tmp_path / "run")
    with pytest.raises(ValueError, match="tsne_perplexity 500"):
        motion.measure(copy, spawn_steps, 2, **dict(SETTINGS, tsne_perplexity=500.0))


def test_unfinished_run_raises(measured, tmp_path):
    job, spawn_steps, num_children = measured
    copy = copy_run(job, tmp_path / "run")
    os.remove(copy.child_paths(spawn_steps[0], 1).done_marker)
    shutil.rmtree(os.path.join(copy.run.root, "analysis"))
    with pytest.raises(ValueError, match="not finished"):
        motion.measure(copy, spawn_steps, num_children, **SETTINGS)


def test_disabled_writes_nothing(trained_job, tmp_path):
    job, spawn_steps, num_children = trained_job
    empty = dataclasses.replace(job, run=storage.RunDir(str(tmp_path / "run")))
    motion.measure(empty, spawn_steps, num_children, enabled=False)
    assert not os.path.exists(tmp_path / "run")
