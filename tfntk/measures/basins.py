"""Error barriers, function-space distance and weight distance between two networks."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import keras
import numpy as np

from tfntk.autodiff import functional
from tfntk.autodiff.functional import Weights
from tfntk.measures import evaluation


@dataclasses.dataclass(frozen=True)
class BarrierResult:
    """Errors and losses along the straight line `alpha * w_a + (1 - alpha) * w_b`.

    Attributes:
      alphas: interpolation coefficients, shape (A,); alpha 1 is network a, alpha 0 network b.
      errors: error rate at each alpha, shape (A,).
      losses: mean cross-entropy at each alpha, shape (A,).
      barrier: max over alpha of the error minus the mean of the two endpoint errors.
      alpha_at_max: the alpha where the maximum error is reached.
    """

    alphas: np.ndarray
    errors: np.ndarray
    losses: np.ndarray
    barrier: float
    alpha_at_max: float


def error_barrier(
    model: keras.Model,
    weights_a: Weights,
    weights_b: Weights,
    x: np.ndarray,
    y: np.ndarray,
    alphas: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)),
    batch_norm_x: Optional[np.ndarray] = None,
    batch_size: int = 1000,
) -> BarrierResult:
    """Measures the error barrier between two networks along the straight line between them.

    Args:
      model: the architecture shared by both networks.
      weights_a, weights_b: the two networks.
      x, y: evaluation inputs (n, ...) and integer labels (n,).
      alphas: interpolation grid; it should contain 0 and 1, the two endpoints.
      batch_norm_x: training inputs on which the batch-norm statistics of every interpolated
        network (endpoints included) are recomputed. Required when the model has batch norm,
        because averaged weights do not match averaged moving statistics.
      batch_size: evaluation batch size.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    if not (np.any(np.isclose(alphas, 0.0)) and np.any(np.isclose(alphas, 1.0))):
        raise ValueError(f"Invalid alphas {alphas.tolist()}; the grid must include 0 and 1 (the two networks).")
    batch_norm = evaluation.has_batch_norm(model)
    if batch_norm and batch_norm_x is None:
        raise ValueError("The model has batch norm; pass batch_norm_x (training inputs) to recompute its statistics.")

    errors = []
    losses = []
    for alpha in alphas:
        trainable = functional.interpolate(weights_a.trainable, weights_b.trainable, float(alpha))
        point = Weights(trainable, list(weights_a.non_trainable))
        if batch_norm:
            point = evaluation.recompute_batch_norm_statistics(model, point, batch_norm_x)
        loss, error = evaluation.loss_and_error(evaluation.logits(model, point, x, batch_size), y)
        errors.append(error)
        losses.append(loss)

    errors = np.asarray(errors)
    endpoint_mean = 0.5 * (errors[np.argmin(np.abs(alphas - 1.0))] + errors[np.argmin(np.abs(alphas))])
    return BarrierResult(
        alphas=alphas,
        errors=errors,
        losses=np.asarray(losses),
        barrier=float(errors.max() - endpoint_mean),
        alpha_at_max=float(alphas[int(np.argmax(errors))]),
    )


def disagreement_normaliser(error_a: float, error_b: float, num_classes: int) -> float:
    """Z: expected disagreement of two independent random classifiers with these error rates.

    `Z = p (1 - p') + p' (1 - p) + p p' (K - 2) / (K - 1)`: one is right and the other wrong,
    or both are wrong and pick different wrong labels uniformly among the K - 1.
    """
    if num_classes < 2:
        raise ValueError(f"Invalid num_classes {num_classes}; a classifier needs at least 2 classes.")
    p, q = float(error_a), float(error_b)
    return p * (1 - q) + q * (1 - p) + p * q * (num_classes - 2) / (num_classes - 1)


def function_space_distance(
    predictions_a: np.ndarray, predictions_b: np.ndarray, labels: np.ndarray, num_classes: int
) -> float:
    """Fraction of inputs whose predicted labels differ, divided by `disagreement_normaliser`.

    Args:
      predictions_a, predictions_b: predicted labels, shape (n,).
      labels: true labels, shape (n,), used for the two error rates.
      num_classes: K.

    Returns:
      The distance; 1 means the two networks disagree as often as independent classifiers with
      the same error rates would. NaN when both networks are perfect (Z = 0).
    """
    disagreement = float(np.mean(predictions_a != predictions_b))
    z = disagreement_normaliser(np.mean(predictions_a != labels), np.mean(predictions_b != labels), num_classes)
    return disagreement / z if z > 0 else float("nan")


def weight_distance(weights_a: Weights, weights_b: Weights) -> float:
    """Euclidean (L2) distance between the trainable weights of two networks."""
    difference = [a - b for a, b in zip(weights_a.trainable, weights_b.trainable)]
    return float(functional.norm(difference))
