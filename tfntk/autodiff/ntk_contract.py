"""Contraction of two blocks of per-example logit Jacobians into an empirical NTK block."""

from __future__ import annotations

import tensorflow as tf

from tfntk.autodiff.jacobian_factors import BlockFactors


def _contract_flat(flat1: tf.Tensor, flat2: tf.Tensor, trace_logits: bool) -> tf.Tensor:
    """Contracts (b1, K, D) with (b2, K, D) over D: (b1, b2, K, K), or (b1, b2) summed over k = l."""
    if trace_logits:
        return tf.einsum("ikd,jkd->ij", flat1, flat2)
    return tf.einsum("ikd,jld->ijkl", flat1, flat2)


def _contract_structured(factors1: tuple, factors2: tuple, trace_logits: bool) -> tf.Tensor:
    """Contracts one kernel's per-example gradients without forming them.

    With patches A (b, P, C) and output cotangents G (b, K, P, O), the per-example kernel
    gradient is `sum_p A[i, p] outer G[i, k, p]`, so the kernel's NTK term is
    `sum_{p, q} <A1[i, p], A2[j, q]> <G1[i, k, p], G2[j, l, q]>`. It is evaluated as a patch Gram
    matrix (b1, b2, P, P), then H = Gram times G2 (b1, b2, K, P, O), then H against G1.
    Memory: b1 * b2 * K * P * O floats for H.
    """
    patches1, cotangents1 = factors1
    patches2, cotangents2 = factors2
    gram = tf.einsum("ipc,jqc->ijpq", patches1, patches2)
    mixed = tf.einsum("ijpq,jlqo->ijlpo", gram, cotangents2)
    if trace_logits:
        return tf.einsum("ikpo,ijkpo->ij", cotangents1, mixed)
    return tf.einsum("ikpo,ijlpo->ijkl", cotangents1, mixed)


def contract_blocks(factors1: BlockFactors, factors2: BlockFactors, trace_logits: bool) -> tf.Tensor:
    """Returns the NTK block between two blocks of inputs.

    Args:
      factors1, factors2: from `jacobian_factors.block_factors` with the same `trace_logits`.
      trace_logits: sum over the diagonal logit pairs (k, k) only.

    Returns:
      (b1, b2, K, K) with entry [i, j, k, l] = J_k(x_i) . J_l(x'_j), or (b1, b2) with entry
      sum_k J_k(x_i) . J_k(x'_j) when `trace_logits`.
    """
    kernel = _contract_flat(factors1.flat, factors2.flat, trace_logits)
    for structured1, structured2 in zip(factors1.structured, factors2.structured):
        kernel += _contract_structured(structured1, structured2, trace_logits)
    return kernel
