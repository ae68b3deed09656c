"""Installs tfntk: loss-landscape and neural tangent kernel measurements for Keras."""

import setuptools

setuptools.setup(
    name="tfntk",
    version="0.1.0",
    description=(
        "Parent-child spawning, error barriers, empirical NTK dynamics, Hessian curvature "
        "and linearized training for TensorFlow/Keras classifiers."
    ),
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["tfntk", "tfntk.*"]),
    install_requires=[
        "tensorflow>=2.16,<2.23",
        "keras>=3.0,<4",
        "tensorboard>=2.16",
        "tensorflow-datasets>=4.9,<5",
        "gin-config>=0.5,<0.6",
        "absl-py>=1.0",
        "numpy>=1.23,<3",
        "pandas>=1.5",
        "matplotlib>=3.6",
        "scikit-learn>=1.1",
        "scipy>=1.9",
        "threadpoolctl>=3",
        "mnist1d>=0.0.2",
    ],
    extras_require={"test": ["pytest>=7"]},
)
