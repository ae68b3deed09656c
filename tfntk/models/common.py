"""Building blocks shared by the model families.

Conventions every model follows:
- Keras 3 functional models whose output is logits of shape (n, num_classes).
- Every ReLU nonlinearity is its own `keras.layers.ReLU` layer, so ReLU on/off patterns can be
  read by a second functional model over the same graph.
- Initialisation depends only on the `seed` argument: each kernel gets a He-normal initializer
  with its own seed derived from (seed, layer counter), and biases start at zero. No global
  random state is read.
- Convolutional models accept inputs (H, W, C) with 2-D convolutions or (L, C) with 1-D ones.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

# Keras updates moving statistics as `moving = momentum * moving + (1 - momentum) * batch`, so 0.9
# here is the 0.1 momentum of PyTorch's default CIFAR setups. Epsilon 1e-5 matches them as well.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5


class SeedStream:
    """Derives a distinct initializer seed for every layer from one model seed.

    The k-th call returns a 31-bit integer from `np.random.SeedSequence([seed, k])`, so two builds
    with the same seed and layer order get the same seeds, and different seeds differ.
    """

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError(f"Model seed must be a non-negative integer, got {seed}.")
        self._seed = int(seed)
        self._count = 0

    def next(self) -> int:
        state = np.random.SeedSequence([self._seed, self._count]).generate_state(1)[0]
        self._count += 1
        return int(state) % (2**31 - 1)

    def he_normal(self) -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=self.next())


def check_input_shape(
    input_shape: Sequence[int], ranks: Sequence[int] | None, model_name: str
) -> tuple:
    """Validates an input shape (without the batch axis) and returns it as a tuple of ints.

    `ranks` lists the accepted ranks, and None accepts any rank of at least 1.
    """
    shape = tuple(int(d) for d in input_shape)
    if ranks is not None and len(shape) not in ranks:
        raise ValueError(
            f"{model_name} takes inputs of rank {' or '.join(map(str, ranks))} without the batch "
            f"axis, got input_shape {shape}."
        )
    if not shape or min(shape) < 1:
        raise ValueError(f"{model_name} input_shape {shape} must have positive dimensions.")
    return shape


def check_num_classes(num_classes: int) -> int:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
    return int(num_classes)


def conv(
    rank: int,
    filters: int,
    kernel_size: int,
    seeds: SeedStream,
    strides: int = 1,
    use_bias: bool = True,
    name: str | None = None,
) -> keras.layers.Layer:
    """Returns a 'same'-padded 1-D or 2-D convolution with He-normal kernel and zero bias."""
    layer_class = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}[rank]
    return layer_class(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        kernel_initializer=seeds.he_normal(),
        bias_initializer="zeros",
        name=name,
    )


def dense(units: int, seeds: SeedStream, name: str | None = None) -> keras.layers.Dense:
    """Returns a linear layer with He-normal kernel and zero bias."""
    return keras.layers.Dense(
        units, kernel_initializer=seeds.he_normal(), bias_initializer="zeros", name=name
    )


def batch_norm(name: str | None = None) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(
        momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, name=name
    )


def global_average_pool(rank: int, name: str = "global_pool") -> keras.layers.Layer:
    layer_class = {1: keras.layers.GlobalAveragePooling1D, 2: keras.layers.GlobalAveragePooling2D}
    return layer_class[rank](name=name)


def max_pool(rank: int, name: str | None = None) -> keras.layers.Layer:
    """Returns a 2 (or 2x2) max-pool with stride 2 and 'valid' padding."""
    layer_class = {1: keras.layers.MaxPooling1D, 2: keras.layers.MaxPooling2D}[rank]
    return layer_class(pool_size=2, strides=2, padding="valid", name=name)
