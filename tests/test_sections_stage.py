"""Sections stage: plane geometry, grid values, tangent-plane errors, paths, caching, figures."""

import dataclasses
import glob
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfntk import storage
from tfntk.autodiff import functional, taylor
from tfntk.autodiff.functional import Weights
from tfntk.experiments import sections
from tfntk.measures import basins, evaluation
from tfntk.reporting import sections_figures
from tfntk.training.snapshots import SnapshotStore

from stage_helpers import copy_run, read_table

RESOLUTION = 5
BATCH_NORM_EXAMPLES = 64
SETTINGS = dict(resolution=RESOLUTION, margin=0.3, batch_norm_examples=BATCH_NORM_EXAMPLES)


@pytest.fixture(scope="module")
def measured(trained_job):
    job, spawn_steps, num_children = trained_job
    sections.measure(job, spawn_steps, num_children, **SETTINGS)
    return job, spawn_steps, num_children


def _flat(weights):
    return functional.flatten(weights.trainable).numpy().astype(np.float64)


def _networks(job, spawn_step):
    """Returns the model and the flattened parent at the spawn step and children 0 and 1 at the end."""
    model = job.new_model()
    parent = job.weights_at(model, job.parent_paths(0), spawn_step)
    children = [job.final_weights(model, job.child_paths(spawn_step, child)) for child in (0, 1)]
    return model, parent, [_flat(parent)] + [_flat(child) for child in children]


def _at(model, template, flat, batch_norm_x):
    """The network at flattened weights with recomputed batch-norm statistics."""
    trainable = functional.unflatten(tf.constant(flat, dtype=tf.float32), template.trainable)
    return evaluation.recompute_batch_norm_statistics(model, Weights(trainable, template.non_trainable), batch_norm_x)


def _basis(parent, child_0, child_1):
    """Gram-Schmidt written out for the test."""
    u1 = (child_0 - parent) / np.linalg.norm(child_0 - parent)
    rest = (child_1 - parent) - np.dot(child_1 - parent, u1) * u1
    return u1, rest / np.linalg.norm(rest)


