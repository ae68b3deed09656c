"""Benchmarks Hessian-vector products and top-eigenvalue solvers.

Two measurements:
  1. Time of one Hessian-vector product against one gradient of the same loss on the same
     batches, for SimpleCNN and ResNet-20 (batch norm, inference-mode loss) on random 32x32x3
     inputs. Forward-over-reverse should cost a small multiple of a gradient.
  2. Hessian-vector products that Lanczos and power iteration need for the top eigenvalue of
     SimpleCNN on the digits dataset, at several points of an SGD run (`--train_steps`). Counted,
     from each of `--seeds` random start vectors: products until the estimate stays within each
     of `--relative_accuracies` of a reference value from a long Lanczos run, and products until
     the stopping rule `|H v - lambda v| <= tol |lambda|` holds. The ratio of the two methods'
     counts depends on the spectrum, so each point also reports lambda_2 / lambda_1.

Usage:
  python bench/hessian.py --results=bench/RESULTS.md
"""

from __future__ import annotations

import functools
import os
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

# A sibling module of this script.
from results_file import cpu_description, load_average, write_section  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("timing_models", ["simple_cnn", "resnet20"], "Models to time.")
flags.DEFINE_integer("timing_batch_size", 128, "Examples per batch in the timing runs.")
flags.DEFINE_integer("timing_num_batches", 2, "Batches per gradient or product in the timing.")
flags.DEFINE_integer("timing_repeats", 7, "Timed calls of each kind; the median is reported.")
flags.DEFINE_list(
    "train_steps", ["0", "30", "300", "1500"],
    "SGD steps on digits after which the solvers are compared, in increasing order.",
)
flags.DEFINE_float("train_learning_rate", 0.05, "SGD learning rate of that training.")
flags.DEFINE_integer(
    "hessian_examples", 512,
    "The first this many training examples form the Hessian's loss (the curvature stage's default "
    "count, though the stage draws a stratified subset).",
)
flags.DEFINE_integer("reference_iterations", 200, "Largest Krylov dimension of the reference.")
flags.DEFINE_integer("lanczos_iterations", 60, "Largest Lanczos Krylov dimension compared.")
flags.DEFINE_integer("power_iterations", 300, "Largest number of power iterations compared.")
flags.DEFINE_list(
    "relative_accuracies", ["1e-4", "1e-6"], "Relative errors of the top eigenvalue to reach."
)
flags.DEFINE_float("tol", 1e-4, "Relative residual tolerance of the compared runs.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4", "5"], "Seeds of the random start vectors.")
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


def trained_digits_models():
    """Trains SimpleCNN on digits with plain SGD, pausing at each of `--train_steps`.

    Yields (SGD steps so far, model, batches of the Hessian's loss). The model is trained further
    after each yield, so a consumer must finish with it before asking for the next point.
    """
    data = datasets.load_dataset("digits")
    model = models.build_model("simple_cnn", data.input_shape, data.num_classes, seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(FLAGS.train_learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    train_data = (
        tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
        .shuffle(data.num_train, seed=0)
        .repeat()
        .batch(64)
    )
    count = FLAGS.hessian_examples
    x, y = data.x_train[:count], data.y_train[:count]
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, count, 256)]

    done = 0
    for steps in sorted(int(s) for s in FLAGS.train_steps):
        if steps > done:
            history = model.fit(train_data, epochs=1, steps_per_epoch=steps - done, verbose=0)
            logging.info(
                "Trained to %d SGD steps, training loss %.4f.", steps, history.history["loss"][-1]
            )
            done = steps
        yield steps, model, batches


def hvps_to_accuracy(history: np.ndarray, reference: float, accuracy: float) -> int | None:
    """Returns the first product count after which the estimate stays within `accuracy`."""
    relative_error = np.abs(history - reference) / abs(reference)
    outside = np.nonzero(relative_error > accuracy)[0]
    if len(outside) == 0:
        return 1
    if outside[-1] + 1 == len(history):
        return None
    return int(outside[-1] + 2)


