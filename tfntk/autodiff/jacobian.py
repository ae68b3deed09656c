"""Jacobians of a model's logits with respect to its trainable weights.

All functions evaluate the model in inference mode (batch normalization with its moving
statistics) at the given weights, without assigning to its variables, and work inside and
outside `tf.function`. Inputs are processed in blocks of `batch_size`.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import keras
import tensorflow as tf

from tfntk.autodiff import functional
from tfntk.autodiff import jacobian_factors

DEFAULT_JACOBIAN_BATCH_SIZE = 16
DEFAULT_SUMMED_BATCH_SIZE = 256


def logit_jacobian(
    model: keras.Model,
    x,
    *,
    weights: functional.Weights | Sequence[tf.Tensor] | None = None,
    batch_size: int = DEFAULT_JACOBIAN_BATCH_SIZE,
) -> list[tf.Tensor]:
    """Computes the per-example Jacobian of the logits with respect to each trainable weight.

    Uses the per-layer factors of `jacobian_factors` (one forward and K backward passes per
    block), so the model must be a functional or Sequential model with one input.

    Args:
      model: a Keras 3 model with logits output (n, K).
      x: inputs of shape (n,) + input_shape.
      weights: where to evaluate (see `functional.resolve_weights`); None means current weights.
      batch_size: inputs per block.

    Returns:
      One tensor per trainable variable, of shape (n, K) + variable shape: entry [i, k] is the
      gradient of logit k at input i. Memory: n * K * d floats.
    """
    weights, x = _prepare(model, weights, x, batch_size)
    probe = jacobian_factors.probe_for(model)
    jacobian_fn = jacobian_factors.cached_function(
        model, "logit_jacobian", lambda: lambda w, xb: jacobian_factors.per_example_jacobian(probe, w, xb)
    )
    blocks = [jacobian_fn(weights, x[start : start + batch_size]) for start in range(0, x.shape[0], batch_size)]
    return [tf.concat([block[i] for block in blocks], axis=0) for i in range(len(weights.trainable))]


def summed_logit_jacobian(
    model: keras.Model,
    x,
    *,
    weights: functional.Weights | Sequence[tf.Tensor] | None = None,
    batch_size: int = DEFAULT_SUMMED_BATCH_SIZE,
) -> list[tf.Tensor]:
    """Computes the Jacobian of the batch-summed logits: sum_i grad_w f_k(x_i) for every k.

    One forward pass and K backward passes per block of inputs.

    Args:
      model: a Keras 3 model with logits output (n, K).
      x: inputs of shape (n,) + input_shape.
      weights: where to evaluate (see `functional.resolve_weights`); None means current weights.
      batch_size: inputs per block.

    Returns:
      One tensor per trainable variable, of shape (K,) + variable shape.
    """
    weights, x = _prepare(model, weights, x, batch_size)
    if x.shape[0] == 0:
        raise ValueError("summed_logit_jacobian needs at least one input, got an empty x.")
    summed_fn = jacobian_factors.cached_function(model, "summed_logit_jacobian", lambda: _summed_block_fn(model))
    total = None
    for start in range(0, x.shape[0], batch_size):
        block = summed_fn(weights, x[start : start + batch_size])
        total = block if total is None else [t + b for t, b in zip(total, block)]
    return total


def _summed_block_fn(model: keras.Model):
    num_logits = int(model.outputs[0].shape[-1])
    model_ref = weakref.ref(model)

    def summed_block(weights: functional.Weights, x: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(weights.trainable)
            summed = tf.reduce_sum(functional.logits_at(model_ref(), weights, x), axis=0)
        per_logit = [
            tape.gradient(
                summed, weights.trainable, output_gradients=tf.one_hot(k, num_logits, dtype=summed.dtype),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            for k in range(num_logits)
        ]
        del tape
        return [tf.stack([g[i] for g in per_logit], axis=0) for i in range(len(weights.trainable))]

    return summed_block


def tensor_weights(model: keras.Model, weights: functional.Weights | Sequence | None) -> functional.Weights:
    """Resolves `weights` like `functional.resolve_weights` and converts every entry to a tensor."""
    weights = functional.resolve_weights(model, weights)
    return functional.Weights(
        [tf.convert_to_tensor(w) for w in weights.trainable],
        [tf.convert_to_tensor(w) for w in weights.non_trainable],
    )


def _prepare(model, weights, x, batch_size) -> tuple[functional.Weights, tf.Tensor]:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    x = tf.convert_to_tensor(x, dtype=model.inputs[0].dtype)
    if x.shape[0] is None:
        raise ValueError("x has no static number of inputs. Inside tf.function, give x a fixed batch size.")
    return tensor_weights(model, weights), x