def test_plane_closed_form():
    origin = np.array([1.0, 1.0, 0.0, 0.0])
    plane = sections.plane_through(origin, origin + [3.0, 0.0, 0.0, 0.0], origin + [1.0, 2.0, 0.0, 0.0])
    np.testing.assert_allclose(plane.u1, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(plane.u2, [0.0, 1.0, 0.0, 0.0])
    assert plane.project(origin + [3.0, 0.0, 0.0, 0.0]) == pytest.approx((3.0, 0.0, 0.0))
    assert plane.project(origin + [1.0, 2.0, 0.0, 0.0]) == pytest.approx((1.0, 2.0, 0.0))
    assert plane.project(origin + [-2.0, 0.5, 3.0, 4.0]) == pytest.approx((-2.0, 0.5, 5.0))
    np.testing.assert_allclose(plane.point(-2.0, 0.5), origin + [-2.0, 0.5, 0.0, 0.0])


def test_plane_orthonormal_for_random_points():
    rng = np.random.default_rng(0)
    origin, first, second, other = rng.normal(size=(4, 50))
    plane = sections.plane_through(origin, first, second)
    gram = np.array([[plane.u1 @ plane.u1, plane.u1 @ plane.u2], [plane.u2 @ plane.u1, plane.u2 @ plane.u2]])
    np.testing.assert_allclose(gram, np.eye(2), atol=1e-12)
    a, b, off_plane = plane.project(other)
    assert off_plane == pytest.approx(np.linalg.norm(other - plane.point(a, b)))
    assert np.linalg.norm(other - origin) ** 2 == pytest.approx(a * a + b * b + off_plane**2)
    assert plane.project(second)[1] > 0


@pytest.mark.parametrize("first, second", [([0.0, 0.0], [1.0, 1.0]), ([1.0, 1.0], [-2.0, -2.0])])
def test_plane_rejects_degenerate(first, second):
    with pytest.raises(ValueError, match="Cannot build a section"):
        sections.plane_through(np.zeros(2), np.array(first), np.array(second))


def test_grid_axes_margin():
    a_values, b_values = sections.grid_axes(np.array([[0.0, 0.0], [4.0, 0.0], [1.0, 2.0]]), 5, 0.25)
    np.testing.assert_allclose(a_values, np.linspace(-1.0, 5.0, 5))
    np.testing.assert_allclose(b_values, np.linspace(-0.5, 2.5, 5))


def test_tangent_errors_match_loop():
    rng = np.random.default_rng(1)
    f, jvp_u1, jvp_u2 = rng.normal(size=(3, 20, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=20)
    a_offsets, b_offsets = np.array([-1.0, 0.0, 2.0]), np.array([0.5, -3.0])
    errors = sections.tangent_errors(f, jvp_u1, jvp_u2, a_offsets, b_offsets, labels)
    assert errors.shape == (3, 2)
    for i, da in enumerate(a_offsets):
        for j, db in enumerate(b_offsets):
            expected = np.mean(np.argmax(f + da * jvp_u1 + db * jvp_u2, axis=-1) != labels)
            assert errors[i, j] == pytest.approx(expected)


def test_tables_shapes_and_columns(measured):
    job, spawn_steps, _ = measured
    table = read_table(job, "sections")
    assert list(table.columns) == ["spawn_epoch", "a_index", "b_index", "a", "b", "measure", "value",
                                   "test_examples", "non_trainable_state"]
    assert len(table) == len(spawn_steps) * RESOLUTION**2 * len(sections.MEASURES)
    assert set(table["measure"]) == set(sections.MEASURES)
    assert set(table["spawn_epoch"]) == {step / job.steps_per_epoch for step in spawn_steps}
    assert (table["test_examples"] == len(job.data.y_test)).all()
    assert (table["non_trainable_state"] == f"batch-norm statistics recomputed on {BATCH_NORM_EXAMPLES} training examples").all()
    assert table["value"].notna().all()

    points = read_table(job, "section_points")
    assert list(points.columns) == ["spawn_epoch", "point", "run", "step", "a", "b"]
    assert len(points) == 3 * len(spawn_steps)
    paths = read_table(job, "section_paths")
    assert list(paths.columns) == ["spawn_epoch", "role", "run", "step", "epoch", "a", "b", "off_plane_distance"]


def test_points_match_weight_distances(measured):
    job, spawn_steps, _ = measured
    points = read_table(job, "section_points")
    for spawn_step in spawn_steps:
        _, _, (parent, child_0, child_1) = _networks(job, spawn_step)
        rows = points[np.isclose(points["spawn_epoch"], spawn_step / job.steps_per_epoch)].set_index("point")
        assert rows.loc["parent", ["a", "b"]].tolist() == [0.0, 0.0]
        assert rows.loc["child_0", "a"] == pytest.approx(np.linalg.norm(child_0 - parent), rel=1e-6)
        assert rows.loc["child_0", "b"] == pytest.approx(0.0, abs=1e-6)
        assert rows.loc["child_1", "b"] > 0
        assert np.hypot(rows.loc["child_1", "a"], rows.loc["child_1", "b"]) == pytest.approx(
            np.linalg.norm(child_1 - parent), rel=1e-6)
        assert np.hypot(rows.loc["child_1", "a"] - rows.loc["child_0", "a"], rows.loc["child_1", "b"]) == pytest.approx(
            np.linalg.norm(child_1 - child_0), rel=1e-6)
        assert rows.loc["child_0", "step"] == job.total_steps


def test_grid_values_match_direct_evaluation(measured):
    job, spawn_steps, _ = measured
    table = read_table(job, "sections")
    spawn_step = spawn_steps[-1]
    model, template, (parent, child_0, child_1) = _networks(job, spawn_step)
    u1, u2 = _basis(parent, child_0, child_1)
    batch_norm_x = job.train_subset(BATCH_NORM_EXAMPLES)[0]
    x, y = job.data.x_test, job.data.y_test

    rows = table[np.isclose(table["spawn_epoch"], spawn_step / job.steps_per_epoch)
                 & (table["a_index"] == 1) & (table["b_index"] == 3)].set_index("measure")
    a, b = rows["a"].iloc[0], rows["b"].iloc[0]
    logits = evaluation.logits(model, _at(model, template, parent + a * u1 + b * u2, batch_norm_x), x)
    loss, error = evaluation.loss_and_error(logits, y)
    child_predictions = np.argmax(evaluation.logits(model, _at(model, template, child_0, batch_norm_x), x), axis=-1)
    distance = basins.function_space_distance(np.argmax(logits, axis=-1), child_predictions, y, job.data.num_classes)

    assert rows.loc["test_error", "value"] == pytest.approx(error)
    assert rows.loc["test_loss", "value"] == pytest.approx(loss, rel=1e-5)
    assert rows.loc["function_space_distance_to_child_0", "value"] == pytest.approx(distance)


@pytest.mark.parametrize("measure, expansion", [("tangent_error_at_parent", 0), ("tangent_error_at_child_0", 1)])
def test_tangent_matches_taylor_logits(measured, measure, expansion):
    job, spawn_steps, _ = measured
    table = read_table(job, "sections")
    spawn_step = spawn_steps[-1]
    model, template, networks = _networks(job, spawn_step)
    u1, u2 = _basis(*networks)
    batch_norm_x = job.train_subset(BATCH_NORM_EXAMPLES)[0]
    w0 = _at(model, template, networks[expansion], batch_norm_x)
    rows = table[np.isclose(table["spawn_epoch"], spawn_step / job.steps_per_epoch) & (table["measure"] == measure)]

    for _, row in rows.iloc[[0, 7, 18]].iterrows():
        displacement = networks[0] + row["a"] * u1 + row["b"] * u2 - networks[expansion]
        tangents = functional.unflatten(tf.constant(displacement, dtype=tf.float32), w0.trainable)
        logits = taylor.taylor_logits(model, w0, tangents, tf.constant(job.data.x_test), order=1).numpy()
        error = np.mean(np.argmax(logits, axis=-1) != job.data.y_test)
        # Float32 rounding of the two evaluation orders may flip at most one near-tied example.
        assert abs(row["value"] - error) <= 1.0 / len(job.data.y_test) + 1e-9


def test_paths_start_at_parent_and_end_at_children(measured):
    job, spawn_steps, _ = measured
    paths = read_table(job, "section_paths")
    points = read_table(job, "section_points")
    for spawn_step in spawn_steps:
        spawn_epoch = spawn_step / job.steps_per_epoch
        rows = paths[np.isclose(paths["spawn_epoch"], spawn_epoch)]

        parent = rows[rows["role"] == "parent"].sort_values("step")
        parent_steps = SnapshotStore(job.parent_paths(0)).read()["step"]
        assert parent["step"].tolist() == [s for s in parent_steps if s >= spawn_step]
        assert parent[["a", "b", "off_plane_distance"]].iloc[0].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)

        for child in (0, 1):
            run = rows[rows["role"] == f"child_{child}"].sort_values("step")
            assert run["step"].tolist() == SnapshotStore(job.child_paths(spawn_step, child)).read()["step"].tolist()
            point = points[np.isclose(points["spawn_epoch"], spawn_epoch) & (points["point"] == f"child_{child}")]
            assert run[["a", "b"]].iloc[-1].tolist() == pytest.approx(point[["a", "b"]].iloc[0].tolist())
            assert run["off_plane_distance"].iloc[-1] == pytest.approx(0.0, abs=1e-4)


def test_second_call_skips(measured, monkeypatch):
    job, spawn_steps, num_children = measured
    before = {name: os.stat(job.run.table(name)).st_mtime_ns for name in sections.TABLES}

    def fail(*args, **kwargs):
        raise AssertionError("the stage loaded weights although its tables exist")

    monkeypatch.setattr(job, "weights_at", fail)
    sections.measure(job, spawn_steps, num_children, **SETTINGS)
    assert {name: os.stat(job.run.table(name)).st_mtime_ns for name in sections.TABLES} == before


def test_resume_recomputes_only_missing_row(measured, tmp_path, monkeypatch):
    job, spawn_steps, num_children = measured
    copy = copy_run(job, tmp_path / "run")
    os.remove(copy.run.table("sections"))
    spawn_dir = copy.run.analysis(f"sections/spawn_{storage.format_epoch(0.0)}")
    os.remove(os.path.join(spawn_dir, "row_002.npz"))

    evaluated = []
    original = sections._Evaluator.logits
    monkeypatch.setattr(sections._Evaluator, "logits", lambda self, flat: evaluated.append(1) or original(self, flat))
    sections.measure(copy, spawn_steps, num_children, **SETTINGS)

    # One missing row of RESOLUTION points plus child 0 as the reference, for each spawn epoch.
    assert len(evaluated) == RESOLUTION + len(spawn_steps)
    pd.testing.assert_frame_equal(read_table(copy, "sections"), read_table(job, "sections"))


def test_stale_cache_is_recomputed(measured, tmp_path):
    job, spawn_steps, num_children = measured
    copy = copy_run(job, tmp_path / "run")
    sections.measure(copy, spawn_steps[:1] + spawn_steps[:1], num_children, **dict(SETTINGS, resolution=3))
    table = read_table(copy, "sections")
    assert len(table) == 9 * len(sections.MEASURES)
    assert set(table["spawn_epoch"]) == {0.0}

    # Corners and centre of the 3 x 3 grid are points of the 5 x 5 grid.
    old = read_table(job, "sections")
    for (i, j), (k, l) in [((0, 0), (0, 0)), ((1, 1), (2, 2)), ((2, 2), (4, 4))]:
        new_rows = table[(table["a_index"] == i) & (table["b_index"] == j)].set_index("measure")["value"]
        old_rows = old[(old["spawn_epoch"] == 0.0) & (old["a_index"] == k) & (old["b_index"] == l)].set_index("measure")["value"]
        pd.testing.assert_series_equal(new_rows.sort_index(), old_rows.sort_index(), rtol=1e-5)


def test_figure_drawn_from_tables_only(measured, tmp_path):
    job, spawn_steps, _ = measured
    os.makedirs(tmp_path / "tables")
    for name in sections.TABLES:
        shutil.copy(job.run.table(name), tmp_path / "tables")
    names = sections_figures.draw(str(tmp_path))
    assert names == [f"sections_{storage.format_epoch(step / job.steps_per_epoch)}" for step in spawn_steps]
    for name in names:
        for extension in ("png", "pdf"):
            assert os.path.getsize(tmp_path / "figures" / f"{name}.{extension}") > 0
    assert sections_figures.draw(str(tmp_path / "empty")) == []


def test_tensorboard_image_under_parent(measured):
    job, spawn_steps, _ = measured
    tags = set()
    for path in glob.glob(os.path.join(job.run.tensorboard(job.parent_paths(0).name), "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    for step in spawn_steps:
        assert f"sections/spawn_{storage.format_epoch(step / job.steps_per_epoch)}" in tags


def test_spawn_epoch_selection(trained_job):
    job, spawn_steps, num_children = trained_job
    assert sections.select_spawn_steps(job, spawn_steps, num_children, None) == [0, 6]
    assert sections.select_spawn_steps(job, spawn_steps, num_children, [1.0]) == [6]
    # A spawn step without children is left out of the default and rejected when named.
    assert sections.select_spawn_steps(job, spawn_steps + [12], num_children, None) == [0, 6]
    with pytest.raises(ValueError, match="entry 2.0: children 0 and 1"):
        sections.select_spawn_steps(job, spawn_steps + [12], num_children, [2.0])


@pytest.mark.parametrize("setting, value, message", [
    ("spawn_epochs", [0.5], "spawn_epochs entry 0.5"),
    ("resolution", 1, "resolution 1"),
    ("resolution", 2.5, "resolution 2.5"),
    ("margin", -0.1, "margin -0.1"),
    ("test_examples", 0, "test_examples 0"),
    ("batch_norm_examples", 0, "batch_norm_examples 0"),
])
def test_bad_setting_raises(trained_job, setting, value, message):
    job, spawn_steps, num_children = trained_job
    with pytest.raises(ValueError, match=message):
        sections.measure(job, spawn_steps, num_children, **{setting: value})


def test_one_child_raises(trained_job):
    job, spawn_steps, _ = trained_job
    with pytest.raises(ValueError, match="num_children 1"):
        sections.measure(job, spawn_steps, 1)


def test_disabled_writes_nothing(trained_job, tmp_path):
    job, spawn_steps, num_children = trained_job
    empty = dataclasses.replace(job, run=storage.RunDir(str(tmp_path / "run")))
    sections.measure(empty, spawn_steps, num_children, enabled=False)
    assert not os.path.exists(tmp_path / "run")
