"""Benchmarks the training loop against the quick preset, one ResNet-20 epoch and `model.fit`.

Measurements, chosen with `--what`:
  preset        wall time of `python -m tfntk.run --gin_file gin/digits_quick.gin` in a
                subprocess, split into the job's phases by the timestamps of its "Phase:" log
                lines. Then one parent of that preset is trained in this process, and its time
                is split into optimizer steps, evaluation, checkpoints and exports.
  resnet_epoch  one epoch of ResNet-20 (batch norm) on CIFAR-shaped synthetic data through
                `Trainer.train_run`, snapshots on the default schedule, SavedModel exports on.
  throughput    examples/s of `Trainer.train_run` against `model.fit` on the same model, data,
                batch size, optimizer and number of steps, after one warm-up epoch in each.
  pipeline      cost of building the loop's per-epoch `tf.data` pipeline and of reading one
                epoch from it, at the size of CIFAR-10 (50,000 examples).

Every timing is wall-clock time on a machine that may be shared, so the epoch timings are the
best of `--measured_epochs` consecutive epochs of one run, and the process CPU time of the same
epoch is reported beside it.

Usage:
  python bench/train.py --results=bench/RESULTS.md
  python bench/train.py --what=throughput --throughput_models=resnet20 --measured_epochs=2
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from tfntk import config as tfntk_config
from tfntk import models
from tfntk import storage
from tfntk.data import datasets
from tfntk.data import pipeline
from tfntk.training import loop
from tfntk.training import schedules
from tfntk.training.snapshots import SnapshotStore

# A sibling module of this script.
from results_file import cpu_description, write_section  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("what", ["preset", "resnet_epoch", "throughput", "pipeline"], "Measurements to run.")
flags.DEFINE_string("preset_gin", "gin/digits_quick.gin", "Gin file of the preset measurement.")
flags.DEFINE_integer("examples", 5000, "Synthetic training examples of the ResNet-20 epoch.")
flags.DEFINE_integer("test_examples", 1000, "Synthetic test examples of the ResNet-20 epoch.")
flags.DEFINE_list("throughput_models", ["simple_cnn", "resnet20"], "Models of the throughput comparison.")
flags.DEFINE_integer("throughput_examples", 1280, "Synthetic training examples of the throughput runs.")
flags.DEFINE_integer("throughput_test_examples", 256, "Synthetic test examples of the throughput runs.")
flags.DEFINE_integer(
    "limited_eval_train_examples", 256, "TrainingConfig.eval_train_examples of the limited-evaluation loop runs."
)
flags.DEFINE_integer("measured_epochs", 2, "Timed epochs after the warm-up epoch; the fastest is reported.")
flags.DEFINE_integer("batch_size", 128, "Global batch size of every training run.")
flags.DEFINE_float("snapshot_every_epochs", 0.1, "Snapshot spacing of the dense loop runs, in epochs.")
flags.DEFINE_integer("pipeline_examples", 50000, "Training examples of the pipeline measurement.")
flags.DEFINE_string("results", None, "Markdown file in which to replace or append this benchmark's section.")

SECTION = "## Training loop (bench/train.py)"
REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_SHAPE = (32, 32, 3)
CIFAR_TRAIN_EXAMPLES = 50000
CIFAR_TEST_EXAMPLES = 10000
# Epochs of the CIFAR-10 presets in gin/ for each model.
FULL_RUN_EPOCHS = {"simple_cnn": 100, "resnet20": 160}
MODEL_KWARGS = {"simple_cnn": {}, "resnet20": {"batch_norm": True}}

# absl's text prefix: severity, MMDD, HH:MM:SS.micro, thread id, file:line] message.
ABSL_LINE = re.compile(r"^[IWEF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2}\.\d+)\s+\d+ [^\]]+\] (.*)$")


# ---------------------------------------------------------------------------------------------
# Timing helpers


class SectionTimer:
    """Accumulates the wall-clock seconds spent in patched functions, by label."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    @contextlib.contextmanager
    def patched(self, targets):
        """Replaces each `(owner, attribute, label)` function by a timed one inside the block.

        `label` is a string or a function of the call's positional arguments returning one.
        """
        originals = []
        for owner, attribute, label in targets:
            original = getattr(owner, attribute)
            originals.append((owner, attribute, original))
            setattr(owner, attribute, self._timed(original, label))
        try:
            yield self
        finally:
            for owner, attribute, original in reversed(originals):
                setattr(owner, attribute, original)

    def _timed(self, function, label):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                name = label(args) if callable(label) else label
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def copy(self) -> dict[str, float]:
        return dict(self.seconds)


