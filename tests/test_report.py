"""Report: key numbers from hand-made tables, and figures redrawn from tables alone."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tfntk import storage
from tfntk.reporting import html, key_numbers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _barriers(values_by_spawn):
    rows = [{"spawn_epoch": e, "pair": "children", "split": "test", "barrier": v} for e, v in values_by_spawn.items()]
    rows.append({"spawn_epoch": np.nan, "pair": "parents", "split": "test", "barrier": 0.5})
    return pd.DataFrame(rows)


def test_first_spawn_below_barrier():
    number = key_numbers.first_spawn_below_barrier(_barriers({0.0: 0.4, 0.5: 0.005, 1.0: 0.02, 2.0: 0.004, 4.0: 0.0}))
    assert number.value == 2.0
    assert "2" in number.text
    none = key_numbers.first_spawn_below_barrier(_barriers({0.0: 0.4, 1.0: 0.3}))
    assert none.value is None
    assert key_numbers.first_spawn_below_barrier(None).value is None


def test_velocity_settling_epoch():
    epochs = np.arange(10, dtype=float)
    velocity = np.array([5.0, 3.0, 2.0, 1.3, 1.1, 0.95, 1.05, 1.0, 1.0, 1.0])
    table = pd.DataFrame({"run": "parent_0", "epoch": epochs, "velocity": velocity})
    number = key_numbers.velocity_settling_epoch(table)
    assert number.value == 4.0


def test_linearized_onset_ratio():
    table = pd.DataFrame({
        "kind": ["linearized_order_1"] * 4 + ["low_lr_nonlinear"],
        "split": ["test"] * 5,
        "onset_epoch": [0.0, 1.0, 2.0, 8.0, 1.0],
        "error": [0.6, 0.2, 0.15, 0.01, 0.05],
    })
    number = key_numbers.linearized_onset_ratio(table, total_epochs=10.0)
    assert number.value == pytest.approx(4.0)
    assert key_numbers.linearized_onset_ratio(table, None).value is None


def test_captions_cover_prefixed_names():
    assert html.caption("sections_0002.000") == html.CAPTIONS["sections"]
    assert html.caption("unknown") == ""


def test_report_cli_redraws_from_copied_tables(tmp_path, trained_job):
    job, spawn_steps, num_children = trained_job
    from tfntk.experiments import main_job

    main_job._measure_basins(job, spawn_steps, num_children, np.linspace(0, 1, 3), None)
    copy = tmp_path / "copy"
    os.makedirs(copy)
    shutil.copytree(os.path.join(job.run.root, "tables"), copy / "tables")
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "tfntk.report", str(copy)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(copy / "figures" / "basin_fate.png")
    assert os.path.exists(copy / "figures" / "basin_fate.pdf")
    report = (copy / "report.html").read_text()
    assert "figures/basin_fate.png" in report
    assert "Key numbers" in report


def test_report_cli_rejects_missing_tables(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "tfntk.report", str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2
    assert "learning_curves.csv" in result.stderr
