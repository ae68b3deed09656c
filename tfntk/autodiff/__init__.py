"""Derivatives of a model's logits and loss with respect to its weights.

Apart from the gradient of an ordinary training step, this package is the only one that
records `tf.GradientTape` or `tf.autodiff.ForwardAccumulator` on weights.
"""
