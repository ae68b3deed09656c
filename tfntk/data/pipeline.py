"""Deterministic, stateless input pipelines.

The examples in a training batch and their augmentation depend only on (seed, epoch, batch index),
never on how many batches were drawn before. A run resumed in the middle of an epoch therefore
reads exactly the batches it would have read without the interruption, and a child spawned from
a parent snapshot can replay or vary the parent's data order on purpose.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfntk.data.datasets import Dataset

# Random-crop padding in pixels on each side, as in the standard CIFAR augmentation.
CROP_PADDING = 4


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Returns the number of full batches in one epoch, dropping the final partial batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {num_examples} training examples. "
            "Use a batch size of at most the dataset size."
        )
    return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Returns the order of the training examples in `epoch`, shape (num_examples,), int64.

    Drawn from `np.random.default_rng([seed, epoch])`, so it depends only on (seed, epoch).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got seed={seed}, epoch={epoch}.")
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int64)


def batch_seeds(seed: int, epoch: int, num_batches: int) -> np.ndarray:
    """Returns one stateless-op seed pair per batch of `epoch`, shape (num_batches, 2), int64.

    The pair of batch b comes from `np.random.SeedSequence([seed, epoch, b])`, so it does not
    depend on the other batches.
    """
    pairs = [np.random.SeedSequence([seed, epoch, b]).generate_state(2) for b in range(num_batches)]
    return np.asarray(pairs, dtype=np.int64).reshape(num_batches, 2)


def train_batches(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, start_batch: int = 0
) -> tf.data.Dataset:
    """Builds the training batches of one epoch, from `start_batch` to the end of the epoch.

    Args:
      dataset: the in-memory dataset, whose training split is used.
      batch_size: examples per batch. The final partial batch of the epoch is dropped.
      seed: data-order and augmentation seed of the run.
      epoch: zero-based epoch index.
      start_batch: first batch to yield, in [0, steps_per_epoch]. Resuming at k yields exactly
        batches k, k+1, ... of the uninterrupted epoch, augmentation included.

    Returns:
      A `tf.data.Dataset` of (x, y): x float32 of shape (batch_size,) + input_shape, y int64 of
      shape (batch_size,). When `dataset.augment` is set, every image is zero-padded by 4 pixels,
      randomly cropped back to its size and randomly flipped left-right, independently per
      example. Zero padding equals the per-channel training mean because inputs are normalised.
    """
    num_batches = steps_per_epoch(dataset.num_train, batch_size)
    if not 0 <= start_batch <= num_batches:
        raise ValueError(
            f"start_batch {start_batch} is outside the epoch's {num_batches} batches. "
            f"Use 0 <= start_batch <= {num_batches}."
        )
    if dataset.augment and len(dataset.input_shape) != 3:
        raise ValueError(
            f"Augmentation needs (H, W, C) images but {dataset.name} has input shape "
            f"{dataset.input_shape}."
        )

    order = epoch_permutation(dataset.num_train, seed, epoch)[: num_batches * batch_size]
    indices = order.reshape(num_batches, batch_size)[start_batch:]
    seeds = batch_seeds(seed, epoch, num_batches)[start_batch:]

    x_all = tf.convert_to_tensor(dataset.x_train, dtype=tf.float32)
    y_all = tf.convert_to_tensor(dataset.y_train, dtype=tf.int64)
    augment = dataset.augment

    def load_batch(batch_indices, batch_seed):
        x = tf.gather(x_all, batch_indices)
        y = tf.gather(y_all, batch_indices)
        if augment:
            x = augment_images(x, batch_seed)
        return x, y

    ds = tf.data.Dataset.from_tensor_slices((indices, seeds))
    ds = ds.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def augment_images(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Applies a padded random crop and a random left-right flip to each image of a batch.

    Args:
      images: float tensor of shape (B, H, W, C).
      seed: int tensor of shape (2,), the stateless seed of this batch.

    Returns:
      Augmented images of shape (B, H, W, C), a pure function of (images, seed).
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    images = random_crops(images, crop_seed, CROP_PADDING)
    return tf.image.stateless_random_flip_left_right(images, seed=flip_seed)


def random_crops(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    """Zero-pads each image by `padding` pixels and crops it back at its own random offset.

    `tf.image.stateless_random_crop` draws one offset for a whole batch, so the offsets are drawn
    here per example and the crops gathered, which keeps the batch in one vectorised op.

    Args:
      images: float tensor of shape (B, H, W, C).
      seed: int tensor of shape (2,).
      padding: pixels added on each side before cropping.

    Returns:
      Crops of shape (B, H, W, C).
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])

    offsets = tf.random.stateless_uniform(
        [batch, 2], seed=seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis, :]
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Builds batches of (x, y) in order, keeping the final partial batch.

    Args:
      x: inputs of shape (n,) + input_shape.
      y: integer labels of shape (n,).
      batch_size: examples per batch.

    Returns:
      A `tf.data.Dataset` of (x float32, y int64) covering all n examples once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if len(x) != len(y):
        raise ValueError(f"Got {len(x)} inputs but {len(y)} labels. Pass one label per input.")
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.convert_to_tensor(x, dtype=tf.float32), tf.convert_to_tensor(y, dtype=tf.int64))
    )
    return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
