"""NAC's image tokenizer (docs/design.md §2.6): a 2-stage ConvNeXt plus a learned positional grid.

Images ``[B, C, H, W]`` → stem (conv k=s, stride s; LayerNorm) → stage 1 (ConvNeXt blocks at
``dims[0]``) → downsample (LayerNorm; conv 2×2 stride 2) → stage 2 (blocks at ``dims[1]``) →
feature map ``[B, dims[1], H/(2s), W/(2s)]``, to which a learned grid of ``pos_dim`` channels
(initialised N(0, 1), one value per position) is concatenated on the channel axis; tokens
``[B, V, dims[1] + pos_dim]`` in row-major order. NAC uses dims (D/4, D/2), depths (3, 3),
stem stride 4, block LayerScale 1e-6, no final norm, convs and linears trunc_normal(0.02) with
zero bias (as the seed's ConvNeXt).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn
from timm.layers import DropPath, LayerNorm2d, trunc_normal_

__all__ = ["ConvNeXtBlock", "NACTokenizer"]


class ConvNeXtBlock(nn.Module):
    """dwconv 7×7 → LayerNorm (eps 1e-6) → Linear 4× → GELU → Linear → LayerScale → DropPath, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class NACTokenizer(nn.Module):
    """ConvNeXt stages + positional grid → tokens ``[B, V, dims[-1] + pos_dim]``.

    Args:
        in_chans: image channels.  img_size: (H, W) the grid is sized for.
        dims, depths: channels and blocks per ConvNeXt stage (NAC: (D/4, D/2), (3, 3)).
        stem_stride: patchify stride of the stem (4 in NAC; 2 for 28×28 inputs).
        pos_dim: channels of the learned positional grid (64 in NAC; 0 = none).
        ls_init_value: block LayerScale init (1e-6).  drop_path_rate: linspace over the blocks.
    """

    def __init__(self, in_chans: int = 3, img_size: Tuple[int, int] = (64, 64), dims: Sequence[int] = (96, 192),
                 depths: Sequence[int] = (3, 3), stem_stride: int = 4, pos_dim: int = 64,
                 ls_init_value: float = 1e-6, drop_path_rate: float = 0.0):
        super().__init__()
        dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
        if len(dims) != len(depths) or len(dims) < 1:
            raise ValueError(f"NACTokenizer: dims {dims} and depths {depths} must have the same non-zero length")
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        stride = stem_stride * 2 ** (len(dims) - 1)
        if h % stride or w % stride:
            raise ValueError(f"NACTokenizer: img_size {(h, w)} must be divisible by the total stride {stride}")
        self.dims, self.depths, self.pos_dim = dims, depths, int(pos_dim)
        self.grid_size = (h // stride, w // stride)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=stem_stride, stride=stem_stride),
                                  LayerNorm2d(dims[0], eps=1e-6))
        self.downsample = nn.ModuleList(
            nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
            for i in range(1, len(dims)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist() if sum(depths) else []
        blocks, cursor = [], 0
        for dim, depth in zip(dims, depths):
            blocks.append(nn.Sequential(*[ConvNeXtBlock(dim, rates[cursor + j], ls_init_value) for j in range(depth)]))
            cursor += depth
        self.conv_stages = nn.ModuleList(blocks)
        self.pos_grid = nn.Parameter(torch.randn(self.pos_dim, *self.grid_size)) if self.pos_dim > 0 else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def output_dim(self) -> int:
        return self.dims[-1] + self.pos_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ConvNeXt feature map ``[B, dims[-1], h, w]``."""
        x = self.conv_stages[0](self.stem(x))
        for down, stage in zip(self.downsample, self.conv_stages[1:]):
            x = stage(down(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"NACTokenizer: expected images [B, C, H, W], got shape {tuple(x.shape)}")
        x = self.forward_features(x)
        if self.pos_grid is not None:
            if tuple(x.shape[-2:]) != self.grid_size:
                raise ValueError(f"NACTokenizer: feature map {tuple(x.shape[-2:])} does not match the positional "
                                 f"grid {self.grid_size}; build the model with this img_size")
            x = torch.cat([x, self.pos_grid.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        return x.flatten(2).transpose(1, 2)
