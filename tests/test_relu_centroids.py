"""Tests of kernel distance and velocity, ReLU pattern distance and logit gradient centroids."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfntk.autodiff import functional
from tfntk.autodiff import jacobian
from tfntk.measures import centroids
from tfntk.measures import kernel
from tfntk.measures import relu


def _relu_net(input_dim=5, hidden=(6, 4), num_classes=3, use_bias=True, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    x = inputs
    for width in hidden:
        x = keras.layers.ReLU()(keras.layers.Dense(width, use_bias=use_bias)(x))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def _bn_conv_net(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    rng = np.random.default_rng(seed + 1)
    for variable in model.non_trainable_variables:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    return model


def _inputs(model, n, seed=0):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_kernel_distance_identical_is_zero():
    gram = np.random.default_rng(0).normal(size=(4, 4, 3, 3)).astype("float32")
    assert kernel.kernel_distance(gram, gram) == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_scale_invariant():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    assert kernel.kernel_distance(a, 7.5 * b) == pytest.approx(kernel.kernel_distance(a, b), abs=1e-12)
    assert kernel.kernel_distance(a, 3.0 * a) == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_hand_value():
    identity = np.eye(2)
    ones = tf.ones((2, 2))
    # <I, 1>_F = 2, |I|_F = sqrt(2), |1|_F = 2.
    assert kernel.kernel_distance(identity, ones) == pytest.approx(1.0 - 1.0 / np.sqrt(2.0), abs=1e-12)
    assert isinstance(kernel.kernel_distance(identity, ones), float)


def test_kernel_distance_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        kernel.kernel_distance(np.eye(2), np.eye(3))
    with pytest.raises(ValueError, match="all-zero"):
        kernel.kernel_distance(np.zeros((2, 2)), np.eye(2))


def _rotating_kernels(epochs, rate):
    """Kernels [cos(rate t), sin(rate t)], whose distance over a gap g is 1 - cos(rate g)."""
    return [np.array([np.cos(rate * t), np.sin(rate * t)]) for t in epochs]


def test_kernel_velocity_regular_snapshots():
    epochs = np.round(np.arange(0.0, 1.01, 0.1), 10)
    starts, velocities = kernel.kernel_velocity(epochs, _rotating_kernels(epochs, 0.5), dt=0.4)
    # From t = 0.7 the nearest later snapshot to t + 0.4 is 1.0 (0.1 away, within dt / 2);
    # from 0.8 on it is more than 0.2 away.
    np.testing.assert_allclose(starts, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    gaps = np.array([0.4] * 7 + [0.3])
    np.testing.assert_allclose(velocities, (1.0 - np.cos(0.5 * gaps)) / gaps, rtol=1e-9)


def test_kernel_velocity_irregular_snapshots():
    epochs = [0.0, 0.35, 0.5, 0.9, 2.0]
    starts, velocities = kernel.kernel_velocity(epochs, _rotating_kernels(epochs, 1.0), dt=0.4, tolerance=0.1)
    # 0.0 -> 0.35 (0.05 off), 0.35 -> 0.9 (0.15 off: skipped), 0.5 -> 0.9 (exact), 0.9 -> none.
    np.testing.assert_allclose(starts, [0.0, 0.5])
    np.testing.assert_allclose(velocities, [(1 - np.cos(0.35)) / 0.35, (1 - np.cos(0.4)) / 0.4], rtol=1e-9)


def test_kernel_velocity_bad_input():
    with pytest.raises(ValueError, match="increasing"):
        kernel.kernel_velocity([0.0, 0.0], [np.eye(2), np.eye(2)])
    with pytest.raises(ValueError, match="one epoch per kernel"):
        kernel.kernel_velocity([0.0], [np.eye(2), np.eye(2)])


def test_relu_patterns_shape_and_values():
    model = _relu_net()
    x = _inputs(model, 7)
    patterns = relu.relu_patterns(model, x, batch_size=3)
    w1, b1, w2, b2 = [v.numpy() for v in model.trainable_variables[:4]]
    first = x @ w1 + b1
    second = np.maximum(first, 0) @ w2 + b2
    assert patterns.dtype == bool
    assert patterns.shape == (7, 10)
    np.testing.assert_array_equal(patterns, np.concatenate([first > 0, second > 0], axis=1))


def test_relu_distance_self_is_zero():
    model = _bn_conv_net()
    x = _inputs(model, 6)
    patterns = relu.relu_patterns(model, x)
    assert patterns.shape == (6, 5 * 5 * 3)
    assert relu.relu_distance(patterns, relu.relu_patterns(model, x)) == 0.0


def test_relu_distance_inverted_pattern_is_one():
    model = _relu_net(hidden=(8,), use_bias=False)
    x = _inputs(model, 9)
    weights = functional.current_weights(model)
    negated = [-weights.trainable[0]] + list(weights.trainable[1:])
    before = [v.numpy().copy() for v in model.variables]

    patterns = relu.relu_patterns(model, x)
    inverted = relu.relu_patterns(model, x, weights=negated)

    assert np.all(np.abs(x @ weights.trainable[0].numpy()) > 0)
    assert relu.relu_distance(patterns, inverted) == 1.0
    for value, variable in zip(before, model.variables):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_relu_distance_hand_value_and_bad_input():
    a = np.array([[True, False], [True, True]])
    b = np.array([[True, True], [False, True]])
    assert relu.relu_distance(a, b) == 0.5
    with pytest.raises(ValueError, match="same shape"):
        relu.relu_distance(a, b[:1])


def test_relu_patterns_without_relu_raise():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no keras.layers.ReLU"):
        relu.relu_patterns(model, np.zeros((2, 3), "float32"))


def _brute_force_centroids(model, x, weights):
    """Per-example gradients of each logit, one GradientTape call per (input, logit)."""
    weights = jacobian.tensor_weights(model, weights)
    rows = []
    for k in range(model.outputs[0].shape[-1]):
        total = 0.0
        for i in range(len(x)):
            with tf.GradientTape() as tape:
                tape.watch(weights.trainable)
                logit = functional.logits_at(model, weights, tf.constant(x[i : i + 1]))[0, k]
            total = total + functional.flatten(tape.gradient(logit, weights.trainable)).numpy().astype(np.float64)
        rows.append(total / len(x))
    return np.stack(rows)


def test_centroids_match_per_example_mean():
    model = _bn_conv_net()
    other = _bn_conv_net(seed=4)
    x = _inputs(model, 5)
    weights = functional.current_weights(other)

    result = centroids.logit_gradient_centroids(model, x, weights=weights, batch_size=2)

    expected = _brute_force_centroids(model, x, weights)
    assert result.shape == (4, sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_centroid_alignment_values():
    mu = np.random.default_rng(0).normal(size=(3, 8))
    assert centroids.centroid_alignment(mu, mu) == pytest.approx(1.0)
    assert centroids.centroid_alignment(mu, 2.0 * mu) == pytest.approx(1.0)
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 1.0], [0.0, -1.0]])
    assert centroids.centroid_alignment(a, b) == pytest.approx((1.0 / np.sqrt(2.0) - 1.0) / 2.0)


def test_centroid_alignment_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        centroids.centroid_alignment(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        centroids.centroid_alignment(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((2, 2)))
