"""Tests of the kernel dynamics stage on the session's tiny trained job, and of its figures."""

import copy
import glob
import itertools
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfntk import storage
from tfntk.autodiff import jacobian
from tfntk.data import subsets
from tfntk.experiments import kernel_dynamics
from tfntk.measures import centroids as centroid_measures
from tfntk.measures import kernel as kernel_measures
from tfntk.measures import relu as relu_measures
from tfntk.reporting import kernel_figures

from stage_helpers import read_table

EXAMPLES = 12
TABLES = ("snapshot_pairs", "kernel_velocity", "pair_kernel")


def _isolated_job(job, root):
    """A shallow copy of `job` whose run directory is a copy of the job's, without analysis caches.

    Other stages write into the session job's run directory, so this stage is tested on a copy.
    """
    shutil.copytree(job.run.root, root)
    shutil.rmtree(os.path.join(root, "analysis"), ignore_errors=True)
    for name in TABLES:
        path = storage.RunDir(root).table(name)
        if os.path.exists(path):
            os.remove(path)
    isolated = copy.copy(job)
    isolated.run = storage.RunDir(str(root))
    return isolated


@pytest.fixture(scope="module")
def measured(trained_job, tmp_path_factory):
    """The stage run once, every parent snapshot measured, on a copy of the session job."""
    job, spawn_steps, num_children = trained_job
    job = _isolated_job(job, tmp_path_factory.mktemp("kernel_stage") / "run")
    kernel_dynamics.measure(job, spawn_steps, num_children, analysis_examples=EXAMPLES, max_snapshots=None)
    return job, spawn_steps, num_children


def _subset_inputs(job):
    indices = subsets.stratified_subset(job.data.y_train, EXAMPLES, seed=job.seed)
    return job.data.x_train[indices]


def _parent_steps(job):
    return [0, 3, 6, 12, 18]


def _measures_at(job, paths, step):
    model = job.new_model()
    weights = job.weights_at(model, paths, step)
    x = _subset_inputs(job)
    gram = kernel_measures.ntk_gram(model, x, weights=weights, trace_logits=True)
    patterns = relu_measures.relu_patterns(model, x, weights=weights)
    centroids = centroid_measures.logit_gradient_centroids(model, x, weights=weights)
    return gram, patterns, centroids


def _value(table, measure, **keys):
    rows = table[table["measure"] == measure]
    for column, value in keys.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1, f"expected one {measure} row for {keys}, got {len(rows)}"
    return float(rows["value"].iloc[0])


def test_velocity_partner_nearest_within_tolerance():
    epochs = [0.0, 0.1, 0.35, 0.5, 1.5]
    assert kernel_dynamics.velocity_partner(epochs, 0, 0.4, 0.2) == 2
    assert kernel_dynamics.velocity_partner(epochs, 1, 0.4, 0.2) == 3
    assert kernel_dynamics.velocity_partner(epochs, 2, 0.4, 0.2) is None  # 0.5 is 0.25 from 0.75
    assert kernel_dynamics.velocity_partner(epochs, 2, 0.4, 0.3) == 3
    assert kernel_dynamics.velocity_partner(epochs, 4, 0.4, 0.2) is None


def test_select_snapshot_steps_spread_and_partners():
    steps = list(range(21))
    epochs = [step / 10 for step in steps]
    chosen = kernel_dynamics.select_snapshot_steps(steps, epochs, 3, required_steps=[7, 99], dt=0.4)
    # Spread 0, 10, 20; required 7; partners 0 -> 4, 7 -> 11, 10 -> 14; 20 has none.
    assert chosen == [0, 4, 7, 10, 11, 14, 20]
    assert kernel_dynamics.select_snapshot_steps(steps, epochs, None) == steps


def test_centroid_alignment_matrix_matches_measure():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 50)).astype(np.float32) for _ in range(5)]
    loads = []

    def load(i):
        loads.append(i)
        return arrays[i]

    one_panel = kernel_dynamics.centroid_alignment_matrix(load, 5)
    assert len(loads) == 5
    loads.clear()
    panels = kernel_dynamics.centroid_alignment_matrix(load, 5, memory_bytes=2 * 2 * arrays[0].nbytes * 2)
    assert len(loads) > 5

    for a, b in itertools.product(range(5), repeat=2):
        expected = centroid_measures.centroid_alignment(arrays[a], arrays[b])
        assert one_panel[a, b] == pytest.approx(expected, abs=1e-12)
        assert panels[a, b] == pytest.approx(expected, abs=1e-12)


def test_centroid_alignment_matrix_zero_centroid_raises():
    arrays = [np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32)]
    with pytest.raises(ValueError, match="centroid 0 of array 1 is zero"):
        kernel_dynamics.centroid_alignment_matrix(lambda i: arrays[i], 2)


