"""Per-example logit Jacobians of a Keras model in per-layer, factored form.

Some layers are linear in their weights: Dense, Conv1D, Conv2D, and the scale and offset of
batch normalization in inference mode. For them, the gradient of logit k at input x with respect
to the layer's weights is a product of two per-example tensors, the layer's input activation and
the cotangent of logit k at the layer's output. A convolution reads its input as patches, so the
gradient of its kernel is `sum_p patch_p(x) outer cotangent_{k,p}(x)` over output positions p.

`JacobianProbe` reads both tensors for a block of inputs with one forward and K backward passes
over a functional copy of the model that shares its layers. `block_factors` then either contracts
them into flat per-example gradients (materialized) or keeps them apart (structured), so that
`ntk_contract` can contract that layer's NTK term without forming its per-example gradients.
Layers of any other kind get their per-example gradients from their own `stateless_call` under
`tf.vectorized_map`.

Every formula here assumes that the examples of a batch do not interact. Feed-forward networks
in inference mode (batch norm with its moving statistics) satisfy this.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import weakref
from typing import NamedTuple

import keras
import tensorflow as tf

from tfntk.autodiff import functional


class LayerKind(enum.Enum):
    """Formula for the per-example gradients of one layer call."""

    DENSE = "dense"
    CONV = "conv"
    BATCH_NORM = "batch_norm"
    GENERIC = "generic"


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a layer with trainable weights in the model graph.

    Attributes:
      layer: the Keras layer (shared with the model).
      kind: which formula gives its per-example gradients.
      kernel_index, bias_index: positions in `model.trainable_variables` of the kernel (Dense,
        Conv) or scale (batch norm) and of the bias or offset; None when absent or frozen.
      statistics_indices: positions in `model.non_trainable_variables` of the moving mean and
        variance (batch norm only).
      trainable_indices, non_trainable_indices: positions of `layer.trainable_variables` and
        `layer.non_trainable_variables` in the model's lists (generic layers).
      input_shape, output_shape: shapes of one example's layer input and output.
    """

    layer: keras.layers.Layer
    kind: LayerKind
    kernel_index: int | None
    bias_index: int | None
    statistics_indices: tuple[int, ...]
    trainable_indices: tuple[int, ...]
    non_trainable_indices: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def positions(self) -> int:
        """Number of output positions P sharing the kernel (1 for a Dense layer on vectors)."""
        return math.prod(self.output_shape[:-1])

    @property
    def patch_size(self) -> int:
        """Length C of the input vector read by one output position (Dense, Conv)."""
        kernel_shape = self.layer.kernel.shape
        return math.prod(kernel_shape[:-1])

    @property
    def channels(self) -> int:
        return self.output_shape[-1]


class BlockFactors(NamedTuple):
    """Per-example logit Jacobians of a block of b inputs.

    Attributes:
      flat: (b, K, D) per-example gradients of every weight that is not in `structured`,
        concatenated in a fixed order, so that two blocks' `flat` tensors contract directly.
      structured: one (activations, cotangents) pair per structured kernel: activations (b, P, C)
        are the inputs (patches) seen by the P output positions, cotangents (b, K, P, O) the
        gradients of each logit with respect to the layer output. The per-example kernel
        gradient is `einsum('bpc,bkpo->bkco', activations, cotangents)`.
    """

    flat: tf.Tensor
    structured: tuple


def _linear_activation(layer: keras.layers.Layer) -> bool:
    return getattr(layer, "activation", None) is keras.activations.linear


def _classify(layer: keras.layers.Layer, input_rank: int) -> LayerKind:
    """Picks the fastest formula that is exact for `layer`."""
    if getattr(layer, "quantization_mode", None) is not None or getattr(layer, "lora_enabled", False):
        return LayerKind.GENERIC
    if type(layer) is keras.layers.Dense and _linear_activation(layer):
        return LayerKind.DENSE
    if (
        type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D)
        and _linear_activation(layer)
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and layer.padding in ("valid", "same")
    ):
        return LayerKind.CONV
    if type(layer) is keras.layers.BatchNormalization and layer.axis in (-1, input_rank - 1):
        return LayerKind.BATCH_NORM
    return LayerKind.GENERIC