def loop_sections(test_inputs: np.ndarray) -> list:
    """Lists the `(owner, attribute, label)` functions of the training loop that every loop run times."""

    def evaluation_label(args):
        return "eval_test" if args[1] is test_inputs else "eval_train"

    return [
        (loop.Trainer, "_train_until", "train_until"),
        (pipeline, "train_batches", "dataset_build"),
        (loop, "evaluate", evaluation_label),
        (loop.Trainer, "_store_snapshot", "snapshot"),
        (SnapshotStore, "write_checkpoint", "checkpoint"),
        (SnapshotStore, "append", "csv"),
        (SnapshotStore, "export_saved_model", "export"),
    ]


def breakdown(sections: dict[str, float], wall_s: float) -> dict[str, float]:
    """Splits one interval's wall time into disjoint parts, in seconds.

    `steps` is `_train_until` less the dataset builds (so it includes iterator creation), and
    `summaries_other` is `_store_snapshot` less its timed parts (TensorBoard scalars, flushes).
    """
    get = lambda key: sections.get(key, 0.0)  # noqa: E731
    parts = {
        "steps": get("train_until") - get("dataset_build"),
        "dataset_build": get("dataset_build"),
        "eval_train": get("eval_train"),
        "eval_test": get("eval_test"),
        "checkpoint": get("checkpoint"),
        "csv": get("csv"),
        "export": get("export"),
    }
    timed_snapshot = sum(get(key) for key in ("eval_train", "eval_test", "checkpoint", "csv", "export"))
    parts["summaries_other"] = get("snapshot") - timed_snapshot
    parts["outside"] = wall_s - get("train_until") - get("snapshot")
    return parts


def difference(later: dict[str, float], earlier: dict[str, float]) -> dict[str, float]:
    return {key: value - earlier.get(key, 0.0) for key, value in later.items()}


@dataclasses.dataclass
class EpochTiming:
    """Wall and process CPU seconds of one epoch, with the wall seconds split by `breakdown`."""

    wall_s: float
    cpu_s: float
    parts: dict = dataclasses.field(default_factory=dict)


def fastest(epochs: list[EpochTiming]) -> EpochTiming:
    return min(epochs, key=lambda epoch: epoch.wall_s)


# ---------------------------------------------------------------------------------------------
# Runs


def cifar_shaped_data(num_train: int, num_test: int) -> datasets.Dataset:
    return datasets.load_dataset(
        "synthetic",
        synthetic_shape=CIFAR_SHAPE,
        synthetic_classes=10,
        synthetic_train=num_train,
        synthetic_test=num_test,
    )


def model_builder(name: str, data: datasets.Dataset) -> Callable[[], keras.Model]:
    return lambda: models.build_model(name, data.input_shape, data.num_classes, seed=0, **MODEL_KWARGS[name])


@dataclasses.dataclass
class LoopRun:
    """Timings of one `Trainer.train_run` call.

    Attributes:
      total_s: wall seconds of the whole call (model building, tracing and the step-0 snapshot
        included).
      epochs: one `EpochTiming` per epoch, from the snapshot that ends the previous epoch (or the
        step-0 snapshot) to the snapshot that ends this one, exports included.
      snapshots: number of snapshots written, the step-0 one included.
    """

    total_s: float
    epochs: list
    snapshots: int


