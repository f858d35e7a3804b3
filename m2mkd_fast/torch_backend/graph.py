"""graph_attention on plain PyTorch (docs/design.md §2.4): the kernel bias built once, then attention.

The kernel bias is computed once per call from the signatures: ℓ [U,V] (deterministic and
threshold modes, broadcast over batch and heads) or [B,U,V] (sampled mode, shared by the
heads). In sampled mode on CPU the Philox noise is drawn only for the kept edges (a
host-side ``nonzero`` of the [U,V] truncation mask; ~20% of the edges for random signatures),
then scattered into a −∞-filled [B,U,V] bias; elsewhere (CUDA, under torch.compile) it is drawn
densely. Same stream either way: n[b,u,v] = tl.rand(seed, (b·U + u)·V + v).

Attention is eager (matmul, one fused scale-and-bias add, softmax, matmul). On CPU at NAC's
Tiny-ImageNet propagation shapes (B=8, H=6, U=256, V=320, C=64, sampling on, σ/β gradients on)
it measured level with ``scaled_dot_product_attention`` given the float bias (which then runs
SDPA's math path: the bias requires grad) — 79 vs 78 ms median CPU time single-threaded, 64 vs
72 ms best — and it keeps the kernel bias and the softmax in float32 for bf16/fp16 inputs, where
SDPA would round the bias to the query dtype. When the bias needs no gradient (threshold mode;
frozen or no-grad signatures and bandwidth) and is exact in q's dtype, SDPA takes it as a mask
and runs its fused kernel instead (CPU flash: 54 vs 86 ms median there). Receivers with no edge get a zero bias row for the
softmax and their output (and so every gradient through it) is multiplied by 0: zeros, never NaN.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .philox import philox_uniform

__all__ = ["graph_attention", "graph_bias"]

_EPS = torch.finfo(torch.float32).eps
_LN2 = math.log(2.0)


def _sparse_noise_ok(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    return not (compiling is not None and compiling())


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def graph_bias(
    sig_r: torch.Tensor,
    sig_s: torch.Tensor,
    bandwidth: torch.Tensor,
    batch: int,
    truncation: Optional[float] = 0.9,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    threshold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias, empty): the kernel bias, [U,V] or [B,U,V] (float32; float64 for float64 inputs),
    −∞ on missing edges and 0 on rows without edges; empty [U] bool marks those rows."""
    dtype = torch.promote_types(sig_r.dtype, torch.float32)
    unit_r = F.normalize(sig_r.to(dtype), dim=-1, eps=1e-12)
    unit_s = F.normalize(sig_s.to(dtype), dim=-1, eps=1e-12)
    dist = 1 - unit_r @ unit_s.t()  # [U,V]
    beta = bandwidth.to(dtype)
    receivers, senders = dist.shape
    if truncation is None:
        kept = torch.ones_like(dist, dtype=torch.bool)
    else:
        kept = dist <= truncation
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=dist.device)
    if threshold:
        with torch.no_grad():
            kept = kept & (dist / beta <= _LN2)
            bias = torch.where(kept, torch.zeros((), dtype=dtype, device=dist.device), neg_inf)
    elif temperature is None:
        bias = torch.where(kept, -(dist / beta), neg_inf)
    else:
        bias = None
    empty = ~kept.any(dim=-1)  # [U]
    if bias is not None:
        return bias.masked_fill(empty[:, None], 0.0), empty

    numel = receivers * senders
    # what a missing edge holds: −∞, or 0 on a row without edges (its output is zeroed later)
    filler = torch.where(empty[:, None], torch.zeros((), dtype=dtype, device=dist.device), neg_inf).expand(receivers, senders)
    batch_offsets = torch.arange(batch, dtype=torch.int64, device=dist.device)[:, None] * numel
    if _sparse_noise_ok(dist.device):
        index = kept.reshape(-1).nonzero().squeeze(1)  # [K] flat indices of kept edges
        log_p = -(dist.reshape(-1).index_select(0, index) / beta)  # [K]
        offsets = batch_offsets + index  # [B,K]
    else:
        index = None
        log_p = -(dist / beta).reshape(-1)  # [U·V]
        offsets = batch_offsets + torch.arange(numel, dtype=torch.int64, device=dist.device)
    p = torch.exp(log_p).clamp(_EPS, 1 - _EPS)
    n = philox_uniform(seed, offsets).to(dtype).clamp_(_EPS, 1 - _EPS)
    logit_n = torch.log(n) - torch.log1p(-n)
    z = (_logit(p) + logit_n) / temperature  # [B,K] or [B,U·V]
    sample = F.logsigmoid(z)
    if index is not None:
        bias = filler.reshape(1, numel).expand(batch, numel).clone()
        bias.index_put_((torch.arange(batch, device=dist.device)[:, None], index[None, :]), sample)
    else:
        bias = torch.where(kept.reshape(1, -1), sample, filler.reshape(1, -1))
    return bias.view(batch, receivers, senders), empty


def graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sig_r: torch.Tensor,
    sig_s: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float] = 0.9,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    threshold: bool = False,
) -> torch.Tensor:
    """q [B,H,U,C] · k, v [B,H,V,C] · sig_r [U,S] · sig_s [V,S] · bandwidth 0-dim -> o [B,H,U,C]."""
    batch, _, _, head_dim = q.shape
    bias, empty = graph_bias(sig_r, sig_s, bandwidth, batch, truncation, temperature, seed, threshold)
    if bias.dim() == 2:
        bias = bias[None, None]  # [1,1,U,V]
    else:
        bias = bias[:, None]  # [B,1,U,V]
    scale = 1.0 / math.sqrt(head_dim)
    if not bias.requires_grad and (threshold or q.dtype in (torch.float32, torch.float64)):
        # No gradient to the bias (threshold mode, frozen or no-grad signatures) and the bias is
        # exact in q's dtype: SDPA's fused kernels (CPU flash) take it as a mask.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    else:
        if q.dtype == torch.float16:  # q·k can overflow fp16 (bf16 has float32's range): float32
            q, k = q.float(), k.float()
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B,H,U,V]
        logits = torch.add(bias, scores, alpha=scale)  # one pass, in the bias' (fp32+) dtype
        attn = torch.softmax(logits, dim=-1).to(v.dtype)
        out = torch.matmul(attn, v)
    return out.masked_fill(empty[:, None], 0.0)
