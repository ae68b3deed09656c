"""Loss, gradient and Hessian-vector products of a model's training loss over fixed batches.

The loss is the mean per-example loss over every example of the given batches,

    R(w) = (1 / N) sum_i loss_fn(y_i, f_w(x_i)) + 0.5 * weight_decay * |w_decayed|^2,

with N the total number of examples. It is assembled batch by batch: each batch contributes its
batch-mean loss (and gradient, and Hessian-vector product) weighted by `n_batch / N`. The result
is therefore exact for the whole data and independent of how the data is split into batches,
except in `bn_mode="train"`, where the batch statistics depend on the split by definition.

Hessian-vector products are forward-over-reverse: a `tf.autodiff.ForwardAccumulator` whose
primals are the weight tensors (tangents: the vector) records a `tf.GradientTape` gradient, and
the JVP of that gradient is `H v`. The weights are tensors passed to `model.stateless_call`, so
nothing assigns to the model's variables.

Batch norm has two loss modes:
  - `bn_mode="inference"` (default): batch norm normalises with its moving statistics, so the
    loss is a sum of per-example terms.
  - `bn_mode="train"`: the model runs with `training=True`, so batch norm normalises each fixed
    batch with that batch's own statistics. The updated moving statistics are discarded.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import keras
import tensorflow as tf

from tfntk.autodiff import functional

BN_MODES = ("inference", "train")

LossFunction = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Definition of a training loss from a model's logits.

    Attributes:
      loss_fn: `loss_fn(labels, logits)` returning per-example losses of shape (n,), for example
        `functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)`.
        A loss that is already a batch mean (shape ()) also works, because a batch mean of a
        scalar is the scalar.
      bn_mode: "inference" (batch norm with moving statistics) or "train" (batch norm with the
        statistics of each fixed batch, without updating the moving statistics). In "train" mode
        the model runs with `training=True`, which also turns on dropout if the model has any.
      weight_decay: coefficient of the L2 penalty `0.5 * weight_decay * |w|^2` added to the loss.
        It adds `weight_decay * w` to the gradient and `weight_decay * v` to `H v`, which matches
        an optimizer that adds `weight_decay * w` to each gradient (coupled L2, as in SGD).
      decay_mask: one bool per trainable variable, in `model.trainable_variables` order, saying
        which variables are decayed. None decays every trainable variable.
    """

    loss_fn: LossFunction
    bn_mode: str = "inference"
    weight_decay: float = 0.0
    decay_mask: tuple[bool, ...] | None = None

    def __post_init__(self):
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"Unknown bn_mode {self.bn_mode!r}. Use one of {BN_MODES}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.decay_mask is not None:
            object.__setattr__(self, "decay_mask", tuple(bool(m) for m in self.decay_mask))


