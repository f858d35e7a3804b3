"""Per-batch image transforms on tensors (CPU or GPU): uint8 → normalised float, and the
training augmentation (random crop after padding, horizontal flip, random erasing).

They draw from torch's default generator of the batch's device, so a checkpoint that saves
that generator's state makes a resumed run draw the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Normalize:
    """uint8 [B, C, H, W] (0..255) → float32, (x/255 − mean) / std per channel."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std


def random_crop_flip(x: torch.Tensor, padding: int = 2, flip: bool = True) -> torch.Tensor:
    """Random crop of the original size after zero padding, per image, plus random horizontal
    flips; x is [B, C, H, W] (any dtype)."""
    b, _, h, w = x.shape
    if b == 0:
        return x
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # [B, H]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # [B, W]
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        f = torch.rand(b, device=x.device) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def random_erasing(x: torch.Tensor, prob: float) -> torch.Tensor:
    """timm-style random erasing (one rectangle, per-pixel normal noise) on normalised images."""
    if prob <= 0:
        return x
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=prob, mode="pixel", device=str(x.device))(x)


class TrainTransform:
    """uint8 batch → augmented, normalised float batch (what the training loop feeds the model)."""

    def __init__(self, mean, std, padding: int = 2, flip: bool = True, erase_prob: float = 0.0):
        self.norm = Normalize(mean, std)
        self.padding, self.flip, self.erase_prob = int(padding), bool(flip), float(erase_prob)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = random_crop_flip(x, self.padding, self.flip)
        return random_erasing(self.norm(x), self.erase_prob)
