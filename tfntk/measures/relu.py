"""ReLU on/off patterns and the normalised Hamming distance between two of them."""

from __future__ import annotations

import weakref
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfntk import models
from tfntk.autodiff import functional


class _ReluProbe:
    """A functional model over the same layers that returns every ReLU layer's output."""

    def __init__(self, model: keras.Model):
        layers = models.relu_layers(model)
        if not layers:
            raise ValueError(f"Model {model.name!r} has no keras.layers.ReLU layer, so it has no ReLU pattern.")
        outputs = []
        for layer in layers:
            try:
                outputs.append(layer.output)
            except (AttributeError, ValueError) as error:
                raise ValueError(
                    f"ReLU layer {layer.name!r} must be called exactly once in the model graph: {error}"
                ) from error
        self.model = keras.Model(model.inputs, outputs)
        trainable_index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        non_trainable_index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        self.trainable_indices = [trainable_index[id(v)] for v in self.model.trainable_variables]
        self.non_trainable_indices = [non_trainable_index[id(v)] for v in self.model.non_trainable_variables]
        self.patterns = tf.function(self._patterns, autograph=False)

    def _patterns(self, trainable: list, non_trainable: list, x: tf.Tensor) -> tf.Tensor:
        probe_trainable = [trainable[i] for i in self.trainable_indices]
        probe_non_trainable = [non_trainable[i] for i in self.non_trainable_indices]
        outputs, _ = self.model.stateless_call(probe_trainable, probe_non_trainable, x, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        batch = tf.shape(x)[0]
        return tf.concat([tf.reshape(output > 0, [batch, -1]) for output in outputs], axis=1)


_PROBES: "weakref.WeakKeyDictionary[keras.Model, _ReluProbe]" = weakref.WeakKeyDictionary()


def relu_patterns(
    model: keras.Model,
    x,
    *,
    weights: functional.Weights | Sequence[tf.Tensor] | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Returns which ReLU units are on (output strictly positive) for each input.

    Units are the outputs of every `keras.layers.ReLU` layer of the model graph, flattened per
    input and concatenated in topological layer order. The model runs in inference mode at
    `weights` (None: its current weights) and is not modified.

    Args:
      model: a functional Keras model with `keras.layers.ReLU` layers, each called once.
      x: inputs of shape (n,) + input_shape.
      weights: a `functional.Weights`, a trainable tensor list, or None.
      batch_size: inputs per forward pass.

    Returns:
      A bool array of shape (n, total number of ReLU units).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    probe = _PROBES.get(model)
    if probe is None:
        probe = _PROBES[model] = _ReluProbe(model)
    weights = functional.resolve_weights(model, weights)
    trainable = [tf.convert_to_tensor(w) for w in weights.trainable]
    non_trainable = [tf.convert_to_tensor(w) for w in weights.non_trainable]

    x = np.asarray(x, dtype=model.inputs[0].dtype)
    parts = [
        probe.patterns(trainable, non_trainable, tf.constant(x[start : start + batch_size])).numpy()
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts, axis=0)


def relu_distance(patterns_a: np.ndarray, patterns_b: np.ndarray) -> float:
    """Returns the normalised Hamming distance: the fraction of (input, unit) entries that differ.

    Both arguments are on/off patterns of the same shape from `relu_patterns`, for the same
    inputs in the same order.
    """
    a = np.asarray(patterns_a, dtype=bool)
    b = np.asarray(patterns_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"ReLU patterns must have the same shape, got {a.shape} and {b.shape}.")
    if a.size == 0:
        raise ValueError("ReLU distance is undefined for empty patterns.")
    return float(np.count_nonzero(a != b)) / a.size
