"""Top eigenvalues of the Hessian of a model's training loss, from Hessian-vector products.

The Hessian is that of the mean training loss over fixed batches, as defined in
`tfntk.autodiff.hvp` (batch-norm mode and weight decay selectable). Only products `H v` are
computed, so the cost is a few gradient evaluations per iteration and the memory is a few weight
vectors, plus the Krylov basis for Lanczos.

Eigenvalues are the largest ALGEBRAIC ones (the most positive), not the largest in magnitude.
The iterations run on flat float64 numpy vectors of length d (the number of trainable weights),
and each product is computed in the model's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf
from absl import logging

from tfntk.autodiff import functional
from tfntk.autodiff import hvp as hvp_lib

METHODS = ("lanczos", "power")


@dataclasses.dataclass
class HessianEigenResult:
    """Top Hessian eigenpairs with their accuracy.

    Attributes:
      eigenvalues: (k,) float64, largest algebraic eigenvalues in descending order.
      eigenvectors: k weight vectors, each a list of tensors in `model.trainable_variables` order
        (model dtype), of unit Euclidean norm over all weights. Pass this list back as
        `initial_vectors` to warm-start a later call.
      residual_norms: (k,) float64, `|H v - lambda v|` of each returned pair, measured with one
        more Hessian-vector product per pair (Lanczos) or from the last products of each
        vector, rotated with it by the Rayleigh-Ritz step (power).
      converged: (k,) bool, `residual_norms <= tol * |eigenvalues|`.
      num_hvps: Hessian-vector products computed in total, residual checks included.
      top_eigenvalue_history: (num_iterations,) float64, the estimate of the largest eigenvalue
        after each iteration (largest Ritz value for Lanczos, the Rayleigh quotient of the first
        vector for power iteration, then held at its final value while later vectors iterate).
      method: "lanczos" or "power".
    """

    eigenvalues: np.ndarray
    eigenvectors: list
    residual_norms: np.ndarray
    converged: np.ndarray
    num_hvps: int
    top_eigenvalue_history: np.ndarray
    method: str


class _FlatHessian:
    """Maps flat float64 vectors to Hessian-vector products and counts the products."""

    def __init__(self, training_loss: hvp_lib.TrainingLoss, weights: functional.Weights):
        self.training_loss = training_loss
        self.weights = weights
        self.shapes = [tuple(t.shape) for t in weights.trainable]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.dtype = tf.as_dtype(training_loss.model.trainable_variables[0].dtype)
        self.dimension = sum(self.sizes)
        self.eps = float(np.finfo(self.dtype.as_numpy_dtype).eps)
        self.num_hvps = 0

    def to_weight_vector(self, flat: np.ndarray) -> list:
        parts = np.split(flat, np.cumsum(self.sizes)[:-1])
        return [tf.constant(p.reshape(s), dtype=self.dtype) for p, s in zip(parts, self.shapes)]

    def to_flat(self, tensors: Sequence) -> np.ndarray:
        if len(tensors) != len(self.shapes):
            raise ValueError(
                f"A weight vector has {len(tensors)} tensors but the model has {len(self.shapes)} "
                "trainable variables. Pass tensors in model.trainable_variables order."
            )
        return np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in tensors])

    def matvec(self, flat: np.ndarray) -> np.ndarray:
        self.num_hvps += 1
        product = self.training_loss.hvp(self.to_weight_vector(flat), self.weights)
        return self.to_flat(product)


def _random_unit_vector(dimension: int, rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(dimension)
    return vector / np.linalg.norm(vector)


def _orthogonalize(vector: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Removes the span of the rows of `basis` from `vector`, twice for numerical safety."""
    for _ in range(2):
        vector = vector - basis.T @ (basis @ vector)
    return vector


def _lanczos_start_vector(
    initial: list[np.ndarray], dimension: int, rng: np.random.Generator
) -> np.ndarray:
    """Returns the normalised sum of the unit-normalised initial vectors, or a random vector."""
    if initial:
        start = np.sum([v / np.linalg.norm(v) for v in initial], axis=0)
        if np.linalg.norm(start) > 0:
            return start / np.linalg.norm(start)
    return _random_unit_vector(dimension, rng)


