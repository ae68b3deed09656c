"""CIFAR ResNet v1 (He et al. 2016, "Deep residual learning for image recognition", section 4.2).

A 3x3 stem with 16 channels, three stages of n basic blocks with 16, 32 and 64 channels (stride 2
at the first block of stages 2 and 3), global average pooling and a dense head: depth 6n + 2.
A basic block is conv3x3-BN-ReLU-conv3x3-BN, added to the shortcut, then ReLU.

Where a block changes the shape, the shortcut is a strided 1x1 convolution (followed by batch norm
when enabled): the projection shortcut, option B of the paper. The paper's CIFAR networks use
option A (zero-padded identity) instead, which has no parameters. Projection adds 2,560 kernel
weights to ResNet-20 (16x32 + 32x64) and, with batch norm, 192 scale and offset parameters.
"""

from __future__ import annotations

from typing import Sequence

import keras

from tfntk.models import common

STAGE_WIDTHS = (16, 32, 64)


def resnet(
    input_shape: Sequence[int],
    num_classes: int,
    seed: int = 0,
    depth: int = 20,
    batch_norm: bool = True,
) -> keras.Model:
    """Builds a CIFAR ResNet v1 of the given depth.

    Args:
      input_shape: (H, W, C) for 2-D or (L, C) for 1-D convolutions. Strided convolutions use
        'same' padding, so any positive size works (a side of 1 stays 1).
      num_classes: number of logits K.
      seed: initialisation seed (He-normal kernels, zero biases, batch-norm scale 1, offset 0).
      depth: 6n + 2 for n blocks per stage: 20, 32, 44, 56, 110, ...
      batch_norm: with True, every convolution is followed by batch normalization (momentum 0.9,
        epsilon 1e-5) and has no bias. With False, there is no normalization and convolutions
        have biases.

    Returns:
      A functional model mapping (n,) + input_shape to logits (n, K), named "resnet<depth>".
    """
    shape = common.check_input_shape(input_shape, (2, 3), f"resnet{depth}")
    num_classes = common.check_num_classes(num_classes)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}.")

    blocks_per_stage = (depth - 2) // 6
    rank = len(shape) - 1
    seeds = common.SeedStream(seed)

    inputs = keras.Input(shape=shape, name="inputs")
    x = common.conv(rank, STAGE_WIDTHS[0], 3, seeds, use_bias=not batch_norm, name="stem_conv")(inputs)
    if batch_norm:
        x = common.batch_norm(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)

    for stage, width in enumerate(STAGE_WIDTHS, start=1):
        for block in range(1, blocks_per_stage + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, width, strides, batch_norm, rank, seeds, f"stage{stage}_block{block}")

    x = common.global_average_pool(rank)(x)
    logits = common.dense(num_classes, seeds, name="logits")(x)
    return keras.Model(inputs, logits, name=f"resnet{depth}")


def resnet20(
    input_shape: Sequence[int], num_classes: int, seed: int = 0, batch_norm: bool = True
) -> keras.Model:
    """Builds ResNet-20, the depth-20 `resnet` with three blocks per stage."""
    return resnet(input_shape, num_classes, seed=seed, depth=20, batch_norm=batch_norm)


def _basic_block(x, width, strides, batch_norm, rank, seeds, name):
    """Applies conv-BN-ReLU-conv-BN, adds the (projected) shortcut and applies ReLU."""
    use_bias = not batch_norm
    shortcut = x
    if strides != 1 or x.shape[-1] != width:
        shortcut = common.conv(
            rank, width, 1, seeds, strides=strides, use_bias=use_bias, name=f"{name}_shortcut_conv"
        )(x)
        if batch_norm:
            shortcut = common.batch_norm(name=f"{name}_shortcut_bn")(shortcut)

    y = common.conv(rank, width, 3, seeds, strides=strides, use_bias=use_bias, name=f"{name}_conv1")(x)
    if batch_norm:
        y = common.batch_norm(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = common.conv(rank, width, 3, seeds, use_bias=use_bias, name=f"{name}_conv2")(y)
    if batch_norm:
        y = common.batch_norm(name=f"{name}_bn2")(y)

    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_relu2")(y)
