"""Out-of-distribution test set: a deterministic corrupted copy of a test split, in the spirit
of MNIST-C / ImageNet-C.

Image i gets corruption ``CORRUPTIONS[i % len(CORRUPTIONS)]`` at the given severity (1..5); the
random parts (noise, rotation direction, ...) come from a generator seeded by ``seed``, so the
same test split always gives the same corrupted copy, on any machine. Images are uint8 in and
uint8 out, so the OOD set is an ordinary dataset and goes through the usual normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .datasets import ArrayDataset

CORRUPTIONS = ("gaussian_noise", "impulse_noise", "gaussian_blur", "contrast", "rotate", "pixelate", "elastic")
OOD_SEED = 1234

# severity 1..5 → parameter, increasing difficulty (chosen so severity 3 costs a small CNN
# roughly 10–30 points on Fashion-MNIST, as MNIST-C's middle severities do)
_PARAMS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),   # std on [0, 1]
    "impulse_noise": (0.02, 0.04, 0.07, 0.11, 0.17),    # fraction of pixels set to 0 or 1
    "gaussian_blur": (0.5, 0.7, 0.9, 1.2, 1.6),         # kernel sigma in pixels
    "contrast": (0.6, 0.45, 0.3, 0.2, 0.12),            # remaining contrast
    "rotate": (10.0, 20.0, 30.0, 40.0, 50.0),           # degrees, random sign
    "pixelate": (0.8, 0.65, 0.5, 0.4, 0.3),             # downscale factor
    "elastic": (1.0, 1.5, 2.0, 2.5, 3.0),               # displacement amplitude in pixels
}


def _blur(x, sigma):
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def corrupt(x: torch.Tensor, kind: str, severity: int, gen: torch.Generator) -> torch.Tensor:
    """Apply one corruption to float images x [B, C, H, W] in [0, 1]; returns [0, 1] floats."""
    if kind not in _PARAMS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    p = _PARAMS[kind][severity - 1]
    b, c, h, w = x.shape
    if b == 0:
        return x
    if kind == "gaussian_noise":
        x = x + p * torch.randn(x.shape, generator=gen)
    elif kind == "impulse_noise":
        u = torch.rand(x.shape, generator=gen)
        salt = torch.rand(x.shape, generator=gen) < 0.5
        x = torch.where(u < p, salt.to(x.dtype), x)
    elif kind == "gaussian_blur":
        x = _blur(x, p)
    elif kind == "contrast":
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * p + m
    elif kind == "rotate":
        sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        ang = sign * p * math.pi / 180.0
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], -1), torch.stack([sin, cos, torch.zeros(b)], -1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif kind == "pixelate":
        small = (max(1, int(h * p)), max(1, int(w * p)))
        x = F.interpolate(F.interpolate(x, size=small, mode="area"), size=(h, w), mode="nearest")
    elif kind == "elastic":
        d = torch.randn((b, 2, h, w), generator=gen)
        d = _blur(d, 3.0)
        d = d / d.flatten(1).std(dim=1).clamp_min(1e-6).view(b, 1, 1, 1) * p
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        gx = (xs[None] + d[:, 0]) * 2 / (w - 1) - 1
        gy = (ys[None] + d[:, 1]) * 2 / (h - 1) - 1
        x = F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=True)
    return x.clamp(0.0, 1.0)


def corrupted_copy(ds: ArrayDataset, severity: int = 3, seed: int = OOD_SEED,
                   corruptions=CORRUPTIONS) -> ArrayDataset:
    """The deterministic OOD copy of an in-memory test set (uint8 in, uint8 out); the
    corruption of image i is ``corruptions[i % len(corruptions)]`` (``.corruption_of`` holds it)."""
    if not isinstance(ds, ArrayDataset):
        raise TypeError("corrupted_copy needs an in-memory ArrayDataset (ImageFolder sets: bring your own OOD set)")
    corruptions = tuple(corruptions)
    if not corruptions:
        raise ValueError("at least one corruption is needed")
    gen = torch.Generator().manual_seed(int(seed))
    x = ds.images.float() / 255.0
    out = torch.empty_like(x)
    which = torch.arange(len(ds)) % len(corruptions)
    for ci, kind in enumerate(corruptions):
        idx = (which == ci).nonzero().flatten()
        out[idx] = corrupt(x[idx], kind, severity, gen)
    res = ArrayDataset.__new__(ArrayDataset)
    res.images = (out * 255.0).round_().to(torch.uint8)
    res.labels = ds.labels.clone()
    res.classes = ds.classes
    res.corruption_of = which
    res.corruption_names = corruptions
    return res
