"""SimpleCNN: six 3x3 convolutions with three 2x2 max-pools, global average pooling and a linear head."""

from __future__ import annotations

from typing import Sequence

import keras

from tfntk.models import common

DEFAULT_FILTERS = (32, 32, 64, 64, 128, 128)


def simple_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    seed: int = 0,
    filters: Sequence[int] = DEFAULT_FILTERS,
) -> keras.Model:
    """Builds SimpleCNN.

    Layout: conv(f1)-ReLU-conv(f2)-ReLU-maxpool, and the same for (f3, f4) and (f5, f6), then
    global average pooling and a dense layer to logits. Convolutions are 3x3 (or 3 for 1-D
    inputs), stride 1, 'same' padding, with bias. Max-pools are 2x2, stride 2, 'valid' padding,
    one after every second convolution, so each spatial side must be at least 2 ** (len(filters)
    // 2) (8 for the default: 8 -> 4 -> 2 -> 1 on digits, 32 -> 4 on CIFAR).

    Args:
      input_shape: (H, W, C) for 2-D or (L, C) for 1-D convolutions.
      num_classes: number of logits K.
      seed: initialisation seed (He-normal kernels, zero biases).
      filters: output channels of the convolutions, an even number of them.

    Returns:
      A functional model mapping (n,) + input_shape to logits (n, K).
    """
    shape = common.check_input_shape(input_shape, (2, 3), "simple_cnn")
    num_classes = common.check_num_classes(num_classes)
    if len(filters) == 0 or len(filters) % 2:
        raise ValueError(f"simple_cnn needs an even, non-zero number of filters, got {tuple(filters)}.")

    num_pools = len(filters) // 2
    min_side = 2**num_pools
    if min(shape[:-1]) < min_side:
        raise ValueError(
            f"simple_cnn with {num_pools} max-pools needs every spatial side >= {min_side}, got "
            f"input_shape {shape}. Use larger inputs or fewer filters."
        )

    rank = len(shape) - 1
    seeds = common.SeedStream(seed)
    inputs = keras.Input(shape=shape, name="inputs")
    x = inputs
    for i, width in enumerate(filters, start=1):
        x = common.conv(rank, width, 3, seeds, name=f"conv{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if i % 2 == 0:
            x = common.max_pool(rank, name=f"pool{i // 2}")(x)
    x = common.global_average_pool(rank)(x)
    logits = common.dense(num_classes, seeds, name="logits")(x)
    return keras.Model(inputs, logits, name="simple_cnn")
