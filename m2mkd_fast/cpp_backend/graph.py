"""graph_attention on the C++ extension (docs/design.md §2.4): sparse attention over the kept edges only.

Per call, once: the signature distances dist [U,V] (float32, float64 for float64 inputs; plain
autograd-tracked torch ops, U·V·S work), the edge list of the kept edges as CSR (receiver rows,
sender columns; dist ≤ truncation, and dist/β ≤ ln 2 in threshold mode) and the per-edge
log-affinity ℓ_e = −dist/β. Then in C++ (torch.ops.m2mkd_fast):

* ``graph_cpp_sample``: per batch element and kept edge the relaxed-Bernoulli log-sample with the
  shared Philox stream n[b,u,v] = tl.rand(seed, (b·U + u)·V + v), and its derivative w.r.t. ℓ_e;
* ``graph_cpp_fwd`` / ``graph_cpp_bwd``: per (b, h) and receiver, a softmax over that
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

from .. import _C  # noqa: F401  (registers the m2mkd_fast::*_cpp_* ops)
from ..library import forbid_double_backward, op_name, register_no_derivative

__all__ = ["graph_attention"]

_ops = torch.ops.m2mkd_fast
_LN2 = math.log(2.0)


@torch.library.register_fake(op_name("graph", "cpp", "fwd"))
def _graph_forward_fake(q, k, v, row_ptr, col, bias, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3])


@torch.library.register_fake(op_name("graph", "cpp", "bwd"))
def _graph_backward_fake(grad_out, q, k, v, out, lse, row_ptr, col, bias, scale, bias_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


@torch.library.register_fake(op_name("graph", "cpp", "sample"))
def _graph_sample_fake(logit, row, col, batch, num_receivers, num_senders, seed, temperature):
    shape = (batch, logit.shape[0])
    return logit.new_empty(shape), logit.new_empty(shape)


@torch.library.register_fake(op_name("graph", "cpp", "philox"))
def _philox_uniform_fake(seed, offsets):
    return offsets.new_empty(offsets.shape, dtype=torch.float32)


def _attention_setup_context(ctx, inputs, output):
    """graph_cpp_fwd: o = softmax over each receiver's edges of (q·k·scale + bias[b, e]) times v."""
    q, k, v, row_ptr, col, bias, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, row_ptr, col, bias)
    ctx.scale = scale


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, row_ptr, col, bias = ctx.saved_tensors
    bias_grad = ctx.needs_input_grad[5]
    dq, dk, dv, dbias = _ops.graph_cpp_bwd(grad_out, q, k, v, out, lse, row_ptr, col, bias, ctx.scale, bias_grad)
    return dq, dk, dv, None, None, (dbias if bias_grad else None), None


def _sample_setup_context(ctx, inputs, output):
    """graph_cpp_sample: bias[b, e] = logsigmoid((logit p_e + logit n[b,u_e,v_e]) / t),
    p_e = clamp(exp ℓ_e, ε, 1−ε), and its derivative w.r.t. ℓ_e (not differentiable)."""
    _, deriv = output
    ctx.mark_non_differentiable(deriv)
    ctx.save_for_backward(deriv)


def _sample_backward(ctx, grad, _grad_deriv):
    (deriv,) = ctx.saved_tensors
    return (grad * deriv).sum(0), None, None, None, None, None, None, None


torch.library.register_autograd(op_name("graph", "cpp", "fwd"), _attention_backward, setup_context=_attention_setup_context)
forbid_double_backward(op_name("graph", "cpp", "bwd"))
torch.library.register_autograd(op_name("graph", "cpp", "sample"), _sample_backward, setup_context=_sample_setup_context)
register_no_derivative(op_name("graph", "cpp", "philox"))


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
        seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
        bias = _ops.graph_cpp_sample(logit, row, col, batch, receivers, senders, seed, float(temperature))[0]
    else:
        bias = logit[None]
    bias = bias.to(dtype)
    out, _ = _ops.graph_cpp_fwd(
        q.to(dtype).contiguous(),
        k.to(dtype).contiguous(),
        v.to(dtype).contiguous(),
        row_ptr,
        col,
        bias.contiguous(),
        1.0 / math.sqrt(head_dim),
    )
    return out.to(q.dtype)
