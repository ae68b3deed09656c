"""Tests of the datasets, the deterministic input pipelines and stratified subsets."""

import dataclasses
import random
import socket

import numpy as np
import pytest
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from tfntk import data


def _collect(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _image_dataset(augment=True, num_train=48, shape=(6, 5, 3)):
    dataset = data.load_dataset(
        "synthetic", seed=1, synthetic_shape=shape, synthetic_train=num_train, synthetic_test=8
    )
    return dataclasses.replace(dataset, augment=augment)


def _find_augmentation(original, augmented, padding=4):
    """Returns the (row offset, column offset, flipped) that turn `original` into `augmented`."""
    height, width, _ = original.shape
    padded = np.pad(original, [(padding, padding), (padding, padding), (0, 0)])
    for row in range(2 * padding + 1):
        for col in range(2 * padding + 1):
            crop = padded[row : row + height, col : col + width]
            if np.array_equal(crop, augmented):
                return row, col, False
            if np.array_equal(crop[:, ::-1], augmented):
                return row, col, True
    return None


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def mnist1d():
    return data.load_dataset("mnist1d")


def test_digits_shapes_and_split(digits):
    assert digits.x_train.shape == (1437, 8, 8, 1)
    assert digits.x_test.shape == (360, 8, 8, 1)
    assert digits.y_train.shape == (1437,)
    assert digits.x_train.dtype == np.float32
    assert digits.y_train.dtype == np.int64
    assert digits.num_classes == 10
    assert digits.input_shape == (8, 8, 1)
    assert not digits.augment


def test_digits_split_is_stratified(digits):
    all_counts = np.bincount(np.concatenate([digits.y_train, digits.y_test]), minlength=10)
    test_counts = np.bincount(digits.y_test, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)


def test_digits_normalised_with_train_statistics(digits):
    raw = sk_datasets.load_digits()
    images = raw.images.astype(np.float64)[..., None]
    raw_train, raw_test, y_train, y_test = model_selection.train_test_split(
        images, raw.target, test_size=0.2, stratify=raw.target, random_state=0
    )
    mean, std = raw_train.mean(), raw_train.std()

    np.testing.assert_allclose(digits.x_train, (raw_train - mean) / std, atol=1e-5)
    np.testing.assert_allclose(digits.x_test, (raw_test - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(digits.y_test, y_test)
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-5


def test_digits_split_ignores_seed(digits):
    again = data.load_dataset("digits", seed=7)
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_train, digits.y_train)


def test_dataset_arrays_read_only(digits):
    with pytest.raises(ValueError):
        digits.x_train[0, 0, 0, 0] = 1.0


def test_dataset_rejects_mismatched_labels():
    x = np.zeros((4, 2, 1), np.float32)
    with pytest.raises(ValueError, match="labels have shape"):
        data.Dataset("bad", x, np.zeros(3, np.int64), x, np.zeros(4, np.int64), 2, (2, 1), False)


def test_mnist1d_generated_offline(monkeypatch):
    def refuse_connection(*args, **kwargs):
        raise AssertionError("mnist1d loading must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    numpy_state = np.random.get_state()
    python_state = random.getstate()

    dataset = data.load_dataset("mnist1d")

    assert dataset.x_train.shape == (4000, 40, 1)
    assert dataset.x_test.shape == (1000, 40, 1)
    assert dataset.num_classes == 10
    assert set(np.unique(dataset.y_train)) == set(range(10))
    assert np.all(np.asarray(np.random.get_state()[1]) == numpy_state[1])
    assert random.getstate() == python_state


def test_mnist1d_normalised_and_fixed(mnist1d):
    assert abs(float(mnist1d.x_train.mean())) < 1e-5
    assert abs(float(mnist1d.x_train.std()) - 1.0) < 1e-4
    again = data.load_dataset("mnist1d", seed=5)
    np.testing.assert_array_equal(again.x_train, mnist1d.x_train)


def test_synthetic_deterministic_and_seeded():
    first = data.load_dataset("synthetic", seed=2)
    again = data.load_dataset("synthetic", seed=2)
    other = data.load_dataset("synthetic", seed=3)

    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    assert not np.array_equal(first.x_train, other.x_train)
    assert first.x_train.shape == (256, 8, 8, 1)
    assert first.x_test.shape == (64, 8, 8, 1)


def test_synthetic_custom_shape_and_classes():
    dataset = data.load_dataset(
        "synthetic", synthetic_shape=(5, 3), synthetic_classes=4, synthetic_train=20, synthetic_test=6
    )
    assert dataset.input_shape == (5, 3)
    assert dataset.num_classes == 4
    np.testing.assert_array_equal(np.bincount(dataset.y_train), [5, 5, 5, 5])


def test_synthetic_learnable_by_class_means():
    dataset = data.load_dataset("synthetic", seed=0)
    x_train = dataset.x_train.reshape(dataset.num_train, -1)
    x_test = dataset.x_test.reshape(dataset.num_test, -1)
    means = np.stack([x_train[dataset.y_train == k].mean(axis=0) for k in range(10)])
    distances = ((x_test[:, None, :] - means[None]) ** 2).sum(axis=-1)
    accuracy = np.mean(distances.argmin(axis=1) == dataset.y_test)
    assert accuracy > 0.9


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="digits, mnist1d, cifar10, cifar100, synthetic"):
        data.load_dataset("imagenet")


def test_missing_cifar_raises_not_found(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path)) as error:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)
    assert "download_and_prepare" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_cifar_uses_env_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path)):
        data.load_dataset("cifar100")


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_mocked_tfds(tmp_path, name, num_classes):
    import tensorflow_datasets as tfds

    # Writing the dataset's metadata makes the directory count as prepared. The mock then serves
    # random examples in place of the missing record files.
    builder = tfds.builder(name, data_dir=str(tmp_path))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)

    with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
        dataset = data.load_dataset(name, data_dir=str(tmp_path))

    assert dataset.x_train.shape == (12, 32, 32, 3)
    assert dataset.x_test.shape == (12, 32, 32, 3)
    assert dataset.x_train.dtype == np.float32
    assert dataset.y_train.dtype == np.int64
    assert dataset.num_classes == num_classes
    assert dataset.augment
    assert np.all((dataset.y_train >= 0) & (dataset.y_train < num_classes))
    np.testing.assert_allclose(dataset.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(dataset.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_steps_per_epoch():
    assert data.steps_per_epoch(100, 32) == 3
    assert data.steps_per_epoch(96, 32) == 3
    with pytest.raises(ValueError, match="larger than"):
        data.steps_per_epoch(10, 11)
    with pytest.raises(ValueError, match="positive"):
        data.steps_per_epoch(10, 0)


def test_epoch_permutation_depends_on_seed_and_epoch():
    first = data.epoch_permutation(50, seed=1, epoch=2)
    np.testing.assert_array_equal(first, data.epoch_permutation(50, seed=1, epoch=2))
    np.testing.assert_array_equal(first, np.random.default_rng([1, 2]).permutation(50))
    np.testing.assert_array_equal(np.sort(first), np.arange(50))
    assert not np.array_equal(first, data.epoch_permutation(50, seed=2, epoch=2))
    assert not np.array_equal(first, data.epoch_permutation(50, seed=1, epoch=3))


def test_train_batches_shapes_and_dtypes():
    dataset = _image_dataset()
    batches = _collect(data.train_batches(dataset, 10, seed=0, epoch=0))
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (10, 6, 5, 3)
        assert x.dtype == np.float32
        assert y.shape == (10,)
        assert y.dtype == np.int64


def test_train_batches_reproducible():
    dataset = _image_dataset()
    first = _collect(data.train_batches(dataset, 8, seed=3, epoch=1))
    again = _collect(data.train_batches(dataset, 8, seed=3, epoch=1))
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_train_batches_follow_epoch_permutation():
    dataset = _image_dataset(augment=False)
    batches = _collect(data.train_batches(dataset, 8, seed=3, epoch=1))
    order = data.epoch_permutation(48, seed=3, epoch=1)
    for b, (x, y) in enumerate(batches):
        np.testing.assert_array_equal(x, dataset.x_train[order[8 * b : 8 * b + 8]])
        np.testing.assert_array_equal(y, dataset.y_train[order[8 * b : 8 * b + 8]])


def test_train_batches_order_depends_on_seed():
    dataset = _image_dataset(augment=False)
    first = _collect(data.train_batches(dataset, 8, seed=0, epoch=0))
    other = _collect(data.train_batches(dataset, 8, seed=1, epoch=0))
    first_x = np.concatenate([x for x, _ in first])
    other_x = np.concatenate([x for x, _ in other])

    assert not np.array_equal(first_x, other_x)
    np.testing.assert_array_equal(np.sort(first_x.reshape(48, -1), axis=0), np.sort(other_x.reshape(48, -1), axis=0))


def test_train_batches_resume_matches_tail():
    dataset = _image_dataset()
    full = _collect(data.train_batches(dataset, 6, seed=4, epoch=2))
    for start in (1, 5, 8):
        resumed = _collect(data.train_batches(dataset, 6, seed=4, epoch=2, start_batch=start))
        assert len(resumed) == len(full) - start
        for (x1, y1), (x2, y2) in zip(resumed, full[start:]):
            assert x1.tobytes() == x2.tobytes()
            assert y1.tobytes() == y2.tobytes()


def test_train_batches_rejects_bad_start_batch():
    with pytest.raises(ValueError, match="start_batch"):
        data.train_batches(_image_dataset(), 6, seed=0, epoch=0, start_batch=9)


def test_augmentation_is_crop_and_flip_per_example():
    augmented_set = _image_dataset(augment=True)
    plain_set = _image_dataset(augment=False)
    augmented = _collect(data.train_batches(augmented_set, 16, seed=5, epoch=0))
    plain = _collect(data.train_batches(plain_set, 16, seed=5, epoch=0))

    found = []
    for (x_aug, y_aug), (x_plain, y_plain) in zip(augmented, plain):
        assert x_aug.shape == x_plain.shape
        np.testing.assert_array_equal(y_aug, y_plain)
        assert not np.array_equal(x_aug, x_plain)
        batch_found = [_find_augmentation(original, image) for original, image in zip(x_plain, x_aug)]
        assert None not in batch_found
        assert len(set(batch_found)) > 5
        found += batch_found

    flips = sum(flipped for _, _, flipped in found)
    assert 0 < flips < len(found)


def test_augmentation_depends_on_epoch():
    dataset = _image_dataset()
    first = _collect(data.train_batches(dataset, 48, seed=0, epoch=0))[0]
    second = _collect(data.train_batches(dataset, 48, seed=0, epoch=1))[0]
    order_first = np.argsort(data.epoch_permutation(48, 0, 0))
    order_second = np.argsort(data.epoch_permutation(48, 0, 1))
    assert not np.array_equal(first[0][order_first], second[0][order_second])


def test_augmentation_requires_images():
    dataset = dataclasses.replace(data.load_dataset("synthetic", synthetic_shape=(8, 1)), augment=True)
    with pytest.raises(ValueError, match="H, W, C"):
        data.train_batches(dataset, 8, seed=0, epoch=0)


def test_eval_batches_keep_all_examples_in_order():
    x = np.arange(23 * 2, dtype=np.float64).reshape(23, 2)
    y = np.arange(23)
    batches = _collect(data.eval_batches(x, y, 5))

    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    assert batches[0][0].dtype == np.float32
    assert batches[0][1].dtype == np.int64


def test_eval_batches_reject_length_mismatch():
    with pytest.raises(ValueError, match="labels"):
        data.eval_batches(np.zeros((3, 2)), np.zeros(4, np.int64), 2)


def test_stratified_subset_balanced_and_sorted():
    labels = np.repeat(np.arange(4), 25)
    subset = data.stratified_subset(labels, 18, seed=0)

    assert subset.shape == (18,)
    assert subset.dtype == np.int64
    assert np.all(np.diff(subset) > 0)
    counts = np.bincount(labels[subset], minlength=4)
    assert counts.sum() == 18
    assert counts.max() - counts.min() <= 1


def test_stratified_subset_deterministic():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    first = data.stratified_subset(labels, 100, seed=1)
    np.testing.assert_array_equal(first, data.stratified_subset(labels, 100, seed=1))
    assert not np.array_equal(first, data.stratified_subset(labels, 100, seed=2))
    np.testing.assert_array_equal(np.bincount(labels[first], minlength=10), np.full(10, 10))


def test_stratified_subset_small_class_shortfall():
    labels = np.array([0] * 2 + [1] * 10 + [2] * 10)
    subset = data.stratified_subset(labels, 12, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[subset]), [2, 5, 5])
    np.testing.assert_array_equal(np.sort(data.stratified_subset(labels, 22)), np.arange(22))


def test_stratified_subset_bad_input():
    labels = np.arange(5) % 2
    with pytest.raises(ValueError, match="between 0"):
        data.stratified_subset(labels, 6)
    with pytest.raises(ValueError, match="1-D integer"):
        data.stratified_subset(labels.astype(np.float32), 2)
    assert data.stratified_subset(labels, 0).shape == (0,)
