"""Offline datasets and per-batch transforms for the m2mKD pipeline.

- Fashion-MNIST (shipped subset, or the full set when installed / given): :func:`load_fashion_mnist`
- generic in-memory arrays, numpy files and ImageFolder trees: :class:`ArrayDataset`,
  :func:`load_numpy_arrays`, :class:`ImageFolderDataset`, and :func:`build_data` for configs
- OOD: :func:`corrupted_copy` (deterministic corrupted test split)
- few-shot: :func:`load_digits_dataset`, :func:`linear_probe_episodes`
"""

from .corruptions import CORRUPTIONS, corrupt, corrupted_copy
from .datasets import ArrayDataset, DataBundle, ImageFolderDataset, build_data, load_numpy_arrays
from .fashion_mnist import load_fashion_mnist, read_idx
from .fewshot import linear_probe_episodes, load_digits_dataset, sample_episodes
from .transforms import Normalize, TrainTransform, random_crop_flip

__all__ = [
    "ArrayDataset", "CORRUPTIONS", "DataBundle", "ImageFolderDataset", "Normalize", "TrainTransform",
    "build_data", "corrupt", "corrupted_copy", "linear_probe_episodes", "load_digits_dataset",
    "load_fashion_mnist", "load_numpy_arrays", "random_crop_flip", "read_idx", "sample_episodes",
]
