"""Times a hand-written Taylor-mode order-2 step of SimpleCNN against tfntk's order-2 step.

tfntk computes the order-2 expansion with nested forward accumulators, which repeat the
first-order tangents inside the outer accumulator. This prototype propagates the Taylor
coefficients (x0, x1, x2) of x(t) = x0 + t x1 + t^2 / 2 x2 through SimpleCNN's layers by hand, as
a Taylor-mode pass would, for weights w0 + t d:

  convolution or dense layer   z1 = W0 x1 + D x0 + db,   z2 = W0 x2 + 2 D x1
  ReLU                         x1 = mask * z1,           x2 = mask * z2
  max-pool, average pool       applied to each coefficient through the primal's selection

and lets a tf.GradientTape differentiate that pass in d. It measures how fast the order-2 step
could be with a Taylor-mode pass, for SimpleCNN only, and checks that its gradient matches
tfntk's. It is a measurement, not a supported code path.

Usage, from the repository root:
  PYTHONPATH=. python bench/taylor_mode_prototype.py
"""

from __future__ import annotations

import time

import numpy as np
from absl import app
from absl import flags

import linearized  # noqa: E402  (a sibling module of this script; also defines --batch_size)

FLAGS = flags.FLAGS
flags.DEFINE_integer("prototype_repeats", 9, "Timed rounds; the median of each step is reported.")

CONV_LAYERS = 6


def max_pool_jet(a0, a1, a2):
    """Max-pools the primal and carries both coefficients through the primal's maxima."""
    import tensorflow as tf

    with tf.autodiff.ForwardAccumulator(a0, a1) as first:
        pooled = tf.nn.max_pool2d(a0, 2, 2, "VALID")
    with tf.autodiff.ForwardAccumulator(a0, a2) as second:
        pooled_again = tf.nn.max_pool2d(a0, 2, 2, "VALID")
    return pooled, first.jvp(pooled), second.jvp(pooled_again)


def simple_cnn_jet(x, weights, displacement):
    """Returns the logits' Taylor coefficients (f, J d, d^T H d) of SimpleCNN at w0 + t d.

    `weights` and `displacement` are lists in SimpleCNN's trainable-variable order: a kernel and
    a bias for each of the six convolutions, then the dense kernel and bias.
    """
    import tensorflow as tf

    def conv(inputs, kernel):
        return tf.nn.conv2d(inputs, kernel, 1, "SAME")

    a0, a1, a2 = x, None, None
    for layer in range(CONV_LAYERS):
        kernel, bias = weights[2 * layer], weights[2 * layer + 1]
        kernel_step, bias_step = displacement[2 * layer], displacement[2 * layer + 1]
        z0 = conv(a0, kernel) + bias
        if a1 is None:
            # The inputs do not depend on the weights, so their coefficients are zero.
            z1 = conv(a0, kernel_step) + bias_step
            z2 = tf.zeros_like(z1)
        else:
            z1 = conv(a1, kernel) + conv(a0, kernel_step) + bias_step
            z2 = conv(a2, kernel) + 2.0 * conv(a1, kernel_step)

        mask = tf.cast(z0 > 0, z0.dtype)
        a0, a1, a2 = tf.nn.relu(z0), mask * z1, mask * z2
        if layer % 2 == 1:
            a0, a1, a2 = max_pool_jet(a0, a1, a2)

    g0, g1, g2 = (tf.reduce_mean(a, axis=[1, 2]) for a in (a0, a1, a2))
    kernel, bias = weights[-2], weights[-1]
    kernel_step, bias_step = displacement[-2], displacement[-1]
    logits = g0 @ kernel + bias
    first = g1 @ kernel + g0 @ kernel_step + bias_step
    second = g2 @ kernel + 2.0 * (g1 @ kernel_step)
    return logits, first, second


def displaced_step(second_order_terms, expansion_point, start, x, y):
    """Returns a blocking callable running one SGD step of an order-2 expansion, and its gradient.

    `second_order_terms(displacement)` returns (f, J d, d^T H d). The step's learning rate is 0,
    so repeated calls time the same computation.
    """
    import keras
    import tensorflow as tf

    variables = [tf.Variable(value) for value in start]
    optimizer = keras.optimizers.SGD(learning_rate=0.0)
    optimizer.build(variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            displacement = [v - w for v, w in zip(variables, expansion_point)]
            logits, first, second = second_order_terms(displacement)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, tf.stop_gradient(logits) + first + 0.5 * second, from_logits=True
                )
            )
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss, gradients

    return step


def main(argv):
    del argv
    import tensorflow as tf

    from tfntk import models
    from tfntk.autodiff import functional
    from tfntk.autodiff import taylor

    x, y = linearized.random_batch(FLAGS.batch_size)
    x, y = tf.constant(x), tf.constant(y)
    base = models.build_model("simple_cnn", linearized.INPUT_SHAPE, linearized.NUM_CLASSES, seed=0)
    expansion_point = [tf.constant(v.numpy()) for v in base.trainable_variables]
    rng = np.random.default_rng(1)
    start = [w + 1e-2 * rng.standard_normal(w.shape).astype(np.float32) for w in expansion_point]

    weights = functional.Weights(expansion_point, [])
    steps = {
        "ordinary": linearized.tensorflow_step(base, x.numpy(), y.numpy(), training=True),
        "tfntk_order2": displaced_step(
            lambda d: taylor.second_order_jvp(base, weights, d, x), expansion_point, start, x, y
        ),
        "taylor_mode_order2": displaced_step(
            lambda d: simple_cnn_jet(x, expansion_point, d), expansion_point, start, x, y
        ),
    }

    _, tfntk_gradients = steps["tfntk_order2"]()
    _, prototype_gradients = steps["taylor_mode_order2"]()
    flat_tfntk = np.concatenate([np.ravel(g) for g in tfntk_gradients])
    flat_prototype = np.concatenate([np.ravel(g) for g in prototype_gradients])
    difference = np.linalg.norm(flat_prototype - flat_tfntk) / np.linalg.norm(flat_tfntk)
    print(f"relative gradient difference, Taylor-mode against tfntk: {difference:.2g}")

    times = {key: [] for key in steps}
    for _ in range(FLAGS.prototype_repeats):
        for key, step in steps.items():
            started = time.perf_counter()
            result = step()
            if isinstance(result, tuple):
                float(result[0])
            times[key].append(time.perf_counter() - started)
    ordinary = np.median(times["ordinary"])
    for key, values in times.items():
        median = np.median(values)
        print(f"{key:20s} {1e3 * median:8.1f} ms  {median / ordinary:5.2f} x ordinary")


if __name__ == "__main__":
    app.run(main)
