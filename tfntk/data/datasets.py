"""In-memory classification datasets: digits, mnist1d, CIFAR-10/100 and synthetic data.

Every loader returns a `Dataset` of numpy arrays whose inputs are normalised per channel with the
mean and standard deviation of the training split, so the test split is transformed with training
statistics. Only CIFAR reads files. `digits` and `mnist1d` come with installed packages and
`synthetic` is generated, so tests and the default run need neither a network nor a data directory.
"""

from __future__ import annotations

import dataclasses
import os
import random

from absl import logging
import numpy as np

DATASET_NAMES = ("digits", "mnist1d", "cifar10", "cifar100", "synthetic")

# The digits split is fixed so that every run and every seed uses the same test set.
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_STATE = 0

# Floor for a channel's standard deviation, so a constant channel is centred but not divided by 0.
_MIN_STD = 1e-8


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset that must be prepared on disk (CIFAR) is absent from the data dir."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory.

    Attributes:
      name: the name passed to `load_dataset`.
      x_train: float32 inputs, shape (n_train,) + input_shape, normalised per channel.
      y_train: int64 labels in [0, num_classes), shape (n_train,).
      x_test: float32 inputs, shape (n_test,) + input_shape, normalised with training statistics.
      y_test: int64 labels, shape (n_test,).
      num_classes: number of classes K.
      input_shape: shape of one input, channels last: (H, W, C) for images, (L, C) for sequences.
      augment: whether training batches get random crops and horizontal flips (True for CIFAR).

    The arrays are made read-only, so a `Dataset` can be shared between runs without copies.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    augment: bool

    def __post_init__(self):
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.shape[1:] != tuple(self.input_shape):
                raise ValueError(
                    f"{self.name} {split} inputs have shape {x.shape}, expected (n,) + "
                    f"{tuple(self.input_shape)}."
                )
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name} {split} labels have shape {y.shape}, expected ({x.shape[0]},)."
                )
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            array.setflags(write=False)

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


def load_dataset(
    name: str,
    data_dir: str | None = None,
    seed: int = 0,
    synthetic_shape: tuple = (8, 8, 1),
    synthetic_classes: int = 10,
    synthetic_train: int = 256,
    synthetic_test: int = 64,
) -> Dataset:
    """Loads a dataset by name into memory.

    Args:
      name: one of `DATASET_NAMES`.
        - "digits": scikit-learn's 1797 handwritten 8x8 digits (pixel values 0..16), input shape
          (8, 8, 1), 10 classes, a stratified 80/20 split fixed for every seed (1437 / 360).
        - "mnist1d": the MNIST-1D sequences generated locally with the `mnist1d` package's default
          arguments (its own generator seed 42, for every `seed`), input shape (40, 1) so that 1-D
          convolutions and MLPs both apply, 10 classes, 4000 / 1000 examples.
        - "cifar10", "cifar100": tensorflow-datasets' prepared copies under `data_dir`, input shape
          (32, 32, 3), 10 or 100 (fine) classes, 50000 / 10000 examples, `augment=True`.
        - "synthetic": Gaussian clusters around random class means, drawn with `seed`.
      data_dir: tensorflow-datasets data directory for CIFAR. Defaults to the environment variable
        TFDS_DATA_DIR, then to tensorflow-datasets' own default (~/tensorflow_datasets).
      seed: seed of the synthetic data. The other datasets are fixed and ignore it.
      synthetic_shape: input shape of the synthetic data.
      synthetic_classes: number of synthetic classes.
      synthetic_train: number of synthetic training examples.
      synthetic_test: number of synthetic test examples.

    Returns:
      A `Dataset` with per-channel normalised float32 inputs and int64 labels.

    Raises:
      ValueError: for an unknown name or invalid synthetic sizes.
      DatasetNotFoundError: when CIFAR has not been prepared under the data directory.
    """
    if name == "digits":
        x_train, y_train, x_test, y_test, num_classes = _load_digits()
    elif name == "mnist1d":
        x_train, y_train, x_test, y_test, num_classes = _load_mnist1d()
    elif name in ("cifar10", "cifar100"):
        x_train, y_train, x_test, y_test, num_classes = _load_tfds_images(name, data_dir)
    elif name == "synthetic":
        x_train, y_train, x_test, y_test, num_classes = _make_synthetic(
            seed, synthetic_shape, synthetic_classes, synthetic_train, synthetic_test
        )
    else:
        raise ValueError(f"Unknown dataset {name!r}. Use one of {', '.join(DATASET_NAMES)}.")

    x_train, x_test = _normalise_per_channel(x_train, x_test)
    dataset = Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train.astype(np.int64),
        x_test=x_test,
        y_test=y_test.astype(np.int64),
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        augment=name in ("cifar10", "cifar100"),
    )
    logging.info(
        "Loaded %s: %d train and %d test inputs of shape %s, %d classes.",
        name, dataset.num_train, dataset.num_test, dataset.input_shape, dataset.num_classes,
    )
    return dataset


