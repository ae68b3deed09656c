"""Splits the kernel time of an ordinary and a Taylor-expanded training step by TensorFlow op.

`bench/linearized.py` times whole steps. This script shows where an order-2 step spends its time.
It first counts the convolution ops in the traced forward passes (primal, order 1, order 2) before
graph optimisation. Then it traces `--steps` calls of each step with `tf.profiler`, reads the
XPlane trace and sums the kernel time of each op type over all executor threads (so with two
threads the total can exceed the wall time). Each step is the same SGD step as in
`bench/linearized.py`, on one batch of random 32x32x3 inputs (`--batch_size` and `--learning_rate`
are that script's flags).

Usage, from the repository root:
  PYTHONPATH=. python bench/profile_taylor_step.py --architecture=simple_cnn
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

from absl import app
from absl import flags

import linearized  # noqa: E402  (a sibling module of this script; also defines --batch_size)

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "architecture", "simple_cnn", ["simple_cnn", "resnet20", "resnet20_no_bn"],
    "Architecture, as in bench/linearized.py.",
)
flags.DEFINE_list("kinds", ["ordinary", "order1", "order2"], "Steps to profile.")
flags.DEFINE_integer("steps", 3, "Profiled calls of each step; the table shows the mean per call.")
flags.DEFINE_integer("top", 12, "Op types listed per step.")

# Name prefix of the trace lines that hold the ops run by TensorFlow's executor threads.
EXECUTOR_LINE_PREFIX = "tf_Compute"


def build_steps() -> dict:
    """Returns {kind: blocking callable running one SGD step} for the requested kinds."""
    from tfntk import linearize
    from tfntk import models

    name, kwargs, _ = linearized.ARCHITECTURES[FLAGS.architecture]
    x, y = linearized.random_batch(FLAGS.batch_size)
    base = models.build_model(
        name, linearized.INPUT_SHAPE, linearized.NUM_CLASSES, seed=0, **kwargs
    )
    expansions = {
        kind: linearize.linearize(base, order=int(kind[-1]))
        for kind in FLAGS.kinds
        if kind != "ordinary"
    }
    steps = {}
    for kind in FLAGS.kinds:
        model = base if kind == "ordinary" else expansions[kind]
        steps[kind] = linearized.tensorflow_step(model, x, y, training=True)
    return steps


def kernel_milliseconds(trace_directory: str) -> collections.Counter:
    """Sums event durations per op type over the executor threads of an XPlane trace (ms)."""
    # NOTE: this is an internal module path of TensorFlow 2.21, so other versions may move it.
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(trace_directory, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as handle:
        space.ParseFromString(handle.read())

    totals = collections.Counter()
    for plane in space.planes:
        names = {key: metadata.name for key, metadata in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith(EXECUTOR_LINE_PREFIX):
                continue
            for event in line.events:
                op_type = names.get(event.metadata_id, "unknown").split(":")[-1]
                totals[op_type] += event.duration_ps / 1e9
    return totals


def convolution_counts() -> dict:
    """Counts convolution ops in the traced forward passes, before graph optimisation.

    Returns {pass: Counter of op type}, for the primal pass, the order-1 pass (`taylor.jvp`) and
    the nested order-2 pass, with the ops of every function the graph calls.
    """
    import tensorflow as tf

    from tfntk import models
    from tfntk.autodiff import functional
    from tfntk.autodiff import taylor

    name, kwargs, _ = linearized.ARCHITECTURES[FLAGS.architecture]
    x, _ = linearized.random_batch(FLAGS.batch_size)
    x = tf.constant(x)
    base = models.build_model(
        name, linearized.INPUT_SHAPE, linearized.NUM_CLASSES, seed=0, **kwargs
    )
    weights = functional.Weights(
        [tf.constant(v.numpy()) for v in base.trainable_variables],
        [tf.constant(v.numpy()) for v in base.non_trainable_variables],
    )
    tangents = [tf.ones_like(w) for w in weights.trainable]
    passes = {
        "primal": lambda: functional.logits_at(base, weights, x),
        "order 1": lambda: taylor.jvp(base, weights, tangents, x),
        "order 2": lambda: taylor.second_order_jvp(base, weights, tangents, x),
    }

    counts = {}
    for key, function in passes.items():
        graph_def = tf.function(function).get_concrete_function().graph.as_graph_def()
        nodes = list(graph_def.node)
        for library_function in graph_def.library.function:
            nodes.extend(library_function.node_def)
        counts[key] = collections.Counter(node.op for node in nodes if "Conv" in node.op)
    return counts


def main(argv):
    del argv
    import tensorflow as tf

    for key, counts in convolution_counts().items():
        listed = ", ".join(f"{op_type} {count}" for op_type, count in sorted(counts.items()))
        print(f"{FLAGS.architecture} {key} pass, convolution ops before graph optimisation: "
              f"{listed}")

    steps = build_steps()
    for step in steps.values():
        step()

    for kind, step in steps.items():
        with tempfile.TemporaryDirectory() as trace_directory:
            tf.profiler.experimental.start(trace_directory)
            for _ in range(FLAGS.steps):
                step()
            tf.profiler.experimental.stop()
            totals = kernel_milliseconds(trace_directory)

        # The executor's per-step "Process" events enclose the op events, so they are left out.
        totals.pop("Process", None)
        total = sum(totals.values()) / FLAGS.steps
        print(f"\n{FLAGS.architecture} {kind}: {total:.1f} ms of op time per step")
        for op_type, milliseconds in totals.most_common(FLAGS.top):
            print(f"  {milliseconds / FLAGS.steps:8.1f} ms  {op_type}")


if __name__ == "__main__":
    app.run(main)
