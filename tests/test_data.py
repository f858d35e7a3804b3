"""Offline data: the shipped Fashion-MNIST subset, IDX/numpy/ImageFolder loaders, the OOD copy,
few-shot episodes."""

import gzip
import struct

import numpy as np
import pytest
import torch

from m2mkd_fast.data import (CORRUPTIONS, ArrayDataset, ImageFolderDataset, build_data, corrupt, corrupted_copy,
                             linear_probe_episodes, load_digits_dataset, load_fashion_mnist, random_crop_flip,
                             read_idx, sample_episodes)
from m2mkd_fast.data.fashion_mnist import ASSET, full_set_dir, subset_indices


def test_shipped_subset_is_balanced_and_small():
    assert ASSET.stat().st_size < 6 * 2**20
    tr = load_fashion_mnist("train", "subset")
    te = load_fashion_mnist("test", "subset")
    assert tr.images.shape == (10000, 28, 28, 1) and tr.images.dtype == np.uint8
    assert te.images.shape == (2000, 28, 28, 1)
    assert np.bincount(tr.labels).tolist() == [1000] * 10
    assert np.bincount(te.labels).tolist() == [200] * 10
    assert tr.images.std() > 50  # real images, not zeros


@pytest.mark.skipif(full_set_dir() is None, reason="the full Fashion-MNIST set is not installed")
def test_subset_is_the_documented_selection_of_the_full_set():
    full = load_fashion_mnist("train", "full")
    assert len(full) == 60000
    idx = subset_indices(full.labels, 1000, 20170825)
    sub = load_fashion_mnist("train", "subset")
    assert np.array_equal(full.images[idx], sub.images)
    assert np.array_equal(full.labels[idx], sub.labels)


def _write_idx(path, arr, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_reader_and_root_directory(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), True)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), False)
    a = load_fashion_mnist("train", "auto", root=str(tmp_path))
    assert a.images.shape == (12, 28, 28, 1) and a.labels.shape == (12,)
    assert load_fashion_mnist("test", root=str(tmp_path)).images.shape == (5, 28, 28, 1)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, 1) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header says"):
        read_idx(bad)
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_fashion_mnist("train", root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")


def test_numpy_and_imagefolder_loaders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", train_images=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 4, 20), test_images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
             test_labels=rng.integers(0, 4, 6))
    b = build_data({"name": "numpy", "root": str(tmp_path / "d.npz")})
    assert (b.in_chans, b.img_size, len(b.train), len(b.test)) == (3, 8, 20, 6)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / "folder" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(d / f"{i}.png")
    b = build_data({"name": "imagefolder", "root": str(tmp_path / "folder"), "img_size": 8, "in_chans": 3})
    x, y = b.train[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and int(y) == 1
    assert b.num_classes == 2 and b.classes == ("cat", "dog")
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="data.root"):
        build_data({"name": "numpy"})
    with pytest.raises(ValueError, match="data.name"):
        build_data({"name": "cifar"})


def test_array_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(np.zeros((2, 4, 4), np.float32), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(np.zeros((2, 4, 4), np.uint8), [0, 1, 2])


def test_train_limit_is_deterministic():
    a = build_data({"name": "fashion_mnist", "source": "subset", "train_limit": 100, "test_limit": 50})
    b = build_data({"name": "fashion_mnist", "source": "subset", "train_limit": 100, "test_limit": 50})
    assert len(a.train) == 100 and len(a.test) == 50
    assert torch.equal(a.train.images, b.train.images)


def test_random_crop_flip_keeps_content_and_shape():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    y = random_crop_flip(x, padding=0, flip=False)
    assert torch.equal(x, y)
    z = random_crop_flip(x, padding=2, flip=True)
    assert z.shape == x.shape and z.dtype == x.dtype


def test_ood_copy_is_deterministic_and_corrupts():
    te = build_data({"name": "fashion_mnist", "source": "subset", "test_limit": 70}).test
    a = corrupted_copy(te, severity=3, seed=5)
    b = corrupted_copy(te, severity=3, seed=5)
    c = corrupted_copy(te, severity=3, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, te.labels)
    assert not torch.equal(a.images, c.images)  # the noise depends on the seed
    for ci, name in enumerate(CORRUPTIONS):
        idx = a.corruption_of == ci
        diff = (a.images[idx].float() - te.images[idx].float()).abs().mean()
        assert diff > 1.0, name  # every corruption changes its images
    with pytest.raises(ValueError, match="severity"):
        corrupt(torch.rand(1, 1, 4, 4), "contrast", 6, torch.Generator())
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(torch.rand(1, 1, 4, 4), "fog", 1, torch.Generator())


def test_fewshot_episodes_and_probe():
    d = load_digits_dataset(img_size=16, in_chans=1)
    assert d.images.shape == (1797, 1, 16, 16) and d.images.dtype == torch.uint8
    si, sy, qi, qy = sample_episodes(d.labels, ways=5, shots=2, queries=3, episodes=4, seed=0)
    assert si.shape == (4, 10) and qi.shape == (4, 15)
    for e in range(4):  # support and query disjoint, labels consistent within an episode
        assert not set(si[e].tolist()) & set(qi[e].tolist())
        for w in range(5):
            cls = d.labels[si[e][sy[e] == w]].unique()
            assert cls.numel() == 1 and (d.labels[qi[e][qy[e] == w]] == cls).all()
    again = sample_episodes(d.labels, 5, 2, 3, 4, seed=0)
    assert torch.equal(again[0], si)
    # informative features → high accuracy; random features → about chance
    feats = torch.nn.functional.one_hot(d.labels, 10).float() + 0.1 * torch.randn(len(d), 10)
    good, ci, _ = linear_probe_episodes(feats, d.labels, ways=5, shots=1, queries=5, episodes=20, steps=50)
    noise, _, _ = linear_probe_episodes(torch.randn(len(d), 10), d.labels, ways=5, shots=1, queries=5, episodes=20, steps=50)
    assert good > 0.9 and 0 <= ci < 0.2
    assert noise < 0.45
    with pytest.raises(ValueError, match="ways"):
        sample_episodes(d.labels, ways=11, shots=1, queries=1, episodes=1, seed=0)
