"""Benchmarks a training step of Taylor-expanded models against an ordinary training step.

For each architecture, on one batch of random 32x32x3 inputs with 10 classes, this times
  - an ordinary SGD step of the network (batch norm in training mode),
  - an SGD step of its order-1 expansion (`tfntk.linearize`, batch norm frozen),
  - an SGD step of its order-2 expansion,
all as `tf.function`s with a mean cross-entropy loss, and reports the median of `--repeats`
steps after a traced warm-up step. The target is an order-1 step within 3x an ordinary step.

Side by side, the same architectures without batch norm are written with
`jax.example_libraries.stax` and timed in the neural-tangents environment `bench/.venv-nt`
(created by `bench/setup_neural_tangents.sh`): an ordinary step, `nt.linearize` and
`nt.taylor_expand(..., degree=2)`, each a jitted SGD step. This script runs itself there with
`--part=neural_tangents` and reads back one JSON line.

Usage, from the repository root (PYTHONPATH is not needed once tfntk is installed):
  PYTHONPATH=. python bench/linearized.py --results=bench/RESULTS.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

# A sibling module of this script.
from results_file import cpu_description, write_section  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "architectures",
    ["simple_cnn", "resnet20", "resnet20_no_bn"],
    "Architectures to time: simple_cnn, resnet20 (batch norm) and resnet20_no_bn.",
)
flags.DEFINE_list("orders", ["1", "2"], "Taylor orders to time.")
flags.DEFINE_integer("batch_size", 128, "Examples per training step.")
flags.DEFINE_integer("repeats", 3, "Timed steps of each kind after the warm-up; reports the median.")
flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate of the timed steps.")
flags.DEFINE_bool("neural_tangents", True, "Also time neural-tangents in --nt_python.")
flags.DEFINE_string(
    "nt_python",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv-nt", "bin", "python"),
    "Python of the neural-tangents environment.",
)
flags.DEFINE_integer("nt_timeout", 1800, "Seconds allowed for the neural-tangents part.")
flags.DEFINE_enum(
    "part", "tfntk", ["tfntk", "neural_tangents"],
    "Internal: which side this process times. The default runs both.",
)
flags.DEFINE_string("results", None, "Markdown file to append or update the section in.")

SECTION = "## Linearized training (bench/linearized.py)"
INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
SIMPLE_CNN_FILTERS = (32, 32, 64, 64, 128, 128)
RESNET_WIDTHS = (16, 32, 64)
RESNET_BLOCKS_PER_STAGE = 3
# Architecture key -> (tfntk.models name, build_model keyword arguments, has batch norm).
ARCHITECTURES = {
    "simple_cnn": ("simple_cnn", {}, False),
    "resnet20": ("resnet20", {"batch_norm": True}, True),
    "resnet20_no_bn": ("resnet20", {"batch_norm": False}, False),
}


def random_batch(batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size,) + INPUT_SHAPE).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
    return x, y


def time_interleaved(steps: dict, repeats: int) -> dict:
    """Times blocking callables, returning {key: (first call s, median of later calls s)}.

    Later calls are interleaved, one of each kind per round, so that load from other processes
    falls on every kind of step over the same period.
    """
    first = {}
    for key, step in steps.items():
        start = time.perf_counter()
        step()
        first[key] = time.perf_counter() - start

    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: (first[key], float(np.median(times[key]))) for key in steps}


def timing_row(architecture: str, parameters: int, timings: dict) -> dict:
    row = dict(architecture=architecture, parameters=parameters)
    for key, (first, median) in timings.items():
        row[f"{key}_first_s"] = first
        row[f"{key}_ms"] = 1e3 * median
    return row


# TensorFlow side.


def tensorflow_step(model, x, y, training: bool):
    """Returns a blocking callable that runs one SGD step of `model` on (x, y)."""
    import keras
    import tensorflow as tf

    optimizer = keras.optimizers.SGD(learning_rate=FLAGS.learning_rate)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=training)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    x, y = tf.constant(x), tf.constant(y)
    return lambda: float(step(x, y))


def time_tensorflow(architecture: str) -> dict:
    from tfntk import linearize
    from tfntk import models

    name, kwargs, _ = ARCHITECTURES[architecture]
    x, y = random_batch(FLAGS.batch_size)
    base = models.build_model(name, INPUT_SHAPE, NUM_CLASSES, seed=0, **kwargs)
    parameters = int(sum(np.prod(v.shape) for v in base.trainable_variables))

    # The expansions are built first, so that they expand around the untrained weights.
    expansions = {int(order): linearize.linearize(base, order=int(order)) for order in FLAGS.orders}
    steps = {"ordinary": tensorflow_step(base, x, y, training=True)}
    for order, expansion in expansions.items():
        steps[f"order{order}"] = tensorflow_step(expansion, x, y, training=True)

    row = timing_row(architecture, parameters, time_interleaved(steps, FLAGS.repeats))
    logging.info("tfntk %s", row)
    return row


# neural-tangents side (runs in the neural-tangents environment).


def stax_architecture(architecture: str):
    """Returns (init_fn, apply_fn) of the architecture without batch norm, in jax stax."""
    import jax
    import jax.numpy as jnp
    from jax.example_libraries import stax

    he_normal = jax.nn.initializers.he_normal()

    def conv(width, strides=(1, 1), size=(3, 3)):
        return stax.Conv(width, size, strides, padding="SAME", W_init=he_normal)

    global_average_pool = (
        lambda rng, input_shape: ((input_shape[0], input_shape[-1]), ()),
        lambda params, inputs, **kwargs: jnp.mean(inputs, axis=(1, 2)),
    )
    head = [global_average_pool, stax.Dense(NUM_CLASSES, W_init=he_normal)]

    if architecture == "simple_cnn":
        layers = []
        for i, width in enumerate(SIMPLE_CNN_FILTERS, start=1):
            layers += [conv(width), stax.Relu]
            if i % 2 == 0:
                layers.append(stax.MaxPool((2, 2), strides=(2, 2), padding="VALID"))
        return stax.serial(*layers, *head)

    if architecture == "resnet20_no_bn":
        layers = [conv(RESNET_WIDTHS[0]), stax.Relu]
        in_width = RESNET_WIDTHS[0]
        for stage, width in enumerate(RESNET_WIDTHS):
            for block in range(RESNET_BLOCKS_PER_STAGE):
                strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
                main = stax.serial(conv(width, strides), stax.Relu, conv(width))
                if strides != (1, 1) or width != in_width:
                    shortcut = conv(width, strides, size=(1, 1))
                else:
                    shortcut = stax.Identity
                layers += [stax.FanOut(2), stax.parallel(main, shortcut), stax.FanInSum, stax.Relu]
                in_width = width
        return stax.serial(*layers, *head)

    raise ValueError(f"No stax version of {architecture!r}; use simple_cnn or resnet20_no_bn.")


def time_neural_tangents(architecture: str) -> dict:
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt

    init_fn, apply_fn = stax_architecture(architecture)
    _, params = init_fn(jax.random.PRNGKey(0), (-1,) + INPUT_SHAPE)
    x, y = random_batch(FLAGS.batch_size)
    x, y = jnp.asarray(x), jnp.asarray(y)
    parameters = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))

    def sgd_step(function):
        def loss(p):
            log_probabilities = jax.nn.log_softmax(function(p, x))
            return -jnp.mean(jnp.take_along_axis(log_probabilities, y[:, None], axis=1))

        @jax.jit
        def step(p):
            value, grads = jax.value_and_grad(loss)(p)
            return jax.tree_util.tree_map(lambda a, g: a - FLAGS.learning_rate * g, p, grads), value

        return lambda: jax.block_until_ready(step(params))

    functions = {"ordinary": apply_fn}
    for order in (int(o) for o in FLAGS.orders):
        if order == 1:
            functions["order1"] = nt.linearize(apply_fn, params)
        else:
            functions[f"order{order}"] = nt.taylor_expand(apply_fn, params, order)

    steps = {key: sgd_step(function) for key, function in functions.items()}
    row = timing_row(architecture, parameters, time_interleaved(steps, FLAGS.repeats))
    logging.info("neural-tangents %s", row)
    return row


def run_neural_tangents_part(architectures: list) -> tuple[list, str]:
    """Runs this script with --part=neural_tangents in the neural-tangents Python."""
    if not architectures:
        return [], "no architecture without batch norm was requested"
    if not os.path.exists(FLAGS.nt_python):
        return [], (
            f"neural-tangents Python {FLAGS.nt_python} not found; create it with "
            "`bash bench/setup_neural_tangents.sh`"
        )
    command = [
        FLAGS.nt_python,
        os.path.abspath(__file__),
        "--part=neural_tangents",
        f"--architectures={','.join(architectures)}",
        f"--orders={','.join(FLAGS.orders)}",
        f"--batch_size={FLAGS.batch_size}",
        f"--repeats={FLAGS.repeats}",
        f"--learning_rate={FLAGS.learning_rate}",
    ]
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=FLAGS.nt_timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return [], f"the neural-tangents part timed out after {FLAGS.nt_timeout} s"
    if completed.returncode != 0:
        logging.error("neural-tangents part failed:\n%s", completed.stderr[-3000:])
        return [], f"the neural-tangents part failed with exit status {completed.returncode}"
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1])
    return result["rows"], result["versions"]


# Report.


def format_table(rows: list, orders: list) -> list:
    kinds = ["ordinary"] + [f"order{order}" for order in orders]
    header = "| architecture | parameters | ordinary step (ms) |"
    rule = "|---|---:|---:|"
    for order in orders:
        header += f" order-{order} step (ms) | order {order} / ordinary |"
        rule += "---:|---:|"
    header += f" warm-up step (s): {' / '.join(kinds)} |"
    rule += "---:|"

    lines = [header, rule]
    for row in rows:
        line = f"| {row['architecture']} | {row['parameters']:,} | {row['ordinary_ms']:.0f} |"
        for order in orders:
            milliseconds = row[f"order{order}_ms"]
            line += f" {milliseconds:.0f} | {milliseconds / row['ordinary_ms']:.2f} |"
        line += " " + " / ".join(f"{row[f'{kind}_first_s']:.1f}" for kind in kinds) + " |"
        lines.append(line)
    return lines


def format_section(tf_rows, nt_rows, nt_note, versions, seconds, load_averages) -> str:
    import keras
    import tensorflow as tf

    orders = [int(order) for order in FLAGS.orders]
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_description()}, CPU only, float32. One-minute load average at the start "
        f"and end of the run: {load_averages[0]:.1f} and {load_averages[1]:.1f}. Load from other "
        "processes makes absolute times vary between runs. Each ratio compares steps timed in "
        "the same interleaved rounds.",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({seconds:.0f} s in total).",
        "",
        f"One SGD step on one batch of {FLAGS.batch_size} random 32x32x3 inputs, 10 classes, "
        f"mean cross-entropy; median of {FLAGS.repeats} steps after a warm-up step that traces "
        "or compiles.",
        "",
        f"tfntk (TensorFlow {tf.__version__}, Keras {keras.__version__}): the ordinary step runs "
        "batch norm in training mode, the Taylor-expanded steps (`tfntk.linearize`, forward-mode "
        "JVPs) run it frozen at the expansion point. Target: order 1 within 3x ordinary.",
        "",
    ]
    lines += format_table(tf_rows, orders)
    lines += ["", f"neural-tangents ({versions}), the same architectures without batch norm "
              "written in `jax.example_libraries.stax`, jitted steps: ordinary, `nt.linearize`, "
              "`nt.taylor_expand(degree=2)`.", ""]
    if nt_rows:
        lines += format_table(nt_rows, orders)
    else:
        lines.append(f"Not measured: {nt_note}.")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    for architecture in FLAGS.architectures:
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"Unknown architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}."
            )

    if FLAGS.part == "neural_tangents":
        import jax
        import neural_tangents  # noqa: F401
        from importlib import metadata

        rows = [time_neural_tangents(name) for name in FLAGS.architectures]
        versions = (
            f"neural-tangents {metadata.version('neural-tangents')}, jax {jax.__version__}"
        )
        print(json.dumps({"rows": rows, "versions": versions}))
        return

    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    tf_rows = [time_tensorflow(name) for name in FLAGS.architectures]
    nt_rows, nt_note, versions = [], "disabled with --noneural_tangents", "not run"
    if FLAGS.neural_tangents:
        without_bn = [name for name in FLAGS.architectures if not ARCHITECTURES[name][2]]
        nt_rows, versions_or_note = run_neural_tangents_part(without_bn)
        if nt_rows:
            versions = versions_or_note
        else:
            nt_note = versions_or_note
    load_averages = (load_at_start, os.getloadavg()[0])
    section = format_section(
        tf_rows, nt_rows, nt_note, versions, time.perf_counter() - start, load_averages
    )
    print(section)
    if FLAGS.results:
        write_section(FLAGS.results, section)


if __name__ == "__main__":
    app.run(main)
