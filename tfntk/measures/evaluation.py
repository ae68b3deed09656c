"""Loss, error and predictions of a model at given weights, and batch-norm recomputation."""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from tfntk.autodiff import functional
from tfntk.autodiff.functional import Weights


def _batches(x: np.ndarray, batch_size: int):
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


def logits(model: keras.Model, weights: Weights, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Returns inference-mode logits of shape (n, K) at `weights`, computed in batches."""
    call = _inference_fn(model)
    parts = [call(weights.trainable, weights.non_trainable, tf.constant(batch)).numpy() for batch in _batches(x, batch_size)]
    return np.concatenate(parts, axis=0)


def loss_and_error(logits_array: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Returns (mean cross-entropy, error rate) for logits (n, K) and integer labels (n,)."""
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits_array, from_logits=True)
    loss = float(np.mean(np.asarray(losses, dtype=np.float64)))
    error = float(np.mean(np.argmax(logits_array, axis=-1) != labels))
    return loss, error


# One traced function per model and mode, reused for every weight vector.
_INFERENCE_FNS = weakref.WeakKeyDictionary()
_TRAINING_STATE_FNS = weakref.WeakKeyDictionary()


def _inference_fn(model: keras.Model):
    if model not in _INFERENCE_FNS:

        @tf.function(reduce_retracing=True)
        def call(trainable, non_trainable, x):
            return functional.logits_at(model, Weights(trainable, non_trainable), x, training=False)

        _INFERENCE_FNS[model] = call
    return _INFERENCE_FNS[model]


def _training_state_fn(model: keras.Model):
    if model not in _TRAINING_STATE_FNS:

        @tf.function(reduce_retracing=True)
        def call(trainable, non_trainable, x):
            _, state = functional.logits_and_state_at(model, Weights(trainable, non_trainable), x, training=True)
            return state

        _TRAINING_STATE_FNS[model] = call
    return _TRAINING_STATE_FNS[model]


def batch_norm_moving_indices(model: keras.Model) -> list[tuple[int, float]]:
    """Returns (index in `model.non_trainable_variables`, momentum) of every BN moving statistic."""
    positions = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    indices = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            for variable in (layer.moving_mean, layer.moving_variance):
                indices.append((positions[id(variable)], float(layer.momentum)))
    return indices


def has_batch_norm(model: keras.Model) -> bool:
    return bool(batch_norm_moving_indices(model))


def recompute_batch_norm_statistics(
    model: keras.Model, weights: Weights, x: np.ndarray, batch_size: int = 500
) -> Weights:
    """Returns `weights` with every batch-norm moving mean and variance recomputed on `x`.

    Each statistic becomes the example-weighted mean, over batches of `x`, of that layer's batch
    statistic (Keras' biased batch variance) with all earlier layers in training mode. A moving
    average with momentum close to 1 converges to the same value over many passes. The
    computation starts each batch from zero moving statistics, so one training-mode call
    returns `(1 - momentum) * batch_statistic` exactly for each of them.

    Args:
      model: the network.
      weights: trainable weights to evaluate; their non-trainable state is replaced.
      x: training inputs, shape (n, ...).
      batch_size: batch size of the recomputation; batch statistics depend on it.
    """
    indices = batch_norm_moving_indices(model)
    if not indices:
        return weights
    zero_state = list(weights.non_trainable)
    for index, _ in indices:
        zero_state[index] = tf.zeros_like(zero_state[index])
    update = _training_state_fn(model)

    sums = {index: 0.0 for index, _ in indices}
    for batch in _batches(x, batch_size):
        state = update(weights.trainable, zero_state, tf.constant(batch))
        for index, momentum in indices:
            sums[index] += state[index].numpy().astype(np.float64) * (len(batch) / (1.0 - momentum))

    new_state = list(weights.non_trainable)
    for index, _ in indices:
        new_state[index] = tf.constant((sums[index] / len(x)).astype(np.float32))
    return Weights(list(weights.trainable), new_state)
