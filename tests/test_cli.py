"""The command line and the main job: end to end, resume, and rejection of bad input."""

import os
import subprocess
import sys

import gin
import pandas as pd
import pytest

from tfntk import config, storage
from tfntk.experiments import main_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(f for f in os.listdir(os.path.join(REPO, "gin")) if f.endswith(".gin"))

TINY_BINDINGS = [
    "main_job.dataset = 'synthetic'",
    "main_job.model = 'mlp'",
    "main_job.model_kwargs = {'hidden': (16,)}",
    "main_job.spawn_epochs = (0.0, 1.0)",
    "TrainingConfig.epochs = 2.0",
    "TrainingConfig.batch_size = 32",
    "TrainingConfig.learning_rate = 0.05",
    "TrainingConfig.snapshot_schedule = ((1.0, 0.5),)",
    "kernel_dynamics.measure.analysis_examples = 16",
    "kernel_dynamics.measure.max_snapshots = 4",
    "curvature.measure.examples = 64",
    "curvature.measure.max_snapshots = 3",
    "linearized.measure.onset_epochs = (0.0, 1.0)",
    "linearized.measure.epochs = 1",
    "linearized.measure.low_lr_epochs = 1",
    "motion.measure.tsne_snapshots_per_run = 4",
    "sections.measure.resolution = 5",
]

EXPECTED_TABLES = (
    "learning_curves", "error_barrier", "interpolation", "pair_distance", "children_over_time",
    "final_child_distance", "tsne", "snapshot_pairs", "kernel_velocity", "pair_kernel", "hessian",
    "escape_threshold", "linearized_curves", "linearized", "nonlinear_advantage", "sections",
    "section_paths", "section_points",
)
EXPECTED_FIGURES = (
    "basin_fate", "integrated", "appendix", "children_over_time", "final_child_distance", "tsne",
    "kernel_heatmaps", "kernel_velocity", "barrier_vs_velocity", "children_kernel", "curvature",
    "linearized", "nonlinear_advantage",
)


