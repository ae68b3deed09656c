"""Taylor-expanded Keras models (order 1 and 2) around frozen weights."""

from tfntk.linearize.taylor_model import TaylorModel, assign_weights, linearize, plug_back

__all__ = ["TaylorModel", "assign_weights", "linearize", "plug_back"]
