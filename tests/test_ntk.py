"""Tests of the empirical NTK and per-example logit Jacobians against closed forms and each other."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfntk.autodiff import functional
from tfntk.autodiff import jacobian
from tfntk.autodiff import ntk
from tfntk.measures import kernel as kernel_measures

IMPLEMENTATIONS = ("jacobian", "ntvp")


def _linear_model(input_dim=5, num_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    return keras.Model(inputs, keras.layers.Dense(num_classes, bias_initializer="glorot_uniform")(inputs))


def _one_hidden_layer(input_dim=4, hidden=6, num_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    hidden_units = keras.layers.ReLU()(keras.layers.Dense(hidden, bias_initializer="random_normal")(inputs))
    return keras.Model(inputs, keras.layers.Dense(num_classes, bias_initializer="random_normal")(hidden_units))


def _bn_cnn(seed=0):
    """A small CNN with batch norm, a strided conv, a Conv1D, a tanh Dense layer (generic path)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 3, strides=2, padding="valid")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Reshape((4, 5))(x)
    x = keras.layers.Conv1D(3, 2, padding="same")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(7, activation="tanh")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    rng = np.random.default_rng(seed + 1)
    for variable in model.non_trainable_variables:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def bn_cnn():
    """One model for the tests that only read it, so its traced block functions are reused."""
    return _bn_cnn()


def _inputs(model, n, seed=0):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _brute_force_ntk(model, x1, x2, weights=None):
    """J(x1) J(x2)^T in float64 from a GradientTape Jacobian of the whole batch."""
    weights = jacobian.tensor_weights(model, weights)

    def flat_jacobian(x):
        with tf.GradientTape() as tape:
            tape.watch(weights.trainable)
            logits = functional.logits_at(model, weights, tf.constant(x))
        parts = tape.jacobian(logits, weights.trainable)
        return np.concatenate([np.reshape(p.numpy(), (len(x), logits.shape[1], -1)) for p in parts], axis=2)

    j1, j2 = flat_jacobian(x1).astype(np.float64), flat_jacobian(x2).astype(np.float64)
    return np.einsum("ikd,jld->ijkl", j1, j2)


def _relative_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_linear_model_closed_form(implementation):
    model = _linear_model()
    x1, x2 = _inputs(model, 4), _inputs(model, 3, seed=1)
    kernel = ntk.empirical_ntk(model, x1, x2, implementation=implementation).numpy()
    expected = np.einsum("ij,kl->ijkl", x1 @ x2.T + 1.0, np.eye(3))
    assert kernel.shape == (4, 3, 3, 3)
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_hidden_layer_relu_closed_form(implementation):
    model = _one_hidden_layer()
    x = _inputs(model, 5)
    w1, b1, w2, _ = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    pre_activation = x @ w1 + b1
    hidden = np.maximum(pre_activation, 0.0)
    slopes = (pre_activation > 0).astype(np.float64)
    readout = np.einsum("ij,kl->ijkl", hidden @ hidden.T + 1.0, np.eye(3))
    first_layer = np.einsum("ij,ih,jh,hk,hl->ijkl", x @ x.T + 1.0, slopes, slopes, w2, w2)

    kernel = ntk.empirical_ntk(model, x, implementation=implementation).numpy()
    np.testing.assert_allclose(kernel, readout + first_layer, rtol=1e-5, atol=1e-5)


def test_implementations_agree_on_batch_norm_cnn(bn_cnn):
    model = bn_cnn
    x = _inputs(model, 6)
    expected = _brute_force_ntk(model, x, x)
    for implementation in IMPLEMENTATIONS:
        kernel = ntk.empirical_ntk(model, x, implementation=implementation, batch_size=3).numpy()
        assert _relative_error(kernel, expected) < 1e-5, implementation


@pytest.mark.parametrize("implementation, batch_sizes", [("jacobian", (1, 3, 16)), ("ntvp", (3, 16))])
def test_block_sizes_agree(implementation, batch_sizes, bn_cnn):
    model = bn_cnn
    x1, x2 = _inputs(model, 7), _inputs(model, 5, seed=1)
    expected = _brute_force_ntk(model, x1, x2)
    for batch_size in batch_sizes:
        kernel = ntk.empirical_ntk(model, x1, x2, implementation=implementation, batch_size=batch_size).numpy()
        assert kernel.shape == (7, 5, 3, 3)
        assert _relative_error(kernel, expected) < 1e-5, batch_size


def test_jacobian_panels_agree(bn_cnn):
    model = bn_cnn
    x = _inputs(model, 7)
    whole = ntk.empirical_ntk(model, x, batch_size=2).numpy()
    one_block_per_panel = ntk.empirical_ntk(model, x, batch_size=2, jacobian_memory_gib=1e-9).numpy()
    x2 = _inputs(model, 4, seed=1)
    asymmetric = ntk.empirical_ntk(model, x, x2, batch_size=2, jacobian_memory_gib=1e-9).numpy()
    np.testing.assert_allclose(one_block_per_panel, whole, rtol=1e-5, atol=1e-6)
    assert _relative_error(asymmetric, _brute_force_ntk(model, x, x2)) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_trace_logits_equals_traced_full_kernel(implementation, bn_cnn):
    model = bn_cnn
    x = _inputs(model, 6)
    full = ntk.empirical_ntk(model, x, implementation=implementation, batch_size=3).numpy()
    traced = ntk.empirical_ntk(model, x, implementation=implementation, batch_size=3, trace_logits=True).numpy()
    assert traced.shape == (6, 6)
    np.testing.assert_allclose(traced, np.einsum("ijkk->ij", full), rtol=1e-5, atol=1e-5)


