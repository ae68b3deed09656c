"""Multilayer perceptron on flattened inputs."""

from __future__ import annotations

from typing import Sequence

import keras

from tfntk.models import common


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    seed: int = 0,
    hidden: Sequence[int] = (256, 256),
) -> keras.Model:
    """Builds flatten -> [Dense(h) -> ReLU for h in hidden] -> Dense(num_classes).

    Args:
      input_shape: any input shape without the batch axis. Inputs are flattened.
      num_classes: number of logits K.
      seed: initialisation seed (He-normal kernels, zero biases).
      hidden: widths of the hidden layers. An empty tuple gives a linear (softmax regression) model.

    Returns:
      A functional model mapping (n,) + input_shape to logits (n, K).
    """
    shape = common.check_input_shape(input_shape, None, "mlp")
    num_classes = common.check_num_classes(num_classes)
    if any(int(width) < 1 for width in hidden):
        raise ValueError(f"mlp hidden widths must be positive, got {tuple(hidden)}.")

    seeds = common.SeedStream(seed)
    inputs = keras.Input(shape=shape, name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, width in enumerate(hidden, start=1):
        x = common.dense(int(width), seeds, name=f"dense{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    logits = common.dense(num_classes, seeds, name="logits")(x)
    return keras.Model(inputs, logits, name="mlp")
