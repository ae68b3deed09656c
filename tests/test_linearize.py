"""Tests of the Taylor-expanded models in `tfntk.linearize` and `tfntk.autodiff.taylor`."""

import json
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfntk.autodiff import functional, taylor
from tfntk.autodiff import ntk as ntk_lib
from tfntk.linearize import TaylorModel, assign_weights, linearize, plug_back

NUM_CLASSES = 3


def _bn_cnn(dtype="float32", seed=0):
    """Returns a conv -> batch norm -> ReLU -> pool -> dense network with random moving stats."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2), dtype=dtype)
    h = keras.layers.Conv2D(4, 3, padding="same", dtype=dtype)(inputs)
    h = keras.layers.BatchNormalization(dtype=dtype)(h)
    h = keras.layers.ReLU(dtype=dtype)(h)
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", dtype=dtype)(h)
    h = keras.layers.ReLU(dtype=dtype)(h)
    h = keras.layers.GlobalAveragePooling2D(dtype=dtype)(h)
    outputs = keras.layers.Dense(NUM_CLASSES, dtype=dtype)(h)
    model = keras.Model(inputs, outputs)

    rng = np.random.default_rng(seed)
    moving_mean, moving_variance = model.non_trainable_variables
    moving_mean.assign(rng.normal(0.0, 0.5, moving_mean.shape).astype(dtype))
    moving_variance.assign(rng.uniform(0.5, 2.0, moving_variance.shape).astype(dtype))
    return model


def _tanh_mlp(seed=0):
    """Returns a smooth float64 network, so second derivatives are well defined everywhere."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,), dtype="float64")
    h = keras.layers.Dense(8, activation="tanh", dtype="float64")(inputs)
    h = keras.layers.Dense(6, activation="tanh", dtype="float64")(h)
    outputs = keras.layers.Dense(NUM_CLASSES, dtype="float64")(h)
    return keras.Model(inputs, outputs)


def _inputs(model, n, seed=1):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return tf.constant(np.random.default_rng(seed).normal(size=shape), dtype=model.inputs[0].dtype)


def _random_direction(weights, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(scale * rng.normal(size=w.shape), dtype=w.dtype) for w in weights.trainable
    ]


def _set_w(model, values):
    for variable, value in zip(model.w, values):
        variable.assign(value)


def _shifted(weights, direction, t):
    return [w + t * d for w, d in zip(weights.trainable, direction)]


@pytest.fixture(scope="module")
def bn_cnn():
    return _bn_cnn()


@pytest.mark.parametrize("order", [1, 2])
def test_expansion_at_w0_matches_network(bn_cnn, order):
    x = _inputs(bn_cnn, 8)
    model = linearize(bn_cnn, order=order)

    expected = bn_cnn(x, training=False)
    np.testing.assert_allclose(model(x).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model(x, training=True).numpy(), expected.numpy(), atol=1e-6)

    # The moving statistics matter: training-mode batch norm gives other logits.
    batch_stat_logits = bn_cnn(x, training=True)
    assert np.abs(batch_stat_logits.numpy() - expected.numpy()).max() > 1e-2


def test_variables_map_to_base_variables(bn_cnn):
    model = linearize(bn_cnn, order=1)

    assert len(model.trainable_variables) == len(bn_cnn.trainable_variables)
    for ours, theirs in zip(model.trainable_variables, bn_cnn.trainable_variables):
        assert tuple(ours.shape) == tuple(theirs.shape)
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    assert model.order == 1
    assert model.base is bn_cnn


