"""Stitch layers: map token features between the meta model's width and a student's width.

m2mKD (docs/design.md §2.5) wraps every student module in a pre-stitch (meta width → student width) and a
post-stitch (student width → meta width):

* V-MoE students use ``Stitch(in_dim, out_dim, norm=True)``: LayerNorm(in_dim, eps) then
  Linear(in_dim, out_dim) with bias.
* NAC students use ``Stitch(in_dim, out_dim, norm=False)``: a single Linear with bias.

Both act on the last dimension of a tensor of any rank, e.g. tokens ``[B, N, in_dim]``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Stitch"]


class Stitch(nn.Module):
    """LayerNorm + Linear (``norm=True``, V-MoE style) or a single Linear (``norm=False``, NAC style).

    Args:
        in_dim: width of the incoming features (last dimension).
        out_dim: width of the outgoing features.
        norm: put a LayerNorm (with affine) over ``in_dim`` before the Linear.
        eps: the LayerNorm epsilon (m2mKD's stitch layers use torch's default 1e-5).
        identity_if_equal: when ``in_dim == out_dim`` and ``norm`` is False, hold no parameters
            and return the input unchanged. Off by default: m2mKD trains its stitch layers even
            when the widths agree.

    Shapes: ``forward(x [..., in_dim]) -> [..., out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, norm: bool = True, eps: float = 1e-5,
                 identity_if_equal: bool = False):
        super().__init__()
        if int(in_dim) < 1 or int(out_dim) < 1:
            raise ValueError(f"Stitch: in_dim and out_dim must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.identity = bool(identity_if_equal) and not norm and self.in_dim == self.out_dim
        self.norm = nn.LayerNorm(self.in_dim, eps=eps) if norm else nn.Identity()
        self.proj = nn.Identity() if self.identity else nn.Linear(self.in_dim, self.out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"Stitch: expected x with last dimension in_dim={self.in_dim}, got shape {tuple(x.shape)}")
        return self.proj(self.norm(x))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, identity={self.identity}"