def _normalise_per_channel(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardises both splits with the training split's per-channel (last axis) statistics."""
    axes = tuple(range(x_train.ndim - 1))
    mean = np.mean(x_train, axis=axes, dtype=np.float64)
    std = np.maximum(np.std(x_train, axis=axes, dtype=np.float64), _MIN_STD)

    # Statistics accumulate in float64, and the arrays are transformed in float32 to halve memory.
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    x_train = (np.asarray(x_train, np.float32) - mean) / std
    x_test = (np.asarray(x_test, np.float32) - mean) / std
    return x_train, x_test


def _load_digits():
    from sklearn import datasets as sk_datasets
    from sklearn import model_selection

    digits = sk_datasets.load_digits()
    images = digits.images.astype(np.float32)[..., np.newaxis]
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        images,
        digits.target,
        test_size=_DIGITS_TEST_FRACTION,
        stratify=digits.target,
        random_state=_DIGITS_SPLIT_STATE,
    )
    return x_train, y_train, x_test, y_test, 10


def _load_mnist1d():
    """Generates MNIST-1D with the package defaults: 5000 sequences of length 40, split 80/20."""
    from mnist1d import data as mnist1d_data

    # make_dataset reseeds the global `random` and `np.random` generators, so their states are
    # restored afterwards to keep loading free of side effects. `get_dataset` is avoided because
    # it downloads a pickle.
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        raw = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    x_train = raw["x"].astype(np.float32)[..., np.newaxis]
    x_test = raw["x_test"].astype(np.float32)[..., np.newaxis]
    return x_train, raw["y"], x_test, raw["y_test"], len(raw["templates"]["y"])


def _resolve_tfds_data_dir(data_dir: str | None) -> str | None:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _load_tfds_images(name: str, data_dir: str | None):
    """Reads a prepared tensorflow-datasets image dataset without ever downloading it."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=_resolve_tfds_data_dir(data_dir))
    if not builder.is_prepared():
        raise DatasetNotFoundError(
            f"Dataset {name} is not prepared in {builder.data_dir}. On a machine with internet, "
            f"run python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir=DIR).download_and_prepare()\" and set TFDS_DATA_DIR=DIR."
        )

    num_classes = builder.info.features["label"].num_classes
    arrays = []
    for split in ("train", "test"):
        images, labels = _read_split(builder, split)
        arrays += [images.astype(np.float32), labels]
    return (*arrays, num_classes)


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    # The whole split is read as one batch of its known size. `batch_size=-1` is not used because
    # it falls back to a batch of sys.maxsize examples when the split size is missing from the
    # metadata, which aborts TensorFlow 2.21.
    ds = builder.as_dataset(split=split, shuffle_files=False)
    num_examples = int(ds.cardinality())
    if num_examples <= 0:
        raise ValueError(f"Split {split!r} of {builder.name} has unknown or zero size {num_examples}.")
    batch = next(iter(tfds.as_numpy(ds.batch(num_examples))))
    return batch["image"], batch["label"]


def _make_synthetic(seed, input_shape, num_classes, num_train, num_test):
    """Draws inputs `mean[y] + noise` with class means and noise both standard normal."""
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"Synthetic input shape {input_shape} must have positive dimensions.")
    if num_classes < 2:
        raise ValueError(f"Synthetic data needs at least 2 classes, got {num_classes}.")
    if min(num_train, num_test) < 1:
        raise ValueError(
            f"Synthetic split sizes must be positive, got train={num_train}, test={num_test}."
        )

    rng = np.random.default_rng(seed)
    class_means = rng.standard_normal((num_classes,) + input_shape)

    def draw(num_examples):
        labels = rng.permutation(np.arange(num_examples) % num_classes)
        noise = rng.standard_normal((num_examples,) + input_shape)
        return (class_means[labels] + noise).astype(np.float32), labels.astype(np.int64)

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    return x_train, y_train, x_test, y_test, num_classes