def time_train_run(
    data: datasets.Dataset,
    config: loop.TrainingConfig,
    build_model: Callable[[], keras.Model],
    snapshot_steps: list[int],
    name: str,
) -> LoopRun:
    """Trains one run in a temporary directory and times each epoch between snapshots."""
    trainer = loop.Trainer(data, config)
    steps_per_epoch = trainer.steps_per_epoch
    timer = SectionTimer()
    marks = []
    snapshots = []

    def on_snapshot(step: int) -> None:
        snapshots.append(step)
        if step % steps_per_epoch == 0:
            marks.append((time.perf_counter(), time.process_time(), timer.copy()))

    with tempfile.TemporaryDirectory(prefix="bench_train_") as run_dir:
        spec = loop.RunSpec(
            paths=storage.RunPaths(os.path.join(run_dir, "run"), name),
            tensorboard_dir=os.path.join(run_dir, "tensorboard"),
            build_model=build_model,
            init_seed=0,
            data_seed=1,
            final_step=config.total_steps(data.num_train),
            snapshot_steps=snapshot_steps,
        )
        with timer.patched(loop_sections(data.x_test)):
            start = time.perf_counter()
            trainer.train_run(spec, on_snapshot=on_snapshot)
            total_s = time.perf_counter() - start

    epochs = []
    for (wall_a, cpu_a, sections_a), (wall_b, cpu_b, sections_b) in zip(marks, marks[1:]):
        wall_s = wall_b - wall_a
        epochs.append(EpochTiming(wall_s, cpu_b - cpu_a, breakdown(difference(sections_b, sections_a), wall_s)))
    return LoopRun(total_s, epochs, len(snapshots))


class EpochClock(keras.callbacks.Callback):
    """Records wall and process CPU time at the start of training and at each epoch's end."""

    def on_train_begin(self, logs=None):
        self.marks = [(time.perf_counter(), time.process_time())]

    def on_epoch_end(self, epoch, logs=None):
        self.marks.append((time.perf_counter(), time.process_time()))


