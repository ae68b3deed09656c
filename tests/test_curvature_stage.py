"""Tests of the curvature stage: Hessian and escape-threshold tables, caching and the figure.

The stage runs once on the session's tiny trained job (ResNet-8 with batch norm, snapshots at
steps 0, 3, 6, 12 and 18), on 3 of its 5 snapshots, and is checked against direct calls of
`hessian.hessian_top_eigenvalues` and `escape.escape_threshold`.
"""

import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfntk import storage
from tfntk.autodiff import hvp
from tfntk.experiments import curvature
from tfntk.measures import escape, hessian
from tfntk.reporting import curvature_figures
from tfntk.training.snapshots import SnapshotStore

SETTINGS = dict(max_snapshots=3, k=2, max_iterations=40, examples=64, escape_minibatches=3, seed=1)
EXPECTED_STEPS = [0, 6, 18]
HESSIAN_COLUMNS = {
    "run", "step", "epoch", "learning_rate", "index", "eigenvalue", "residual_norm", "iterations",
    "converged", "two_over_lr", "method", "bn_mode", "weight_decay_included", "examples",
}
ESCAPE_COLUMNS = {
    "run", "step", "epoch", "learning_rate", "escape_mean", "escape_std", "minibatches", "gd_escape_threshold",
}
TAGS = ("hessian/top_eigenvalue", "hessian/two_over_lr", "hessian/escape_threshold", "hessian/gd_escape_threshold")


# Training losses built by the stage run in the `measured` fixture.
BUILT_LOSSES = []


@pytest.fixture(scope="module")
def measured(trained_job):
    """Runs the stage once, recording the warm-start vectors passed to the eigenvalue solver."""
    job, spawn_steps, num_children = trained_job
    initial_vectors = []
    solver = hessian.hessian_top_eigenvalues_of_loss

    def recording_solver(*args, **kwargs):
        initial_vectors.append(kwargs.get("initial_vectors"))
        return solver(*args, **kwargs)

    class RecordingLoss(hvp.TrainingLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            BUILT_LOSSES.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hessian, "hessian_top_eigenvalues_of_loss", recording_solver)
        patch.setattr(hvp, "TrainingLoss", RecordingLoss)
        curvature.measure(job, spawn_steps, num_children, **SETTINGS)
    tables = {name: storage.read_csv(job.run.table(name)) for name in ("hessian", "escape_threshold")}
    return job, tables, initial_vectors


def loss_data(job):
    """The loss batches and escape minibatches the stage builds for SETTINGS."""
    x, y = job.train_subset(SETTINGS["examples"])
    indices = curvature.escape_minibatch_indices(
        len(y), SETTINGS["escape_minibatches"], job.training.batch_size, SETTINGS["seed"]
    )
    return [(x, y)], [(x[chunk], y[chunk]) for chunk in indices]