def test_kernel_symmetric_positive_semidefinite(bn_cnn):
    model = bn_cnn
    x = _inputs(model, 6)
    kernel = ntk.empirical_ntk(model, x, batch_size=3).numpy().astype(np.float64)
    gram = kernel.transpose(0, 2, 1, 3).reshape(18, 18)
    eigenvalues = np.linalg.eigvalsh((gram + gram.T) / 2)
    np.testing.assert_allclose(gram, gram.T, rtol=1e-5, atol=1e-5 * np.abs(gram).max())
    assert eigenvalues.min() > -1e-5 * eigenvalues.max()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_other_weights_leave_model_untouched(implementation, bn_cnn):
    model = bn_cnn
    other = _bn_cnn(seed=3)
    x = _inputs(model, 6)
    before = [v.numpy().copy() for v in model.variables]

    kernel = ntk.empirical_ntk(
        model, x, weights=functional.current_weights(other), implementation=implementation, batch_size=3
    )

    assert _relative_error(kernel.numpy(), _brute_force_ntk(other, x, x)) < 1e-5
    for value, variable in zip(before, model.variables):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_trainable_list_pairs_with_current_statistics(bn_cnn):
    model = bn_cnn
    other = _bn_cnn(seed=3)
    x = _inputs(model, 6)
    trainable = [v.numpy() for v in other.trainable_variables]
    expected = _brute_force_ntk(model, x, x, weights=trainable)
    kernel = ntk.empirical_ntk(model, x, weights=trainable, batch_size=3).numpy()
    assert _relative_error(kernel, expected) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inside_tf_function(implementation, bn_cnn):
    model = bn_cnn
    x = tf.constant(_inputs(model, 6))
    weights = functional.current_weights(_bn_cnn(seed=2))

    @tf.function
    def traced_kernel(trainable, non_trainable, inputs):
        return ntk.empirical_ntk(
            model, inputs, weights=functional.Weights(trainable, non_trainable), implementation=implementation, batch_size=3
        )

    kernel = traced_kernel(weights.trainable, weights.non_trainable, x).numpy()
    eager = ntk.empirical_ntk(model, x, weights=weights, implementation=implementation, batch_size=3).numpy()
    np.testing.assert_allclose(kernel, eager, rtol=1e-5, atol=1e-6)


def test_model_builders_structured_path():
    from tfntk.models import build_model

    model = build_model("simple_cnn", (8, 8, 1), 4, filters=(4, 4, 6, 6, 8, 8))
    x = _inputs(model, 3)
    kernel = ntk.empirical_ntk(model, x, batch_size=2).numpy()
    assert _relative_error(kernel, _brute_force_ntk(model, x, x)) < 1e-5


def test_per_example_jacobian_matches_tape(bn_cnn):
    model = bn_cnn
    x = _inputs(model, 5)
    weights = functional.current_weights(model)
    with tf.GradientTape() as tape:
        tape.watch(weights.trainable)
        logits = functional.logits_at(model, weights, tf.constant(x))
    expected = tape.jacobian(logits, weights.trainable)
    per_example = jacobian.logit_jacobian(model, x, batch_size=2)
    for actual, reference, variable in zip(per_example, expected, model.trainable_variables):
        assert actual.shape == (5, 3) + tuple(variable.shape)
        np.testing.assert_allclose(actual.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6, err_msg=variable.path)


def test_ntk_gram_returns_numpy():
    model = _linear_model()
    x = _inputs(model, 3)
    gram = kernel_measures.ntk_gram(model, x, trace_logits=True)
    assert isinstance(gram, np.ndarray)
    np.testing.assert_allclose(gram, 3.0 * (x @ x.T + 1.0), rtol=1e-5)


def test_bad_arguments_raise():
    model = _linear_model()
    x = _inputs(model, 2)
    with pytest.raises(ValueError, match="Unknown NTK implementation"):
        ntk.empirical_ntk(model, x, implementation="structured")
    with pytest.raises(ValueError, match="batch_size"):
        ntk.empirical_ntk(model, x, batch_size=0)
    with pytest.raises(ValueError, match="example shape"):
        ntk.empirical_ntk(model, np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="jacobian_memory_gib"):
        ntk.empirical_ntk(model, x, jacobian_memory_gib=0)


_STRATEGY_SCRIPT = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from tests.test_ntk import _bn_cnn, _inputs, _brute_force_ntk
    from tfntk.autodiff import ntk

    model = _bn_cnn()
    x = _inputs(model, 4)
    expected = _brute_force_ntk(model, x, x)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {"replicas": strategy.num_replicas_in_sync}
    with strategy.scope():
        for implementation in ("jacobian", "ntvp"):
            kernel = ntk.empirical_ntk(model, x, implementation=implementation, batch_size=2).numpy()
            error = np.abs(kernel - expected).max() / np.abs(expected).max()
            result[implementation] = float(error)
    print("RESULT " + json.dumps(result))
    """
)


def test_mirrored_strategy_two_cpus():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, "-c", _STRATEGY_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert lines, completed.stdout[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["replicas"] == 2
    assert result["jacobian"] < 1e-5
    assert result["ntvp"] < 1e-5
