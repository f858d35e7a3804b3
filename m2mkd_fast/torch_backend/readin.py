"""readin_attention on plain PyTorch: the folded form (docs/design.md §2.3) on scaled_dot_product_attention.

Keys and values of the folded form are the layer-normed tokens x themselves, identical for
every head. So the H heads of the U receivers are simply H·U query rows attending to the same
V keys: Q' = (W_kᵀ q) ⊙ s_k is laid out [B, U·H, Din] and SDPA runs with one "head" whose keys
and values are x — no per-head copy, no expand, nothing of size B·V·U. The scale is 1/√C with
C the head dim of q (not of Din), passed explicitly. Then m = W_v((a·x) ⊙ s_v) + b_v.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["readin_attention"]


def readin_attention(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    s_k: torch.Tensor,
    s_v: torch.Tensor,
    b_v: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q [B,U,H,C] · x [B,V,Din] · w_k, w_v [H,C,Din] · s_k, s_v [U,Din] · b_v [H,C] | None -> m [B,U,H,C]."""
    batch, receivers, heads, head_dim = q.shape
    in_dim = x.shape[-1]
    # (W_kᵀ q) per head, as one batched matmul over heads: [H, B·U, C] @ [H, C, Din]
    q_heads = q.permute(2, 0, 1, 3).reshape(heads, batch * receivers, head_dim)
    q_folded = torch.bmm(q_heads, w_k)  # [H, B·U, Din]
    q_folded = q_folded.view(heads, batch, receivers, in_dim).permute(1, 2, 0, 3) * s_k[:, None, :]  # [B,U,H,Din]
    rows = q_folded.reshape(batch, 1, receivers * heads, in_dim)
    tokens = x[:, None]  # [B,1,V,Din]: keys = values = x
    mixed = F.scaled_dot_product_attention(rows, tokens, tokens, scale=1.0 / math.sqrt(head_dim))
    # PyTorch's CPU SDPA returns zeros for a query row holding NaN / Inf; the oracle gives NaN
    mixed = torch.where(torch.isfinite(rows).all(-1, keepdim=True), mixed, float("nan"))
    mixed = mixed.view(batch, receivers, heads, in_dim) * s_v[:, None, :]  # [B,U,H,Din]
    m = torch.bmm(mixed.permute(2, 0, 1, 3).reshape(heads, batch * receivers, in_dim), w_v.transpose(1, 2))
    m = m.view(heads, batch, receivers, head_dim).permute(1, 2, 0, 3)  # [B,U,H,C]
    if b_v is not None:
        m = m + b_v
    return m
