"""Tests of the model families and the model registry."""

import keras
import numpy as np
import pytest

from tfntk import models
from tfntk.models import common


def _num_weights(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def _simple_cnn_params(channels, num_classes, filters=(32, 32, 64, 64, 128, 128), kernel_taps=9):
    """Counts SimpleCNN parameters by hand: (taps * c_in + 1) * c_out per conv, plus the head."""
    total = 0
    c_in = channels
    for c_out in filters:
        total += (kernel_taps * c_in + 1) * c_out
        c_in = c_out
    return total + (c_in + 1) * num_classes


def _max_abs_difference(model_a, model_b):
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(model_a.get_weights(), model_b.get_weights())
    )


# Parameter counts for 32x32x3 inputs and 10 classes, measured once with Keras 3.15 and pinned.
# Without its projection shortcuts (16*32 + 32*64 kernel weights and 2 * (32 + 64) batch-norm
# scales and offsets), ResNet-20 would have the 269,722 trainable parameters of option A.
RESNET20_BN_TRAINABLE = 272_474
RESNET20_BN_NON_TRAINABLE = 1_568
RESNET20_NO_BN_TRAINABLE = 271_690
WRN_16_4_TRAINABLE = 2_748_890
WRN_16_4_NON_TRAINABLE = 3_616


@pytest.mark.parametrize("shape, num_classes", [((32, 32, 3), 10), ((8, 8, 1), 10), ((16, 16, 3), 100)])
def test_simple_cnn_param_count_formula(shape, num_classes):
    model = models.build_model("simple_cnn", shape, num_classes)
    assert model.count_params() == _simple_cnn_params(shape[-1], num_classes)
    assert _num_weights(model.non_trainable_variables) == 0


def test_simple_cnn_cifar_param_count():
    model = models.build_model("simple_cnn", (32, 32, 3), 10)
    assert model.count_params() == 288_298


def test_simple_cnn_1d_param_count_formula():
    model = models.build_model("simple_cnn", (40, 1), 10)
    assert model.count_params() == _simple_cnn_params(1, 10, kernel_taps=3)


def test_resnet20_param_counts():
    with_bn = models.build_model("resnet20", (32, 32, 3), 10, batch_norm=True)
    without_bn = models.build_model("resnet20", (32, 32, 3), 10, batch_norm=False)

    assert _num_weights(with_bn.trainable_variables) == RESNET20_BN_TRAINABLE
    assert _num_weights(with_bn.non_trainable_variables) == RESNET20_BN_NON_TRAINABLE
    assert _num_weights(without_bn.trainable_variables) == RESNET20_NO_BN_TRAINABLE
    assert _num_weights(without_bn.non_trainable_variables) == 0


def test_resnet20_param_count_by_layer_formula():
    # Second count: 19 convolutions and 2 projections, the head, and batch-norm scale/offset.
    conv_kernels = 9 * (3 * 16 + 16 * 16 * 6 + 16 * 32 + 32 * 32 * 5 + 32 * 64 + 64 * 64 * 5)
    projections = 16 * 32 + 32 * 64
    head = 64 * 10 + 10
    bn_channels = 16 * 7 + 32 * 7 + 64 * 7
    model = models.build_model("resnet20", (32, 32, 3), 10)
    assert _num_weights(model.trainable_variables) == conv_kernels + projections + head + 2 * bn_channels
    assert _num_weights(model.non_trainable_variables) == 2 * bn_channels


def test_wide_resnet_16_4_param_counts():
    model = models.build_model("wide_resnet", (32, 32, 3), 10, depth=16, width=4)
    assert _num_weights(model.trainable_variables) == WRN_16_4_TRAINABLE
    assert _num_weights(model.non_trainable_variables) == WRN_16_4_NON_TRAINABLE
    assert model.name == "wrn_16_4"


