"""Escape threshold: whether one optimizer step is predicted to raise the training loss.

Take an update `w' = w - eta * Delta`, where Delta is the step direction computed from a
minibatch (for SGD, the minibatch gradient), g is the gradient of the full training loss R at w
and L its Hessian. A second-order Taylor expansion gives

    R(w') - R(w) ~= 0.5 * eta^2 * <Delta, L Delta> - eta * <Delta, g>.

Dividing by `0.5 * eta * |g|^2 > 0` gives the escape threshold

    T = (eta * <Delta, L Delta> - 2 * <Delta, g>) / |g|^2,

which is <= 0 when the quadratic model predicts a non-increasing loss (the step descends in the
quadratic basin) and > 0 when it predicts an increase (the step leaves the basin). For full-batch
gradient descent, Delta = g, and along the top Hessian eigenvector `<g, L g> = lambda_max |g|^2`,
so the largest value T can take is `eta * lambda_max - 2`, positive exactly when
`lambda_max > 2 / eta`.

Sign convention: positive means escape, for both functions here. Some texts write the
gradient-descent form as `2 - eta * lambda_max`, the negation of this one (positive there means
stable), and put eta in front of both terms of T, which does not follow from the expansion.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import keras
import numpy as np
from absl import logging

from tfntk.autodiff import functional
from tfntk.autodiff import hvp as hvp_lib


@dataclasses.dataclass
class EscapeThresholdResult:
    """Escape threshold of one step per minibatch, at one point in weight space.

    Attributes:
      mean: mean of `values` over the minibatches.
      std: standard deviation of `values` over the minibatches (ddof=0).
      values: (num_minibatches,) float64, the threshold T for each minibatch's step.
      curvature: (num_minibatches,) float64, `<Delta, L Delta>` per minibatch.
      alignment: (num_minibatches,) float64, `<Delta, g>` per minibatch.
      gradient_norm_squared: `|g|^2` of the full-data gradient.
      learning_rate: the eta used.
    """

    mean: float
    std: float
    values: np.ndarray
    curvature: np.ndarray
    alignment: np.ndarray
    gradient_norm_squared: float
    learning_rate: float


def gd_escape_threshold(learning_rate: float, lambda_max: float) -> float:
    """Returns `learning_rate * lambda_max - 2`, the escape threshold of full-batch gradient
    descent along the top Hessian eigenvector (positive: the step leaves the basin)."""
    return learning_rate * lambda_max - 2.0


def escape_threshold(
    model: keras.Model,
    loss_fn: hvp_lib.LossFunction,
    data: Iterable,
    minibatches: Iterable,
    learning_rate: float,
    weights=None,
    bn_mode: str = "inference",
    weight_decay: float = 0.0,
    decay_mask: Sequence[bool] | None = None,
) -> EscapeThresholdResult:
    """Estimates the escape threshold of SGD steps over a set of minibatches.

    For each minibatch, Delta is the gradient of the minibatch's mean loss (plain SGD without
    momentum), and T = (eta <Delta, L Delta> - 2 <Delta, g>) / |g|^2 with L and g the Hessian
    and gradient of the mean loss over `data`. Each minibatch costs one gradient on the
    minibatch and one Hessian-vector product over `data`. Passing `minibatches=data` as one
    batch gives the full-batch gradient-descent value.

    Each call builds and traces a new `hvp.TrainingLoss`. To evaluate many weight vectors of one
    model, build one and call `escape_threshold_of_loss` instead.

    Delta, g and L all use the same loss conventions (`bn_mode`, `weight_decay`). With
    `weight_decay > 0` the decay term `weight_decay * w` is part of Delta, as in SGD with a
    coupled L2 penalty. NOTE: a real SGD step on a batch-norm network uses batch statistics,
    so with `bn_mode="inference"` Delta differs from the step the optimizer takes.

    Args:
      model: a Keras 3 model whose outputs are logits (n, K).
      loss_fn: per-example loss `loss_fn(labels, logits)`, see `hvp.LossSpec`.
      data: (x, y) batches defining the full training loss R.
      minibatches: (x, y) minibatches, each giving one step direction. They must share the
        trailing shapes and dtypes of `data`.
      learning_rate: eta, > 0.
      weights: where to evaluate: a `functional.Weights`, a trainable list or None for the
        model's current weights.
      bn_mode, weight_decay, decay_mask: see `hvp.LossSpec`.

    Returns:
      An `EscapeThresholdResult`. If the full-data gradient is zero, the threshold is
      undefined: values are NaN and a warning is logged.
    """
    _check_learning_rate(learning_rate)
    spec = hvp_lib.LossSpec(loss_fn, bn_mode, weight_decay, decay_mask)
    return escape_threshold_of_loss(
        hvp_lib.TrainingLoss(model, spec, data), minibatches, learning_rate, weights=weights
    )


def escape_threshold_of_loss(
    training_loss: hvp_lib.TrainingLoss,
    minibatches: Iterable,
    learning_rate: float,
    weights=None,
) -> EscapeThresholdResult:
    """Estimates the escape threshold of SGD steps for a prebuilt `hvp.TrainingLoss`.

    It runs the computation of `escape_threshold`, whose docstring defines the threshold and
    the arguments, with `training_loss`'s loss conventions for the minibatch gradients too.
    Reusing one instance across calls at different `weights` traces its `tf.function`s only once.
    """
    _check_learning_rate(learning_rate)
    weights = functional.resolve_weights(training_loss.model, weights)

    _, gradient = training_loss.value_and_gradient(weights)
    gradient_norm_squared = float(functional.dot(gradient, gradient))
    if gradient_norm_squared == 0:
        logging.warning("The full-data gradient is zero, so the escape threshold is NaN.")

    curvature, alignment = [], []
    for minibatch in hvp_lib.materialize_batches(minibatches):
        _, direction = training_loss.value_and_gradient(weights, batches=[minibatch])
        curvature_product = training_loss.hvp(direction, weights)
        curvature.append(float(functional.dot(direction, curvature_product)))
        alignment.append(float(functional.dot(direction, gradient)))

    curvature, alignment = np.array(curvature), np.array(alignment)
    if gradient_norm_squared > 0:
        values = (learning_rate * curvature - 2.0 * alignment) / gradient_norm_squared
    else:
        values = np.full_like(curvature, np.nan)
    return EscapeThresholdResult(
        mean=float(np.mean(values)),
        std=float(np.std(values)),
        values=values,
        curvature=curvature,
        alignment=alignment,
        gradient_norm_squared=gradient_norm_squared,
        learning_rate=float(learning_rate),
    )


def _check_learning_rate(learning_rate: float) -> None:
    if not learning_rate > 0:
        raise ValueError(
            f"learning_rate must be > 0, got {learning_rate!r}. Pass the learning rate of the SGD "
            "steps to evaluate."
        )
