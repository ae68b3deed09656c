"""The empirical neural tangent kernel of a Keras classifier.

`empirical_ntk` returns K(x, x') = J(x) J(x')^T, where J(x) is the (K, d) Jacobian of the K logits
at input x with respect to all d trainable weights, with the model in inference mode (batch
normalization uses its moving statistics). It evaluates the model at any weight vector without
assigning to its variables, in blocks of inputs so that memory stays bounded for any number of
inputs, inside or outside `tf.function`.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from typing import Sequence

import keras
import tensorflow as tf
from absl import logging

from tfntk.autodiff import functional
from tfntk.autodiff import jacobian
from tfntk.autodiff import jacobian_factors
from tfntk.autodiff import ntk_contract

DEFAULT_BATCH_SIZE = 16
DEFAULT_JACOBIAN_MEMORY_GIB = 2.0


class NtkImplementation(enum.Enum):
    """Algorithm that `empirical_ntk` uses for J(x1) J(x2)^T.

    Below, b is `batch_size`, K the number of logits, d the number of trainable weights, A the
    activation memory of one input's forward pass, and n1, n2 the numbers of inputs.

    JACOBIAN: per-example Jacobians in per-layer factored form (see `jacobian_factors`). One
      forward and K backward passes over a block give every layer call's input activations and
      the cotangents of all K logits at its output. Dense and Conv kernels with few output
      positions are then contracted in factored form (patch Gram matrix times cotangents). The
      others are materialized as (b, K, d_layer) per-example gradients and contracted with one
      matrix product. The Jacobians of a panel of x1 blocks are computed once and kept while the
      blocks of x2 stream past. Compute: n1 + (n1 / panel) * n2 per-example Jacobians plus at
      most n1 * n2 * K^2 * d multiply-adds (K times fewer with `trace_logits`).
      Memory: (panel + b) * K * d floats of Jacobians, with the panel sized by
      `jacobian_memory_gib`, about (K + 1) * b * A for one block's passes, and the output.
      The fastest choice. It needs a functional model with one input whose layers with weights
      take one tensor. Layers other than Dense, Conv1D, Conv2D and BatchNormalization get their
      per-example gradients from a `tf.vectorized_map` of that layer alone.
    NTVP: NTK-vector products. For each block of x2, the per-example VJPs J(x2_j)^T e_l give
      b * K weight-space vectors, and one forward-mode JVP per vector through a block of x1
      (`tf.autodiff.ForwardAccumulator`, vectorized over the vectors) gives J(x1) J(x2_j)^T e_l.
      It uses only the model's forward pass and automatic differentiation, so it works for any
      model, but it costs n1 * n2 * K forward-mode passes of one input. Memory: b * K * d floats
      of VJPs plus about b^2 * K * A for the vectorized VJPs and JVPs, and the output.
    """

    JACOBIAN = "jacobian"
    NTVP = "ntvp"


def empirical_ntk(
    model: keras.Model,
    x1,
    x2=None,
    *,
    weights: functional.Weights | Sequence[tf.Tensor] | None = None,
    trace_logits: bool = False,
    implementation: str | NtkImplementation = NtkImplementation.JACOBIAN,
    batch_size: int | None = None,
    jacobian_memory_gib: float = DEFAULT_JACOBIAN_MEMORY_GIB,
) -> tf.Tensor:
    """Computes the empirical NTK of a model's logits with respect to its trainable weights.

    Args:
      model: a Keras 3 model with one input and logits output of shape (n, K).
      x1: inputs of shape (n1,) + input_shape.
      x2: inputs of shape (n2,) + input_shape, or None for x2 = x1, which computes only the
        blocks on and above the diagonal and fills the rest by symmetry.
      weights: where to evaluate: a `functional.Weights`, a list of tensors in
        `model.trainable_variables` order (paired with the model's current batch-norm
        statistics), or None for the model's current weights. The model is never modified.
      trace_logits: if True, return the logit-traced kernel sum_k J_k(x) . J_k(x') of shape
        (n1, n2) instead of the full (n1, n2, K, K) kernel.
      implementation: "jacobian" or "ntvp", an `NtkImplementation`; see its docstring for the
        cost and memory of each.
      batch_size: inputs per block, default `DEFAULT_BATCH_SIZE` (16). Larger blocks run
        faster and use more memory (see `NtkImplementation`).
      jacobian_memory_gib: memory for the x1 Jacobians kept across x2 blocks by the "jacobian"
        implementation, in GiB (2**30 bytes). At least one block is always kept.

    Returns:
      A float tensor of shape (n1, n2, K, K) with entry [i, j, k, l] = J_k(x1_i) . J_l(x2_j),
      or (n1, n2) with `trace_logits`.

    Inside `tf.function` the numbers of inputs must be static. Under a `tf.distribute` strategy
    with several replicas (in cross-replica context), blocks are placed on the replicas' devices
    in turn.
    """
    implementation = _parse_implementation(implementation)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if jacobian_memory_gib <= 0:
        raise ValueError(f"jacobian_memory_gib must be positive, got {jacobian_memory_gib}.")

    weights = jacobian.tensor_weights(model, weights)
    symmetric = x2 is None
    x1 = _check_inputs(model, x1, "x1")
    x2 = x1 if symmetric else _check_inputs(model, x2, "x2")

    rows, row_sizes = _split(x1, batch_size)
    columns, column_sizes = (rows, row_sizes) if symmetric else _split(x2, batch_size)
    if implementation is NtkImplementation.JACOBIAN:
        blocks = _jacobian_blocks(model, weights, rows, columns, symmetric, trace_logits, jacobian_memory_gib)
    else:
        blocks = _ntvp_blocks(model, weights, rows, columns, symmetric, trace_logits)
    return _assemble(blocks, row_sizes, column_sizes, symmetric, trace_logits)


def _parse_implementation(implementation) -> NtkImplementation:
    try:
        return NtkImplementation(implementation)
    except ValueError:
        choices = ", ".join(repr(i.value) for i in NtkImplementation)
        raise ValueError(f"Unknown NTK implementation {implementation!r}. Use one of {choices}.") from None


def _check_inputs(model: keras.Model, x, name: str) -> tf.Tensor:
    x = tf.convert_to_tensor(x, dtype=model.inputs[0].dtype)
    expected = tuple(model.inputs[0].shape[1:])
    got = tuple(x.shape[1:])
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        raise ValueError(f"{name} has example shape {got} but the model takes {expected}.")
    if x.shape[0] is None:
        raise ValueError(
            f"{name} has no static number of inputs. Inside tf.function, pass inputs with a "
            "static first dimension (an input_signature with a fixed batch size)."
        )
    return x


def _split(x: tf.Tensor, batch_size: int) -> tuple[list[tf.Tensor], list[int]]:
    """Splits x into blocks of min(batch_size, n) inputs and returns them with their sizes.

    The last block is padded with zero inputs to the common size, so each block function is
    traced once. `_assemble` drops the padded rows and columns.
    """
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("The NTK needs at least one input, got an empty batch.")
    size = min(batch_size, n)
    blocks, sizes = [], []
    for start in range(0, n, size):
        block = x[start : start + size]
        valid = min(size, n - start)
        if valid < size:
            block = tf.pad(block, [[0, size - valid]] + [[0, 0]] * (len(x.shape) - 1))
        blocks.append(block)
        sizes.append(valid)
    return blocks, sizes


def _devices() -> list[str | None]:
    """Returns the devices of the current strategy's replicas, or [None] for default placement."""
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1 and tf.distribute.in_cross_replica_context():
        return list(strategy.extended.worker_devices)
    return [None]


def _on(device: str | None):
    return contextlib.nullcontext() if device is None else tf.device(device)


def _jacobian_blocks(model, weights, rows, columns, symmetric, trace_logits, memory_gib) -> dict:
    probe = jacobian_factors.probe_for(model)
    factors_fn = jacobian_factors.cached_function(
        model,
        f"factors_trace={trace_logits}",
        lambda: lambda w, x: jacobian_factors.block_factors(probe, w, x, trace_logits),
    )
    contract_fn = jacobian_factors.cached_function(
        model,
        f"contract_trace={trace_logits}",
        lambda: lambda f1, f2: ntk_contract.contract_blocks(f1, f2, trace_logits),
    )

    batch_size = int(rows[0].shape[0])
    bytes_per_block = probe.bytes_per_input(trace_logits) * batch_size
    panel_blocks = max(1, int(memory_gib * 2**30 // bytes_per_block))
    logging.log_first_n(
        logging.INFO,
        "empirical_ntk: %d row blocks of %d inputs, %d kept per panel (%.3f GiB of Jacobians).",
        3, len(rows), batch_size, panel_blocks, panel_blocks * bytes_per_block / 2**30,
    )

    devices = _devices()
    blocks = {}
    for first in range(0, len(rows), panel_blocks):
        panel = range(first, min(first + panel_blocks, len(rows)))
        row_factors = {}
        for r in panel:
            with _on(devices[r % len(devices)]):
                row_factors[r] = factors_fn(weights, rows[r])
        for c in range(first if symmetric else 0, len(columns)):
            with _on(devices[c % len(devices)]):
                column_factors = row_factors[c] if symmetric and c in row_factors else factors_fn(weights, columns[c])
                for r in panel:
                    if not symmetric or r <= c:
                        blocks[r, c] = contract_fn(row_factors[r], column_factors)
    return blocks


def _ntvp_blocks(model, weights, rows, columns, symmetric, trace_logits) -> dict:
    model_ref = weakref.ref(model)
    vjp_fn = jacobian_factors.cached_function(
        model, "ntvp_vjps", lambda: lambda w, x: _per_example_vjps(model_ref(), w, x)
    )
    jvp_fn = jacobian_factors.cached_function(
        model, "ntvp_jvps", lambda: lambda w, x, t: _batched_jvps(model_ref(), w, x, t)
    )
    num_logits = int(model.outputs[0].shape[-1])

    devices = _devices()
    blocks = {}
    for c, column in enumerate(columns):
        with _on(devices[c % len(devices)]):
            tangents = vjp_fn(weights, column)
            for r, row in enumerate(rows):
                if symmetric and r > c:
                    continue
                products = jvp_fn(weights, row, tangents)
                b1, b2 = int(row.shape[0]), int(column.shape[0])
                kernel = tf.reshape(products, [b2, num_logits, b1, num_logits])
                kernel = tf.transpose(kernel, [2, 0, 3, 1])
                if trace_logits:
                    kernel = tf.reduce_sum(tf.linalg.diag_part(kernel), axis=-1)
                blocks[r, c] = kernel
    return blocks


def _per_example_vjps(model: keras.Model, weights: functional.Weights, x: tf.Tensor) -> list[tf.Tensor]:
    """Returns J(x_j)^T e_l for every input j and logit l, as tensors (b * K,) + weight shape.

    Inputs do not interact in inference mode, so the Jacobian of the block's (b, K) logits is
    the per-example Jacobian. `GradientTape.jacobian` runs b * K backward passes of the block
    under pfor, so this costs b times more than necessary: keep blocks small.
    """
    with tf.GradientTape() as tape:
        tape.watch(weights.trainable)
        logits = functional.logits_at(model, weights, x)
    jacobians = tape.jacobian(logits, weights.trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [tf.reshape(j, tf.concat([[-1], tf.shape(w)], axis=0)) for j, w in zip(jacobians, weights.trainable)]


def _batched_jvps(model: keras.Model, weights: functional.Weights, x: tf.Tensor, tangents: list) -> tf.Tensor:
    """Returns J(x) t for every tangent t: shape (T, b, K) for T tangents stacked on axis 0."""

    def jvp(tangent):
        with tf.autodiff.ForwardAccumulator(weights.trainable, tangent) as accumulator:
            logits = functional.logits_at(model, weights, x)
        return accumulator.jvp(logits, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return tf.vectorized_map(jvp, tangents)


def _assemble(blocks: dict, row_sizes: list, column_sizes: list, symmetric: bool, trace_logits: bool) -> tf.Tensor:
    """Concatenates the blocks, without padding, into the (n1, n2, ...) kernel."""
    transpose = [1, 0] if trace_logits else [1, 0, 3, 2]
    rows = []
    for r, row_size in enumerate(row_sizes):
        row = []
        for c, column_size in enumerate(column_sizes):
            block = tf.transpose(blocks[c, r], transpose) if symmetric and r > c else blocks[r, c]
            row.append(block[:row_size, :column_size])
        rows.append(tf.concat(row, axis=1))
    return tf.concat(rows, axis=0)
