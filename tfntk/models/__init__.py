"""Model families and the registry that builds them by name.

Every model is a Keras 3 functional model returning logits (n, num_classes), with each ReLU its
own `keras.layers.ReLU` layer and initialisation determined by `seed` alone (see `common`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras

from tfntk.models.mlp import mlp
from tfntk.models.resnet import resnet
from tfntk.models.resnet import resnet20
from tfntk.models.simple_cnn import simple_cnn
from tfntk.models.wide_resnet import wide_resnet

ModelBuilder = Callable[..., keras.Model]

MODEL_REGISTRY: dict[str, ModelBuilder] = {
    "simple_cnn": simple_cnn,
    "resnet20": resnet20,
    "resnet": resnet,
    "wide_resnet": wide_resnet,
    "mlp": mlp,
}


def register_model(name: str, builder: ModelBuilder) -> None:
    """Adds a builder `builder(input_shape, num_classes, seed=0, **kwargs) -> keras.Model`."""
    if name in MODEL_REGISTRY:
        raise ValueError(f"Model name {name!r} is already registered. Choose another name.")
    MODEL_REGISTRY[name] = builder


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0, **kwargs
) -> keras.Model:
    """Builds a registered model.

    Args:
      name: a key of `MODEL_REGISTRY`: "simple_cnn" (filters), "resnet20" (batch_norm),
        "resnet" (depth, batch_norm), "wide_resnet" (depth, width) or "mlp" (hidden).
      input_shape: shape of one input without the batch axis, channels last.
      num_classes: number of logits K.
      seed: initialisation seed. The same seed gives identical initial weights.
      **kwargs: architecture arguments of that family, listed above with `name`.

    Returns:
      A functional Keras model mapping (n,) + input_shape to logits (n, K).
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Use one of {', '.join(sorted(MODEL_REGISTRY))}.")
    return MODEL_REGISTRY[name](input_shape, num_classes, seed=seed, **kwargs)


def relu_layers(model: keras.Model) -> list[keras.layers.ReLU]:
    """Returns every `keras.layers.ReLU` layer of a functional model in topological order.

    The order is that of `model.layers`, which Keras 3.15 sorts by decreasing depth from the
    outputs, so every layer comes after the layers that feed it.

    NOTE: ReLU layers inside nested models are not listed, because their outputs are not nodes of
    the outer graph and could not be read by `keras.Model(model.inputs, ...)`.
    """
    return [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]


__all__ = [
    "MODEL_REGISTRY",
    "build_model",
    "mlp",
    "register_model",
    "relu_layers",
    "resnet",
    "resnet20",
    "simple_cnn",
    "wide_resnet",
]
