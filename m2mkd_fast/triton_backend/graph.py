"""Triton backend of ``graph_attention`` (docs/design.md §2.4): torch.library custom ops around the
kernels in m2mkd_fast.kernels.graph.

Layers of this file, top to bottom:

* :func:`graph_attention` — the backend function with the op's public signature. It normalises the
  signatures in torch (autograd differentiates through the normalisation) and calls the op.
* ``m2mkd_fast::graph_triton_fwd`` / ``m2mkd_fast::graph_triton_bwd`` — custom ops with fake
  (meta) implementations, the forward registered with autograd whose backward is the second op.
  They take the unit-normalised signatures ŝ_r [U,S], ŝ_s [V,S] (float32) and return gradients
  with respect to them and to β.

q, k, v in float32, bfloat16 or float16 (fp32 accumulation). CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1. Validation of arguments is the job of ``m2mkd_fast.ops.graph_attention``.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import graph as _k
from ..library import forbid_double_backward, op_name

__all__ = ["graph_attention"]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _blocks(block_u: int, block_v: int):
    return (block_u, block_v) if block_u and block_v else None


@torch.library.custom_op(op_name("graph", "triton", "fwd"), mutates_args=())
def _graph_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sig_r_hat: torch.Tensor,
    sig_s_hat: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float],
    temperature: Optional[float],
    seed: torch.Tensor,
    threshold: bool,
    block_u: int,
    block_v: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B,H,U,C], lse [B,H,U] float32, base-2 log-sum-exp of the scores; 0 on empty rows).
    seed: 0-dim int64 CPU tensor (read here, outside any traced graph)."""
    ell = _k.log_affinity(sig_r_hat, sig_s_hat, bandwidth, truncation, threshold)
    return _k.forward(q, k, v, ell, temperature, int(seed), _blocks(block_u, block_v))


@_graph_attention_fwd.register_fake
def _(q, k, v, sig_r_hat, sig_s_hat, bandwidth, truncation, temperature, seed, threshold, block_u, block_v):
    B, H, U, C = q.shape
    return q.new_empty((B, H, U, C)), q.new_empty((B, H, U), dtype=torch.float32)


@torch.library.custom_op(op_name("graph", "triton", "bwd"), mutates_args=())
def _graph_attention_bwd(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    sig_r_hat: torch.Tensor,
    sig_s_hat: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float],
    temperature: Optional[float],
    seed: torch.Tensor,
    threshold: bool,
    block_u: int,
    block_v: int,
    heads_per_program: int,
    signature_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dŝ_r, dŝ_s, dβ); the last three are zeros unless signature_grad."""
    ell = _k.log_affinity(sig_r_hat, sig_s_hat, bandwidth, truncation, threshold)
    sig_grad = signature_grad and not threshold
    dq, dk, dv, rr, rs, db = _k.backward(
        grad_o, q, k, v, o, lse, ell, sig_r_hat, sig_s_hat, temperature, int(seed), sig_grad,
        _blocks(block_u, block_v), heads_per_program or None,
    )
    # ℓ = (ŝ_r·ŝ_s − 1)/β on kept pairs: ∂ℓ/∂ŝ_r = ŝ_s/β, ∂ℓ/∂ŝ_s = ŝ_r/β, ∂ℓ/∂β = −ℓ/β
    beta = bandwidth.detach().float()
    d_sig_r = (rr / beta).to(sig_r_hat.dtype)
    d_sig_s = (rs / beta).to(sig_s_hat.dtype)
    d_beta = (-db / beta).to(bandwidth.dtype).reshape(bandwidth.shape)
    return dq, dk, dv, d_sig_r, d_sig_s, d_beta


@_graph_attention_bwd.register_fake
def _(grad_o, q, k, v, o, lse, sig_r_hat, sig_s_hat, bandwidth, truncation, temperature, seed, threshold,
      block_u, block_v, heads_per_program, signature_grad):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty_like(sig_r_hat, memory_format=torch.contiguous_format),
        torch.empty_like(sig_s_hat, memory_format=torch.contiguous_format),
        torch.empty_like(bandwidth),
    )


forbid_double_backward(op_name("graph", "triton", "bwd"))


def _setup_context(ctx, inputs, output):
    q, k, v, sig_r_hat, sig_s_hat, bandwidth, truncation, temperature, seed, threshold, block_u, block_v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, sig_r_hat, sig_s_hat, bandwidth, seed)
    ctx.args = (truncation, temperature, threshold, block_u, block_v)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, sig_r_hat, sig_s_hat, bandwidth, seed = ctx.saved_tensors
    truncation, temperature, threshold, block_u, block_v = ctx.args
    need = ctx.needs_input_grad
    signature_grad = not threshold and any(need[3:6])
    dq, dk, dv, d_sig_r, d_sig_s, d_beta = torch.ops.m2mkd_fast.graph_triton_bwd(
        grad_o, q, k, v, o, lse, sig_r_hat, sig_s_hat, bandwidth,
        truncation, temperature, seed, threshold, block_u, block_v, 0, signature_grad,
    )
    if not signature_grad:
        d_sig_r = d_sig_s = d_beta = None
    return dq, dk, dv, d_sig_r, d_sig_s, d_beta, None, None, None, None, None, None


_graph_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sig_r: torch.Tensor,
    sig_s: torch.Tensor,
    bandwidth: torch.Tensor,
    truncation: Optional[float] = 0.9,
    temperature: Optional[float] = None,
    seed=None,
    threshold: bool = False,
    *,
    block_u: int = 0,
    block_v: int = 0,
) -> torch.Tensor:
    """Kernel-modulated graph attention on Triton: q [B,H,U,C] · k, v [B,H,V,C] · sig_r [U,S] ·
    sig_s [V,S] · bandwidth 0-dim → o [B,H,U,C] (see m2mkd_fast.ops.graph_attention).

    ``block_u``/``block_v`` (0 = automatic) fix the kernels' tile sizes (powers of two ≥ 16),
    for tests of the tile-skipping paths.
    """
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"graph_attention (triton): q/k/v must be float32, bfloat16 or float16, got {q.dtype}")
    if temperature is not None and seed is None:
        raise ValueError("graph_attention (triton): temperature is set, so a seed (int) is required")
    for name, blk in (("block_u", block_u), ("block_v", block_v)):
        if blk and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"graph_attention (triton): {name} must be 0 or a power of two >= 16, got {blk}")
    if bool(block_u) != bool(block_v):
        raise ValueError("graph_attention (triton): give both block_u and block_v, or neither")
    if threshold:
        # the 0/−∞ mask is detached: σ and β get no gradient from it
        sig_r, sig_s, bandwidth = sig_r.detach(), sig_s.detach(), bandwidth.detach()
    sig_r_hat = F.normalize(sig_r.float(), dim=-1, eps=1e-12)
    sig_s_hat = F.normalize(sig_s.float(), dim=-1, eps=1e-12)
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed) if temperature is not None else 0, dtype=torch.int64)
    o, _ = torch.ops.m2mkd_fast.graph_triton_fwd(
        q, k, v, sig_r_hat, sig_s_hat, bandwidth,
        truncation, temperature, seed, bool(threshold), int(block_u), int(block_v),
    )
    return o
