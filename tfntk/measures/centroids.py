"""Logit gradient centroids and the alignment of two sets of them.

The centroid of class k is mu_k = (1/m) sum_i grad_w f_k(x_i), the mean over m inputs of the
gradient of logit k with respect to all trainable weights. Centroid alignment is the mean over
classes of the cosine similarity between mu_k at two weight vectors.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfntk.autodiff import functional
from tfntk.autodiff import jacobian


def logit_gradient_centroids(
    model: keras.Model,
    x,
    *,
    weights: functional.Weights | Sequence[tf.Tensor] | None = None,
    batch_size: int = jacobian.DEFAULT_SUMMED_BATCH_SIZE,
) -> np.ndarray:
    """Returns the K logit gradient centroids as a float32 array of shape (K, d).

    Row k is mu_k flattened in `model.trainable_variables` order (see `functional.flatten`).
    The model runs in inference mode at `weights` (None: its current weights) and is not
    modified.

    Args:
      model: a Keras 3 model with logits output (n, K).
      x: the m inputs, shape (m,) + input_shape.
      weights: a `functional.Weights`, a trainable tensor list, or None.
      batch_size: inputs per forward pass (each followed by K backward passes).
    """
    summed = jacobian.summed_logit_jacobian(model, x, weights=weights, batch_size=batch_size)
    num_inputs = int(np.shape(x)[0])
    num_logits = int(summed[0].shape[0])
    rows = tf.concat([tf.reshape(g, [num_logits, -1]) for g in summed], axis=1)
    return rows.numpy() / num_inputs


def centroid_alignment(centroids_a: np.ndarray, centroids_b: np.ndarray) -> float:
    """Returns (1/K) sum_k cos(mu_k, mu'_k) for two (K, d) centroid arrays, in float64.

    1 when every pair points the same way; -1 when every pair points opposite ways.

    Raises:
      ValueError: if the shapes differ or a centroid is zero.
    """
    a = np.asarray(centroids_a, dtype=np.float64)
    b = np.asarray(centroids_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"Centroids must be two (K, d) arrays of the same shape, got {a.shape} and {b.shape}.")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if np.any(norms == 0):
        zero = np.flatnonzero(norms == 0).tolist()
        raise ValueError(f"Centroid alignment is undefined because the centroids of classes {zero} are zero.")
    return float(np.mean(np.sum(a * b, axis=1) / norms))
