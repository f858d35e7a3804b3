"""readin_attention on the C++ extension (docs/design.md §2.3, folded form).

The keys and values of the folded read-in are the layer-normed tokens x, shared by every head,
so per batch element the U·H query rows Q' = (W_kᵀ q) ⊙ s_k / √C attend to one [V, Din]
matrix. torch.ops.m2mkd_fast.readin_cpp_fwd computes the projections as batched GEMMs over
all rows and the attention per batch element and block of rows (scores of at most 32k
elements per block in a thread-local buffer; nothing of size B·U·V), with the s_k / s_v
scalings and the softmax fused into the passes over each block; it saves W_kᵀ q, the attention
output and the row log-sum-exp. The backward recomputes the scores block by block and fuses
the s_k / s_v gradient reductions into the same passes. Every GEMM goes through ATen.

float32 and float64 run natively; bfloat16 / float16 inputs are computed in float32 and the
result is cast back.
"""

from typing import Optional

import torch

from .. import _C  # noqa: F401  (registers the m2mkd_fast::*_cpp_* ops)
from ..library import forbid_double_backward, op_name

__all__ = ["readin_attention"]

_ops = torch.ops.m2mkd_fast


@torch.library.register_fake(op_name("readin", "cpp", "fwd"))
def _readin_forward_fake(q, x, w_k, w_v, s_k, s_v, b_v):
    B, U, H, _ = q.shape
    din = x.shape[-1]
    return torch.empty_like(q), q.new_empty(B, U, H, din), q.new_empty(B, U, H, din), q.new_empty(B, U, H)


@torch.library.register_fake(op_name("readin", "cpp", "bwd"))
def _readin_backward_fake(grad_m, q, x, w_k, w_v, s_k, s_v, tk, a, lse):
    return (
        torch.empty_like(q),
        torch.empty_like(x),
        torch.empty_like(w_k),
        torch.empty_like(w_v),
        torch.empty_like(s_k),
        torch.empty_like(s_v),
        q.new_empty(q.shape[2], q.shape[3]),
    )


def _setup_context(ctx, inputs, output):
    q, x, w_k, w_v, s_k, s_v, b_v = inputs
    _, tk, a, lse = output
    ctx.mark_non_differentiable(tk, a, lse)
    ctx.save_for_backward(q, x, w_k, w_v, s_k, s_v, tk, a, lse)
    ctx.has_bias = b_v is not None


def _backward(ctx, grad_m, _grad_tk, _grad_a, _grad_lse):
    q, x, w_k, w_v, s_k, s_v, tk, a, lse = ctx.saved_tensors
    dq, dx, dw_k, dw_v, ds_k, ds_v, db_v = _ops.readin_cpp_bwd(grad_m, q, x, w_k, w_v, s_k, s_v, tk, a, lse)
    return dq, dx, dw_k, dw_v, ds_k, ds_v, (db_v if ctx.has_bias else None)


torch.library.register_autograd(op_name("readin", "cpp", "fwd"), _backward, setup_context=_setup_context)
forbid_double_backward(op_name("readin", "cpp", "bwd"))


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
    if q.device.type != "cpu":
        raise ValueError(f"readin_attention (cpp backend): expected CPU tensors, got {q.device}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    args = [t.to(dtype).contiguous() for t in (q, x, w_k, w_v, s_k, s_v)]
    bias = None if b_v is None else b_v.to(dtype).contiguous()
    return _ops.readin_cpp_fwd(*args, bias)[0].to(q.dtype)