def test_mlp_param_count_formula():
    model = models.build_model("mlp", (8, 8, 1), 10)
    assert model.count_params() == (64 + 1) * 256 + (256 + 1) * 256 + (256 + 1) * 10


@pytest.mark.parametrize(
    "name, shape, num_classes, kwargs",
    [
        ("simple_cnn", (8, 8, 1), 10, {}),
        ("simple_cnn", (32, 32, 3), 100, {}),
        ("simple_cnn", (12, 9, 2), 3, {}),
        ("simple_cnn", (40, 1), 10, {}),
        ("simple_cnn", (4, 4, 1), 2, {"filters": (4, 4, 8, 8)}),
        ("resnet20", (8, 8, 1), 10, {}),
        ("resnet20", (32, 32, 3), 100, {"batch_norm": False}),
        ("resnet20", (40, 1), 10, {}),
        ("resnet", (7, 5, 3), 4, {"depth": 8}),
        ("wide_resnet", (8, 8, 3), 7, {"depth": 10, "width": 1}),
        ("mlp", (40, 1), 10, {}),
        ("mlp", (5,), 1, {"hidden": ()}),
    ],
)
def test_output_shape(name, shape, num_classes, kwargs):
    model = models.build_model(name, shape, num_classes, **kwargs)
    x = np.random.default_rng(0).standard_normal((3,) + shape).astype(np.float32)
    assert model.output_shape == (None, num_classes)
    assert tuple(model(x, training=False).shape) == (3, num_classes)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("simple_cnn", {}),
        ("resnet20", {}),
        ("resnet20", {"batch_norm": False}),
        ("wide_resnet", {"depth": 10, "width": 1}),
        ("mlp", {}),
    ],
)
def test_seed_determines_weights(name, kwargs):
    first = models.build_model(name, (8, 8, 1), 10, seed=3, **kwargs)
    again = models.build_model(name, (8, 8, 1), 10, seed=3, **kwargs)
    other = models.build_model(name, (8, 8, 1), 10, seed=4, **kwargs)

    assert _max_abs_difference(first, again) == 0.0
    assert _max_abs_difference(first, other) > 0.0
    kernels = [v for v in first.trainable_variables if len(v.shape) > 1]
    other_kernels = [v for v in other.trainable_variables if len(v.shape) > 1]
    for a, b in zip(kernels, other_kernels):
        assert not np.array_equal(np.asarray(a), np.asarray(b)), a.path


def test_layers_get_distinct_initial_kernels():
    model = models.build_model("simple_cnn", (8, 8, 1), 10, filters=(4, 4, 4, 4))
    second, third = model.get_layer("conv2").kernel, model.get_layer("conv3").kernel
    assert not np.array_equal(np.asarray(second), np.asarray(third))


def test_he_normal_scale_and_zero_biases():
    model = models.build_model("simple_cnn", (32, 32, 3), 10)
    kernel = np.asarray(model.get_layer("conv6").kernel)
    fan_in = 9 * 128
    assert abs(kernel.std() - np.sqrt(2.0 / fan_in)) < 0.1 * np.sqrt(2.0 / fan_in)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            assert not np.any(np.asarray(layer.bias)), layer.name


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("simple_cnn", {}, 6),
        ("resnet20", {}, 19),
        ("resnet20", {"batch_norm": False}, 19),
        ("resnet", {"depth": 32}, 31),
        ("wide_resnet", {"depth": 16, "width": 4}, 13),
        ("mlp", {"hidden": (16, 16, 16)}, 3),
    ],
)
def test_relu_layer_count(name, kwargs, expected):
    model = models.build_model(name, (32, 32, 3), 10, **kwargs)
    assert len(models.relu_layers(model)) == expected


@pytest.mark.parametrize("name", ["simple_cnn", "resnet20", "wide_resnet", "mlp"])
def test_no_fused_activations(name):
    model = models.build_model(name, (32, 32, 3), 10)
    for layer in model.layers:
        activation = getattr(layer, "activation", None)
        if activation is not None:
            assert activation is keras.activations.linear, layer.name


