"""tfntk: loss-landscape geometry and neural tangent kernel dynamics for Keras classifiers.

The instruments work on any Keras 3 functional classifier whose outputs are logits:

    import tfntk
    kernel = tfntk.empirical_ntk(model, x)                  # (n, n, K, K)
    distance = tfntk.kernel_distance(kernel_a, kernel_b)
    result = tfntk.hessian_top_eigenvalues(model, loss_fn, batches, k=2)
    taylor = tfntk.linearize.linearize(model, order=1)       # trains with model.fit
"""

import os

# Hide TensorFlow's C++ start-up INFO and WARNING lines (CUDA probing on CPU-only machines,
# oneDNN notices) unless the user chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfntk import linearize  # noqa: E402
from tfntk.autodiff.functional import Weights, current_weights
from tfntk.autodiff.hvp import LossSpec, TrainingLoss, hessian_vector_product, loss_and_gradient
from tfntk.autodiff.ntk import NtkImplementation, empirical_ntk
from tfntk.linearize.taylor_model import TaylorModel, assign_weights, plug_back
from tfntk.measures.basins import error_barrier, function_space_distance, weight_distance
from tfntk.measures.centroids import centroid_alignment, logit_gradient_centroids
from tfntk.measures.escape import escape_threshold, escape_threshold_of_loss, gd_escape_threshold
from tfntk.measures.hessian import (
    HessianEigenResult,
    hessian_top_eigenvalues,
    hessian_top_eigenvalues_of_loss,
)
from tfntk.measures.kernel import kernel_distance, kernel_velocity, ntk_gram
from tfntk.measures.relu import relu_distance, relu_patterns

__version__ = "0.1.0"

__all__ = [
    "HessianEigenResult", "LossSpec", "NtkImplementation", "TaylorModel", "TrainingLoss", "Weights",
    "assign_weights", "centroid_alignment", "current_weights", "empirical_ntk", "error_barrier",
    "escape_threshold", "escape_threshold_of_loss", "function_space_distance",
    "gd_escape_threshold", "hessian_top_eigenvalues", "hessian_top_eigenvalues_of_loss",
    "hessian_vector_product", "kernel_distance", "kernel_velocity", "linearize",
    "logit_gradient_centroids", "loss_and_gradient", "ntk_gram", "plug_back", "relu_distance",
    "relu_patterns", "weight_distance",
]