def time_model_fit(data: datasets.Dataset, config: loop.TrainingConfig, build_model) -> list[EpochTiming]:
    """Times each epoch of `model.fit` with the loop's optimizer on an unshuffled `tf.data` pipeline.

    The input is `from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True).prefetch`,
    so fit runs the same number of steps per epoch as the loop but draws no permutation.
    """
    steps_per_epoch = config.steps_per_epoch(data.num_train)
    model = build_model()
    model.compile(
        optimizer=loop.make_optimizer(config, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    batches = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
    batches = batches.batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    clock = EpochClock()
    model.fit(batches, epochs=int(config.epochs), verbose=0, shuffle=False, callbacks=[clock])
    return [
        EpochTiming(wall_b - wall_a, cpu_b - cpu_a)
        for (wall_a, cpu_a), (wall_b, cpu_b) in zip(clock.marks, clock.marks[1:])
    ]


# ---------------------------------------------------------------------------------------------
# Measurements


def parse_phases(stderr: str, started: float, finished: float) -> list[tuple[str, float]]:
    """Returns (phase, seconds) from absl "Phase:" lines, plus start-up before the first phase.

    The last phase ends at the "Main job finished" line, or at process exit when that line is
    missing. absl writes local time without a year, so the current year is assumed.
    """
    year = datetime.datetime.fromtimestamp(started).year
    events = []
    for line in stderr.splitlines():
        match = ABSL_LINE.match(line)
        if not match:
            continue
        month, day, hour, minute, second, message = match.groups()
        if not (message.startswith("Phase: ") or message.startswith("Main job finished")):
            continue
        moment = datetime.datetime(year, int(month), int(day), int(hour), int(minute)) + datetime.timedelta(
            seconds=float(second)
        )
        events.append((moment.timestamp(), message))
    if not events:
        return []

    phases = [("start-up (imports, flag and gin parsing)", events[0][0] - started)]
    for (moment, message), (next_moment, _) in zip(events, events[1:] + [(finished, "")]):
        if message.startswith("Phase: "):
            phases.append((message[len("Phase: "):], next_moment - moment))
    if not events[-1][1].startswith("Main job finished"):
        phases.append(("after the last phase (no 'Main job finished' line)", 0.0))
    return phases


def measure_preset() -> dict:
    """Runs the preset's command in a subprocess and times it by phase."""
    with tempfile.TemporaryDirectory(prefix="bench_preset_") as parent_dir:
        run_dir = os.path.join(parent_dir, "run")
        command = [sys.executable, "-m", "tfntk.run", "--gin_file", FLAGS.preset_gin, "--run_dir", run_dir]
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY_ROOT, environment.get("PYTHONPATH")]))
        logging.info("Running %s", " ".join(command))
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        result = subprocess.run(command, cwd=REPOSITORY_ROOT, env=environment, capture_output=True, text=True)
        finished = time.time()
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-5:])
        raise RuntimeError(f"The preset command failed with exit status {result.returncode}:\n{tail}")
    cpu_s = (usage_after.ru_utime + usage_after.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    return {
        "command": "python -m tfntk.run --gin_file " + FLAGS.preset_gin + " --run_dir <fresh temporary directory>",
        "wall_s": finished - started,
        "cpu_s": cpu_s,
        "phases": parse_phases(result.stderr, started, finished),
        "log_lines": len(result.stderr.splitlines()),
    }


def measure_preset_parent() -> dict:
    """Trains parent 0 of the preset in this process and splits its time by loop section.

    NOTE: op determinism, which the preset turns on, stays off here because TensorFlow 2.21 has
    no call to turn it off again for the later measurements of this process.
    """
    tfntk_config.parse([os.path.join(REPOSITORY_ROOT, FLAGS.preset_gin)], [])
    try:
        config = loop.TrainingConfig()
        model_name = gin.query_parameter("main_job.model")
        spawn_epochs = gin.query_parameter("main_job.spawn_epochs")
        dataset_name = gin.query_parameter("main_job.dataset")
    finally:
        gin.clear_config()

    data = datasets.load_dataset(dataset_name)
    steps_per_epoch = config.steps_per_epoch(data.num_train)
    total_steps = config.total_steps(data.num_train)
    steps = schedules.snapshot_steps(
        total_steps, steps_per_epoch, config.snapshot_schedule, config.snapshot_every_epochs_after
    )
    steps = sorted(set(steps) | {int(round(float(epoch) * steps_per_epoch)) for epoch in spawn_epochs})
    build = lambda: models.build_model(model_name, data.input_shape, data.num_classes, seed=0)  # noqa: E731
    run = time_train_run(data, config, build, steps, "preset_parent")
    parts = collections.Counter()
    for epoch in run.epochs:
        parts.update(epoch.parts)
    return {
        "model": model_name,
        "dataset": dataset_name,
        "examples": data.num_train,
        "test_examples": data.num_test,
        "steps": total_steps,
        "batch_size": config.batch_size,
        "total_s": run.total_s,
        "snapshots": run.snapshots,
        "exports": sum(1 for step in steps if step % steps_per_epoch == 0),
        "parts": dict(parts),
        "epochs_wall_s": sum(epoch.wall_s for epoch in run.epochs),
    }


def measure_resnet_epoch() -> dict:
    """Trains ResNet-20 (batch norm) for one epoch through `Trainer.train_run` and times it."""
    data = cifar_shaped_data(FLAGS.examples, FLAGS.test_examples)
    config = loop.TrainingConfig(batch_size=FLAGS.batch_size, epochs=1.0)
    steps_per_epoch = config.steps_per_epoch(data.num_train)
    steps = schedules.snapshot_steps(
        steps_per_epoch, steps_per_epoch, config.snapshot_schedule, config.snapshot_every_epochs_after
    )
    run = time_train_run(data, config, model_builder("resnet20", data), steps, "resnet20_epoch")
    epoch = run.epochs[0]
    return {
        "examples": data.num_train,
        "test_examples": data.num_test,
        "steps": steps_per_epoch,
        "total_s": run.total_s,
        "snapshots": run.snapshots,
        "epoch": epoch,
    }


def measure_throughput(model_name: str) -> dict:
    """Times `model.fit` and three loop settings on one model; returns the fastest epochs."""
    data = cifar_shaped_data(FLAGS.throughput_examples, FLAGS.throughput_test_examples)
    epochs = 1 + FLAGS.measured_epochs
    build = model_builder(model_name, data)
    base = loop.TrainingConfig(
        batch_size=FLAGS.batch_size,
        epochs=float(epochs),
        weight_decay=0.0,
        snapshot_schedule=((float(epochs), FLAGS.snapshot_every_epochs),),
    )
    steps_per_epoch = base.steps_per_epoch(data.num_train)
    dense_steps = schedules.snapshot_steps(
        base.total_steps(data.num_train), steps_per_epoch, base.snapshot_schedule, base.snapshot_every_epochs_after
    )
    epoch_end_steps = [step for step in dense_steps if step % steps_per_epoch == 0]
    limited = dataclasses.replace(base, eval_train_examples=FLAGS.limited_eval_train_examples)
    bare = dataclasses.replace(limited, export_saved_model=False)

    results = {"model": model_name, "examples": data.num_train, "test_examples": data.num_test,
               "steps_per_epoch": steps_per_epoch,
               "snapshots_per_epoch": len([s for s in dense_steps if 0 < s <= steps_per_epoch])}
    logging.info("Throughput of %s: model.fit", model_name)
    results["fit"] = fastest(time_model_fit(data, base, build)[1:])
    settings = [
        ("loop_dense_full_eval", base, dense_steps),
        ("loop_dense_limited_eval", limited, dense_steps),
        ("loop_epoch_end_no_export", bare, epoch_end_steps),
    ]
    for label, config, steps in settings:
        logging.info("Throughput of %s: %s", model_name, label)
        results[label] = fastest(time_train_run(data, config, build, steps, label).epochs[1:])
    return results


def measure_pipeline() -> dict:
    """Times the per-segment costs of the loop's input pipelines at CIFAR-10 size.

    The loop calls `pipeline.train_batches` and `iter` once per stretch of steps between two
    snapshots, and `pipeline.eval_batches` once per evaluated split at every snapshot.
    Returns the seconds of each call over 3 repeats, and the best time to read one epoch.
    """
    rng = np.random.default_rng(0)
    num_examples = FLAGS.pipeline_examples
    data = datasets.Dataset(
        name="synthetic",
        x_train=rng.standard_normal((num_examples,) + CIFAR_SHAPE, dtype=np.float32),
        y_train=(np.arange(num_examples) % 10).astype(np.int64),
        x_test=np.zeros((1,) + CIFAR_SHAPE, np.float32),
        y_test=np.zeros((1,), np.int64),
        num_classes=10,
        input_shape=CIFAR_SHAPE,
        augment=False,
    )
    steps_per_epoch = pipeline.steps_per_epoch(num_examples, FLAGS.batch_size)
    seconds = collections.defaultdict(list)
    for repeat in range(3):
        start = time.perf_counter()
        batches = pipeline.train_batches(data, FLAGS.batch_size, 1, repeat, start_batch=repeat * steps_per_epoch // 10)
        built = time.perf_counter()
        iterator = iter(batches)
        created = time.perf_counter()
        next(iterator)
        seconds["train_build"].append(built - start)
        seconds["train_iter"].append(created - built)
        seconds["train_first"].append(time.perf_counter() - created)
        del iterator, batches

        start = time.perf_counter()
        batches = pipeline.eval_batches(data.x_train, data.y_train, 1000)
        built = time.perf_counter()
        next(iter(batches))
        seconds["eval_build"].append(built - start)
        seconds["eval_first"].append(time.perf_counter() - built)
        del batches

    for epoch in range(3):
        start = time.perf_counter()
        for _ in pipeline.train_batches(data, FLAGS.batch_size, 1, epoch):
            pass
        seconds["epoch"].append(time.perf_counter() - start)
    return {"examples": num_examples, "steps_per_epoch": steps_per_epoch, "seconds": dict(seconds)}


# ---------------------------------------------------------------------------------------------
# Report


PART_NAMES = {
    "steps": "optimizer steps (iterator creation included)",
    "dataset_build": "`pipeline.train_batches` builds",
    "eval_train": "evaluation on training examples",
    "eval_test": "evaluation on test examples",
    "checkpoint": "checkpoint writes",
    "csv": "`snapshots.csv` rewrites",
    "export": "SavedModel exports",
    "summaries_other": "TensorBoard scalars and other snapshot work",
    "outside": "loop code outside steps and snapshots",
}


def parts_table(parts: dict[str, float], wall_s: float) -> list[str]:
    lines = ["| part | seconds | share |", "|---|---:|---:|"]
    for key, name in PART_NAMES.items():
        seconds = parts.get(key, 0.0)
        lines.append(f"| {name} | {seconds:.2f} | {100 * seconds / wall_s:.0f}% |")
    return lines


def format_preset(preset: Optional[dict], parent: Optional[dict]) -> list[str]:
    lines = ["### Quick preset", ""]
    if preset:
        lines += [
            f"`{preset['command']}`: {preset['wall_s']:.0f} s wall, {preset['cpu_s']:.0f} s process CPU "
            f"(user + system), one run, {preset['log_lines']} lines on stderr.",
            "",
            "| phase | seconds |",
            "|---|---:|",
        ]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in preset["phases"]]
        lines.append("")
    if parent:
        wall_s = parent["epochs_wall_s"]
        lines += [
            f"One parent of the preset in this process ({parent['model']} on {parent['dataset']}, "
            f"{parent['examples']} training and {parent['test_examples']} test examples, "
            f"{parent['steps']} steps of batch {parent['batch_size']}, {parent['snapshots']} snapshots, "
            f"{parent['exports']} exports, op determinism off): {parent['total_s']:.1f} s for the whole "
            f"`train_run`, of which {wall_s:.1f} s after the step-0 snapshot split as follows.",
            "",
        ]
        lines += parts_table(parent["parts"], wall_s)
        lines.append("")
    return lines


def format_resnet_epoch(result: dict) -> list[str]:
    epoch = result["epoch"]
    parts = epoch.parts
    examples = result["steps"] * FLAGS.batch_size
    without_export = epoch.wall_s - parts["export"]
    scale = CIFAR_TRAIN_EXAMPLES / result["examples"]
    per_snapshot_fixed = parts["checkpoint"] + parts["csv"] + parts["summaries_other"]
    estimate = (parts["steps"] + parts["dataset_build"] + parts["eval_train"] + parts["eval_test"]) * scale
    estimate += per_snapshot_fixed + parts["export"]
    return [
        "### One ResNet-20 epoch through `Trainer.train_run`",
        "",
        f"ResNet-20 with batch norm, {result['examples']} synthetic 32x32x3 training and "
        f"{result['test_examples']} test examples, batch {FLAGS.batch_size} ({result['steps']} steps), "
        "default `TrainingConfig` (SGD 0.05, momentum 0.9, weight decay 1e-4), snapshots every 0.1 "
        f"epoch ({result['snapshots']} with the step-0 one), each evaluated on every training and test "
        "example, SavedModel exports at epochs 0 and 1.",
        "",
        f"- whole `train_run`: {result['total_s']:.1f} s (model building, tracing and the step-0 snapshot included)",
        f"- the epoch (first step to the end-of-epoch snapshot and export): {epoch.wall_s:.1f} s wall, "
        f"{epoch.cpu_s:.1f} s CPU, {examples / epoch.wall_s:.0f} examples/s",
        f"- the same without the epoch-1 export (its measured time subtracted, not a separate run): "
        f"{without_export:.1f} s, {examples / without_export:.0f} examples/s",
        f"- optimizer steps alone: {parts['steps']:.1f} s, {examples / parts['steps']:.0f} examples/s",
        f"- estimate for 50,000 examples (steps and evaluation scaled by {scale:g}, with a 10,000-example "
        f"test set; checkpoints and the export not scaled): {estimate:.0f} s",
        "",
    ] + parts_table(parts, epoch.wall_s) + [""]


def format_throughput(results: list[dict]) -> list[str]:
    first = results[0]
    lines = [
        "### Training loop against `model.fit`",
        "",
        f"{first['examples']} synthetic 32x32x3 training and {first['test_examples']} test examples, batch "
        f"{FLAGS.batch_size} ({first['steps_per_epoch']} steps per epoch), SGD with momentum 0.9 from "
        "`loop.make_optimizer` in both, weight decay 0 in both, no XLA (`jit_compile=False`; Keras "
        "3.15 also turns it off on CPU-only machines). `model.fit` reads "
        "`from_tensor_slices((x, y)).batch(128, drop_remainder=True).prefetch(AUTOTUNE)`, unshuffled; "
        "the loop reads `pipeline.train_batches` (a new permutation every epoch). Each setting ran "
        f"1 warm-up epoch and {FLAGS.measured_epochs} timed epochs; the fastest timed epoch is shown. "
        f"Dense settings snapshot every {FLAGS.snapshot_every_epochs} epoch "
        f"({first['snapshots_per_epoch']} snapshots per epoch, the densest part of the default "
        "schedule) and export a SavedModel at each epoch end, as real runs do.",
        "",
        "| model | setting | epoch wall s | epoch CPU s | examples/s | loop / fit (wall) | loop / fit (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    settings = [
        ("fit", "`model.fit`"),
        ("loop_dense_full_eval", "loop, dense snapshots, evaluation on all training examples"),
        ("loop_dense_limited_eval", f"loop, dense snapshots, `eval_train_examples={FLAGS.limited_eval_train_examples}`"),
        ("loop_epoch_end_no_export", "loop, one snapshot per epoch (limited evaluation), no export"),
    ]
    for result in results:
        examples = result["steps_per_epoch"] * FLAGS.batch_size
        fit = result["fit"]
        for key, name in settings:
            timing = result[key]
            ratio_wall = fit.wall_s / timing.wall_s
            ratio_cpu = fit.cpu_s / timing.cpu_s
            lines.append(
                f"| {result['model']} | {name} | {timing.wall_s:.2f} | {timing.cpu_s:.2f} | "
                f"{examples / timing.wall_s:.0f} | {ratio_wall:.2f} | {ratio_cpu:.2f} |"
            )
    lines.append("")
    for result in results:
        lines += format_dense_breakdown(result)
    return lines


def format_dense_breakdown(result: dict) -> list[str]:
    """Formats the split of the dense, full-evaluation epoch and what it implies for a CIFAR-10 run."""
    examples = result["steps_per_epoch"] * FLAGS.batch_size
    dense = result["loop_dense_full_eval"]
    parts = dense.parts
    snapshots = result["snapshots_per_epoch"]
    fit_rate = examples / result["fit"].wall_s
    evaluated = snapshots * (result["examples"] + result["test_examples"])
    eval_rate = evaluated / (parts["eval_train"] + parts["eval_test"])
    fixed_per_snapshot = (parts["checkpoint"] + parts["csv"] + parts["summaries_other"]) / snapshots
    lines = [
        f"Where the fastest dense, full-evaluation epoch of {result['model']} went ({dense.wall_s:.2f} s). "
        f"Optimizer steps alone ran at {examples / parts['steps']:.0f} examples/s against fit's "
        f"{fit_rate:.0f}; evaluation ran at {eval_rate:.0f} examples/s; checkpoint, CSV and "
        f"summaries cost {1000 * fixed_per_snapshot:.0f} ms per snapshot and the export "
        f"{parts['export']:.2f} s per epoch.",
        "",
    ]
    lines += parts_table(parts, dense.wall_s)
    lines.append("")

    epochs = FULL_RUN_EPOCHS[result["model"]]
    steps_per_epoch = CIFAR_TRAIN_EXAMPLES // FLAGS.batch_size
    defaults = loop.TrainingConfig()
    snapshot_count = len(schedules.snapshot_steps(
        epochs * steps_per_epoch, steps_per_epoch, defaults.snapshot_schedule, defaults.snapshot_every_epochs_after
    ))
    train_s = epochs * CIFAR_TRAIN_EXAMPLES / fit_rate
    overhead_s = snapshot_count * fixed_per_snapshot + epochs * parts["export"]
    estimates = []
    for eval_train in (CIFAR_TRAIN_EXAMPLES, CIFAR_TRAIN_EXAMPLES // 5, 0):
        eval_s = snapshot_count * (eval_train + CIFAR_TEST_EXAMPLES) / eval_rate
        estimates.append(f"{eval_train:,} training examples: {train_s / (train_s + eval_s + overhead_s):.2f}")
    lines += [
        f"Estimate (from these rates, assuming loop steps as fast as fit's) of loop / fit for a whole "
        f"{epochs}-epoch CIFAR-10 run with the default snapshot schedule ({snapshot_count} snapshots, each "
        f"evaluated on the 10,000 test examples and on the number of training examples given; 10,000 is "
        "the CIFAR presets' `eval_train_examples`): " + "; ".join(estimates) + ".",
        "",
    ]
    return lines


def format_pipeline(result: dict) -> list[str]:
    seconds = result["seconds"]
    listed = lambda key: ", ".join(f"{value:.2f}" for value in seconds[key])  # noqa: E731
    best_epoch = min(seconds["epoch"])
    return [
        "### Input pipeline",
        "",
        f"{result['examples']} random 32x32x3 training examples (CIFAR-10 has 50,000), batch "
        f"{FLAGS.batch_size}, no augmentation, no model; seconds of 3 repeats each:",
        "",
        f"- `pipeline.train_batches(...)` (converts the whole training array to a tensor): {listed('train_build')}",
        f"- `iter()` on it: {listed('train_iter')}; first batch: {listed('train_first')}",
        f"- `pipeline.eval_batches(x_train, y_train, 1000)`: {listed('eval_build')}; "
        f"`iter()` and first batch: {listed('eval_first')}",
        f"- reading one whole epoch ({result['steps_per_epoch']} batches): best {best_epoch:.2f} s, "
        f"{result['examples'] / best_epoch:.0f} examples/s",
        "",
    ]


def format_section(results: dict, seconds: float) -> str:
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_description()}, TensorFlow {tf.__version__}, Keras {keras.__version__}, float32, "
        "CPU only, shared with other jobs while measured (so wall times are noisy; CPU times are "
        "given beside them).",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({seconds:.0f} s in total).",
        "",
    ]
    if "preset" in results or "preset_parent" in results:
        lines += format_preset(results.get("preset"), results.get("preset_parent"))
    if "resnet_epoch" in results:
        lines += format_resnet_epoch(results["resnet_epoch"])
    if "throughput" in results:
        lines += format_throughput(results["throughput"])
    if "pipeline" in results:
        lines += format_pipeline(results["pipeline"])
    return "\n".join(lines).rstrip() + "\n"