def test_tables_columns_and_row_counts(measured):
    job, _, _ = measured
    pairs = read_table(job, "snapshot_pairs")
    assert list(pairs.columns) == ["run", "step_a", "epoch_a", "step_b", "epoch_b", "measure", "value", "kernel"]
    assert len(pairs) == 10 * 3  # every pair of the 5 snapshots, three measures
    assert set(pairs["kernel"]) == {"traced (m, m)"}
    assert set(pairs["run"]) == {"parent_0"}
    assert (pairs["step_a"] < pairs["step_b"]).all()

    velocity = read_table(job, "kernel_velocity")
    assert list(velocity.columns) == [
        "run", "step", "epoch", "partner_step", "partner_epoch", "dt_epochs", "velocity", "kernel"
    ]
    pair_kernel = read_table(job, "pair_kernel")
    assert list(pair_kernel.columns) == ["spawn_epoch", "pair", "run_a", "run_b", "measure", "value", "kernel"]
    assert len(pair_kernel) == 3 * 3  # two spawn epochs with one pair each, and the parents
    parents = pair_kernel[pair_kernel["pair"] == "parents"]
    assert parents["spawn_epoch"].isna().all()
    assert set(parents["run_a"]) == {"parent_0"}
    assert set(parents["run_b"]) == {"parent_1"}


def test_analysis_subset_saved(measured):
    job, _, _ = measured
    saved = storage.load_npz(job.run.analysis("subset.npz"))
    expected = subsets.stratified_subset(job.data.y_train, EXAMPLES, seed=job.seed)
    np.testing.assert_array_equal(saved["indices"], expected)
    np.testing.assert_array_equal(saved["x"], job.data.x_train[expected])
    np.testing.assert_array_equal(saved["y"], job.data.y_train[expected])


def test_snapshot_pairs_match_direct_measures(measured):
    job, _, _ = measured
    pairs = read_table(job, "snapshot_pairs")
    gram_a, patterns_a, centroids_a = _measures_at(job, job.parent_paths(0), 0)
    gram_b, patterns_b, centroids_b = _measures_at(job, job.parent_paths(0), 12)
    keys = dict(run="parent_0", step_a=0, step_b=12)
    assert _value(pairs, "kernel_distance", **keys) == pytest.approx(
        kernel_measures.kernel_distance(gram_a, gram_b), abs=1e-6)
    assert _value(pairs, "relu_distance", **keys) == pytest.approx(
        relu_measures.relu_distance(patterns_a, patterns_b), rel=1e-8)
    assert _value(pairs, "centroid_alignment", **keys) == pytest.approx(
        centroid_measures.centroid_alignment(centroids_a, centroids_b), abs=1e-6)


def test_cache_holds_gram_patterns_centroids(measured):
    job, _, _ = measured
    gram, patterns, _ = _measures_at(job, job.parent_paths(0), 6)
    cached = storage.load_npz(job.run.ntk_snapshot("parent_0", 6))
    np.testing.assert_allclose(cached["gram"], gram, rtol=1e-5, atol=1e-6)
    unpacked = np.unpackbits(cached["relu_bits"], count=patterns.size).reshape(cached["relu_shape"])
    np.testing.assert_array_equal(unpacked.astype(bool), patterns)

    # The centroids against a second method: the mean of the per-example logit Jacobians.
    model = job.new_model()
    weights = job.weights_at(model, job.parent_paths(0), 6)
    per_example = jacobian.logit_jacobian(model, _subset_inputs(job), weights=weights)
    num_classes = job.data.num_classes
    expected = np.concatenate(
        [tf.reshape(tf.reduce_mean(j, axis=0), [num_classes, -1]).numpy() for j in per_example], axis=1)
    assert cached["centroids"].shape == expected.shape
    np.testing.assert_allclose(cached["centroids"], expected, rtol=1e-4, atol=1e-6)


def test_velocity_matches_kernel_velocity(measured):
    job, _, _ = measured
    steps = _parent_steps(job)
    epochs = [step / job.steps_per_epoch for step in steps]
    grams = [storage.load_npz(job.run.ntk_snapshot("parent_0", step))["gram"] for step in steps]
    expected_epochs, expected = kernel_measures.kernel_velocity(epochs, grams, dt=0.4)

    velocity = read_table(job, "kernel_velocity").sort_values("epoch")
    assert len(expected) > 0
    np.testing.assert_allclose(velocity["epoch"], expected_epochs)
    np.testing.assert_allclose(velocity["velocity"], expected, rtol=1e-8)
    np.testing.assert_allclose(velocity["dt_epochs"], velocity["partner_epoch"] - velocity["epoch"])