def read_scalars(directory):
    """Returns {tag: {step: value}} of the `hessian/*` scalars in a TensorBoard directory."""
    scalars = {}
    for path in tf.io.gfile.glob(f"{directory}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith("hessian/"):
                    scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


def forbid_measuring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the stage measured a snapshot although its result was cached")

    monkeypatch.setattr(hessian, "hessian_top_eigenvalues_of_loss", fail)
    monkeypatch.setattr(escape, "escape_threshold_of_loss", fail)


def test_snapshot_selection_spread():
    steps = list(range(0, 410, 10))

    chosen = curvature.select_snapshot_steps(steps, 12)

    assert len(chosen) == 12
    assert chosen[0] == 0
    assert chosen[-1] == 400
    assert chosen == sorted(set(chosen))
    assert curvature.select_snapshot_steps([0, 3, 6, 12, 18], 3) == EXPECTED_STEPS
    assert curvature.select_snapshot_steps([18, 0, 6], 12) == [0, 6, 18]
    assert curvature.select_snapshot_steps(steps, None) == steps


def test_escape_minibatches_without_repeats():
    indices = curvature.escape_minibatch_indices(20, 3, 6, seed=0)

    assert indices.shape == (3, 6)
    assert len(set(indices.ravel())) == 18
    np.testing.assert_array_equal(indices, curvature.escape_minibatch_indices(20, 3, 6, seed=0))

    wrapped = curvature.escape_minibatch_indices(10, 4, 4, seed=0)
    assert wrapped.shape == (4, 4)
    assert all(len(set(row)) == 4 for row in wrapped)
    with pytest.raises(ValueError, match="examples"):
        curvature.escape_minibatch_indices(10, 2, 11, seed=0)


def test_hessian_table_rows(measured):
    job, tables, _ = measured
    table = tables["hessian"]
    snapshots = SnapshotStore(job.parent_paths(0)).read().set_index("step")

    assert HESSIAN_COLUMNS <= set(table.columns)
    assert len(table) == len(EXPECTED_STEPS) * SETTINGS["k"]
    assert set(table["run"]) == {"parent_0"}
    assert sorted(set(table["step"])) == EXPECTED_STEPS
    for step, rows in table.groupby("step"):
        rows = rows.sort_values("index")
        assert rows["index"].tolist() == [0, 1]
        assert rows["eigenvalue"].iloc[0] >= rows["eigenvalue"].iloc[1]
        np.testing.assert_allclose(rows["learning_rate"], snapshots.loc[step, "learning_rate"])
        np.testing.assert_allclose(rows["epoch"], step / job.steps_per_epoch)
    np.testing.assert_allclose(table["two_over_lr"], 2.0 / table["learning_rate"])
    assert table["weight_decay_included"].all()
    np.testing.assert_allclose(table["weight_decay"], job.training.weight_decay)
    assert (table["examples"] == SETTINGS["examples"]).all()
    assert (table["method"] == "lanczos").all()
    assert (table["bn_mode"] == "inference").all()


def test_escape_table_rows(measured):
    _, tables, _ = measured
    table = tables["escape_threshold"].sort_values("step")
    top = tables["hessian"].query("index == 0").sort_values("step")

    assert ESCAPE_COLUMNS <= set(table.columns)
    assert table["step"].tolist() == EXPECTED_STEPS
    assert (table["minibatches"] == SETTINGS["escape_minibatches"]).all()
    assert (table["escape_std"] >= 0).all()
    expected_gd = table["learning_rate"].to_numpy() * top["eigenvalue"].to_numpy() - 2.0
    np.testing.assert_allclose(table["gd_escape_threshold"], expected_gd, rtol=1e-6)


def test_first_snapshot_matches_measures(measured):
    job, tables, _ = measured
    model = job.new_model()
    weights = job.weights_at(model, job.parent_paths(0), 0)
    batches, minibatches = loss_data(job)
    loss_settings = dict(weight_decay=job.training.weight_decay, bn_mode="inference")

    direct = hessian.hessian_top_eigenvalues(
        model, curvature.CROSS_ENTROPY, batches, k=2, tol=1e-3, max_iterations=40, weights=weights,
        seed=SETTINGS["seed"], **loss_settings,
    )
    threshold = escape.escape_threshold(
        model, curvature.CROSS_ENTROPY, batches, minibatches, job.training.learning_rate, weights=weights,
        **loss_settings,
    )

    rows = tables["hessian"].query("step == 0").sort_values("index")
    np.testing.assert_allclose(rows["eigenvalue"], direct.eigenvalues, rtol=1e-5)
    np.testing.assert_allclose(rows["residual_norm"], direct.residual_norms, rtol=1e-2, atol=1e-6)
    assert rows["converged"].tolist() == direct.converged.tolist()
    row = tables["escape_threshold"].query("step == 0").iloc[0]
    np.testing.assert_allclose(row["escape_mean"], threshold.mean, rtol=1e-5)
    np.testing.assert_allclose(row["escape_std"], threshold.std, rtol=1e-4)


def test_one_loss_traced_once(measured):
    assert len(BUILT_LOSSES) == 1
    assert BUILT_LOSSES[0]._batch_hvp.experimental_get_tracing_count() == 1
    assert BUILT_LOSSES[0]._batch_loss_and_gradient.experimental_get_tracing_count() == 1


def test_warm_start_matches_cold_start(measured):
    job, tables, initial_vectors = measured
    model = job.new_model()
    weights = job.weights_at(model, job.parent_paths(0), EXPECTED_STEPS[-1])
    batches, _ = loss_data(job)

    cold = hessian.hessian_top_eigenvalues(
        model, curvature.CROSS_ENTROPY, batches, k=1, tol=1e-3, max_iterations=40, weights=weights,
        weight_decay=job.training.weight_decay,
    )

    assert len(initial_vectors) == len(EXPECTED_STEPS)
    assert initial_vectors[0] is None
    assert all(vectors is not None and len(vectors) == SETTINGS["k"] for vectors in initial_vectors[1:])
    warm = tables["hessian"].query(f"step == {EXPECTED_STEPS[-1]} and index == 0")["eigenvalue"].iloc[0]
    np.testing.assert_allclose(warm, cold.eigenvalues[0], rtol=1e-2)


def test_tensorboard_scalars(measured):
    job, tables, _ = measured
    scalars = read_scalars(job.run.tensorboard("parent_0"))
    top = tables["hessian"].query("index == 0").set_index("step")

    for tag in TAGS:
        assert sorted(scalars[tag]) == EXPECTED_STEPS, tag
    for step in EXPECTED_STEPS:
        np.testing.assert_allclose(scalars["hessian/top_eigenvalue"][step], top.loc[step, "eigenvalue"], rtol=1e-6)
        np.testing.assert_allclose(scalars["hessian/two_over_lr"][step], top.loc[step, "two_over_lr"], rtol=1e-6)


def test_second_call_skips_work(measured, monkeypatch):
    job, _, _ = measured
    paths = [job.run.table(name) for name in ("hessian", "escape_threshold")]
    before = [storage.read_text(path) for path in paths]
    forbid_measuring(monkeypatch)

    curvature.measure(job, [], 2, **SETTINGS)

    assert [storage.read_text(path) for path in paths] == before


def test_tables_rebuilt_from_cache(measured, monkeypatch):
    job, tables, _ = measured
    for name in ("hessian", "escape_threshold"):
        tf.io.gfile.remove(job.run.table(name))
    forbid_measuring(monkeypatch)

    curvature.measure(job, [], 2, **SETTINGS)

    for name, expected in tables.items():
        pd.testing.assert_frame_equal(storage.read_csv(job.run.table(name)), expected)


def test_changed_settings_invalidate_cache(measured):
    job, _, _ = measured
    path = job.run.analysis("hessian/parent_0/step_00000000.npz")
    settings = dict(k=2, method="lanczos", tol=1e-3, max_iterations=40, examples=64, batch_size=512,
                    bn_mode="inference", weight_decay=job.training.weight_decay, escape_minibatches=3,
                    escape_batch_size=job.training.batch_size, seed=1)

    assert curvature._load_cache(path, curvature.CurvatureSettings(**settings).key()) is not None
    for change in (dict(tol=1e-4), dict(batch_size=32)):
        changed = dict(settings, **change)
        changed_key = curvature.CurvatureSettings(**changed).key()
        assert curvature._load_cache(path, changed_key) is None, change


def test_figure_from_tables_only(measured, tmp_path):
    job, tables, _ = measured
    (tmp_path / "tables").mkdir()
    for name in ("hessian", "escape_threshold", "learning_curves"):
        shutil.copy(job.run.table(name), tmp_path / "tables")
    unconverged = tables["hessian"].copy()
    unconverged.loc[0, "converged"] = False
    storage.write_csv_atomic(str(tmp_path / "tables" / "hessian.csv"), unconverged)

    assert curvature_figures.draw(str(tmp_path)) == ["curvature"]
    assert (tmp_path / "figures" / "curvature.png").stat().st_size > 0
    assert (tmp_path / "figures" / "curvature.pdf").stat().st_size > 0
    assert curvature_figures.draw(str(tmp_path / "empty")) == []


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(parents=(2,)), "parents"),
        (dict(parents=()), "parents"),
        (dict(parents=(0, 0)), "parents"),
        (dict(max_snapshots=1), "max_snapshots"),
        (dict(k=0), "k"),
        (dict(method="arnoldi"), "method"),
        (dict(tol=0.0), "tol"),
        (dict(max_iterations=1, k=2), "max_iterations"),
        (dict(examples=0), "examples"),
        (dict(batch_size=0), "batch_size"),
        (dict(bn_mode="batch"), "bn_mode"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(escape_minibatches=0), "escape_minibatches"),
        (dict(examples=8), "examples"),
    ],
)
def test_rejects_bad_settings(trained_job, settings, name):
    job, spawn_steps, num_children = trained_job

    with pytest.raises(ValueError, match=name):
        curvature.measure(job, spawn_steps, num_children, **settings)


def test_disabled_stage_does_nothing():
    curvature.measure(None, [], 0, enabled=False)