def test_order1_affine_in_weights():
    base = _bn_cnn(dtype="float64")
    x = _inputs(base, 6)
    w0 = functional.current_weights(base)
    u = _random_direction(w0, seed=2, scale=0.3)
    v = _random_direction(w0, seed=3, scale=0.3)
    model = linearize(base, w0, order=1)

    def expansion_at(trainable):
        _set_w(model, trainable)
        return model(x).numpy()

    f0 = expansion_at(w0.trainable)
    du = expansion_at(_shifted(w0, u, 1.0)) - f0
    dv = expansion_at(_shifted(w0, v, 1.0)) - f0
    assert np.abs(du).max() > 1e-2

    for t in (-2.0, -0.5, 0.25, 3.0, 10.0):
        np.testing.assert_allclose(
            expansion_at(_shifted(w0, u, t)) - f0, t * du, rtol=1e-9, atol=1e-10
        )

    for a, b in ((0.5, -1.5), (2.0, 3.0)):
        combined = [w + a * du_ + b * dv_ for w, du_, dv_ in zip(w0.trainable, u, v)]
        np.testing.assert_allclose(
            expansion_at(combined) - f0, a * du + b * dv, rtol=1e-9, atol=1e-10
        )


def test_order1_term_matches_finite_difference():
    base = _tanh_mlp()
    x = _inputs(base, 4)
    w0 = functional.current_weights(base)
    d = _random_direction(w0, seed=4)
    h = 1e-4

    logits, first = taylor.jvp(base, w0, d, x)
    plus = functional.logits_at(base, functional.Weights(_shifted(w0, d, h), []), x)
    minus = functional.logits_at(base, functional.Weights(_shifted(w0, d, -h), []), x)

    np.testing.assert_allclose(logits.numpy(), base(x).numpy(), atol=1e-12)
    np.testing.assert_allclose(first.numpy(), ((plus - minus) / (2 * h)).numpy(), atol=1e-6)


def test_order2_term_matches_finite_difference():
    base = _tanh_mlp()
    x = _inputs(base, 4)
    w0 = functional.current_weights(base)
    d = _random_direction(w0, seed=5)
    h = 1e-3

    _, _, quadratic = taylor.second_order_jvp(base, w0, d, x)
    f0 = base(x).numpy()
    plus = functional.logits_at(base, functional.Weights(_shifted(w0, d, h), []), x).numpy()
    minus = functional.logits_at(base, functional.Weights(_shifted(w0, d, -h), []), x).numpy()
    second_difference = (plus - 2 * f0 + minus) / h**2

    assert np.abs(quadratic.numpy()).max() > 0.1
    np.testing.assert_allclose(quadratic.numpy(), second_difference, rtol=1e-4, atol=1e-4)


