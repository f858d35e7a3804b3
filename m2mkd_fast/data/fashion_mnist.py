"""Fashion-MNIST, offline.

Three sources, tried in this order by :func:`load_fashion_mnist` with ``source="auto"``:

1. a directory given by the caller (``root``) holding the four IDX files
   (``train-images-idx3-ubyte[.gz]`` …, the layout of the original release);
2. the full set installed by Debian's ``dataset-fashion-mnist`` package
   (``/usr/share/datasets/fashion-mnist``) or pointed to by ``$M2MKD_FASHION_MNIST``;
3. the deterministic subset shipped inside this package
   (``m2mkd_fast/data/assets/fashion_mnist_subset.npz``: 1000 training and 200 test images per
   class, 10k / 2k in all), so the pipeline runs after ``pip install`` alone.

Fashion-MNIST is © 2017 Zalando SE, released under the MIT license
(https://github.com/zalandoresearch/fashion-mnist).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN = (0.2860,)  # per-channel pixel mean and std of the training set, pixels in [0, 1]
STD = (0.3530,)
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/datasets/fashion_mnist")
ASSET = Path(__file__).resolve().parent / "assets" / "fashion_mnist_subset.npz"
SUBSET_PER_CLASS = {"train": 1000, "test": 200}
SUBSET_SEED = 20170825  # Fashion-MNIST's release date; fixes which images the subset holds

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class ImageArrays:
    """Images as uint8 [N, H, W, C] and int64 labels [N], plus where they came from."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    Raises ValueError naming the file when the header does not describe the payload.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but {payload.size} bytes follow")
    return payload.reshape(dims).copy()


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _has_idx(root: Path) -> bool:
    return all(_find(root, stem) is not None for pair in _FILES.values() for stem in pair)


def _read_idx_dir(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lab_stem = _FILES[split]
    img_path, lab_path = _find(root, img_stem), _find(root, lab_stem)
    if img_path is None or lab_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST directory {root} lacks {img_stem}[.gz] or {lab_stem}[.gz] "
            "(expected the four IDX files of the original release)"
        )
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images[..., None], labels.astype(np.int64)


def full_set_dir() -> Path | None:
    """The directory of the full Fashion-MNIST set on this machine, or None."""
    candidates = [os.environ.get("M2MKD_FASHION_MNIST", "")] + list(SYSTEM_DIRS)
    for c in candidates:
        if c and _has_idx(Path(c)):
            return Path(c)
    return None


def subset_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Deterministic class-balanced subset: per class, the first ``per_class`` of a seeded
    permutation; returned sorted so the subset keeps the original order."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(labels.shape[0])
    chosen = []
    for c in np.unique(labels):
        idx = perm[labels[perm] == c][:per_class]
        if idx.size < per_class:
            raise ValueError(f"class {c} has only {idx.size} images, {per_class} requested")
        chosen.append(idx)
    return np.sort(np.concatenate(chosen))


def build_subset_asset(root: str | os.PathLike, out: str | os.PathLike = ASSET) -> Path:
    """Write the shipped subset from a full copy of Fashion-MNIST (the IDX files in ``root``).

    ``python -m m2mkd_fast.data.fashion_mnist /usr/share/datasets/fashion-mnist`` regenerates
    the asset byte for byte (the selection depends only on SUBSET_SEED).
    """
    root, out = Path(root), Path(out)
    arrays = {}
    for split in ("train", "test"):
        images, labels = _read_idx_dir(root, split)
        idx = subset_indices(labels, SUBSET_PER_CLASS[split], SUBSET_SEED + (split == "test"))
        arrays[f"{split}_images"] = images[idx, :, :, 0]
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
    return out


def load_fashion_mnist(split: str = "train", source: str = "auto", root: str | None = None) -> ImageArrays:
    """Load a Fashion-MNIST split as uint8 [N, 28, 28, 1] images and int64 labels.

    Args:
        split: "train" or "test".
        source: "auto" (``root`` if given, else the full set if installed, else the shipped
            subset), "full" (``root`` or the installed full set; an error if absent) or
            "subset" (always the shipped subset, whatever is installed).
        root: a directory with the four IDX files; implies the full set.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source not in ("auto", "full", "subset"):
        raise ValueError(f"source must be 'auto', 'full' or 'subset', got {source!r}")
    if root is not None and source == "subset":
        raise ValueError("a root directory was given but source='subset' asks for the shipped subset")
    if source != "subset":
        directory = Path(root) if root is not None else full_set_dir()
        if directory is not None:
            images, labels = _read_idx_dir(directory, split)
            return ImageArrays(images, labels, CLASSES, f"fashion-mnist full ({directory})")
        if source == "full":
            raise FileNotFoundError(
                "the full Fashion-MNIST set was requested but is not installed: install the Debian "
                "package dataset-fashion-mnist, set $M2MKD_FASHION_MNIST, or pass a directory"
            )
    if not ASSET.is_file():
        raise FileNotFoundError(f"the shipped Fashion-MNIST subset is missing ({ASSET}); reinstall m2mkd_fast")
    with np.load(ASSET, allow_pickle=False) as z:
        images = z[f"{split}_images"][..., None]
        labels = z[f"{split}_labels"].astype(np.int64)
    return ImageArrays(images, labels, CLASSES, "fashion-mnist subset (shipped, 1000/200 per class)")


if __name__ == "__main__":  # pragma: no cover - asset regeneration
    import sys

    print(build_subset_asset(sys.argv[1] if len(sys.argv) > 1 else SYSTEM_DIRS[0]))
