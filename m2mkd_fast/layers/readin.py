"""NAC's read-in attention as a drop-in layer (docs/design.md §2.3)."""

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import LayerScale

from .. import ops
from .modfc import ModFC

__all__ = ["ReadInAttention"]


class ReadInAttention(nn.Module):
    """U latents (receivers) read V input tokens (senders): out = z + LayerScale(exit(m, c)).

    q = ModFC_q(LN_r(z), c); the key and value ModFCs act on LN_s(x) with each latent's code,
    k[b,v,u] = ModFC_k(x̂[b,v], c[u]) — never built: their weights and code scales go to
    :func:`m2mkd_fast.ops.readin_attention` (the folded form). q/k/v ModFCs have no bias, the
    exit ModFC has one. LayerScale starts at ``layer_scale`` (1.0 for the read-in).

    forward(z [B, U, dim], code [U, Dc], x [B, V, input_dim]) -> [B, U, dim].
    """

    def __init__(
        self,
        dim: int,
        input_dim: int,
        code_features: int,
        num_heads: int,
        head_dim: int,
        layer_scale: float = 1.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.backend = backend
        inner = num_heads * head_dim
        self.norm_sender = nn.LayerNorm(input_dim)
        self.norm_receiver = nn.LayerNorm(dim)
        self.q = ModFC(dim, inner, code_features, bias=False)
        self.k = ModFC(input_dim, inner, code_features, bias=False)
        self.v = ModFC(input_dim, inner, code_features, bias=False)
        self.exit = ModFC(inner, dim, code_features, bias=True)
        self.layer_scale = LayerScale(dim, init_values=layer_scale)

    def forward(self, z: torch.Tensor, code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch, receivers, _ = z.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q(self.norm_receiver(z), code).view(batch, receivers, heads, head_dim)
        dtype = q.dtype  # the compute dtype (bf16/fp16 under autocast)
        tokens = self.norm_sender(x).to(dtype)
        in_dim = tokens.shape[-1]
        m = ops.readin_attention(
            q,
            tokens,
            self.k.weight.to(dtype).view(heads, head_dim, in_dim),
            self.v.weight.to(dtype).view(heads, head_dim, in_dim),
            self.k.scale(code).to(dtype),
            self.v.scale(code).to(dtype),
            None,
            backend=self.backend,
        )
        return z + self.layer_scale(self.exit(m.reshape(batch, receivers, heads * head_dim), code))