def test_relu_layers_topological_order():
    model = models.build_model("resnet", (8, 8, 1), 10, depth=8)
    names = [layer.name for layer in models.relu_layers(model)]
    expected = ["stem_relu"]
    for stage in (1, 2, 3):
        expected += [f"stage{stage}_block1_relu1", f"stage{stage}_block1_relu2"]
    assert names == expected


def test_relu_outputs_readable():
    model = models.build_model("resnet", (8, 8, 1), 10, depth=8)
    relus = models.relu_layers(model)
    probe = keras.Model(model.input, [layer.output for layer in relus])
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 1)).astype(np.float32)
    activations = probe(x, training=False)

    assert len(activations) == len(relus)
    assert tuple(activations[0].shape) == (2, 8, 8, 16)
    assert tuple(activations[-1].shape) == (2, 2, 2, 64)
    for activation in activations:
        assert float(np.min(np.asarray(activation))) >= 0.0


def test_batch_norm_settings_and_conv_bias():
    with_bn = models.build_model("resnet20", (8, 8, 1), 10, batch_norm=True)
    without_bn = models.build_model("resnet20", (8, 8, 1), 10, batch_norm=False)

    norms = [layer for layer in with_bn.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 21
    for layer in norms:
        assert layer.momentum == common.BATCH_NORM_MOMENTUM == 0.9
        assert layer.epsilon == common.BATCH_NORM_EPSILON == 1e-5

    convs_with_bn = [layer for layer in with_bn.layers if isinstance(layer, keras.layers.Conv2D)]
    convs_without_bn = [layer for layer in without_bn.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs_with_bn) == 21
    assert all(not layer.use_bias for layer in convs_with_bn)
    assert all(layer.use_bias for layer in convs_without_bn)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in without_bn.layers)


def test_resnet_strides_halve_resolution():
    model = models.build_model("resnet20", (32, 32, 3), 10)
    assert model.get_layer("stage1_block3_relu2").output.shape == (None, 32, 32, 16)
    assert model.get_layer("stage2_block1_relu2").output.shape == (None, 16, 16, 32)
    assert model.get_layer("stage3_block3_relu2").output.shape == (None, 8, 8, 64)


def test_simple_cnn_rejects_small_input():
    with pytest.raises(ValueError, match="spatial side >= 8"):
        models.build_model("simple_cnn", (7, 8, 1), 10)
    with pytest.raises(ValueError, match="spatial side >= 8"):
        models.build_model("simple_cnn", (6, 1), 10)


@pytest.mark.parametrize(
    "name, shape, kwargs, message",
    [
        ("resnet", (8, 8, 1), {"depth": 21}, "6n \\+ 2"),
        ("wide_resnet", (8, 8, 1), {"depth": 15}, "6n \\+ 4"),
        ("wide_resnet", (8, 8, 1), {"width": 0}, "width factor"),
        ("resnet20", (8,), {}, "rank 2 or 3"),
        ("simple_cnn", (8, 8, 1, 1), {}, "rank 2 or 3"),
        ("mlp", (0, 4), {}, "positive"),
        ("simple_cnn", (8, 8, 1), {"filters": (8, 8, 8)}, "even"),
    ],
)
def test_invalid_arguments_raise(name, shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(name, shape, 10, **kwargs)


def test_invalid_num_classes_raises():
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model("mlp", (4,), 0)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="simple_cnn"):
        models.build_model("vgg", (32, 32, 3), 10)


def test_register_model():
    name = "test_linear_model"
    models.register_model(name, lambda shape, k, seed=0: models.mlp(shape, k, seed=seed, hidden=()))
    try:
        model = models.build_model(name, (4,), 3)
        assert model.count_params() == 15
        with pytest.raises(ValueError, match="already registered"):
            models.register_model(name, models.mlp)
    finally:
        del models.MODEL_REGISTRY[name]