def test_order2_model_is_quadratic_in_weights():
    base = _tanh_mlp()
    x = _inputs(base, 4)
    w0 = functional.current_weights(base)
    d = _random_direction(w0, seed=6, scale=0.5)
    model = linearize(base, w0, order=2)
    _, first, quadratic = taylor.second_order_jvp(base, w0, d, x)

    for t in (-1.0, 0.5, 2.0):
        _set_w(model, _shifted(w0, d, t))
        expected = base(x) + t * first + 0.5 * t**2 * quadratic
        np.testing.assert_allclose(model(x).numpy(), expected.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_matches_finite_difference(order, compiled):
    base = _tanh_mlp()
    x = _inputs(base, 4)
    w0 = functional.current_weights(base)
    start = _shifted(w0, _random_direction(w0, seed=7, scale=0.5), 1.0)
    direction = _random_direction(w0, seed=8)
    weights = tf.constant(np.random.default_rng(9).normal(size=(4, NUM_CLASSES)))
    model = linearize(base, w0, order=order)

    def objective():
        return tf.reduce_sum(weights * model(x))

    def gradient():
        with tf.GradientTape() as tape:
            value = objective()
        return tape.gradient(value, model.trainable_variables)

    _set_w(model, start)
    grads = tf.function(gradient)() if compiled else gradient()
    directional = float(functional.dot(grads, direction))

    eps = 1e-5
    _set_w(model, [w + eps * d for w, d in zip(start, direction)])
    plus = float(objective())
    _set_w(model, [w - eps * d for w, d in zip(start, direction)])
    minus = float(objective())

    np.testing.assert_allclose(directional, (plus - minus) / (2 * eps), rtol=1e-7)


def _explicit_ntk(base, weights, x):
    """Returns the (n, n, K, K) empirical NTK from a materialised per-example Jacobian."""
    primals = [tf.identity(w) for w in weights.trainable]
    with tf.GradientTape() as tape:
        tape.watch(primals)
        logits = functional.logits_at(base, functional.Weights(primals, weights.non_trainable), x)
    n, k = logits.shape
    jacobians = tape.jacobian(logits, primals)
    jacobian = tf.concat([tf.reshape(j, (n * k, -1)) for j in jacobians], axis=1)
    kernel = tf.reshape(tf.matmul(jacobian, jacobian, transpose_b=True), (n, k, n, k))
    return tf.transpose(kernel, (0, 2, 1, 3))


def test_order1_descent_matches_kernel_descent():
    base = _bn_cnn(dtype="float64")
    n, steps = 6, 4
    x = _inputs(base, n)
    targets = tf.constant(np.random.default_rng(10).normal(size=(n, NUM_CLASSES)))
    w0 = functional.current_weights(base)

    ntk = ntk_lib.empirical_ntk(base, x, weights=w0).numpy()
    np.testing.assert_allclose(ntk, _explicit_ntk(base, w0, x).numpy(), rtol=1e-9, atol=1e-12)
    ntvp = ntk_lib.empirical_ntk(base, x, weights=w0, implementation="ntvp").numpy()
    np.testing.assert_allclose(ntvp, ntk, rtol=1e-9, atol=1e-12)
    kernel = ntk.transpose(0, 2, 1, 3).reshape(n * NUM_CLASSES, n * NUM_CLASSES)
    # Keras keeps the learning rate in float32, so use a value that float32 represents exactly.
    learning_rate = float(np.float32(0.5 * n / np.linalg.eigvalsh(kernel).max()))

    model = linearize(base, w0, order=1)
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.0)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = 0.5 * tf.reduce_sum((model(x) - targets) ** 2) / n
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    f = base(x, training=False).numpy().reshape(-1)
    y = targets.numpy().reshape(-1)
    for _ in range(steps):
        train_step()
        f = f - learning_rate * kernel @ (f - y) / n
        np.testing.assert_allclose(model(x).numpy().reshape(-1), f, rtol=1e-9, atol=1e-9)

    assert np.abs(f - base(x, training=False).numpy().reshape(-1)).max() > 0.05


def test_plug_back_at_w0_gives_network(bn_cnn):
    x = _inputs(bn_cnn, 8)
    labels = np.arange(8) % NUM_CLASSES
    model = linearize(bn_cnn, order=1)

    weights = plug_back(model)
    logits = functional.logits_at(bn_cnn, weights, x).numpy()
    expected = bn_cnn(x, training=False).numpy()

    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    assert np.mean(logits.argmax(1) != labels) == np.mean(expected.argmax(1) != labels)


def test_plug_back_returns_trained_weights(bn_cnn):
    model = linearize(bn_cnn, order=2)
    w0 = functional.current_weights(bn_cnn)
    shifted = _shifted(w0, _random_direction(w0, seed=11), 0.1)
    _set_w(model, shifted)

    weights = plug_back(model)
    for got, expected in zip(weights.trainable, shifted):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    for got, expected in zip(weights.non_trainable, bn_cnn.non_trainable_variables):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())

    target = _bn_cnn(seed=12)
    assign_weights(target, weights)
    x = _inputs(bn_cnn, 4)
    np.testing.assert_allclose(
        target(x, training=False).numpy(),
        functional.logits_at(bn_cnn, weights, x).numpy(),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("order", [1, 2])
def test_fit_lowers_loss(bn_cnn, order):
    x = _inputs(bn_cnn, 32)
    y = np.arange(32) % NUM_CLASSES
    model = linearize(bn_cnn, order=order)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    history = model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)

    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.01
    np.testing.assert_array_equal(model.w0[0].numpy(), bn_cnn.trainable_variables[0].numpy())


