"""Datasets, deterministic input pipelines and fixed analysis subsets."""

from tfntk.data.datasets import DATASET_NAMES
from tfntk.data.datasets import Dataset
from tfntk.data.datasets import DatasetNotFoundError
from tfntk.data.datasets import load_dataset
from tfntk.data.pipeline import augment_images
from tfntk.data.pipeline import batch_seeds
from tfntk.data.pipeline import epoch_permutation
from tfntk.data.pipeline import eval_batches
from tfntk.data.pipeline import steps_per_epoch
from tfntk.data.pipeline import train_batches
from tfntk.data.subsets import stratified_subset

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "augment_images",
    "batch_seeds",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "steps_per_epoch",
    "stratified_subset",
    "train_batches",
]