def materialize_batches(data: Iterable) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Reads every (x, y) batch of `data` (a `tf.data.Dataset` or a sequence) into a list.

    Holding the batches fixed makes every loss, gradient and HVP use the same examples even
    when the dataset reshuffles on each pass. All batches are kept in memory.
    """
    batches = []
    for index, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"Batch {index} is a {type(batch).__name__}, expected an (x, y) pair. "
                "Pass a dataset or list of (inputs, labels) batches."
            )
        x, y = batch
        batches.append((tf.convert_to_tensor(x), tf.convert_to_tensor(y)))
    if not batches:
        raise ValueError("data contains no batches. Pass at least one (x, y) batch.")
    return batches


class TrainingLoss:
    """The training loss of one model over fixed batches, with its gradient and HVPs.

    Build one instance and reuse it for many calls: its `tf.function`s are traced once per
    instance, with the batch dimension left unknown so that a smaller last batch does not retrace.

    Args:
      model: a Keras 3 model whose outputs are logits of shape (n, K).
      spec: how the loss is formed (loss function, batch-norm mode, weight decay).
      data: (x, y) batches, a `tf.data.Dataset` or a sequence, read once into memory.
    """

    def __init__(self, model: keras.Model, spec: LossSpec, data: Iterable):
        self.model = model
        self.spec = spec
        self.batches = materialize_batches(data)
        self.num_examples = sum(int(x.shape[0]) for x, _ in self.batches)
        self._decay_mask = self._resolve_decay_mask(model, spec.decay_mask)

        weight_signature = [tf.TensorSpec(v.shape, v.dtype) for v in model.trainable_variables]
        state_signature = [tf.TensorSpec(v.shape, v.dtype) for v in model.non_trainable_variables]
        x0, y0 = self.batches[0]
        batch_signature = [
            tf.TensorSpec([None] + list(x0.shape[1:]), x0.dtype),
            tf.TensorSpec([None] + list(y0.shape[1:]), y0.dtype),
        ]
        self._batch_loss_and_gradient = tf.function(
            self._batch_loss_and_gradient_fn,
            input_signature=[weight_signature, state_signature] + batch_signature,
        )
        self._batch_hvp = tf.function(
            self._batch_hvp_fn,
            input_signature=[weight_signature, state_signature, weight_signature] + batch_signature,
        )

    @staticmethod
    def _resolve_decay_mask(model: keras.Model, decay_mask) -> tuple[bool, ...]:
        num_variables = len(model.trainable_variables)
        if decay_mask is None:
            return (True,) * num_variables
        if len(decay_mask) != num_variables:
            raise ValueError(
                f"decay_mask has {len(decay_mask)} entries but the model has {num_variables} "
                "trainable variables. Give one bool per variable in trainable_variables order."
            )
        return tuple(decay_mask)

    def _batch_mean_loss(self, trainable, non_trainable, x, y) -> tf.Tensor:
        training = self.spec.bn_mode == "train"
        logits, _ = self.model.stateless_call(trainable, non_trainable, x, training=training)
        return tf.reduce_mean(self.spec.loss_fn(y, logits))

    def _batch_loss_and_gradient_fn(self, trainable, non_trainable, x, y):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            loss = self._batch_mean_loss(trainable, non_trainable, x, y)
        zero = tf.UnconnectedGradients.ZERO
        gradient = tape.gradient(loss, trainable, unconnected_gradients=zero)
        return loss, gradient

    def _batch_hvp_fn(self, trainable, non_trainable, vector, x, y):
        with tf.autodiff.ForwardAccumulator(trainable, vector) as accumulator:
            _, gradient = self._batch_loss_and_gradient_fn(trainable, non_trainable, x, y)
        return accumulator.jvp(gradient, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    @staticmethod
    def _weighted_sum(batch_fn, batches) -> list:
        """Sums `batch_fn(x, y)` (a list of tensors) over batches, weighted by n_batch / N."""
        sizes = [int(x.shape[0]) for x, _ in batches]
        total = None
        for (x, y), size in zip(batches, sizes):
            fraction = size / sum(sizes)
            terms = [fraction * t for t in batch_fn(x, y)]
            total = terms if total is None else [a + b for a, b in zip(total, terms)]
        return total

    def _cast_like_weights(self, tensors: Sequence, name: str) -> list:
        variables = self.model.trainable_variables
        if len(tensors) != len(variables):
            raise ValueError(
                f"{name} has {len(tensors)} tensors but the model has {len(variables)} trainable "
                "variables. Pass tensors in model.trainable_variables order."
            )
        return [tf.cast(t, v.dtype) for t, v in zip(tensors, variables)]

    def value_and_gradient(
        self, weights=None, batches: Iterable | None = None
    ) -> tuple[tf.Tensor, list]:
        """Computes the loss and its gradient with respect to the trainable weights.

        Args:
          weights: a `functional.Weights`, a trainable tensor list, or None for the model's
            current weights.
          batches: (x, y) batches to use in place of the stored ones (for example one
            minibatch), with the same trailing shapes and dtypes so that nothing retraces.

        Returns:
          (loss, gradient): a scalar tensor and a tensor list shaped like the trainable weights.
        """
        weights = functional.resolve_weights(self.model, weights)
        trainable = self._cast_like_weights(weights.trainable, "weights")

        def batch_fn(x, y):
            loss, gradient = self._batch_loss_and_gradient(trainable, weights.non_trainable, x, y)
            return [loss] + list(gradient)

        batches = self.batches if batches is None else materialize_batches(batches)
        loss, *gradient = self._weighted_sum(batch_fn, batches)

        if self.spec.weight_decay:
            penalty = tf.add_n(
                [tf.reduce_sum(tf.square(w)) for w, m in zip(trainable, self._decay_mask) if m]
                or [tf.zeros((), loss.dtype)]
            )
            loss = loss + tf.constant(0.5 * self.spec.weight_decay, loss.dtype) * penalty
            gradient = self._add_decay(gradient, trainable)
        return loss, gradient

    def hvp(self, vector: Sequence[tf.Tensor], weights=None) -> list:
        """Computes `H v`, the Hessian of the loss times `vector`.

        Args:
          vector: tensors shaped like the trainable weights, in `model.trainable_variables` order.
          weights: where the Hessian is taken, as in `value_and_gradient`.

        Returns:
          A tensor list shaped like the trainable weights.
        """
        weights = functional.resolve_weights(self.model, weights)
        trainable = self._cast_like_weights(weights.trainable, "weights")
        vector = self._cast_like_weights(vector, "vector")

        def batch_fn(x, y):
            return self._batch_hvp(trainable, weights.non_trainable, vector, x, y)

        product = self._weighted_sum(batch_fn, self.batches)
        if self.spec.weight_decay:
            product = self._add_decay(product, vector)
        return product

    def _add_decay(self, tensors: list, direction: list) -> list:
        coefficient = self.spec.weight_decay
        return [
            t + tf.constant(coefficient, t.dtype) * d if m else t
            for t, d, m in zip(tensors, direction, self._decay_mask)
        ]


def loss_and_gradient(
    model: keras.Model,
    loss_fn: LossFunction,
    data: Iterable,
    weights=None,
    bn_mode: str = "inference",
    weight_decay: float = 0.0,
    decay_mask: Sequence[bool] | None = None,
) -> tuple[tf.Tensor, list]:
    """Computes the mean training loss over `data` and its gradient (arguments: `LossSpec`).

    Each call traces its own `tf.function`, so build a `TrainingLoss` once for repeated calls.

    Returns:
      (loss, gradient): a scalar tensor and a tensor list shaped like the trainable weights.
    """
    spec = LossSpec(loss_fn, bn_mode, weight_decay, decay_mask)
    return TrainingLoss(model, spec, data).value_and_gradient(weights)


def hessian_vector_product(
    model: keras.Model,
    loss_fn: LossFunction,
    data: Iterable,
    vector: Sequence[tf.Tensor],
    weights=None,
    bn_mode: str = "inference",
    weight_decay: float = 0.0,
    decay_mask: Sequence[bool] | None = None,
) -> list:
    """Computes `H v` for the mean training loss over `data` (arguments: `LossSpec`).

    Each call traces its own `tf.function`, so build a `TrainingLoss` once for repeated calls.

    Returns:
      A tensor list shaped like the trainable weights.
    """
    spec = LossSpec(loss_fn, bn_mode, weight_decay, decay_mask)
    return TrainingLoss(model, spec, data).hvp(vector, weights)
