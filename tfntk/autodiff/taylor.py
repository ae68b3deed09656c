"""Forward-mode Taylor terms of a model's logits in its weights.

For a model f(x; w), an expansion point w0 and a weight displacement d, this module computes

    first-order term   J(x; w0) d                     (one JVP),
    second-order term  d^T H_k(x; w0) d  per logit k  (a JVP of that JVP),

with `tf.autodiff.ForwardAccumulator`, so neither the Jacobian J nor the Hessians H_k are ever
materialised. By an operation count, an order-1 term costs about two forward passes and an
order-2 term about four (estimates; `bench/linearized.py` measures whole training steps).

The primals are the expansion-point tensors passed into `model.stateless_call(..., training=False)`,
so batch norm runs in inference mode with the expansion point's moving statistics, and the
tangents are the displacements d. The terms are differentiable in d: a `tf.GradientTape` that
watches d (for example because d = w - w0 with w a trainable variable) differentiates through the
tangents, which is how a Taylor-expanded model trains.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfntk.autodiff import functional

SUPPORTED_ORDERS = (1, 2)


def _check_tangents(weights: functional.Weights, tangents: Sequence[tf.Tensor]) -> list:
    tangents = [tf.convert_to_tensor(t) for t in tangents]
    if len(tangents) != len(weights.trainable):
        raise ValueError(
            f"Got {len(tangents)} tangent tensors for {len(weights.trainable)} trainable weight "
            "tensors; pass one tangent per tensor, in model.trainable_variables order."
        )
    for index, (tangent, primal) in enumerate(zip(tangents, weights.trainable)):
        if tuple(tangent.shape) != tuple(primal.shape):
            raise ValueError(
                f"Tangent {index} has shape {tuple(tangent.shape)} but its weight tensor has "
                f"shape {tuple(primal.shape)}; pass tangents shaped like the weights."
            )
    return tangents


def _primals(weights: functional.Weights) -> list:
    # Reads variables into tensors, because variable primals fail inside tf.function.
    return [tf.convert_to_tensor(w) for w in weights.trainable]


def jvp(
    model: keras.Model,
    weights: functional.Weights,
    tangents: Sequence[tf.Tensor],
    x: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Computes the logits and their directional derivative along `tangents`.

    Args:
      model: a Keras 3 model whose outputs are logits of shape (n, K).
      weights: the expansion point w0; its non-trainable state feeds batch norm (inference mode).
      tangents: the direction d, tensors shaped like `weights.trainable`, in that order.
      x: inputs, shape (n, ...).

    Returns:
      `(f, jvp)`, both of shape (n, K): f = f(x; w0) and jvp = J(x; w0) d. A `tf.GradientTape`
      differentiates both in `weights` and `tangents`.
    """
    tangents = _check_tangents(weights, tangents)
    primals = _primals(weights)

    with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
        logits = functional.logits_at(model, functional.Weights(primals, weights.non_trainable), x)

    return logits, accumulator.jvp(logits, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _nested_jvps(
    model: keras.Model, primals: list, non_trainable: list, tangents: list, x: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Returns f, J d and d^T H d from forward-over-forward accumulation."""
    with tf.autodiff.ForwardAccumulator(primals, tangents) as outer:
        with tf.autodiff.ForwardAccumulator(primals, tangents) as inner:
            logits = functional.logits_at(model, functional.Weights(primals, non_trainable), x)
        first = inner.jvp(logits, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    second = outer.jvp(first, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return logits, first, second


def _tangent_cotangents(
    model: keras.Model,
    primals: list,
    non_trainable: list,
    tangents: list,
    x: tf.Tensor,
    first_cotangent: tf.Tensor,
    second_cotangent: tf.Tensor,
) -> list:
    """Returns J^T g1 + 2 H[g2] d, the gradient of <g1, J d> + <g2, d^T H d> in d.

    Both parts are one reverse pass over a single JVP (reverse-over-forward): the gradient in w of
    <g1, f(w)> is J^T g1, and the gradient in w of <g2, J(w) d> is H[g2] d, with
    H[g2] = sum over (i, k) of g2[i, k] H_k(x_i), because each H_k is symmetric.
    """
    with tf.GradientTape() as tape:
        tape.watch(primals)
        logits, first = jvp(model, functional.Weights(primals, non_trainable), tangents, x)
        objective = tf.reduce_sum(first_cotangent * logits) + 2.0 * tf.reduce_sum(
            second_cotangent * first
        )

    return tape.gradient(objective, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def second_order_jvp(
    model: keras.Model,
    weights: functional.Weights,
    tangents: Sequence[tf.Tensor],
    x: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Computes the logits with their first and second directional derivatives along `tangents`.

    The values come from nested forward accumulators (forward-over-forward): the outer one
    differentiates the inner one's JVP along the same direction. A `tf.GradientTape` does not
    differentiate that nesting correctly in the tangents. In TensorFlow 2.21 it drops the path
    through the inner tangents inside `tf.function`, which halves the gradient of d^T H d, and
    it raises an InternalError when executing eagerly. So the gradient in the tangents is
    supplied explicitly, by reverse-over-forward differentiation that costs one JVP and one
    backward pass.

    Args:
      model: a Keras 3 model whose outputs are logits of shape (n, K).
      weights: the expansion point w0; its non-trainable state feeds batch norm (inference mode).
      tangents: the direction d, tensors shaped like `weights.trainable`, in that order.
      x: inputs, shape (n, ...).

    Returns:
      `(f, jvp, quadratic)`, each of shape (n, K): f = f(x; w0), jvp = J(x; w0) d and
      quadratic[i, k] = d^T H_k(x_i; w0) d, with H_k the Hessian of logit k in the weights.
      They are differentiable in `tangents` (first derivatives only). Gradients in `weights` and
      `x` are not provided.
    """
    tangents = _check_tangents(weights, tangents)
    primals = _primals(weights)
    non_trainable = list(weights.non_trainable)

    stopped = [tf.stop_gradient(t) for t in tangents]
    logits, first, second = _nested_jvps(model, primals, non_trainable, stopped, x)
    logits = tf.stop_gradient(logits)

    @tf.custom_gradient
    def attach_gradient(*tangent_args):
        def backward(first_cotangent, second_cotangent):
            return _tangent_cotangents(
                model,
                primals,
                non_trainable,
                list(tangent_args),
                x,
                _zeros_if_none(first_cotangent, first),
                _zeros_if_none(second_cotangent, second),
            )

        return (tf.identity(first), tf.identity(second)), backward

    first, second = attach_gradient(*tangents)
    return logits, first, second


def _zeros_if_none(cotangent, like: tf.Tensor) -> tf.Tensor:
    return tf.zeros_like(like) if cotangent is None else cotangent


def taylor_logits(
    model: keras.Model,
    weights: functional.Weights,
    tangents: Sequence[tf.Tensor],
    x: tf.Tensor,
    order: int = 1,
) -> tf.Tensor:
    """Evaluates the Taylor expansion of the logits around `weights`, displaced by `tangents`.

    Order 1 returns f(x; w0) + J(x; w0) d. Order 2 adds 1/2 d^T H_k(x; w0) d to each logit k.

    Args:
      model: a Keras 3 model whose outputs are logits of shape (n, K).
      weights: the expansion point w0.
      tangents: the displacement d = w - w0, tensors shaped like `weights.trainable`.
      x: inputs, shape (n, ...).
      order: 1 or 2.

    Returns:
      Logits of the expanded model, shape (n, K).
    """
    if order not in SUPPORTED_ORDERS:
        raise ValueError(f"Taylor order {order!r} is not supported; use 1 or 2.")

    if order == 1:
        logits, first = jvp(model, weights, tangents, x)
        return logits + first

    logits, first, second = second_order_jvp(model, weights, tangents, x)
    return logits + first + 0.5 * second
