"""Error barrier, function-space distance, weight distance and batch-norm recomputation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfntk import models
from tfntk.autodiff import functional
from tfntk.measures import basins, evaluation


def test_normaliser_hand_values():
    assert basins.disagreement_normaliser(0.0, 0.0, 10) == 0.0
    assert basins.disagreement_normaliser(0.1, 0.2, 10) == pytest.approx(0.1 * 0.8 + 0.2 * 0.9 + 0.02 * 8 / 9)
    # Two classes: both wrong means both predict the same (only) wrong label.
    assert basins.disagreement_normaliser(0.5, 0.5, 2) == pytest.approx(0.5)
    # Ten classes at chance (error 0.9 each): random guesses disagree with probability 0.9.
    assert basins.disagreement_normaliser(0.9, 0.9, 10) == pytest.approx(0.9)


def test_normaliser_rejects_one_class():
    with pytest.raises(ValueError, match="num_classes"):
        basins.disagreement_normaliser(0.1, 0.1, 1)


def test_function_space_distance_hand_value():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    a = labels.copy()
    a[0] = 1  # error 0.1
    b = labels.copy()
    b[1] = 2
    b[2] = 3  # error 0.2
    z = 0.1 * 0.8 + 0.2 * 0.9 + 0.1 * 0.2 * 2 / 3
    assert basins.function_space_distance(a, b, labels, 4) == pytest.approx(0.3 / z)
    assert basins.function_space_distance(a, a, labels, 4) == 0.0
    assert np.isnan(basins.function_space_distance(labels, labels, labels, 4))


def _data(seed=0, n=64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype(np.float32), rng.integers(0, 4, size=n)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_barrier_with_itself_is_zero(batch_norm):
    model = models.build_model("resnet", (6, 6, 1), 4, seed=0, depth=8, batch_norm=batch_norm)
    x, y = _data()
    weights = functional.current_weights(model)
    result = basins.error_barrier(model, weights, weights, x, y, batch_norm_x=x if batch_norm else None)
    assert result.barrier == 0.0
    assert result.errors.shape == (11,)
    np.testing.assert_array_equal(result.errors, result.errors[0])


def test_barrier_of_two_networks_and_grid():
    model = models.build_model("mlp", (6, 6, 1), 4, seed=0, hidden=(32,))
    other = models.build_model("mlp", (6, 6, 1), 4, seed=1, hidden=(32,))
    x, y = _data()
    a = functional.current_weights(model)
    b = functional.current_weights(other)
    result = basins.error_barrier(model, a, b, x, y, alphas=[0.0, 0.5, 1.0])
    _, error_a = evaluation.loss_and_error(evaluation.logits(model, a, x), y)
    _, error_b = evaluation.loss_and_error(evaluation.logits(model, b, x), y)
    assert result.errors[2] == error_a
    assert result.errors[0] == error_b
    assert result.barrier == pytest.approx(result.errors.max() - 0.5 * (error_a + error_b))
    with pytest.raises(ValueError, match="include 0 and 1"):
        basins.error_barrier(model, a, b, x, y, alphas=[0.2, 0.5])


def test_barrier_requires_batch_norm_data():
    model = models.build_model("resnet", (6, 6, 1), 4, seed=0, depth=8, batch_norm=True)
    x, y = _data()
    weights = functional.current_weights(model)
    with pytest.raises(ValueError, match="batch_norm_x"):
        basins.error_barrier(model, weights, weights, x, y)


def test_batch_norm_recomputation_closed_form():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(3, kernel_initializer="identity", bias_initializer="zeros")(inputs)
    outputs = keras.layers.BatchNormalization(momentum=0.9)(hidden)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(loc=2.0, scale=3.0, size=(40, 3)).astype(np.float32)
    weights = functional.current_weights(model)

    new = evaluation.recompute_batch_norm_statistics(model, weights, x, batch_size=10)
    batches = x.reshape(4, 10, 3)
    np.testing.assert_allclose(new.non_trainable[0], batches.mean(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(new.non_trainable[1], batches.var(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(model.non_trainable_variables[0].numpy(), np.zeros(3))


def test_weight_distance():
    model = models.build_model("mlp", (6, 6, 1), 4, seed=0, hidden=(8,))
    a = functional.current_weights(model)
    shifted = functional.Weights([w + 1.0 for w in a.trainable], a.non_trainable)
    count = sum(int(tf.size(w)) for w in a.trainable)
    assert basins.weight_distance(a, shifted) == pytest.approx(np.sqrt(count), rel=1e-5)