def _lanczos(operator, k, tol, max_iterations, initial, rng):
    """Runs Lanczos with full reorthogonalisation and returns (values, flat vectors, history)."""
    dimension = operator.dimension
    num_steps = min(max_iterations, dimension)
    basis = np.zeros((min(num_steps, 32), dimension))
    alphas, betas, history = [], [], []
    vector = _lanczos_start_vector(initial, dimension, rng)
    previous_beta = 0.0

    for step in range(num_steps):
        if step == basis.shape[0]:
            basis = np.concatenate([basis, np.zeros_like(basis)])[:num_steps]
        basis[step] = vector

        product = operator.matvec(vector)
        alpha = float(vector @ product)
        product = product - alpha * vector
        if step > 0:
            product = product - previous_beta * basis[step - 1]
        product = _orthogonalize(product, basis[: step + 1])
        beta = float(np.linalg.norm(product))
        alphas.append(alpha)

        ritz_values, ritz_coefficients = scipy.linalg.eigh_tridiagonal(
            np.array(alphas), np.array(betas)
        )
        top = np.argsort(ritz_values)[::-1][:k]
        history.append(ritz_values[top[0]])

        # The residual of Ritz pair i is beta * |last component of its tridiagonal eigenvector|.
        # It can fall below the rounding error of the products, which the final measured
        # residuals then reveal.
        estimated_residuals = beta * np.abs(ritz_coefficients[-1, top])
        if step + 1 >= k and np.all(estimated_residuals <= tol * np.abs(ritz_values[top])):
            break
        if step + 1 == num_steps:
            break

        scale = max(np.max(np.abs(ritz_values)), np.finfo(np.float64).tiny)
        if beta <= 10 * operator.eps * scale:
            # The Krylov space is invariant: continue with a new direction orthogonal to it.
            # Its coupling to the old block is zero, so the tridiagonal matrix stays exact.
            vector = _orthogonalize(_random_unit_vector(dimension, rng), basis[: step + 1])
            vector = vector / np.linalg.norm(vector)
            beta = 0.0
        else:
            vector = product / beta
        betas.append(beta)
        previous_beta = beta

    vectors = ritz_coefficients[:, top].T @ basis[: len(alphas)]
    return ritz_values[top], vectors, np.array(history)


def _power_iteration(operator, k, tol, max_iterations, initial, rng):
    """Power iteration with projection deflation, a shift and a final Rayleigh-Ritz step.

    Returns (values, vectors, residuals, history, reached_top). reached_top is False when the
    budget ran out right after converging to a dominant negative eigenvalue, before the shifted
    iteration could start, so the values returned are not the largest algebraic ones.
    """
    vectors, products, history = [], [], []
    shift, shifted = 0.0, False
    reached_top = True

    for index in range(k):
        found = np.array(vectors).reshape(len(vectors), operator.dimension)
        if index < len(initial):
            start = initial[index]
        else:
            start = _random_unit_vector(operator.dimension, rng)
        start = _orthogonalize(start, found)
        if np.linalg.norm(start) == 0:
            start = _orthogonalize(_random_unit_vector(operator.dimension, rng), found)
        vector = start / np.linalg.norm(start)

        for iteration in range(max_iterations):
            product = operator.matvec(vector)
            value = float(vector @ product)
            history.append(value if index == 0 else history[-1])

            # Earlier eigenvectors are only accurate to tol, so `H v` keeps a component along
            # them that iterating cannot remove. Convergence is judged without that component,
            # and the Rayleigh-Ritz step below removes it from the reported residuals.
            deflated_product = _orthogonalize(product, found)
            residual = float(np.linalg.norm(deflated_product - value * vector))
            if residual <= tol * abs(value):
                if shifted or value >= 0:
                    break
                if iteration + 1 == max_iterations:
                    reached_top = False
                    break
                # The iterate converged to the most negative eigenvalue, which dominated in
                # magnitude. Shifting by it makes the largest algebraic eigenvalue dominant, and
                # one shift suffices for all later values because deflation only removes
                # eigenvalues.
                shift, shifted = value, True
                vector = start / np.linalg.norm(start)
                continue

            if iteration + 1 < max_iterations:
                update = deflated_product - shift * vector
                vector = update / np.linalg.norm(update)

        vectors.append(vector)
        products.append(product)

    vectors, products = np.array(vectors), np.array(products)
    projected = vectors @ products.T
    values, rotation = np.linalg.eigh(0.5 * (projected + projected.T))
    vectors, products = rotation.T @ vectors, rotation.T @ products
    residuals = np.linalg.norm(products - values[:, None] * vectors, axis=1)
    return values, vectors, residuals, np.array(history), reached_top