def main(argv):
    del argv
    unknown = set(FLAGS.what) - {"preset", "resnet_epoch", "throughput", "pipeline"}
    if unknown:
        raise app.UsageError(f"Unknown --what {sorted(unknown)}; use preset, resnet_epoch, throughput, pipeline.")
    unknown_models = set(FLAGS.throughput_models) - set(MODEL_KWARGS)
    if unknown_models:
        raise app.UsageError(f"Unknown --throughput_models {sorted(unknown_models)}; use {sorted(MODEL_KWARGS)}.")
    if FLAGS.measured_epochs < 1:
        raise app.UsageError(f"Invalid --measured_epochs {FLAGS.measured_epochs}; use 1 or more.")

    start = time.perf_counter()
    results = {}
    if "pipeline" in FLAGS.what:
        results["pipeline"] = measure_pipeline()
        logging.info("Pipeline: %s", results["pipeline"])
    if "preset" in FLAGS.what:
        results["preset"] = measure_preset()
        logging.info("Preset: %s", results["preset"])
        results["preset_parent"] = measure_preset_parent()
        logging.info("Preset parent: %s", results["preset_parent"])
    if "resnet_epoch" in FLAGS.what:
        results["resnet_epoch"] = measure_resnet_epoch()
        logging.info("ResNet-20 epoch: %s", results["resnet_epoch"])
    if "throughput" in FLAGS.what:
        results["throughput"] = []
        for name in FLAGS.throughput_models:
            results["throughput"].append(measure_throughput(name))
            logging.info("Throughput: %s", results["throughput"][-1])

    section = format_section(results, time.perf_counter() - start)
    print(section)
    if FLAGS.results:
        write_section(FLAGS.results, section)


if __name__ == "__main__":
    app.run(main)