def _event_tags(directory):
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(directory, size_guidance={"tensors": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    return set(tags["tensors"]) | set(tags["scalars"]) | set(tags["images"])


@pytest.fixture(autouse=True)
def clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_parse(preset):
    config.parse([os.path.join(REPO, "gin", preset)], [])
    assert gin.query_parameter("main_job.dataset") in ("digits", "mnist1d", "cifar10", "cifar100")


@pytest.mark.parametrize(
    "binding, hint",
    [
        ("TrainingConfig.epoch = 3", "did you mean TrainingConfig.epochs?"),
        ("TrainingConfig.zzz = 3", "TrainingConfig takes optimizer, learning_rate"),
        ("TrainingConfig.epochs 3", "write bindings as 'Configurable.parameter = value'"),
    ],
)
def test_bad_binding_hint(binding, hint):
    with pytest.raises(config.ConfigError) as raised:
        config.parse([], [binding])

    assert hint in str(raised.value)


def test_main_job_end_to_end_and_resume(tmp_path):
    run_dir = str(tmp_path / "run")
    config.parse([], TINY_BINDINGS)
    main_job.main_job(run_dir=run_dir, command="test")
    run = storage.RunDir(run_dir)

    barriers = storage.read_csv(run.table("error_barrier"))
    assert set(barriers["pair"]) == {"children", "parents"}
    assert set(barriers["split"]) == {"test", "train"}
    assert len(barriers) == 2 * 3
    distances = storage.read_csv(run.table("pair_distance"))
    assert set(distances["measure"]) >= {"function_space_distance", "weight_l2_distance"}
    curves = storage.read_csv(run.table("learning_curves"))
    assert set(curves["role"]) == {"parent", "child"}
    for name in EXPECTED_TABLES:
        assert storage.exists(run.table(name)), name
    for name in EXPECTED_FIGURES:
        assert os.path.exists(run.figure(name, "png")), name
        assert os.path.exists(run.figure(name, "pdf")), name
    assert any(f.startswith("sections_") for f in os.listdir(os.path.join(run_dir, "figures")))
    report = storage.read_text(run.report_html)
    assert "figures/integrated.png" in report
    assert "Key numbers" in report

    parent_tags = _event_tags(run.tensorboard("parent_0"))
    for tag in ("train/loss", "test/error", "learning_rate", "ntk/kernel_velocity", "hessian/top_eigenvalue",
                "ntk/kernel_distance_heatmap", "config/operative_gin", "hparams/final_test_error"):
        assert tag in parent_tags, (tag, sorted(parent_tags))
    assert any(tag.startswith("sections/") for tag in parent_tags)
    assert "train/loss" in _event_tags(run.tensorboard("spawn_0001.000_child_0"))
    assert os.path.isdir(os.path.join(run_dir, "parents", "0", "saved_model", "epoch_002"))
    assert os.listdir(run.tensorboard("parent_0"))
    assert "TrainingConfig.epochs = 2.0" in storage.read_text(run.config_gin)
    assert storage.read_text(run.command_txt) == "test\n"

    before = {name: storage.read_csv(run.table(name)) for name in ("error_barrier", "pair_distance")}
    main_job.main_job(run_dir=run_dir, command="test")
    for name, table in before.items():
        pd.testing.assert_frame_equal(table, storage.read_csv(run.table(name)))

    config_before = storage.read_text(run.config_gin)
    config.parse([], ["TrainingConfig.epochs = 3.0"])
    with pytest.raises(main_job.InvalidSettingError, match="finished at step .* new --run_dir"):
        main_job.main_job(run_dir=run_dir, command="test")
    assert storage.read_text(run.config_gin) == config_before


def _run_cli(tmp_path, *arguments, environment=None):
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", **(environment or {}))
    command = [sys.executable, "-m", "tfntk.run", "--run_dir", str(tmp_path / "run")] + list(arguments)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.fixture
def existing_run(tmp_path):
    """A run directory with a file in it, which a rejected command must leave as it is."""
    marker = tmp_path / "run" / "tables" / "kept.csv"
    marker.parent.mkdir(parents=True)
    marker.write_text("value\n1\n")
    return marker


BAD_INPUTS = [
    (["--gin_file", "gin/no_such_preset.gin"], 2, "Gin file not found: gin/no_such_preset.gin"),
    (["--gin_param", "NoSuchConfigurable.value = 1"], 2, "NoSuchConfigurable"),
    (["--gin_param", "TrainingConfig.no_such_parameter = 1"], 2, "no_such_parameter"),
    (["--gin_param", "TrainingConfig.epochs = (1"], 2, "Invalid gin configuration in --gin_param 'TrainingConfig.epochs = (1'"),
    (["--gin_param", "TrainingConfig.epochs = 'ten'"], 2, "Invalid TrainingConfig.epochs 'ten'"),
    (["--gin_param", "main_job.spawn_epochs = (50.0,)"], 2, "Invalid spawn epoch 50.0"),
    (["--gin_param", "main_job.dataset = 'imagenet'"], 2, "Unknown main_job.dataset 'imagenet'"),
    (["--gin_param", "main_job.model = 'vgg'"], 2, "vgg"),
    (["--gin_param", "kernel_dynamics.measure.analysis_examples = -5"], 2, "analysis_examples -5"),
    (["--gin_param", "curvature.measure.k = 0"], 2, "k 0"),
    (["--gin_param", "linearized.measure.onset_epochs = (99.0,)"], 2, "99"),
    (["--gin_param", "sections.measure.resolution = 1"], 2, "resolution 1"),
    (["--gin_param", "motion.measure.barrier_alphas = 1"], 2, "barrier_alphas 1"),
]


@pytest.mark.parametrize("arguments, status, message", BAD_INPUTS)
def test_bad_input_rejected(tmp_path, existing_run, arguments, status, message):
    if "--gin_file" not in arguments:
        arguments = ["--gin_file", "gin/digits_quick.gin"] + arguments
    result = _run_cli(tmp_path, *arguments)
    assert result.returncode == status, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert message in error_lines[0]
    assert "In call to configurable" not in error_lines[0]
    assert sorted(os.listdir(tmp_path / "run")) == ["tables"]
    assert existing_run.read_text() == "value\n1\n"


def test_missing_cifar_explains_preparation(tmp_path, existing_run):
    empty = tmp_path / "tfds"
    empty.mkdir()
    result = _run_cli(
        tmp_path, "--gin_file", "gin/resnet20_cifar10.gin", environment={"TFDS_DATA_DIR": str(empty)}
    )
    assert result.returncode == 1, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1
    assert str(empty) in error_lines[0]
    assert "download_and_prepare" in error_lines[0]
    assert existing_run.read_text() == "value\n1\n"