def _dimension(weights: functional.Weights) -> int:
    return sum(int(np.prod(t.shape)) for t in weights.trainable)


def _validate(k, method, tol, max_iterations, dimension):
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}. Use one of {METHODS}.")
    if not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if k > dimension:
        raise ValueError(f"k={k} exceeds the number of trainable weights ({dimension}).")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    if not isinstance(max_iterations, (int, np.integer)) or max_iterations <= 0:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}.")
    if method == "lanczos" and max_iterations < k:
        raise ValueError(
            f"max_iterations={max_iterations} is below k={k}. Lanczos needs at least k steps."
        )


def hessian_top_eigenvalues(
    model: keras.Model,
    loss_fn: hvp_lib.LossFunction,
    data: Iterable,
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-4,
    max_iterations: int = 100,
    initial_vectors: Sequence[Sequence[tf.Tensor]] | None = None,
    weights=None,
    bn_mode: str = "inference",
    weight_decay: float = 0.0,
    decay_mask: Sequence[bool] | None = None,
    seed: int = 0,
) -> HessianEigenResult:
    """Computes the k largest algebraic eigenvalues of the training-loss Hessian.

    Each call builds and traces a new `hvp.TrainingLoss`. To measure many weight vectors of one
    model, build one and call `hessian_top_eigenvalues_of_loss` instead.

    Methods:
      "lanczos": Lanczos with full reorthogonalisation against every earlier basis vector. The
        tridiagonal eigenproblem is solved in float64 with `scipy.linalg.eigh_tridiagonal`. It
        stops when every top-k Ritz pair has an estimated residual `|H v - theta v|` of at most
        `tol * |theta|`. A warm start begins the Krylov space at the normalised sum of the
        (normalised) `initial_vectors`, so a start from the previous eigenvectors of a nearby
        Hessian contains most of the wanted directions from the first step. If the Krylov space
        becomes invariant before convergence, the iteration continues with a random direction
        orthogonal to it. Memory: the basis holds up to `max_iterations` float64 vectors of
        length d.
      "power": power iteration, one eigenvalue at a time, keeping each iterate orthogonal to
        the eigenvectors already found (projection deflation), then one Rayleigh-Ritz step on
        the k vectors found (no extra products). Power iteration converges to the eigenvalue
        of largest magnitude. When an iterate converges to a negative eigenvalue, that
        eigenvalue becomes the shift sigma, and the iteration restarts on `H - sigma I`, whose
        dominant eigenvalue is the largest algebraic one. Convergence is then governed by
        `(lambda_2 - sigma) / (lambda_1 - sigma)`, which is slow when large negative
        eigenvalues exist. `initial_vectors[i]` starts the i-th eigenvalue's iteration.

    Args:
      model: a Keras 3 model whose outputs are logits (n, K).
      loss_fn: per-example loss `loss_fn(labels, logits)`, see `hvp.LossSpec`.
      data: (x, y) batches (a `tf.data.Dataset` or a list) over which the mean loss is taken,
        read once into memory and reused by every product.
      k: number of eigenvalues.
      method: "lanczos" or "power".
      tol: relative residual tolerance, `|H v - lambda v| <= tol * |lambda|`. NOTE: products
        of a float32 model carry float32 rounding, so relative residuals below about 1e-6 are
        out of reach there, and an eigenvalue near zero may never meet a relative tolerance.
      max_iterations: Lanczos: largest Krylov dimension (one product each); power: largest
        number of products per eigenvalue.
      initial_vectors: weight vectors (tensor lists in `model.trainable_variables` order) to
        warm-start from, for example `previous_result.eigenvectors`. None starts at random.
      weights: where the Hessian is taken: a `functional.Weights`, a trainable tensor list or
        None for the model's current weights.
      bn_mode: "inference" or "train", see `hvp.LossSpec`.
      weight_decay: L2 coefficient of the penalty `0.5 * weight_decay * |w|^2`.
      decay_mask: one bool per trainable variable saying whether it is decayed. None decays
        all.
      seed: seed of the random start vectors.

    Returns:
      A `HessianEigenResult`. Unconverged values are flagged in `converged` and logged as a
      warning.

    Raises:
      ValueError: for an unknown method, k <= 0, k > d, tol <= 0 or max_iterations <= 0.
    """
    weights = functional.resolve_weights(model, weights)
    _validate(k, method, tol, max_iterations, _dimension(weights))
    spec = hvp_lib.LossSpec(loss_fn, bn_mode, weight_decay, decay_mask)
    return hessian_top_eigenvalues_of_loss(
        hvp_lib.TrainingLoss(model, spec, data),
        k=k,
        method=method,
        tol=tol,
        max_iterations=max_iterations,
        initial_vectors=initial_vectors,
        weights=weights,
        seed=seed,
    )


