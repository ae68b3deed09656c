"""Functional evaluation of a Keras 3 model at weights given as tensors.

A weight vector is the list of tensors in `model.trainable_variables` order; the model state is
the list of tensors in `model.non_trainable_variables` order (batch-norm moving statistics).
Nothing here assigns to the model's variables, so any number of weight vectors can be evaluated
with one model object, inside or outside `tf.function`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import keras
import tensorflow as tf


class Weights(NamedTuple):
    """A point in weight space together with the model state evaluated there.

    Attributes:
      trainable: tensors in `model.trainable_variables` order.
      non_trainable: tensors in `model.non_trainable_variables` order.
    """

    trainable: list
    non_trainable: list


def current_weights(model: keras.Model) -> Weights:
    """Returns a copy of the model's current variables as tensors."""
    return Weights(
        [tf.identity(v.value) for v in model.trainable_variables],
        [tf.identity(v.value) for v in model.non_trainable_variables],
    )


def resolve_weights(model: keras.Model, weights: Weights | Sequence[tf.Tensor] | None) -> Weights:
    """Accepts None (the model's current weights), a `Weights` or a trainable list alone.

    A trainable list alone is paired with the model's current non-trainable state.
    """
    if weights is None:
        return current_weights(model)
    if isinstance(weights, Weights):
        return weights
    trainable = list(weights)
    if len(trainable) != len(model.trainable_variables):
        raise ValueError(
            f"Got {len(trainable)} weight tensors but the model has "
            f"{len(model.trainable_variables)} trainable variables; pass tensors in "
            "model.trainable_variables order."
        )
    return Weights(trainable, [tf.identity(v.value) for v in model.non_trainable_variables])


def logits_at(model: keras.Model, weights: Weights, x: tf.Tensor, training: bool = False) -> tf.Tensor:
    """Evaluates the model's outputs at `weights` without touching its variables.

    Args:
      model: a Keras 3 model whose outputs are logits of shape (n, K).
      weights: where to evaluate.
      x: inputs, shape (n, ...).
      training: False evaluates batch norm with its moving statistics.

    Returns:
      Logits of shape (n, K).
    """
    outputs, _ = model.stateless_call(weights.trainable, weights.non_trainable, x, training=training)
    return outputs


def logits_and_state_at(
    model: keras.Model, weights: Weights, x: tf.Tensor, training: bool = True
) -> tuple[tf.Tensor, list]:
    """Like `logits_at`, and also returns the updated non-trainable state (training mode)."""
    return model.stateless_call(weights.trainable, weights.non_trainable, x, training=training)


def interpolate(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor], alpha: float) -> list:
    """Returns `alpha * a + (1 - alpha) * b` tensor by tensor."""
    return [alpha * x + (1.0 - alpha) * y for x, y in zip(a, b)]


def flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Concatenates tensors into one vector of shape (d,)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(vector: tf.Tensor, like: Sequence[tf.Tensor]) -> list:
    """Splits a (d,) vector into tensors shaped like `like`."""
    sizes = [int(tf.size(t)) for t in like]
    parts = tf.split(vector, sizes)
    return [tf.reshape(p, t.shape) for p, t in zip(parts, like)]


def dot(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor]) -> tf.Tensor:
    """Inner product of two weight vectors given as tensor lists."""
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def norm(a: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.sqrt(dot(a, a))
