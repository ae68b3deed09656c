"""tfntk: loss-landscape geometry and neural tangent kernel dynamics for Keras classifiers."""

__version__ = "0.1.0"
