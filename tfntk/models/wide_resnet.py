"""Wide residual networks (Zagoruyko and Komodakis 2016) with pre-activation blocks, no dropout.

A 3x3 stem with 16 channels is followed by three stages of n blocks with 16k, 32k and 64k
channels, k the width factor. The first block of stages 2 and 3 has stride 2. Batch norm, ReLU,
global average pooling and a dense head end the network, whose depth is 6n + 4. A block is BN-ReLU-conv3x3-BN-ReLU-conv3x3 added to the
shortcut. Where a block changes the shape, the shortcut is a strided 1x1 convolution of the
block's pre-activated input (BN-ReLU output). Otherwise it is the block's raw input.
"""

from __future__ import annotations

from typing import Sequence

import keras

from tfntk.models import common

STEM_WIDTH = 16
STAGE_BASE_WIDTHS = (16, 32, 64)


def wide_resnet(
    input_shape: Sequence[int],
    num_classes: int,
    seed: int = 0,
    depth: int = 16,
    width: int = 4,
) -> keras.Model:
    """Builds WRN-depth-width, for example WRN-16-4 (about 2.75M parameters on CIFAR-10).

    Args:
      input_shape: (H, W, C) for 2-D or (L, C) for 1-D convolutions. Strided convolutions use
        'same' padding, so any positive size works.
      num_classes: number of logits K.
      seed: initialisation seed (He-normal kernels, batch-norm scale 1 and offset 0, zero head bias).
      depth: 6n + 4 for n blocks per stage: 10, 16, 22, 28, 40, ...
      width: width factor k multiplying the stage widths.

    Returns:
      A functional model mapping (n,) + input_shape to logits (n, K), named "wrn_<depth>_<width>".
      Convolutions have no bias, and batch norm uses momentum 0.9 and epsilon 1e-5.
    """
    name = f"wrn_{depth}_{width}"
    shape = common.check_input_shape(input_shape, (2, 3), name)
    num_classes = common.check_num_classes(num_classes)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28), got {depth}.")
    if width < 1:
        raise ValueError(f"WideResNet width factor must be a positive integer, got {width}.")

    blocks_per_stage = (depth - 4) // 6
    rank = len(shape) - 1
    seeds = common.SeedStream(seed)

    inputs = keras.Input(shape=shape, name="inputs")
    x = common.conv(rank, STEM_WIDTH, 3, seeds, use_bias=False, name="stem_conv")(inputs)
    for stage, base_width in enumerate(STAGE_BASE_WIDTHS, start=1):
        for block in range(1, blocks_per_stage + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _preactivation_block(
                x, base_width * width, strides, rank, seeds, f"stage{stage}_block{block}"
            )

    x = common.batch_norm(name="final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = common.global_average_pool(rank)(x)
    logits = common.dense(num_classes, seeds, name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def _preactivation_block(x, width, strides, rank, seeds, name):
    """Applies BN-ReLU-conv-BN-ReLU-conv and adds the shortcut."""
    preactivated = common.batch_norm(name=f"{name}_bn1")(x)
    preactivated = keras.layers.ReLU(name=f"{name}_relu1")(preactivated)

    shortcut = x
    if strides != 1 or x.shape[-1] != width:
        shortcut = common.conv(
            rank, width, 1, seeds, strides=strides, use_bias=False, name=f"{name}_shortcut_conv"
        )(preactivated)

    y = common.conv(rank, width, 3, seeds, strides=strides, use_bias=False, name=f"{name}_conv1")(
        preactivated
    )
    y = common.batch_norm(name=f"{name}_bn2")(y)
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    y = common.conv(rank, width, 3, seeds, use_bias=False, name=f"{name}_conv2")(y)
    return keras.layers.Add(name=f"{name}_add")([shortcut, y])