def compare_solvers(steps: int, model: keras.Model, batches: list) -> dict:
    """Runs both methods from each seed on the Hessian of `model`'s loss over `batches`.

    Returns a dict with the training point, the reference's two top eigenvalues and measured
    relative residual, and `runs`, one dict per (seed, method).
    """
    # One loss for every run at this point, so that its tf.functions are traced once.
    training_loss = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY), batches)
    reference = hessian.hessian_top_eigenvalues_of_loss(
        training_loss,
        k=2,
        tol=REFERENCE_TOL,
        max_iterations=FLAGS.reference_iterations,
        seed=1000,
    )
    top_value = float(reference.eigenvalues[0])
    point = dict(
        steps=steps,
        eigenvalues=[float(v) for v in reference.eigenvalues],
        reference_residual=float(reference.residual_norms[0] / abs(top_value)),
        runs=[],
    )
    logging.info(
        "After %d steps: reference eigenvalues %s (relative residual %.2g, %d products).",
        steps,
        point["eigenvalues"],
        point["reference_residual"],
        reference.num_hvps,
    )

    for seed in (int(s) for s in FLAGS.seeds):
        for method, budget in (
            ("lanczos", FLAGS.lanczos_iterations),
            ("power", FLAGS.power_iterations),
        ):
            result = hessian.hessian_top_eigenvalues_of_loss(
                training_loss, k=1, method=method, tol=FLAGS.tol, max_iterations=budget, seed=seed
            )
            run = dict(
                seed=seed, method=method, stop=result.num_hvps if result.converged[0] else None
            )
            # Once the residual is below tol, the eigenvalue error is of order tol^2 in exact
            # arithmetic, so the history up to the stop shows when each accuracy is reached. In
            # float32 the products' rounding can keep it above the tighter accuracies.
            for accuracy in FLAGS.relative_accuracies:
                run[accuracy] = hvps_to_accuracy(
                    result.top_eigenvalue_history, top_value, float(accuracy)
                )
            point["runs"].append(run)
            logging.info("Solver run after %d steps: %s", steps, run)
    return point


def count_summary(point: dict, key: str) -> tuple[str, str, str]:
    """Formats the counts of both methods for `key` and the ratio of their means.

    Returns (Lanczos counts, power counts, ratio). The ratio is '-' unless every run of both
    methods reached the target.
    """
    counts = {
        method: [run[key] for run in point["runs"] if run["method"] == method]
        for method in ("lanczos", "power")
    }
    cells = [
        ", ".join("-" if c is None else str(c) for c in counts[method])
        for method in ("lanczos", "power")
    ]
    if any(c is None for method in counts for c in counts[method]):
        return cells[0], cells[1], "-"
    ratio = np.mean(counts["lanczos"]) / np.mean(counts["power"])
    return cells[0], cells[1], f"{ratio:.2f}"


def format_section(timing_rows, points, seconds):
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_description()}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"float32, CPU only. Load average at the end of the run: {load_average()} (other jobs "
        "may share the cores, so times are noisy and ratios more reliable than absolute values).",
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

    keys = [(accuracy, f"to {accuracy}") for accuracy in FLAGS.relative_accuracies]
    keys.append(("stop", "stop"))
    lines += [
        "",
        f"Hessian-vector products for the top eigenvalue of SimpleCNN on digits (8x8x1) at "
        f"several points of one SGD run (learning rate {FLAGS.train_learning_rate}, batch 64); "
        f"the Hessian is that of the mean loss over {FLAGS.hessian_examples} training examples. "
        f"Each method starts from the random vectors of seeds {', '.join(FLAGS.seeds)}; the "
        "counts are listed in seed order. 'to a': products until the estimate stays within "
        "relative error a of the reference, a Lanczos run with k = 2 stopped at residual "
        f"{REFERENCE_TOL:g} or {FLAGS.reference_iterations} products. 'stop': products until "
        f"the stopping rule |Hv - lambda v| <= {FLAGS.tol:g} |lambda| holds, including the one "
        f"residual check of Lanczos. Budgets: Lanczos {FLAGS.lanczos_iterations}, power "
        f"{FLAGS.power_iterations} products; '-' means the estimate did not stay within a before "
        "the run stopped (the stopping rule or the budget). The ratio is Lanczos's mean count "
        "over power iteration's.",
        "",
        "| SGD steps | lambda_1 | lambda_2 / lambda_1 | reference residual | counted | Lanczos | "
        "power | Lanczos / power |",
        "|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for point in points:
        top, second = point["eigenvalues"]
        for index, (key, label) in enumerate(keys):
            lanczos_cells, power_cells, ratio = count_summary(point, key)
            prefix = (
                f"| {point['steps']} | {top:.5g} | {second / top:.3f} | "
                f"{point['reference_residual']:.1e} |"
                if index == 0
                else "| | | | |"
            )
            lines.append(f"{prefix} {label} | {lanczos_cells} | {power_cells} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    start = time.perf_counter()
    timing_rows = [time_hvp_against_gradient(name) for name in FLAGS.timing_models]
    points = [compare_solvers(*point) for point in trained_digits_models()]
    section = format_section(timing_rows, points, time.perf_counter() - start)
    print(section)
    if FLAGS.results:
        write_section(FLAGS.results, section)


if __name__ == "__main__":
    app.run(main)
