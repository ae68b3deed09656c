"""A Keras model that is the Taylor expansion of another model around frozen weights.

For a base network f(x; w) and an expansion point w0, the order-1 model is

    f_lin(x; w) = f(x; w0) + J(x; w0) (w - w0)

and the order-2 model adds 1/2 (w - w0)^T H_k(x; w0) (w - w0) to each logit k. Both are computed
with forward-mode JVPs (see `tfntk.autodiff.taylor`), never by materialising J or H. The base
network runs in inference mode with w0's batch-norm moving statistics, so the expansion is the
same function for every batch, in `fit` as in evaluation.

The trainable variables of a `TaylorModel` are w: one variable per trainable variable of the base
network, with the same shape and order, initialised to w0. Training the order-1 model is
linearized training. After training, `plug_back` returns the trained w with w0's non-trainable
state, to evaluate in the nonlinear network.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfntk.autodiff import functional, taylor


class TaylorModel(keras.Model):
    """The order-1 or order-2 Taylor expansion of `base` in its weights around `weights`.

    The expansion point w0 and the base network's non-trainable state are stored as
    non-trainable variables, so a checkpoint of this model restores the whole expansion. Under a
    `tf.distribute` strategy, construct the model inside `strategy.scope()`. An optimizer's
    weight decay shrinks w toward zero, not toward w0.

    Attributes:
      base: the expanded network. It is not tracked, so its variables are not this model's.
      order: 1 (linearized model) or 2.
      w: trainable variables, one per `base.trainable_variables` entry, in the same order.
      w0: non-trainable copies of the expansion point, in the same order.
      state: non-trainable copies of w0's non-trainable state (batch-norm moving statistics),
        in `base.non_trainable_variables` order.
    """

    def __init__(
        self,
        base: keras.Model,
        weights: functional.Weights | Sequence[tf.Tensor] | None = None,
        order: int = 1,
        **kwargs,
    ):
        """Builds the expansion.

        Args:
          base: a built Keras 3 model whose outputs are logits of shape (n, K).
          weights: the expansion point, a `functional.Weights`, a list of trainable tensors
            (paired with the base's current non-trainable state) or None for the base's current
            variables.
          order: 1 or 2.
          **kwargs: passed to `keras.Model` (for example `name`).
        """
        if order not in taylor.SUPPORTED_ORDERS:
            raise ValueError(f"Taylor order {order!r} is not supported; use 1 or 2.")
        if not base.built:
            raise ValueError(
                f"Base model {base.name!r} is not built; call it on a batch or build it first."
            )
        weights = functional.resolve_weights(base, weights)
        _check_weights_match(base, weights)

        # Inputs reach the base network in the dtype its own Input layer declares.
        base_inputs = getattr(base, "inputs", None)
        kwargs.setdefault("dtype", base_inputs[0].dtype if base_inputs else base.dtype_policy)
        super().__init__(**kwargs)

        # Assigned through object.__setattr__ so that neither Keras nor tf.train.Checkpoint
        # tracks the base network's variables as this model's.
        object.__setattr__(self, "base", base)
        self.order = order

        self.w = self._add_copies("w", base.trainable_variables, weights.trainable, True)
        self.w0 = self._add_copies("w0", base.trainable_variables, weights.trainable, False)
        self.state = self._add_copies(
            "state", base.non_trainable_variables, weights.non_trainable, False
        )
        self.built = True

    def _add_copies(self, prefix: str, like: list, values: list, trainable: bool) -> list:
        """Creates one variable per `like` entry, named after it and initialised to `values`."""
        copies = []
        for index, (variable, value) in enumerate(zip(like, values)):
            initial_value = tf.convert_to_tensor(value, dtype=variable.dtype)
            copy = self.add_weight(
                shape=tuple(variable.shape),
                dtype=variable.dtype,
                initializer=lambda shape, dtype, value=initial_value: tf.identity(value),
                trainable=trainable,
                name=f"{prefix}.{variable.path.replace('/', '.')}",
            )
            # tf.train.Checkpoint tracks variables held by attributes, not Keras-tracked lists.
            setattr(self, f"{prefix}_{index:03d}", copy)
            copies.append(copy)
        return copies

    @property
    def expansion_point(self) -> functional.Weights:
        """The expansion point w0 with its non-trainable state, as tensors."""
        return functional.Weights(
            [tf.convert_to_tensor(v.value) for v in self.w0],
            [tf.convert_to_tensor(v.value) for v in self.state],
        )

    def displacement(self) -> list:
        """Returns w - w0, tensor by tensor, differentiable in w."""
        return [
            tf.convert_to_tensor(w.value) - tf.convert_to_tensor(w0.value)
            for w, w0 in zip(self.w, self.w0)
        ]

    def call(self, inputs, training=None):
        """Evaluates the expansion on `inputs`, shape (n, ...), returning logits (n, K).

        `training` is accepted for Keras and ignored: the expansion point's batch norm is frozen.
        """
        del training
        return taylor.taylor_logits(
            self.base, self.expansion_point, self.displacement(), inputs, order=self.order
        )

    def compute_output_shape(self, input_shape):
        return self.base.compute_output_shape(input_shape)

    def get_config(self):
        # NOTE: the base network is not serialised, so `from_config` cannot rebuild this model.
        # Restore a `tf.train.Checkpoint` into a TaylorModel built around the same architecture.
        return {"name": self.name, "order": self.order}


def _check_weights_match(base: keras.Model, weights: functional.Weights) -> None:
    pairs = [
        ("trainable", base.trainable_variables, weights.trainable),
        ("non-trainable", base.non_trainable_variables, weights.non_trainable),
    ]
    for kind, variables, tensors in pairs:
        if len(tensors) != len(variables):
            raise ValueError(
                f"Got {len(tensors)} {kind} tensors but model {base.name!r} has {len(variables)} "
                f"{kind} variables; pass weights taken from this model."
            )
        for variable, tensor in zip(variables, tensors):
            if tuple(tensor.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Weight for {variable.path} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(variable.shape)}; pass weights taken from this model."
                )


def linearize(
    base: keras.Model,
    weights: functional.Weights | Sequence[tf.Tensor] | None = None,
    order: int = 1,
    **kwargs,
) -> TaylorModel:
    """Returns the Taylor expansion of `base` around `weights` (default: its current weights).

    Args:
      base: a built Keras 3 model whose outputs are logits of shape (n, K).
      weights: the expansion point; None takes the base's current variables.
      order: 1 for the linearized model, 2 for the second-order expansion.
      **kwargs: passed to `TaylorModel` (for example `name`).
    """
    return TaylorModel(base, weights, order=order, **kwargs)


def plug_back(model: TaylorModel) -> functional.Weights:
    """Returns the expansion's current w with w0's non-trainable state.

    The result is a point of the base network's weight space, to evaluate the nonlinear network
    with `functional.logits_at(model.base, weights, x)` or to load with `assign_weights`.
    """
    if not isinstance(model, TaylorModel):
        raise TypeError(f"plug_back expects a TaylorModel, got {type(model).__name__}.")
    return functional.Weights(
        [tf.identity(v.value) for v in model.w],
        [tf.identity(v.value) for v in model.state],
    )


def assign_weights(base: keras.Model, weights: functional.Weights) -> None:
    """Assigns `weights` to the variables of `base`, trainable and non-trainable."""
    _check_weights_match(base, weights)
    for variable, value in zip(base.trainable_variables, weights.trainable):
        variable.assign(value)
    for variable, value in zip(base.non_trainable_variables, weights.non_trainable):
        variable.assign(value)
