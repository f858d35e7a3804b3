"""Datasets: in-memory arrays (the fast path), numpy files, ImageFolder trees, and the builder
the pipeline calls with a config's ``data`` section.

Every dataset yields ``(image, label)`` with image a uint8 tensor [C, H, W] at the dataset's
fixed size; normalisation and augmentation happen per batch (see transforms.py), which keeps
them seeded by the trainer's RNG state (a resumed run draws the same augmentations).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .fashion_mnist import CLASSES as FMNIST_CLASSES
from .fashion_mnist import MEAN as FASHION_MNIST_MEAN
from .fashion_mnist import STD as FASHION_MNIST_STD
from .fashion_mnist import load_fashion_mnist

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class ArrayDataset(Dataset):
    """Images held in memory: uint8 [N, H, W, C] (or [N, H, W]) and integer labels [N]."""

    def __init__(self, images, labels, classes=None):
        images = torch.as_tensor(np.asarray(images))
        labels = torch.as_tensor(np.asarray(labels)).long()
        if images.dim() == 3:
            images = images.unsqueeze(-1)
        if images.dim() != 4:
            raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be [N] with N = {images.shape[0]}, got shape {tuple(labels.shape)}")
        if labels.numel() and labels.min() < 0:
            raise ValueError("labels must be non-negative class indices")
        self.images = images.permute(0, 3, 1, 2).contiguous()  # [N, C, H, W]
        self.labels = labels
        n_cls = int(labels.max()) + 1 if labels.numel() else 0
        self.classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(n_cls))
        if n_cls > len(self.classes):
            raise ValueError(f"labels go up to {n_cls - 1} but only {len(self.classes)} class names were given")

    def __len__(self):
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def batch(self, index: torch.Tensor):
        """Gather a whole batch at once (the trainer's fast path for in-memory data)."""
        return self.images[index], self.labels[index]

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` trees (ImageNet, Tiny-ImageNet, ...), read lazily with Pillow,
    resized (shorter side) and centre-cropped to ``img_size``; classes sorted by name."""

    def __init__(self, root, img_size: int, in_chans: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} is not a directory")
        self.classes = tuple(sorted(d.name for d in self.root.iterdir() if d.is_dir()))
        if not self.classes:
            raise ValueError(f"ImageFolder root {self.root} has no class sub-directories")
        self.samples = []
        for ci, c in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(self.root / c)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), ci))
        if not self.samples:
            raise ValueError(f"ImageFolder root {self.root} holds no images ({', '.join(IMG_EXTENSIONS)})")
        self.labels = torch.tensor([s[1] for s in self.samples], dtype=torch.long)
        self.img_size, self.in_chans = int(img_size), int(in_chans)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("L" if self.in_chans == 1 else "RGB")
            w, h = im.size
            s = self.img_size / min(w, h)
            im = im.resize((max(self.img_size, round(w * s)), max(self.img_size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - self.img_size) // 2, (h - self.img_size) // 2
            im = im.crop((left, top, left + self.img_size, top + self.img_size))
            arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[..., None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), torch.tensor(label)

    @property
    def image_shape(self):
        return (self.in_chans, self.img_size, self.img_size)


def load_numpy_arrays(path, split: str):
    """Read ``<split>_images`` (uint8 [N,H,W(,C)]) and ``<split>_labels`` from an .npz file, or
    ``<split>_images.npy`` / ``<split>_labels.npy`` from a directory."""
    path = Path(path)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            need = {f"{split}_images", f"{split}_labels"}
            if not need <= keys:
                raise KeyError(f"{path} lacks {sorted(need - keys)} (has {sorted(keys)})")
            return z[f"{split}_images"], z[f"{split}_labels"]
    if path.is_dir():
        img, lab = path / f"{split}_images.npy", path / f"{split}_labels.npy"
        for p in (img, lab):
            if not p.is_file():
                raise FileNotFoundError(f"numpy dataset directory {path} lacks {p.name}")
        return np.load(img, allow_pickle=False), np.load(lab, allow_pickle=False)
    raise FileNotFoundError(f"numpy dataset {path} does not exist")


@dataclass
class DataBundle:
    """What a phase needs to know about its data."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple
    std: tuple
    name: str
    source: str
    classes: tuple = field(default_factory=tuple)


def _limit(ds: ArrayDataset, n: int | None, seed: int) -> ArrayDataset:
    if not n or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values
    out = ArrayDataset.__new__(ArrayDataset)
    out.images, out.labels, out.classes = ds.images[idx], ds.labels[idx], ds.classes
    return out


def build_data(cfg: dict) -> DataBundle:
    """Build train/test datasets from a config's ``data`` section.

    Keys: ``name`` ("fashion_mnist" | "numpy" | "imagefolder"), ``source`` (fashion_mnist:
    "auto" | "full" | "subset"), ``root`` (a path: IDX directory, .npz/.npy directory, or an
    ImageFolder root with train/ and val/ (or test/) sub-trees), ``img_size`` (ImageFolder),
    ``in_chans``, ``train_limit`` / ``test_limit`` (a deterministic random subset, 0 = all),
    ``mean`` / ``std`` (per channel, default per dataset).
    """
    name = cfg.get("name", "fashion_mnist")
    root = cfg.get("root") or None
    if name == "fashion_mnist":
        src = cfg.get("source", "auto")
        tr = load_fashion_mnist("train", src, root)
        te = load_fashion_mnist("test", src, root)
        train, test = ArrayDataset(tr.images, tr.labels, FMNIST_CLASSES), ArrayDataset(te.images, te.labels, FMNIST_CLASSES)
        mean, std, source = FASHION_MNIST_MEAN, FASHION_MNIST_STD, tr.source
    elif name == "numpy":
        if root is None:
            raise ValueError("data.name=numpy needs data.root (an .npz file or a directory of .npy files)")
        train = ArrayDataset(*load_numpy_arrays(root, "train"))
        test = ArrayDataset(*load_numpy_arrays(root, "test"))
        c = train.image_shape[0]
        mean, std, source = (0.5,) * c, (0.5,) * c, f"numpy ({root})"
    elif name == "imagefolder":
        if root is None:
            raise ValueError("data.name=imagefolder needs data.root (a directory with train/ and val/ sub-trees)")
        size, chans = int(cfg.get("img_size", 224)), int(cfg.get("in_chans", 3))
        rootp = Path(root)
        val = next((rootp / d for d in ("val", "test", "validation") if (rootp / d).is_dir()), None)
        if not (rootp / "train").is_dir() or val is None:
            raise FileNotFoundError(f"ImageFolder root {root} needs train/ and val/ (or test/) sub-directories")
        train, test = ImageFolderDataset(rootp / "train", size, chans), ImageFolderDataset(val, size, chans)
        if train.classes != test.classes:
            raise ValueError(f"{root}: train/ and {val.name}/ have different class directories")
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if chans == 3 else ((0.5,), (0.5,))
        source = f"imagefolder ({root})"
    else:
        raise ValueError(f"data.name must be 'fashion_mnist', 'numpy' or 'imagefolder', got {name!r}")
    seed = int(cfg.get("subset_seed", 0))
    if isinstance(train, ArrayDataset):
        train = _limit(train, cfg.get("train_limit"), seed)
        test = _limit(test, cfg.get("test_limit"), seed + 1)
    shape = train.image_shape
    if tuple(test.image_shape) != tuple(shape):
        raise ValueError(f"train images are {shape} but test images are {test.image_shape}")
    mean = tuple(cfg.get("mean") or mean)
    std = tuple(cfg.get("std") or std)
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise ValueError(f"data.mean/std need {shape[0]} values (one per channel), got {mean} / {std}")
    num_classes = max(len(getattr(train, "classes", ())), int(train.labels.max()) + 1)
    return DataBundle(train, test, num_classes, shape[0], shape[1], mean, std, name, source,
                      tuple(getattr(train, "classes", ())))
