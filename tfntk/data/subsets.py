"""Fixed class-balanced subsets, such as the analysis inputs of kernel and ReLU measurements."""

from __future__ import annotations

import numpy as np


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Selects `size` example indices spread as evenly over the classes as the data allows.

    Each class gets `size // K` or `size // K + 1` examples, K the number of classes present. A
    class with fewer examples than its share contributes all of them and the shortfall is spread
    evenly over the larger classes. Which classes get the extra example, and which examples are
    picked inside each class, are drawn from `np.random.default_rng(seed)`.

    Args:
      labels: integer class labels, shape (n,).
      size: number of indices to return, 0 <= size <= n.
      seed: selection seed. The same (labels, size, seed) always gives the same subset.

    Returns:
      Sorted int64 indices into `labels`, shape (size,), without repeats.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}."
        )
    if not 0 <= size <= labels.shape[0]:
        raise ValueError(f"size {size} must be between 0 and the number of labels {labels.shape[0]}.")

    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = _balanced_quotas(counts, size, rng)

    chosen = []
    for label, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=quota, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _balanced_quotas(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Splits `size` over classes with `counts` examples, as evenly as the counts allow."""
    quotas = np.zeros_like(counts)
    remaining = size
    open_classes = list(np.argsort(counts, kind="stable"))

    # Smallest classes first: a class that cannot fill the even share gives all its examples.
    while open_classes and counts[open_classes[0]] <= remaining // len(open_classes):
        smallest = open_classes.pop(0)
        quotas[smallest] = counts[smallest]
        remaining -= counts[smallest]

    if open_classes:
        share, extra = divmod(remaining, len(open_classes))
        quotas[open_classes] = share
        quotas[rng.permutation(open_classes)[:extra]] += 1
    return quotas
