"""Empirical NTK Gram matrices, the kernel distance between two of them, and kernel velocity."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfntk.autodiff import functional
from tfntk.autodiff import ntk

DEFAULT_VELOCITY_DT = 0.4

# Entries converted to float64 at a time by `kernel_distance`, so a large float32 kernel is
# never copied whole.
_DISTANCE_CHUNK = 1 << 22


def ntk_gram(
    model: keras.Model,
    x,
    *,
    weights: functional.Weights | Sequence[tf.Tensor] | None = None,
    trace_logits: bool = False,
    implementation: str | ntk.NtkImplementation = ntk.NtkImplementation.JACOBIAN,
    batch_size: int | None = None,
) -> np.ndarray:
    """Returns the empirical NTK Gram matrix of inputs x at `weights` as a float32 array.

    Shape (m, m, K, K), or (m, m) with `trace_logits` (sum over k of J_k(x) . J_k(x')). See
    `tfntk.autodiff.ntk.empirical_ntk` for the arguments.
    """
    kernel = ntk.empirical_ntk(
        model, x, weights=weights, trace_logits=trace_logits, implementation=implementation, batch_size=batch_size
    )
    return kernel.numpy()


def kernel_distance(kernel_a, kernel_b) -> float:
    """Returns 1 - <K_a, K_b>_F / (|K_a|_F |K_b|_F), accumulated in float64.

    0 for kernels that are positive multiples of each other, at most 2. Takes NumPy arrays or
    tensors of the same shape, full (m, m, K, K) or traced (m, m) alike.

    Raises:
      ValueError: if the shapes differ or a kernel is all zeros.
    """
    a = np.asarray(kernel_a).reshape(-1)
    b = np.asarray(kernel_b).reshape(-1)
    if np.shape(kernel_a) != np.shape(kernel_b):
        raise ValueError(f"Kernels must have the same shape, got {np.shape(kernel_a)} and {np.shape(kernel_b)}.")

    inner = norm_a = norm_b = 0.0
    for start in range(0, a.size, _DISTANCE_CHUNK):
        chunk_a = a[start : start + _DISTANCE_CHUNK].astype(np.float64)
        chunk_b = b[start : start + _DISTANCE_CHUNK].astype(np.float64)
        inner += float(chunk_a @ chunk_b)
        norm_a += float(chunk_a @ chunk_a)
        norm_b += float(chunk_b @ chunk_b)
    if norm_a == 0.0 or norm_b == 0.0:
        raise ValueError("Kernel distance is undefined for an all-zero kernel.")
    return 1.0 - inner / np.sqrt(norm_a * norm_b)


def kernel_velocity(
    epochs: Sequence[float],
    kernels: Sequence,
    dt: float = DEFAULT_VELOCITY_DT,
    tolerance: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Computes the kernel velocity S(K_t, K_{t + dt}) / dt along a sequence of snapshots.

    For each snapshot at epoch t, the partner is the later snapshot whose epoch is nearest to
    t + dt. Snapshots without a partner within `tolerance` of t + dt are skipped. The velocity
    divides by the partner's actual epoch difference, not by dt.

    Args:
      epochs: snapshot epochs (floats), strictly increasing.
      kernels: one Gram matrix per epoch, all of the same shape.
      dt: target epoch separation, 0.4 epochs by default.
      tolerance: largest accepted |t_partner - (t + dt)|, in epochs; None means dt / 2.

    Returns:
      (epochs, velocities): float64 arrays of the snapshots that have a partner and their
      velocities, in kernel distance per epoch.
    """
    times = np.asarray(epochs, dtype=np.float64)
    if times.ndim != 1 or len(times) != len(kernels):
        raise ValueError(f"Need one epoch per kernel, got {times.shape} epochs for {len(kernels)} kernels.")
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"Snapshot epochs must be strictly increasing, got {times.tolist()}.")
    if dt <= 0:
        raise ValueError(f"dt must be a positive number of epochs, got {dt}.")
    tolerance = dt / 2 if tolerance is None else float(tolerance)

    starts, velocities = [], []
    for i, t in enumerate(times):
        later = np.arange(i + 1, len(times))
        if later.size == 0:
            break
        j = later[np.argmin(np.abs(times[later] - (t + dt)))]
        if abs(times[j] - (t + dt)) > tolerance:
            continue
        starts.append(t)
        velocities.append(kernel_distance(kernels[i], kernels[j]) / (times[j] - t))
    return np.asarray(starts, dtype=np.float64), np.asarray(velocities, dtype=np.float64)