class _PerturbationTap(keras.layers.Layer):
    """Adds `perturbation` (when set) to its input, so a tape can read the cotangent there.

    The perturbation is a plain Python attribute set just before a call and cleared after it,
    which keeps it out of the layer's tracked state.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "perturbation", None)

    def call(self, inputs):
        if self.perturbation is None:
            return inputs
        return inputs + self.perturbation


class JacobianProbe:
    """A functional copy of a model that exposes what per-example Jacobians are made of.

    The copy shares the model's layers (so its variables are the model's) and returns the logits
    followed by the input of each layer call with trainable weights. A tap after each such call
    adds a tensor that `activations_and_cotangents` sets to zeros and watches, so the gradient
    with respect to it is the cotangent at that call's output.

    Build one with `probe_for(model)`, which caches it per model.
    """

    def __init__(self, model: keras.Model):
        # Indices refer to the variable order of the model as given, before any conversion.
        trainable_index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        non_trainable_index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        variable_paths = [v.path for v in model.trainable_variables]
        if isinstance(model, keras.Sequential):
            model = keras.Model(model.inputs, model.outputs)
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError(
                f"The structured Jacobian needs a model with one input and one logits output, got "
                f"{len(model.inputs)} inputs and {len(model.outputs)} outputs. Use "
                "implementation='ntvp'."
            )
        self.num_logits = int(model.outputs[0].shape[-1])

        recorded = []

        def call_function(layer, *args, **kwargs):
            outputs = layer(*args, **kwargs)
            if not layer.trainable_variables:
                return outputs
            if len(args) != 1 or isinstance(outputs, (list, tuple, dict)):
                raise ValueError(
                    f"Layer {layer.name!r} has trainable weights but several inputs or outputs, "
                    "which the structured Jacobian does not support. Use implementation='ntvp'."
                )
            # The tap takes the layer's dtype policy, so it never casts a float64 output to float32.
            tap = _PerturbationTap(dtype=layer.dtype_policy, name=f"{layer.name}_cotangent_tap_{len(recorded)}")
            recorded.append((layer, args[0], outputs, tap))
            return tap(outputs)

        copy = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call_function)
        self.model = keras.Model(copy.inputs, [copy.outputs[0]] + [r[1] for r in recorded])
        self.calls = [
            _describe_call(layer, layer_input, layer_output, trainable_index, non_trainable_index)
            for layer, layer_input, layer_output, _ in recorded
        ]
        self._taps = [r[3] for r in recorded]
        self.trainable_indices = [trainable_index[id(v)] for v in self.model.trainable_variables]
        self.non_trainable_indices = [non_trainable_index[id(v)] for v in self.model.non_trainable_variables]

        covered = {i for call in self.calls for i in call.trainable_indices}
        missing = [path for i, path in enumerate(variable_paths) if i not in covered]
        if missing:
            raise ValueError(
                f"Trainable variables {missing} are not weights of any layer call in the model graph. "
                "Use implementation='ntvp'."
            )
        self._shared = _shared_variables(self.calls)

    def structured_calls(self, trace_logits: bool) -> list[bool]:
        """Marks the Dense and Conv calls whose kernel is contracted in factored form.

        Take a kernel with patch size C, O channels and P output positions. Contracting its
        per-example gradients costs `K^2 C O` multiply-adds per pair of inputs (`K C O` with
        `trace_logits`). The factored form costs `P^2 C + K P O (P + K)` (`P^2 C + K P O (P + 1)`
        with `trace_logits`). The cheaper one is taken, except that a kernel shared by several
        calls is always materialized.
        """
        marks = []
        for call in self.calls:
            if call.kind not in (LayerKind.DENSE, LayerKind.CONV) or call.kernel_index is None:
                marks.append(False)
                continue
            if call.kernel_index in self._shared:
                marks.append(False)
                continue
            k = self.num_logits
            p, c, o = call.positions, call.patch_size, call.channels
            if trace_logits:
                materialized = k * c * o
                factored = p * p * c + k * p * o * (p + 1)
            else:
                materialized = k * k * c * o
                factored = p * p * c + k * p * o * (p + k)
            marks.append(factored < materialized)
        return marks

    def bytes_per_input(self, trace_logits: bool) -> int:
        """Returns the float32 bytes of one input's `BlockFactors`."""
        marks = self.structured_calls(trace_logits)
        flat_size, structured_size = _flat_size(self.calls, marks), 0
        for call, structured in zip(self.calls, marks):
            if structured:
                structured_size += call.positions * (call.patch_size + self.num_logits * call.channels)
        return 4 * (self.num_logits * flat_size + structured_size)

    def activations_and_cotangents(
        self, weights: functional.Weights, x: tf.Tensor
    ) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """Evaluates every recorded call's input and the logits' cotangents at its output.

        One forward pass over the block, then K backward passes (one per logit) through the
        taps. Memory: one forward pass of b inputs plus the K cotangents of every recorded call.

        Args:
          weights: where to evaluate, in the original model's variable order.
          x: inputs of shape (b, ...).

        Returns:
          activations: per call, its input of shape (b,) + input_shape.
          cotangents: per call, shape (K, b) + output_shape: entry [k, i] is the gradient of
            logit k at input i with respect to that call's output at input i.
        """
        b = tf.shape(x)[0]
        trainable = [weights.trainable[i] for i in self.trainable_indices]
        non_trainable = [weights.non_trainable[i] for i in self.non_trainable_indices]
        perturbations = [tf.zeros(tf.concat([[b], call.output_shape], axis=0), x.dtype) for call in self.calls]

        with tf.GradientTape(persistent=True) as tape:
            tape.watch(perturbations)
            for tap, perturbation in zip(self._taps, perturbations):
                object.__setattr__(tap, "perturbation", perturbation)
            try:
                outputs, _ = self.model.stateless_call(trainable, non_trainable, x, training=False)
            finally:
                for tap in self._taps:
                    object.__setattr__(tap, "perturbation", None)
        logits, activations = outputs[0], outputs[1:]

        per_logit = []
        for k in range(self.num_logits):
            selector = tf.one_hot(tf.fill([b], k), self.num_logits, dtype=logits.dtype)
            per_logit.append(
                tape.gradient(
                    logits, perturbations, output_gradients=selector,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
            )
        del tape
        cotangents = [tf.stack([g[c] for g in per_logit], axis=0) for c in range(len(self.calls))]
        return activations, cotangents


def _describe_call(layer, layer_input, layer_output, trainable_index, non_trainable_index) -> LayerCall:
    if None in layer_input.shape[1:] or None in layer_output.shape[1:]:
        raise ValueError(
            f"Layer {layer.name!r} has input shape {layer_input.shape} and output shape "
            f"{layer_output.shape}, but the structured Jacobian needs static example shapes. "
            "Build the model with a fixed input shape or use implementation='ntvp'."
        )
    input_shape = tuple(int(d) for d in layer_input.shape[1:])
    output_shape = tuple(int(d) for d in layer_output.shape[1:])
    kind = _classify(layer, len(layer_input.shape))
    kernel_index = bias_index = None
    statistics = ()
    if kind in (LayerKind.DENSE, LayerKind.CONV):
        kernel_index = trainable_index.get(id(layer.kernel))
        bias_index = trainable_index.get(id(layer.bias)) if layer.use_bias else None
    elif kind is LayerKind.BATCH_NORM:
        kernel_index = trainable_index.get(id(layer.gamma)) if layer.scale else None
        bias_index = trainable_index.get(id(layer.beta)) if layer.center else None
        statistics = (non_trainable_index[id(layer.moving_mean)], non_trainable_index[id(layer.moving_variance)])
    return LayerCall(
        layer=layer,
        kind=kind,
        kernel_index=kernel_index,
        bias_index=bias_index,
        statistics_indices=statistics,
        trainable_indices=tuple(trainable_index[id(v)] for v in layer.trainable_variables),
        non_trainable_indices=tuple(non_trainable_index[id(v)] for v in layer.non_trainable_variables),
        input_shape=input_shape,
        output_shape=output_shape,
    )


def _shared_variables(calls: list[LayerCall]) -> set[int]:
    seen, shared = set(), set()
    for call in calls:
        for i in call.trainable_indices:
            (shared if i in seen else seen).add(i)
    return shared


def _flat_variables(calls: list[LayerCall], structured: list[bool]) -> list[int]:
    """Returns the sorted trainable indices whose per-example gradients are materialized."""
    indices = set()
    for call, is_structured in zip(calls, structured):
        indices.update(call.trainable_indices)
        if is_structured:
            indices.discard(call.kernel_index)
    return sorted(indices)


def _flat_size(calls: list[LayerCall], structured: list[bool]) -> int:
    sizes = {}
    for call in calls:
        for i, v in zip(call.trainable_indices, call.layer.trainable_variables):
            sizes[i] = math.prod(v.shape)
    return sum(sizes[i] for i in _flat_variables(calls, structured))


_PROBES: "weakref.WeakKeyDictionary[keras.Model, JacobianProbe]" = weakref.WeakKeyDictionary()


def probe_for(model: keras.Model) -> JacobianProbe:
    """Returns the cached `JacobianProbe` of `model`, building it on first use."""
    probe = _PROBES.get(model)
    if probe is None:
        probe = JacobianProbe(model)
        _PROBES[model] = probe
    return probe


_FUNCTIONS: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def cached_function(model: keras.Model, name: str, build):
    """Returns a `tf.function` (without autograph) cached per model and name.

    `build()` returns the Python callable on first use. Caching keeps eager callers from
    retracing on every call; inside an outer `tf.function` the inner one is inlined.
    """
    functions = _FUNCTIONS.setdefault(model, {})
    if name not in functions:
        functions[name] = tf.function(build(), autograph=False)
    return functions[name]


def conv_patches(call: LayerCall, activations: tf.Tensor) -> tf.Tensor:
    """Returns the (b, P, C) inputs seen by each output position of a Dense or Conv call.

    For a convolution, C = prod(kernel_size) * input channels in the kernel's row-major order,
    so that `patches @ reshape(kernel, (C, O))` is the layer output without bias.
    """
    if call.kind is LayerKind.DENSE:
        return tf.reshape(activations, [-1, call.positions, call.patch_size])

    layer = call.layer
    if len(layer.kernel_size) == 1:
        images = activations[:, tf.newaxis]
        sizes = [1, 1, layer.kernel_size[0], 1]
        strides = [1, 1, layer.strides[0], 1]
        rates = [1, 1, layer.dilation_rate[0], 1]
    else:
        images = activations
        sizes = [1, *layer.kernel_size, 1]
        strides = [1, *layer.strides, 1]
        rates = [1, *layer.dilation_rate, 1]
    patches = tf.image.extract_patches(images, sizes=sizes, strides=strides, rates=rates, padding=layer.padding.upper())
    return tf.reshape(patches, [-1, call.positions, call.patch_size])


def _generic_gradients(
    call: LayerCall, weights: functional.Weights, activations: tf.Tensor, cotangents: tf.Tensor
) -> list[tf.Tensor]:
    """Per-example gradients of a layer of any kind: (b, K, size) for each of its weights.

    Runs the layer's own `stateless_call` once per (logit, example) pair under
    `tf.vectorized_map`, with the cotangent as output gradient.
    """
    layer = call.layer
    trainable = [weights.trainable[i] for i in call.trainable_indices]
    non_trainable = [weights.non_trainable[i] for i in call.non_trainable_indices]
    kwargs = {"training": False} if "training" in inspect.signature(layer.call).parameters else {}
    k = cotangents.shape[0]
    b = tf.shape(activations)[0]
    tiled_inputs = tf.tile(activations, tf.concat([[k], tf.ones([tf.rank(activations) - 1], tf.int32)], axis=0))
    flat_cotangents = tf.reshape(cotangents, tf.concat([[-1], call.output_shape], axis=0))

    def per_pair(pair):
        layer_input, cotangent = pair
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            outputs, _ = layer.stateless_call(trainable, non_trainable, layer_input[tf.newaxis], **kwargs)
        gradients = tape.gradient(
            outputs, trainable, output_gradients=cotangent[tf.newaxis],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [tf.reshape(g, [-1]) for g in gradients]

    gradients = tf.vectorized_map(per_pair, (tiled_inputs, flat_cotangents))
    return [tf.transpose(tf.reshape(g, [k, b, -1]), [1, 0, 2]) for g in gradients]


def _kernel_gradients(patches: tf.Tensor, cotangents: tf.Tensor) -> tf.Tensor:
    """Materializes per-example kernel gradients (b, K, C * O) from patches (b, P, C) and
    logit-major cotangents (K, b, P, O), as one batched matrix product over examples."""
    k, b, p, o = tf.unstack(tf.shape(cotangents))
    c = tf.shape(patches)[2]
    by_position = tf.reshape(tf.transpose(cotangents, [1, 2, 0, 3]), [b, p, k * o])
    products = tf.matmul(patches, by_position, transpose_a=True)
    products = tf.transpose(tf.reshape(products, [b, c, k, o]), [0, 2, 1, 3])
    return tf.reshape(products, [b, k, c * o])


def _call_gradients(
    call: LayerCall, weights: functional.Weights, activations: tf.Tensor, cotangents: tf.Tensor,
    structured: bool,
) -> tuple[dict[int, tf.Tensor], tuple | None]:
    """Returns this call's materialized per-example gradients {trainable index: (b, K, size)}
    and, when `structured`, its kernel's (patches, cotangents) pair for `BlockFactors`."""
    if call.kind is LayerKind.GENERIC:
        return dict(zip(call.trainable_indices, _generic_gradients(call, weights, activations, cotangents))), None

    k = cotangents.shape[0]
    b = tf.shape(activations)[0]
    position_cotangents = tf.reshape(cotangents, [k, b, call.positions, call.channels])
    gradients, factors = {}, None
    if call.bias_index is not None:
        gradients[call.bias_index] = tf.transpose(tf.reduce_sum(position_cotangents, axis=2), [1, 0, 2])

    if call.kind is LayerKind.BATCH_NORM:
        if call.kernel_index is not None:
            mean = weights.non_trainable[call.statistics_indices[0]]
            variance = weights.non_trainable[call.statistics_indices[1]]
            normalized = (activations - mean) * tf.math.rsqrt(variance + call.layer.epsilon)
            normalized = tf.reshape(normalized, [b, call.positions, call.channels])
            gradients[call.kernel_index] = tf.einsum("bpo,kbpo->bko", normalized, position_cotangents)
        return gradients, None

    if call.kernel_index is not None:
        patches = conv_patches(call, activations)
        if structured:
            factors = (patches, tf.transpose(position_cotangents, [1, 0, 2, 3]))
        else:
            gradients[call.kernel_index] = _kernel_gradients(patches, position_cotangents)
    return gradients, factors


def block_factors(
    probe: JacobianProbe, weights: functional.Weights, x: tf.Tensor, trace_logits: bool
) -> BlockFactors:
    """Computes the per-example logit Jacobians of a block of inputs in factored form.

    Args:
      probe: from `probe_for(model)`.
      weights: where to evaluate.
      x: inputs of shape (b, ...).
      trace_logits: selects which kernels are kept factored (see `structured_calls`), so the
        row and column blocks of one kernel must use the same value.

    Returns:
      `BlockFactors` whose `flat` tensor has shape (b, K, D).
    """
    marks = probe.structured_calls(trace_logits)
    activations, cotangents = probe.activations_and_cotangents(weights, x)

    gradients, structured = {}, []
    for call, a, g, mark in zip(probe.calls, activations, cotangents, marks):
        call_gradients, factors = _call_gradients(call, weights, a, g, mark)
        for index, gradient in call_gradients.items():
            gradients[index] = gradients[index] + gradient if index in gradients else gradient
        if factors is not None:
            structured.append(factors)

    order = _flat_variables(probe.calls, marks)
    if order:
        flat = tf.concat([gradients[i] for i in order], axis=2)
    else:
        flat = tf.zeros([tf.shape(x)[0], probe.num_logits, 0], x.dtype)
    return BlockFactors(flat, tuple(structured))


def per_example_jacobian(probe: JacobianProbe, weights: functional.Weights, x: tf.Tensor) -> list[tf.Tensor]:
    """Returns the per-example logit Jacobian of each weight: (b, K) + weight shape, for all weights.

    Every kernel is materialized here, so memory is b * K * d floats.
    """
    activations, cotangents = probe.activations_and_cotangents(weights, x)
    gradients = {}
    for call, a, g in zip(probe.calls, activations, cotangents):
        call_gradients, _ = _call_gradients(call, weights, a, g, structured=False)
        for index, gradient in call_gradients.items():
            gradients[index] = gradients[index] + gradient if index in gradients else gradient
    b = tf.shape(x)[0]
    return [
        tf.reshape(gradients[i], tf.concat([[b, probe.num_logits], tf.shape(w)], axis=0))
        for i, w in enumerate(weights.trainable)
    ]
