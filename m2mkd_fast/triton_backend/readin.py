"""readin_attention on Triton: the folded form (docs/design.md §2.3) around the kernels in
m2mkd_fast.kernels.readin.

    Q' = (W_kᵀ q) ⊙ s_k                [B, H, U, Din]   torch matmul (B·H small GEMMs)
    o, lse = readin_attn(Q', x, 1/√C)   [B, H·U, Din]    the Triton kernel: keys = values = x,
                                                         shared by every head, never expanded
    m = W_v (o ⊙ s_v) + b_v             [B, U, H, C]     torch matmul

Only the attention core is a custom op (``m2mkd_fast::readin_triton_fwd`` with its backward
``m2mkd_fast::readin_triton_bwd``), registered with torch.library.custom_op + register_fake +
register_autograd, so torch.compile, meta tensors and export see through it; the projections
around it are ordinary autograd ops, so gradients reach q, x, w_k, w_v, s_k, s_v and b_v (and
through s_k, s_v the codes and ModFC scale parameters that produced them).
"""

import math
from typing import Optional

import torch

from ..kernels import readin as _kernels
from ..library import forbid_double_backward, op_name

__all__ = ["readin_attention", "readin_attn", "supports"]


def _device_guard(t: torch.Tensor):
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op(op_name("readin", "triton", "fwd"), mutates_args=(), device_types=("cuda", "cpu"))
def readin_attn(qp: torch.Tensor, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows q' [B, R, Din] over x [B, N, Din] used as keys AND values.

    Returns (o [B, R, Din] in q's dtype, stats [B, R, 2] float32), o = softmax(scale·q'xᵀ)·x.
    stats (not differentiable) are the softmax statistics the backward needs: the row max of
    scale·q'·x in log2 units and log2 of the row sum relative to it
    (``m2mkd_fast.kernels.readin.logsumexp_from_stats`` turns them into the logsumexp). Rows are
    independent (R = H·U: every head of every latent). CPU tensors need TRITON_INTERPRET=1.
    """
    with _device_guard(qp):
        return _kernels.readin_fwd(qp, x, scale)


@readin_attn.register_fake
def _readin_attn_fake(qp, x, scale):
    batch, rows, din = qp.shape
    return qp.new_empty((batch, rows, din)), qp.new_empty((batch, rows, 2), dtype=torch.float32)


@torch.library.custom_op(op_name("readin", "triton", "bwd"), mutates_args=(), device_types=("cuda", "cpu"))
def readin_attn_bwd(
    do: torch.Tensor,
    qp: torch.Tensor,
    x: torch.Tensor,
    o: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dq' [B, R, Din], dx [B, N, Din]) of readin_attn's o given dO."""
    with _device_guard(qp):
        return _kernels.readin_bwd(do, qp, x, o, stats, scale)


@readin_attn_bwd.register_fake
def _readin_attn_bwd_fake(do, qp, x, o, stats, scale):
    return qp.new_empty(qp.shape), x.new_empty(x.shape)


forbid_double_backward(op_name("readin", "triton", "bwd"))


def _setup_context(ctx, inputs, output):
    qp, x, scale = inputs
    o, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(qp, x, o, stats)
    ctx.scale = scale


def _backward(ctx, do, _dstats):
    qp, x, o, stats = ctx.saved_tensors
    if do is None:
        return None, None, None
    dq, dx = readin_attn_bwd(do, qp, x, o, stats, ctx.scale)
    return dq, dx, None


readin_attn.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _kernels_supported(device_type: str, device_index: Optional[int], dtype: torch.dtype, din: int) -> bool:
    device = torch.device(device_type) if device_index is None else torch.device(device_type, device_index)
    return _kernels.supported(device, dtype, din)


def supports(q, x, w_k, w_v, s_k, s_v, b_v=None) -> bool:
    """Whether the kernels have a verified config for x's device, dtype and Din
    (m2mkd_fast.kernels.readin.supported: today bf16/fp16 up to Din 320 and fp32 up to Din 96
    on sm_80/sm_90a, where ptxas finds spill-free tiles; always under the interpreter). Where
    not, dispatch runs the op on the next backend. Traceable with a dynamic Din: the answer
    depends on its padded width (din_pieces) only, a constant per trace."""
    din = x.shape[-1]
    if not 1 <= din <= _kernels.MAX_DIN:
        return False
    return _kernels_supported(x.device.type, x.device.index, x.dtype, sum(_kernels.din_pieces(din)))


def readin_attention(
    q: torch.Tensor,
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    s_k: torch.Tensor,
    s_v: torch.Tensor,
    b_v: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q [B,U,H,C] · x [B,V,Din] · w_k, w_v [H,C,Din] · s_k, s_v [U,Din] · b_v [H,C] | None -> m [B,U,H,C].

    Folded read-in attention (docs/design.md §2.3) with the attention core in Triton; scale 1/√C with C
    the head dim of q. Only for the cases :func:`supports` accepts (dispatch checks).
    Multiples of 16 keep the loads vectorised; 256 and 320, the NAC shapes, waste no column.
    Inputs are validated by m2mkd_fast.ops.readin_attention.
    """
    batch, receivers, heads, head_dim = q.shape
    in_dim = x.shape[-1]
    if not _kernels.supported(x.device, x.dtype, in_dim):
        raise ValueError(f"readin_attention (triton): no verified kernel config for {x.dtype} Din={in_dim} on {x.device} "
                         "(see supports(); m2mkd_fast.ops.readin_attention falls through to another backend)")
    # Q' [B, H, U, Din]: one batched matmul (w_k broadcast over B), then the per-latent key scale
    q_folded = torch.matmul(q.transpose(1, 2), w_k) * s_k  # [B,H,U,C] @ [H,C,Din] → [B,H,U,Din]
    rows = q_folded.to(x.dtype).reshape(batch, heads * receivers, in_dim)
    mixed, _ = readin_attn(rows, x, 1.0 / math.sqrt(head_dim))
    mixed = mixed.view(batch, heads, receivers, in_dim) * s_v  # [B,H,U,Din]
    m = torch.matmul(mixed, w_v.transpose(1, 2)).transpose(1, 2)  # [B,H,U,C] → [B,U,H,C]
    if b_v is not None:
        m = m + b_v
    return m.contiguous()
