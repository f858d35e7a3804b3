"""NAC read-in attention (docs/design.md §2.3): the folded form and the seed's materialised form.

Receivers are U latents with queries q [B,U,H,C]; senders are V tokens x [B,V,Din] (already
layer-normed). Key and value of token v *for latent u* are ModFCs of x[b,v] with latent u's code:

    k[b,v,u] = W_k (x[b,v] ⊙ s_k[u]) + b_k,     v[b,v,u] = W_v (x[b,v] ⊙ s_v[u]) + b_v,

heads split channels head-major (W [H·C, Din] viewed as [H, C, Din]), scale 1/√C, softmax over v.

Folded form (exact): q·k = ((W_k,hᵀ q) ⊙ s_k[u]) · x[b,v] + q·b_k,h, whose last term is constant in
v and cancels in the softmax; Σ_v a·v = W_v,h((Σ_v a·x[b,v]) ⊙ s_v[u]) + b_v,h. So read-in is
attention whose keys and values are x itself, shared by every head, with queries
Q' = (W_kᵀ q) ⊙ s_k and head dimension Din.
"""

import math
from typing import Optional

import torch

__all__ = ["readin_attention", "readin_attention_materialised"]


def readin_attention(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    s_k: torch.Tensor,
    s_v: torch.Tensor,
    b_v: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Folded read-in attention: q [B,U,H,C] · x [B,V,Din] · w_k, w_v [H,C,Din] · s_k, s_v [U,Din]
    · b_v [H,C] | None -> m [B,U,H,C]."""
    head_dim = q.shape[-1]
    q_folded = torch.einsum("buhc,hcd->buhd", q, w_k) * s_k[None, :, None, :]  # [B,U,H,Din]
    scores = torch.einsum("buhd,bvd->bhuv", q_folded, x) / math.sqrt(head_dim)
    attn = torch.softmax(scores, dim=-1)
    mixed = torch.einsum("bhuv,bvd->buhd", attn, x) * s_v[None, :, None, :]  # [B,U,H,Din]
    m = torch.einsum("buhd,hcd->buhc", mixed, w_v)
    if b_v is not None:
        m = m + b_v
    return m


def readin_attention_materialised(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    s_k: torch.Tensor,
    s_v: torch.Tensor,
    b_v: Optional[torch.Tensor] = None,
    b_k: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The seed's formulation: builds every per-(token, latent) key and value, B·V·U·H·C each.

    Same arguments as :func:`readin_attention` plus an optional key bias b_k [H,C] (which
    cancels in the softmax; the NAC configs have none). Memory grows as B·V·U·H·C: use it for
    tests and as the benchmark baseline only.
    """
    head_dim = q.shape[-1]
    x_k = x[:, :, None, :] * s_k[None, None, :, :]  # [B,V,U,Din]: x[b,v] ⊙ s_k[u]
    x_v = x[:, :, None, :] * s_v[None, None, :, :]
    keys = torch.einsum("bvud,hcd->bvuhc", x_k, w_k)  # [B,V,U,H,C]
    values = torch.einsum("bvud,hcd->bvuhc", x_v, w_v)
    if b_k is not None:
        keys = keys + b_k
    if b_v is not None:
        values = values + b_v
    scores = torch.einsum("buhc,bvuhc->bhuv", q, keys) / math.sqrt(head_dim)
    attn = torch.softmax(scores, dim=-1)
    return torch.einsum("bhuv,bvuhc->buhc", attn, values)
