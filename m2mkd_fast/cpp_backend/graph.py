"""graph_attention on the C++ extension (DESIGN §2.4): sparse attention over the kept edges only.

Per call, once: the signature distances dist [U,V] (float32, float64 for float64 inputs; plain
autograd-tracked torch ops, U·V·S work), the edge list of the kept edges as CSR (receiver rows,
sender columns; dist ≤ truncation, and dist/β ≤ ln 2 in threshold mode) and the per-edge
log-affinity ℓ_e = −dist/β. Then in C++ (torch.ops.m2mkd_fast_cpp):

* ``graph_sample``: per batch element and kept edge the relaxed-Bernoulli log-sample with the
  shared Philox stream n[b,u,v] = tl.rand(seed, (b·U + u)·V + v), and its derivative w.r.t. ℓ_e;
* ``graph_forward`` / ``graph_backward``: per (b, h) and receiver, a softmax over that
  receiver's edges only (scores q·k/√C + bias), o = Σ a·v; the backward recomputes the scores
  from the saved log-sum-exp and returns dq, dk, dv and the bias gradient summed over heads,
  which autograd carries on to σ_r, σ_s and β.

Nothing of size B·U·V or B·H·U·V is built. Rows without an edge give zero output and zero
gradients. bfloat16 / float16 inputs are computed in float32 (the result is cast back);
float32 and float64 run natively.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _C  # noqa: F401  (registers torch.ops.m2mkd_fast_cpp)

__all__ = ["graph_attention"]

_ops = torch.ops.m2mkd_fast_cpp
_LN2 = math.log(2.0)


@torch.library.register_fake("m2mkd_fast_cpp::graph_forward")
def _graph_forward_fake(q, k, v, row_ptr, col, bias, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3])


@torch.library.register_fake("m2mkd_fast_cpp::graph_backward")
def _graph_backward_fake(grad_out, q, k, v, out, lse, row_ptr, col, bias, scale, bias_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


@torch.library.register_fake("m2mkd_fast_cpp::graph_sample")
def _graph_sample_fake(logit, row, col, batch, num_receivers, num_senders, seed, temperature):
    shape = (batch, logit.shape[0])
    return logit.new_empty(shape), logit.new_empty(shape)


@torch.library.register_fake("m2mkd_fast_cpp::philox_uniform")
def _philox_uniform_fake(seed, offsets):
    return offsets.new_empty(offsets.shape, dtype=torch.float32)


class _SparseAttention(torch.autograd.Function):
    """o = softmax over each receiver's edges of (q·k·scale + bias[b, e]) times v."""

    @staticmethod
    def forward(ctx, q, k, v, bias, row_ptr, col, scale):
        out, lse = _ops.graph_forward(q, k, v, row_ptr, col, bias, scale)
        ctx.save_for_backward(q, k, v, out, lse, row_ptr, col, bias)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, row_ptr, col, bias = ctx.saved_tensors
        bias_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _ops.graph_backward(grad_out, q, k, v, out, lse, row_ptr, col, bias, ctx.scale, bias_grad)
        return dq, dk, dv, (dbias if bias_grad else None), None, None, None


class _RelaxedBernoulliLogSample(torch.autograd.Function):
    """bias[b, e] = logsigmoid((logit p_e + logit n[b,u_e,v_e]) / t), p_e = clamp(exp ℓ_e, ε, 1−ε)."""

    @staticmethod
    def forward(ctx, logit, row, col, batch, receivers, senders, seed, temperature):
        sample, deriv = _ops.graph_sample(logit, row, col, batch, receivers, senders, seed, temperature)
        ctx.save_for_backward(deriv)
        return sample

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors
        return (grad * deriv).sum(0), None, None, None, None, None, None, None


def edge_list(
    sig_r: torch.Tensor,
    sig_s: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float] = 0.9,
    threshold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_ptr [U+1], row [nnz], col [nnz], logit [nnz]) of the kept edges, receiver-major.

    logit = −dist/β on each kept edge (autograd-tracked to the signatures and β; None-free);
    in threshold mode the kept edges are those with dist/β ≤ ln 2 too and logit is detached.
    """
    dtype = torch.float64 if sig_r.dtype == torch.float64 else torch.float32
    unit_r = F.normalize(sig_r.to(dtype), dim=-1, eps=1e-12)
    unit_s = F.normalize(sig_s.to(dtype), dim=-1, eps=1e-12)
    dist = 1 - unit_r @ unit_s.t()  # [U,V]
    beta = bandwidth.to(dtype)
    receivers, senders = dist.shape
    with torch.no_grad():
        kept = torch.ones_like(dist, dtype=torch.bool) if truncation is None else dist <= truncation
        if threshold:
            kept &= dist / beta <= _LN2
        flat = kept.reshape(-1).nonzero().squeeze(1)  # row-major: receivers in order, senders sorted
        row = torch.div(flat, senders, rounding_mode="floor")
        col = flat - row * senders
        row_ptr = torch.zeros(receivers + 1, dtype=torch.int64)
        torch.cumsum(kept.sum(dim=1), dim=0, out=row_ptr[1:])
    if threshold:
        logit = torch.zeros(flat.shape[0], dtype=dtype)
    else:
        logit = -(dist.reshape(-1).index_select(0, flat) / beta)
    return row_ptr, row, col, logit


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
    if q.device.type != "cpu":
        raise ValueError(f"graph_attention (cpp backend): expected CPU tensors, got {q.device}")
    if temperature is not None and threshold:
        raise ValueError("graph_attention: threshold=True and temperature are exclusive")
    if temperature is not None and seed is None:
        raise ValueError("graph_attention: temperature is set (sampling), so seed must be given")
    batch, _, receivers, head_dim = q.shape
    senders = k.shape[2]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    row_ptr, row, col, logit = edge_list(sig_r, sig_s, bandwidth, truncation, threshold)
    if temperature is not None:
        bias = _RelaxedBernoulliLogSample.apply(logit, row, col, batch, receivers, senders, int(seed), float(temperature))
    else:
        bias = logit[None]
    bias = bias.to(dtype)
    out = _SparseAttention.apply(
        q.to(dtype).contiguous(),
        k.to(dtype).contiguous(),
        v.to(dtype).contiguous(),
        bias.contiguous(),
        row_ptr,
        col,
        1.0 / math.sqrt(head_dim),
    )
    return out.to(q.dtype)