def test_pair_kernel_matches_direct_measures(measured):
    job, spawn_steps, _ = measured
    table = read_table(job, "pair_kernel")
    paths_a, paths_b = job.child_paths(spawn_steps[1], 0), job.child_paths(spawn_steps[1], 1)
    gram_a, patterns_a, centroids_a = _measures_at(job, paths_a, job.total_steps)
    gram_b, patterns_b, centroids_b = _measures_at(job, paths_b, job.total_steps)
    keys = dict(run_a=paths_a.name, run_b=paths_b.name)
    assert _value(table, "kernel_distance", **keys) == pytest.approx(
        kernel_measures.kernel_distance(gram_a, gram_b), abs=1e-6)
    assert _value(table, "relu_distance", **keys) == pytest.approx(
        relu_measures.relu_distance(patterns_a, patterns_b), rel=1e-8)
    assert _value(table, "centroid_alignment", **keys) == pytest.approx(
        centroid_measures.centroid_alignment(centroids_a, centroids_b), abs=1e-6)


def test_tensorboard_tags_written(measured):
    job, _, _ = measured
    tags = set()
    for path in glob.glob(os.path.join(job.run.tensorboard("parent_0"), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    expected = {"ntk/kernel_velocity", "ntk/kernel_distance_heatmap", "ntk/relu_distance_heatmap",
                "ntk/centroid_alignment_heatmap"}
    assert expected <= tags


def _fail(*args, **kwargs):
    raise AssertionError("the stage measured a snapshot that it should have read from the cache")


def test_second_call_skips(measured, monkeypatch):
    job, spawn_steps, num_children = measured
    before = {name: open(job.run.table(name), "rb").read() for name in TABLES}
    monkeypatch.setattr(kernel_measures, "ntk_gram", _fail)
    monkeypatch.setattr(kernel_dynamics.storage, "write_csv_atomic", _fail)
    kernel_dynamics.measure(job, spawn_steps, num_children, analysis_examples=EXAMPLES, max_snapshots=None)
    after = {name: open(job.run.table(name), "rb").read() for name in TABLES}
    assert after == before


def test_tables_rebuilt_from_cache(measured, monkeypatch):
    job, spawn_steps, num_children = measured
    before = {name: read_table(job, name) for name in TABLES}
    os.remove(job.run.table("snapshot_pairs"))
    monkeypatch.setattr(kernel_measures, "ntk_gram", _fail)
    monkeypatch.setattr(relu_measures, "relu_patterns", _fail)
    monkeypatch.setattr(centroid_measures, "logit_gradient_centroids", _fail)
    kernel_dynamics.measure(job, spawn_steps, num_children, analysis_examples=EXAMPLES, max_snapshots=None)
    for name in TABLES:
        pd.testing.assert_frame_equal(read_table(job, name), before[name])


def test_fewer_snapshots_reuse_cache(measured, monkeypatch):
    job, spawn_steps, num_children = measured
    full = read_table(job, "snapshot_pairs")
    monkeypatch.setattr(kernel_measures, "ntk_gram", _fail)
    try:
        kernel_dynamics.measure(job, spawn_steps, num_children, analysis_examples=EXAMPLES, max_snapshots=2,
                                velocity_dt=1.0)
        pairs = read_table(job, "snapshot_pairs")
    finally:
        monkeypatch.undo()
        kernel_dynamics.measure(job, spawn_steps, num_children, analysis_examples=EXAMPLES, max_snapshots=None)
    # First and last (0, 18), spawn steps (0, 6), and the partners at t + 1 epoch: 6, 12, 18.
    measured_steps = sorted(set(pairs["step_a"]) | set(pairs["step_b"]))
    assert measured_steps == [0, 6, 12, 18]
    merged = pairs.merge(full, on=["run", "step_a", "step_b", "measure"], suffixes=("", "_full"))
    assert len(merged) == len(pairs)
    np.testing.assert_allclose(merged["value"], merged["value_full"], rtol=1e-12)


def test_uncached_centroids_and_small_panels(measured, tmp_path):
    job, spawn_steps, num_children = measured
    other = _isolated_job(job, tmp_path / "run")
    kernel_dynamics.measure(other, spawn_steps, num_children, analysis_examples=EXAMPLES, max_snapshots=None,
                            centroid_cache_max_floats=0, centroid_memory_gib=1e-9)
    assert "centroids" not in storage.load_npz(other.run.ntk_snapshot("parent_0", 0))
    for name in ("snapshot_pairs", "pair_kernel"):
        expected = read_table(job, name)
        got = read_table(other, name)
        np.testing.assert_allclose(got["value"], expected["value"], rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match="analysis_examples is 8"):
        kernel_dynamics.measure(other, spawn_steps, num_children, analysis_examples=8)


def test_full_kernel_replaces_traced_cache(measured, tmp_path):
    job, spawn_steps, num_children = measured
    other = _isolated_job(job, tmp_path / "run")
    shutil.copytree(job.run.analysis(""), other.run.analysis(""))
    kernel_dynamics.measure(other, spawn_steps, num_children, analysis_examples=EXAMPLES, max_snapshots=2,
                            trace_logits=False)

    pairs = read_table(other, "snapshot_pairs")
    assert set(pairs["kernel"]) == {"full (m, m, K, K)"}
    assert set(read_table(other, "pair_kernel")["kernel"]) == {"full (m, m, K, K)"}
    num_classes = job.data.num_classes
    cached = storage.load_npz(other.run.ntk_snapshot("parent_0", 0))["gram"]
    assert cached.shape == (EXAMPLES, EXAMPLES, num_classes, num_classes)
    np.testing.assert_allclose(np.einsum("ijkk->ij", cached),
                               storage.load_npz(job.run.ntk_snapshot("parent_0", 0))["gram"], rtol=1e-4, atol=1e-5)

    model = job.new_model()
    x = _subset_inputs(job)
    grams = [
        kernel_measures.ntk_gram(model, x, weights=job.weights_at(model, job.parent_paths(0), step))
        for step in (0, 18)
    ]
    assert _value(pairs, "kernel_distance", run="parent_0", step_a=0, step_b=18) == pytest.approx(
        kernel_measures.kernel_distance(*grams), abs=1e-6)


@pytest.mark.parametrize("setting, value", [
    ("analysis_examples", 1),
    ("analysis_examples", 2.5),
    ("trace_logits", "yes"),
    ("implementation", "hessian"),
    ("batch_size", 0),
    ("max_snapshots", 1),
    ("velocity_dt", 0.0),
    ("velocity_tolerance", -0.1),
    ("parents", (0, 0)),
    ("parents", (2,)),
    ("centroid_cache_max_floats", -1),
    ("centroid_memory_gib", 0),
])
def test_invalid_setting_raises(trained_job, setting, value):
    job, spawn_steps, num_children = trained_job
    with pytest.raises(ValueError, match=f"kernel_dynamics.measure.{setting}"):
        kernel_dynamics.measure(job, spawn_steps, num_children, **{setting: value})


def test_disabled_writes_nothing(trained_job, tmp_path):
    job, spawn_steps, num_children = trained_job
    other = copy.copy(job)
    other.run = storage.RunDir(str(tmp_path / "empty"))
    kernel_dynamics.measure(other, spawn_steps, num_children, enabled=False)
    assert not os.path.exists(other.run.root)


def test_figures_drawn_from_tables_only(measured, tmp_path):
    job, _, _ = measured
    run_dir = str(tmp_path / "tables_only")
    for name in TABLES + ("error_barrier", "learning_curves"):
        source = job.run.table(name)
        if os.path.exists(source):
            os.makedirs(os.path.join(run_dir, "tables"), exist_ok=True)
            shutil.copy(source, storage.RunDir(run_dir).table(name))

    barrier_path = storage.RunDir(run_dir).table("error_barrier")
    if not os.path.exists(barrier_path):
        storage.write_csv_atomic(barrier_path, pd.DataFrame({
            "spawn_epoch": [0.0, 1.0, np.nan], "pair": ["children", "children", "parents"],
            "split": ["test"] * 3, "barrier": [0.3, 0.1, 0.4],
        }))

    drawn = kernel_figures.draw(run_dir)
    assert drawn == ["kernel_heatmaps", "kernel_velocity", "barrier_vs_velocity", "children_kernel"]
    for name in drawn:
        assert os.path.getsize(storage.RunDir(run_dir).figure(name, "png")) > 0
        assert os.path.getsize(storage.RunDir(run_dir).figure(name, "pdf")) > 0


def test_figures_without_tables_draw_nothing(tmp_path):
    assert kernel_figures.draw(str(tmp_path)) == []


def test_heatmap_matrix_symmetric_with_self_values():
    rows = pd.DataFrame({
        "step_a": [0, 0, 5], "epoch_a": [0.0, 0.0, 0.5], "step_b": [5, 9, 9], "epoch_b": [0.5, 0.9, 0.9],
        "value": [0.1, 0.2, 0.3],
    })
    epochs, matrix = kernel_figures.heatmap_matrix(rows, "kernel_distance")
    np.testing.assert_allclose(epochs, [0.0, 0.5, 0.9])
    np.testing.assert_allclose(matrix, [[0.0, 0.1, 0.2], [0.1, 0.0, 0.3], [0.2, 0.3, 0.0]])
    _, alignment = kernel_figures.heatmap_matrix(rows, "centroid_alignment")
    np.testing.assert_allclose(np.diag(alignment), 1.0)
