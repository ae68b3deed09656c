"""Tests of Hessian-vector products, top Hessian eigenvalues and the escape threshold.

Models are tiny float64 Keras models so that results can be checked against finite differences,
dense Hessians built with nested tapes, and quadratic losses with a chosen spectrum.
"""

import functools
import logging as python_logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfntk.autodiff import functional
from tfntk.autodiff import hvp
from tfntk.measures import escape
from tfntk.measures import hessian

CROSS_ENTROPY = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
QUADRATIC_SPECTRUM = np.array([4.0, 2.5, 1.0, 0.3, -0.5, -6.0])


def quadratic_loss(labels, logits):
    """Per-example loss `0.5 * c * (x . w)^2`, with the sign c passed as the label."""
    return 0.5 * labels[:, 0] * tf.square(logits[:, 0])


def build_tanh_model(batch_norm=False, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,), dtype="float64")
    hidden = keras.layers.Dense(5, dtype="float64")(inputs)
    if batch_norm:
        hidden = keras.layers.BatchNormalization(dtype="float64")(hidden)
    hidden = keras.layers.Activation("tanh", dtype="float64")(hidden)
    outputs = keras.layers.Dense(3, dtype="float64")(hidden)
    return keras.Model(inputs, outputs)


def classification_batches(seed=0):
    """24 examples in uneven batches of 10, 10 and 4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(24, 3))
    y = rng.integers(0, 3, size=24)
    return [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]


def build_quadratic_problem(seed=0):
    """Linear model whose loss has the Hessian V diag(QUADRATIC_SPECTRUM) V^T.

    With n = d examples x_i = sqrt(n |lambda_i|) v_i and labels c_i = sign(lambda_i), the mean of
    `0.5 c_i (x_i . w)^2` has exactly that Hessian.
    """
    rng = np.random.default_rng(seed)
    dimension = len(QUADRATIC_SPECTRUM)
    eigenvectors, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
    x = np.sqrt(dimension * np.abs(QUADRATIC_SPECTRUM))[:, None] * eigenvectors.T
    labels = np.sign(QUADRATIC_SPECTRUM)[:, None]

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((dimension,), dtype="float64")
    outputs = keras.layers.Dense(1, use_bias=False, dtype="float64")(inputs)
    model = keras.Model(inputs, outputs)
    hessian_matrix = eigenvectors @ np.diag(QUADRATIC_SPECTRUM) @ eigenvectors.T
    return model, [(x[:4], labels[:4]), (x[4:], labels[4:])], hessian_matrix, eigenvectors


def dense_hessian(model, loss_fn, batches, training=False):
    """Builds the (d, d) Hessian of the mean loss over all examples with nested tapes."""
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    weights = functional.current_weights(model)
    flat = functional.flatten(weights.trainable)
    with tf.GradientTape() as outer:
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)
            trainable = functional.unflatten(flat, weights.trainable)
            logits, _ = model.stateless_call(trainable, weights.non_trainable, x, training=training)
            loss = tf.reduce_mean(loss_fn(y, logits))
        gradient = inner.gradient(loss, flat)
    return outer.jacobian(gradient, flat).numpy()


def random_weight_vector(model, seed):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=v.shape)) for v in model.trainable_variables]


def flat(tensors):
    return functional.flatten(tensors).numpy()


def test_hvp_matches_finite_differences():
    model = build_tanh_model()
    batches = classification_batches()
    loss = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY), batches)
    weights = functional.current_weights(model).trainable
    vector = random_weight_vector(model, seed=1)
    step = 1e-5

    _, gradient_plus = loss.value_and_gradient([w + step * v for w, v in zip(weights, vector)])
    _, gradient_minus = loss.value_and_gradient([w - step * v for w, v in zip(weights, vector)])
    finite_difference = (flat(gradient_plus) - flat(gradient_minus)) / (2 * step)

    np.testing.assert_allclose(flat(loss.hvp(vector)), finite_difference, rtol=1e-6, atol=1e-9)


def test_hvp_matches_dense_hessian():
    model = build_tanh_model()
    batches = classification_batches()
    vector = random_weight_vector(model, seed=2)
    expected = dense_hessian(model, CROSS_ENTROPY, batches) @ flat(vector)

    product = hvp.hessian_vector_product(model, CROSS_ENTROPY, batches, vector)

    assert [p.shape for p in product] == [v.shape for v in model.trainable_variables]
    np.testing.assert_allclose(flat(product), expected, rtol=1e-10, atol=1e-12)


def test_hvp_independent_of_batching():
    model = build_tanh_model()
    batches = classification_batches()
    one_batch = [tuple(np.concatenate(parts) for parts in zip(*batches))]
    vector = random_weight_vector(model, seed=3)

    split = hvp.hessian_vector_product(model, CROSS_ENTROPY, batches, vector)
    whole = hvp.hessian_vector_product(model, CROSS_ENTROPY, one_batch, vector)

    np.testing.assert_allclose(flat(split), flat(whole), rtol=1e-10, atol=1e-12)


def test_hvp_accepts_dataset_and_traces_once():
    model = build_tanh_model()
    batches = classification_batches()
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    loss = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY), dataset)
    vector = random_weight_vector(model, seed=4)

    from_dataset = loss.hvp(vector)
    loss.hvp(vector)
    from_list = hvp.hessian_vector_product(model, CROSS_ENTROPY, batches, vector)

    np.testing.assert_allclose(flat(from_dataset), flat(from_list), rtol=1e-10, atol=1e-12)
    assert loss._batch_hvp.experimental_get_tracing_count() == 1


def test_loss_and_gradient_match_dense_derivative():
    model = build_tanh_model()
    batches = classification_batches()
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    weights = functional.current_weights(model)
    with tf.GradientTape() as tape:
        tape.watch(weights.trainable)
        logits = functional.logits_at(model, weights, x)
        expected_loss = tf.reduce_mean(CROSS_ENTROPY(y, logits))
    expected_gradient = tape.gradient(expected_loss, weights.trainable)

    loss, gradient = hvp.loss_and_gradient(model, CROSS_ENTROPY, batches)

    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-12)
    np.testing.assert_allclose(flat(gradient), flat(expected_gradient), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
def test_bn_mode_hvp_symmetric_and_exact(bn_mode):
    model = build_tanh_model(batch_norm=True)
    batches = classification_batches()
    loss = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY, bn_mode=bn_mode), batches)
    u = random_weight_vector(model, seed=5)
    v = random_weight_vector(model, seed=6)

    u_h_v = float(functional.dot(u, loss.hvp(v)))
    v_h_u = float(functional.dot(v, loss.hvp(u)))
    assert u_h_v == pytest.approx(v_h_u, rel=1e-10)

    # In train mode each batch has its own statistics, so the reference is a batch-weighted sum.
    training = bn_mode == "train"
    sizes = np.array([len(b[1]) for b in batches])
    expected = sum(
        size / sizes.sum() * dense_hessian(model, CROSS_ENTROPY, [b], training=training)
        for size, b in zip(sizes, batches)
    )
    np.testing.assert_allclose(flat(loss.hvp(v)), expected @ flat(v), rtol=1e-9, atol=1e-12)


def test_bn_modes_differ():
    model = build_tanh_model(batch_norm=True)
    batches = classification_batches()
    vector = random_weight_vector(model, seed=7)

    inference = hvp.hessian_vector_product(model, CROSS_ENTROPY, batches, vector)
    train = hvp.hessian_vector_product(model, CROSS_ENTROPY, batches, vector, bn_mode="train")

    difference = np.linalg.norm(flat(inference) - flat(train))
    assert difference > 1e-3 * np.linalg.norm(flat(inference))


def test_bn_train_mode_keeps_moving_statistics():
    model = build_tanh_model(batch_norm=True)
    before = flat([v.value for v in model.non_trainable_variables])

    hvp.loss_and_gradient(model, CROSS_ENTROPY, classification_batches(), bn_mode="train")

    np.testing.assert_array_equal(flat([v.value for v in model.non_trainable_variables]), before)


def test_weight_decay_terms():
    model = build_tanh_model()
    batches = classification_batches()
    vector = random_weight_vector(model, seed=8)
    weights = functional.current_weights(model).trainable
    decay = 0.3
    mask = [True, False, True, False]

    plain = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY), batches)
    decayed = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY, weight_decay=decay), batches)
    masked = hvp.TrainingLoss(
        model, hvp.LossSpec(CROSS_ENTROPY, weight_decay=decay, decay_mask=mask), batches
    )
    plain_loss, plain_gradient = plain.value_and_gradient()
    decayed_loss, decayed_gradient = decayed.value_and_gradient()
    masked_loss, _ = masked.value_and_gradient()

    np.testing.assert_allclose(
        flat(decayed.hvp(vector)), flat(plain.hvp(vector)) + decay * flat(vector), rtol=1e-12
    )
    masked_vector = [v if m else tf.zeros_like(v) for v, m in zip(vector, mask)]
    np.testing.assert_allclose(
        flat(masked.hvp(vector)), flat(plain.hvp(vector)) + decay * flat(masked_vector), rtol=1e-12
    )
    np.testing.assert_allclose(
        flat(decayed_gradient), flat(plain_gradient) + decay * flat(weights), rtol=1e-12
    )
    assert float(decayed_loss) == pytest.approx(
        float(plain_loss) + 0.5 * decay * np.sum(flat(weights) ** 2), rel=1e-12
    )
    masked_weights = [w for w, m in zip(weights, mask) if m]
    assert float(masked_loss) == pytest.approx(
        float(plain_loss) + 0.5 * decay * np.sum(flat(masked_weights) ** 2), rel=1e-12
    )


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_quadratic_spectrum_recovered(method):
    model, batches, _, eigenvectors = build_quadratic_problem()

    result = hessian.hessian_top_eigenvalues(
        model, quadratic_loss, batches, k=3, method=method, tol=1e-9, max_iterations=500
    )

    np.testing.assert_allclose(result.eigenvalues, QUADRATIC_SPECTRUM[:3], rtol=1e-8)
    assert result.converged.tolist() == [True, True, True]
    assert np.all(result.residual_norms <= 1e-9 * np.abs(result.eigenvalues))
    for found, expected in zip(result.eigenvectors, eigenvectors.T[:3]):
        assert abs(flat(found) @ expected) == pytest.approx(1.0, abs=1e-8)


def test_quadratic_all_negative_spectrum():
    model, batches, _, _ = build_quadratic_problem()
    negated = [(x, -labels) for x, labels in batches]

    lanczos = hessian.hessian_top_eigenvalues(
        model, quadratic_loss, negated, k=2, tol=1e-9, max_iterations=50
    )
    power = hessian.hessian_top_eigenvalues(
        model, quadratic_loss, negated, k=2, method="power", tol=1e-9, max_iterations=500
    )

    expected = np.sort(-QUADRATIC_SPECTRUM)[::-1][:2]
    np.testing.assert_allclose(lanczos.eigenvalues, expected, rtol=1e-8)
    np.testing.assert_allclose(power.eigenvalues, expected, rtol=1e-8)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues_match_dense_hessian(method):
    model = build_tanh_model()
    batches = classification_batches()
    expected = np.sort(np.linalg.eigvalsh(dense_hessian(model, CROSS_ENTROPY, batches)))[::-1]

    result = hessian.hessian_top_eigenvalues(
        model, CROSS_ENTROPY, batches, k=3, method=method, tol=1e-7, max_iterations=2000
    )

    np.testing.assert_allclose(result.eigenvalues, expected[:3], rtol=1e-5)
    assert result.converged.all()
    assert len(result.eigenvectors) == 3
    assert [t.shape for t in result.eigenvectors[0]] == [
        v.shape for v in model.trainable_variables
    ]
    assert np.linalg.norm(flat(result.eigenvectors[0])) == pytest.approx(1.0, rel=1e-10)


def test_reused_loss_traces_once():
    model = build_tanh_model()
    batches = classification_batches()
    minibatches = batches[:2]
    training_loss = hvp.TrainingLoss(model, hvp.LossSpec(CROSS_ENTROPY), batches)
    start = [v.numpy() for v in model.trainable_variables]
    moved = [w + 0.3 * d for w, d in zip(start, random_weight_vector(model, seed=7))]

    for weights in (start, moved):
        reused = hessian.hessian_top_eigenvalues_of_loss(
            training_loss, k=2, tol=1e-7, max_iterations=200, weights=weights
        )
        fresh = hessian.hessian_top_eigenvalues(
            model, CROSS_ENTROPY, batches, k=2, tol=1e-7, max_iterations=200, weights=weights
        )
        np.testing.assert_allclose(reused.eigenvalues, fresh.eigenvalues, rtol=1e-12)
        assert reused.num_hvps == fresh.num_hvps
        assert reused.eigenvectors[0][0].dtype == model.trainable_variables[0].dtype

        reused_threshold = escape.escape_threshold_of_loss(
            training_loss, minibatches, 0.1, weights=weights
        )
        fresh_threshold = escape.escape_threshold(
            model, CROSS_ENTROPY, batches, minibatches, 0.1, weights=weights
        )
        np.testing.assert_allclose(reused_threshold.values, fresh_threshold.values, rtol=1e-12)

    assert training_loss._batch_hvp.experimental_get_tracing_count() == 1
    assert training_loss._batch_loss_and_gradient.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_warm_start_needs_fewer_hvps(method):
    model = build_tanh_model()
    batches = classification_batches()
    start = functional.current_weights(model).trainable
    nearby = [w + 1e-3 * v for w, v in zip(start, random_weight_vector(model, seed=9))]
    arguments = dict(k=2, method=method, tol=1e-6, max_iterations=2000)

    previous = hessian.hessian_top_eigenvalues(model, CROSS_ENTROPY, batches, **arguments)
    cold = hessian.hessian_top_eigenvalues(
        model, CROSS_ENTROPY, batches, weights=nearby, **arguments
    )
    warm = hessian.hessian_top_eigenvalues(
        model,
        CROSS_ENTROPY,
        batches,
        weights=nearby,
        initial_vectors=previous.eigenvectors,
        **arguments,
    )

    assert cold.converged.all()
    assert warm.converged.all()
    np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-8)
    assert warm.num_hvps < cold.num_hvps


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_nonconvergence_reported(method, caplog):
    model = build_tanh_model()
    batches = classification_batches()

    with caplog.at_level(python_logging.WARNING):
        result = hessian.hessian_top_eigenvalues(
            model, CROSS_ENTROPY, batches, k=1, method=method, tol=1e-10, max_iterations=2
        )

    assert result.converged.tolist() == [False]
    assert result.residual_norms[0] > 1e-10 * abs(result.eigenvalues[0])
    assert "did not converge" in caplog.text


def test_gd_escape_threshold_on_quadratic():
    model, batches, hessian_matrix, eigenvectors = build_quadratic_problem()
    full_batch = [tuple(np.concatenate(parts) for parts in zip(*batches))]
    learning_rate = 0.7
    weights = [tf.constant(eigenvectors[:, :1] + 0.3 * eigenvectors[:, 1:2])]

    result = escape.escape_threshold(
        model, quadratic_loss, batches, full_batch, learning_rate, weights=weights
    )

    gradient = hessian_matrix @ flat(weights)
    curvature = gradient @ hessian_matrix @ gradient
    expected = (learning_rate * curvature - 2 * gradient @ gradient) / (gradient @ gradient)
    assert result.values.shape == (1,)
    assert result.mean == pytest.approx(expected, rel=1e-10)
    assert result.std == 0.0
    assert result.gradient_norm_squared == pytest.approx(gradient @ gradient, rel=1e-10)

    # A quadratic loss changes by exactly 0.5 * eta * |g|^2 * T along the step.
    step = [w - learning_rate * tf.constant(gradient[:, None]) for w in weights]
    loss_before, _ = hvp.loss_and_gradient(model, quadratic_loss, batches, weights=weights)
    loss_after, _ = hvp.loss_and_gradient(model, quadratic_loss, batches, weights=step)
    predicted_change = 0.5 * learning_rate * (gradient @ gradient) * result.mean
    assert float(loss_after - loss_before) == pytest.approx(predicted_change, rel=1e-10)


def test_gd_escape_threshold_along_top_eigenvector():
    model, batches, _, eigenvectors = build_quadratic_problem()
    full_batch = [tuple(np.concatenate(parts) for parts in zip(*batches))]
    top = QUADRATIC_SPECTRUM[0]
    weights = [tf.constant(eigenvectors[:, :1])]

    for learning_rate in (0.1, 2.0 / top, 0.9):
        result = escape.escape_threshold(
            model, quadratic_loss, batches, full_batch, learning_rate, weights=weights
        )
        closed_form = escape.gd_escape_threshold(learning_rate, top)
        assert result.mean == pytest.approx(closed_form, abs=1e-10)
    assert escape.gd_escape_threshold(0.1, top) < 0
    assert escape.gd_escape_threshold(0.9, top) > 0


def test_sgd_escape_threshold_per_minibatch():
    model, batches, hessian_matrix, _ = build_quadratic_problem()
    x = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    minibatches = [(x[[0, 5]], labels[[0, 5]]), (x[[1, 2]], labels[[1, 2]]), (x[3:4], labels[3:4])]
    weights = [tf.constant(np.linspace(-1.0, 1.0, len(x))[:, None])]
    learning_rate = 0.2

    result = escape.escape_threshold(
        model, quadratic_loss, batches, minibatches, learning_rate, weights=weights
    )

    w = flat(weights)
    gradient = hessian_matrix @ w
    expected = []
    for batch_x, batch_labels in minibatches:
        batch_hessian = (batch_x.T * batch_labels[:, 0]) @ batch_x / len(batch_x)
        direction = batch_hessian @ w
        curvature = direction @ hessian_matrix @ direction
        expected.append(
            (learning_rate * curvature - 2 * direction @ gradient) / (gradient @ gradient)
        )
    np.testing.assert_allclose(result.values, expected, rtol=1e-10)
    assert result.mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert result.std == pytest.approx(np.std(expected), rel=1e-10)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(k=0), "k must be a positive integer, got 0"),
        (dict(k=-2), "got -2"),
        (dict(k=7), "k=7 exceeds"),
        (dict(method="newton"), "'newton'"),
        (dict(tol=0.0), "tol must be > 0, got 0.0"),
        (dict(max_iterations=0), "max_iterations must be a positive integer, got 0"),
        (dict(k=3, max_iterations=2), "max_iterations=2 is below k=3"),
        (dict(bn_mode="eval"), "'eval'"),
        (dict(weight_decay=-1.0), "-1.0"),
        (dict(decay_mask=[True, False]), "decay_mask has 2 entries"),
    ],
)
def test_eigenvalues_reject_bad_input(arguments, message):
    model, batches, _, _ = build_quadratic_problem()

    with pytest.raises(ValueError, match=message):
        hessian.hessian_top_eigenvalues(model, quadratic_loss, batches, **arguments)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(k=0), "k must be a positive integer, got 0"),
        (dict(method="newton"), "'newton'"),
        (dict(tol=-1.0), "tol must be > 0, got -1.0"),
    ],
)
def test_reused_loss_rejects_bad_input(arguments, message):
    model, batches, _, _ = build_quadratic_problem()
    training_loss = hvp.TrainingLoss(model, hvp.LossSpec(quadratic_loss), batches)

    with pytest.raises(ValueError, match=message):
        hessian.hessian_top_eigenvalues_of_loss(training_loss, **arguments)


def test_arguments_checked_before_data():
    model, batches, _, _ = build_quadratic_problem()

    with pytest.raises(ValueError, match="k must be a positive integer"):
        hessian.hessian_top_eigenvalues(model, quadratic_loss, batches, k=0, bn_mode="eval")
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        escape.escape_threshold(model, quadratic_loss, [], batches, learning_rate=-1.0)
    training_loss = hvp.TrainingLoss(model, hvp.LossSpec(quadratic_loss), batches)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        escape.escape_threshold_of_loss(training_loss, batches, learning_rate=0.0)


def test_bad_data_and_learning_rate_rejected():
    model, batches, _, _ = build_quadratic_problem()

    with pytest.raises(ValueError, match="no batches"):
        hvp.loss_and_gradient(model, quadratic_loss, [])
    with pytest.raises(ValueError, match="expected an"):
        hvp.loss_and_gradient(model, quadratic_loss, [batches[0][0]])
    with pytest.raises(ValueError, match="learning_rate must be > 0, got -0.1"):
        escape.escape_threshold(model, quadratic_loss, batches, batches, -0.1)
    with pytest.raises(ValueError, match="vector has 2 tensors"):
        hvp.hessian_vector_product(
            model, quadratic_loss, batches, [tf.zeros((6, 1)), tf.zeros((6, 1))]
        )