def test_checkpoint_restores_expansion(bn_cnn, tmp_path):
    x = _inputs(bn_cnn, 4)
    model = linearize(bn_cnn, order=1)
    w0 = model.expansion_point
    _set_w(model, _shifted(w0, _random_direction(w0, seed=13), 0.1))
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))

    restored = linearize(_bn_cnn(seed=14), order=1)
    assert np.abs(restored(x).numpy() - model(x).numpy()).max() > 1e-2
    tf.train.Checkpoint(model=restored).read(path).assert_consumed()

    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np

    from tfntk.linearize import linearize, plug_back
    from tfntk.autodiff import functional
    from tests.test_linearize import _bn_cnn, _inputs

    base = _bn_cnn()
    x = _inputs(base, 16)
    y = tf.constant(np.arange(16) % 3)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


    def train(strategy, order):
        with strategy.scope():
            model = linearize(base, order=order)
            optimizer = keras.optimizers.SGD(learning_rate=0.5)
            optimizer.build(model.trainable_variables)

        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = keras.losses.sparse_categorical_crossentropy(
                    yb, model(xb), from_logits=True)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=8)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        @tf.function
        def step(xb, yb):
            strategy.run(replica_step, args=(xb, yb))

        for _ in range(2):
            for xb, yb in strategy.experimental_distribute_dataset(dataset):
                step(xb, yb)
        return functional.flatten(plug_back(model).trainable).numpy()


    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    result = {"replicas": mirrored.num_replicas_in_sync}
    for order in (1, 2):
        a, b = train(mirrored, order), train(single, order)
        start = functional.flatten(functional.current_weights(base).trainable).numpy()
        result[f"difference_{order}"] = float(np.abs(a - b).max())
        result[f"moved_{order}"] = float(np.abs(b - start).max())
    print("RESULT " + json.dumps(result))
    """
)


def test_mirrored_strategy_matches_single_replica():
    completed = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(pathlib.Path(__file__).resolve().parents[1]),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = [row for row in completed.stdout.splitlines() if row.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])

    assert result["replicas"] == 2
    for order in (1, 2):
        assert result[f"moved_{order}"] > 1e-3
        assert result[f"difference_{order}"] < 1e-5


def test_rejects_unsupported_order(bn_cnn):
    with pytest.raises(ValueError, match="order 3"):
        linearize(bn_cnn, order=3)
    with pytest.raises(ValueError, match="order 0"):
        taylor.taylor_logits(bn_cnn, functional.current_weights(bn_cnn), [], None, order=0)


def test_rejects_mismatched_weights(bn_cnn):
    weights = functional.current_weights(bn_cnn)
    with pytest.raises(ValueError, match="trainable tensors"):
        linearize(bn_cnn, functional.Weights(weights.trainable[:-1], weights.non_trainable))
    with pytest.raises(ValueError, match="shape"):
        bad = [tf.zeros((2, 2))] + weights.trainable[1:]
        linearize(bn_cnn, functional.Weights(bad, weights.non_trainable))


def test_rejects_mismatched_tangents(bn_cnn):
    weights = functional.current_weights(bn_cnn)
    x = _inputs(bn_cnn, 2)
    with pytest.raises(ValueError, match="tangent tensors"):
        taylor.jvp(bn_cnn, weights, weights.trainable[:-1], x)
    with pytest.raises(ValueError, match="shape"):
        taylor.second_order_jvp(bn_cnn, weights, [tf.zeros((1,))] * len(weights.trainable), x)


def test_plug_back_rejects_other_models(bn_cnn):
    with pytest.raises(TypeError, match="TaylorModel"):
        plug_back(bn_cnn)
    assert isinstance(linearize(bn_cnn), TaylorModel)