def hessian_top_eigenvalues_of_loss(
    training_loss: hvp_lib.TrainingLoss,
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-4,
    max_iterations: int = 100,
    initial_vectors: Sequence[Sequence[tf.Tensor]] | None = None,
    weights=None,
    seed: int = 0,
) -> HessianEigenResult:
    """Computes the k largest algebraic eigenvalues of the Hessian of `training_loss`.

    It runs the computation of `hessian_top_eigenvalues`, whose docstring describes the methods
    and arguments, on a prebuilt `hvp.TrainingLoss`. Reusing one instance across calls at
    different `weights` (for example at the snapshots of a run) traces its `tf.function`s only
    once.
    """
    weights = functional.resolve_weights(training_loss.model, weights)
    _validate(k, method, tol, max_iterations, _dimension(weights))
    operator = _FlatHessian(training_loss, weights)
    rng = np.random.default_rng(seed)
    initial = [operator.to_flat(v) for v in (initial_vectors or [])]

    if method == "lanczos":
        values, vectors, history = _lanczos(operator, k, tol, max_iterations, initial, rng)
        residuals = np.array(
            [np.linalg.norm(operator.matvec(v) - lam * v) for lam, v in zip(values, vectors)]
        )
    else:
        values, vectors, residuals, history, reached_top = _power_iteration(
            operator, k, tol, max_iterations, initial, rng
        )

    order = np.argsort(values)[::-1]
    values, vectors, residuals = values[order], vectors[order], residuals[order]
    converged = residuals <= tol * np.abs(values)
    if method == "power" and not reached_top:
        converged[:] = False
    if not np.all(converged):
        logging.warning(
            "Hessian %s iteration did not converge for %d of %d eigenvalues after %d "
            "Hessian-vector products: relative residuals %s exceed tol=%g. Raise "
            "max_iterations or tol.",
            method,
            int(np.sum(~converged)),
            k,
            operator.num_hvps,
            np.array2string(residuals / np.abs(values), precision=2),
            tol,
        )

    return HessianEigenResult(
        eigenvalues=values,
        eigenvectors=[operator.to_weight_vector(v) for v in vectors],
        residual_norms=residuals,
        converged=converged,
        num_hvps=operator.num_hvps,
        top_eigenvalue_history=history,
        method=method,
    )
