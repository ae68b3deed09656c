"""Benchmarks Hessian-vector products and top-eigenvalue solvers.

Two measurements:
  1. Time of one Hessian-vector product against one gradient of the same loss on the same
     batches, for SimpleCNN and ResNet-20 (batch norm, inference-mode loss) on random 32x32x3
     inputs. Forward-over-reverse should cost a small multiple of a gradient.
  2. Hessian-vector products that Lanczos and power iteration need for the top eigenvalue of
     SimpleCNN, trained briefly with SGD on the digits dataset. Counted: products until the
     estimate stays within each of `--relative_accuracies` of a reference value from a long
     Lanczos run, and products until the stopping rule `|H v - lambda v| <= tol |lambda|`.

Usage:
  python bench/hessian.py --results=bench/RESULTS.md
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from tfntk import models
from tfntk.autodiff import functional
from tfntk.autodiff import hvp
from tfntk.data import datasets
from tfntk.measures import hessian

from results_file import write_section  # noqa: E402  (a sibling module of this script)

FLAGS = flags.FLAGS
flags.DEFINE_list("timing_models", ["simple_cnn", "resnet20"], "Models to time.")
flags.DEFINE_integer("timing_batch_size", 128, "Examples per batch in the timing runs.")
flags.DEFINE_integer("timing_num_batches", 2, "Batches per gradient or product in the timing.")
flags.DEFINE_integer("timing_repeats", 7, "Timed calls of each kind; the median is reported.")
flags.DEFINE_integer("train_steps", 300, "SGD steps on digits before the eigenvalue runs.")
flags.DEFINE_float("train_learning_rate", 0.05, "SGD learning rate of that training.")
flags.DEFINE_integer("hessian_examples", 256, "Training examples in the Hessian's loss.")
flags.DEFINE_integer("reference_iterations", 200, "Largest Krylov dimension of the reference.")
flags.DEFINE_integer("lanczos_iterations", 60, "Largest Lanczos Krylov dimension compared.")
flags.DEFINE_integer("power_iterations", 300, "Largest number of power iterations compared.")
flags.DEFINE_list(
    "relative_accuracies", ["1e-4", "1e-6"], "Relative errors of the top eigenvalue to reach."
)
flags.DEFINE_float("tol", 1e-4, "Relative residual tolerance of the compared runs.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the random start vectors.")
flags.DEFINE_string("results", None, "Markdown file to append or update the section in.")

SECTION = "## Hessian (bench/hessian.py)"
# The reference Lanczos run stops when its residual estimate is this small relative to the
# eigenvalue. In float32 the measured residual stays near 1e-6, so it logs a non-convergence
# warning, but the eigenvalue error is of the order of the squared residual.
REFERENCE_TOL = 1e-10
CROSS_ENTROPY = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)


def interleaved_median_seconds(functions: list, repeats: int) -> list[float]:
    """Calls each function once to trace it, then times `repeats` rounds that call each once.

    Interleaving the calls exposes all of them to the same background load on a shared machine.
    Returns the median seconds per function.
    """
    for function in functions:
        function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, function_times in zip(functions, times):
            start = time.perf_counter()
            function()
            function_times.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def time_hvp_against_gradient(model_name: str) -> dict:
    model = models.build_model(model_name, (32, 32, 3), 10, seed=0)
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.standard_normal((FLAGS.timing_batch_size, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 10, FLAGS.timing_batch_size),
        )
        for _ in range(FLAGS.timing_num_batches)
    ]
    loss = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY), batches)
    weights = functional.current_weights(model)
    vector = [tf.random.normal(w.shape, seed=1) for w in weights.trainable]

    def gradient_once():
        _, gradient = loss.value_and_gradient(weights)
        return float(tf.reduce_sum(gradient[0]))

    def hvp_once():
        return float(tf.reduce_sum(loss.hvp(vector, weights)[0]))

    gradient_seconds, hvp_seconds = interleaved_median_seconds(
        [gradient_once, hvp_once], FLAGS.timing_repeats
    )
    row = dict(
        model=model_name,
        parameters=int(sum(np.prod(w.shape) for w in weights.trainable)),
        gradient_ms=1e3 * gradient_seconds,
        hvp_ms=1e3 * hvp_seconds,
        ratio=hvp_seconds / gradient_seconds,
    )
    logging.info("Timing %s", row)
    return row


def train_digits_model() -> tuple[keras.Model, list, int]:
    """Trains SimpleCNN on digits with plain SGD.

    Returns the model, the batches of the Hessian's loss and the number of SGD steps.
    """
    data = datasets.load_dataset("digits")
    model = models.build_model("simple_cnn", data.input_shape, data.num_classes, seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(FLAGS.train_learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch_size = 64
    train_data = (
        tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
        .shuffle(data.num_train, seed=0)
        .repeat()
        .batch(batch_size)
    )
    history = model.fit(train_data, epochs=1, steps_per_epoch=FLAGS.train_steps, verbose=0)
    logging.info(
        "Trained %d SGD steps, final training loss %.4f.",
        FLAGS.train_steps,
        history.history["loss"][-1],
    )

    count = FLAGS.hessian_examples
    x, y = data.x_train[:count], data.y_train[:count]
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, count, 256)]
    return model, batches, FLAGS.train_steps


def hvps_to_accuracy(history: np.ndarray, reference: float, accuracy: float) -> int | None:
    """Returns the first product count after which the estimate stays within `accuracy`."""
    relative_error = np.abs(history - reference) / abs(reference)
    outside = np.nonzero(relative_error > accuracy)[0]
    if len(outside) == 0:
        return 1
    if outside[-1] + 1 == len(history):
        return None
    return int(outside[-1] + 2)


def compare_solvers(model: keras.Model, batches: list) -> tuple[float, int, float, list]:
    """Runs both methods from each seed.

    Returns the reference value, its product count, its measured relative residual and one
    row per (seed, method).
    """
    reference = hessian.hessian_top_eigenvalues(
        model,
        CROSS_ENTROPY,
        batches,
        k=1,
        tol=REFERENCE_TOL,
        max_iterations=FLAGS.reference_iterations,
        seed=1000,
    )
    reference_value = float(reference.eigenvalues[0])
    logging.info(
        "Reference top eigenvalue %.8g (measured relative residual %.2g, %d products).",
        reference_value,
        reference.residual_norms[0] / abs(reference_value),
        reference.num_hvps,
    )

    rows = []
    for seed in (int(s) for s in FLAGS.seeds):
        for method, budget in (
            ("lanczos", FLAGS.lanczos_iterations),
            ("power", FLAGS.power_iterations),
        ):
            start = time.perf_counter()
            result = hessian.hessian_top_eigenvalues(
                model, CROSS_ENTROPY, batches, k=1, method=method, tol=FLAGS.tol,
                max_iterations=budget, seed=seed,
            )
            row = dict(
                seed=seed,
                method=method,
                stop_hvps=result.num_hvps if result.converged[0] else None,
                seconds=time.perf_counter() - start,
            )
            # Once the residual is below tol, the eigenvalue error is of order tol^2, so the
            # history up to the stop shows when each accuracy is reached.
            for accuracy in FLAGS.relative_accuracies:
                row[accuracy] = hvps_to_accuracy(
                    result.top_eigenvalue_history, reference_value, float(accuracy)
                )
            rows.append(row)
            logging.info("Solver run %s", row)
    reference_residual = float(reference.residual_norms[0] / abs(reference_value))
    return reference_value, reference.num_hvps, reference_residual, rows


def cpu_description() -> str:
    model_name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model_name}, {os.cpu_count()} cores"


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def format_section(timing_rows, reference, solver_rows, train_steps, seconds):
    reference_value, reference_hvps, reference_residual = reference
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_description()}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"float32, CPU only. Load average at the end of the run: {load_average()} (other jobs "
        "shared the cores, so times are noisy and ratios more reliable than absolute values).",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({seconds:.0f} s in total).",
        "",
        f"One Hessian-vector product against one gradient of the same mean cross-entropy over "
        f"{FLAGS.timing_num_batches} batches of {FLAGS.timing_batch_size} random 32x32x3 inputs "
        f"(median of {FLAGS.timing_repeats} interleaved calls after tracing; batch norm in "
        "inference mode):",
        "",
        "| model | parameters | gradient (ms) | HVP (ms) | HVP / gradient |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in timing_rows:
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['gradient_ms']:.1f} | "
            f"{row['hvp_ms']:.1f} | {row['ratio']:.2f} |"
        )
    accuracies = FLAGS.relative_accuracies
    lines += [
        "",
        f"Hessian-vector products for the top eigenvalue of SimpleCNN on digits (8x8x1) after "
        f"{train_steps} SGD steps (learning rate {FLAGS.train_learning_rate}, batch 64), Hessian "
        f"of the mean loss over {FLAGS.hessian_examples} training examples. Columns 'to a': "
        f"products until the estimate stays within relative error a of the reference "
        f"{reference_value:.7g} (Lanczos run until its residual estimate fell below "
        f"{REFERENCE_TOL:g}: {reference_hvps} products, measured relative residual "
        f"{reference_residual:.1e}). "
        f"'stop': products until the stopping rule |Hv - lambda v| <= {FLAGS.tol:g} |lambda| "
        f"holds, including the one residual check of Lanczos. Budgets: Lanczos "
        f"{FLAGS.lanczos_iterations}, power {FLAGS.power_iterations} products; '-' means not "
        f"reached within the budget.",
        "",
        "| seed | method | " + " | ".join(f"to {a}" for a in accuracies) + " | stop | seconds |",
        "|---:|---|" + "---:|" * (len(accuracies) + 2),
    ]
    for row in solver_rows:
        counts = [row[a] for a in accuracies] + [row["stop_hvps"]]
        cells = " | ".join("-" if c is None else str(c) for c in counts)
        lines.append(f"| {row['seed']} | {row['method']} | {cells} | {row['seconds']:.1f} |")

    lines += ["", "Lanczos / power, mean over seeds where both reached the target:", ""]
    for key in list(accuracies) + ["stop_hvps"]:
        ratios = []
        for seed in {row["seed"] for row in solver_rows}:
            by_method = {r["method"]: r[key] for r in solver_rows if r["seed"] == seed}
            if by_method.get("lanczos") and by_method.get("power"):
                ratios.append(by_method["lanczos"] / by_method["power"])
        label = "stop" if key == "stop_hvps" else f"to {key}"
        value = f"{np.mean(ratios):.2f} ({len(ratios)} seeds)" if ratios else "-"
        lines.append(f"- {label}: {value}")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    start = time.perf_counter()
    timing_rows = [time_hvp_against_gradient(name) for name in FLAGS.timing_models]
    model, batches, train_steps = train_digits_model()
    *reference, solver_rows = compare_solvers(model, batches)
    section = format_section(
        timing_rows, reference, solver_rows, train_steps, time.perf_counter() - start
    )
    print(section)
    if FLAGS.results:
        write_section(FLAGS.results, section)


if __name__ == "__main__":
    app.run(main)
