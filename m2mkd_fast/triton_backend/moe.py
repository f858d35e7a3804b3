"""The MoE MLP on Triton: the padding-free grouped expert MLP of m2mkd_fast.kernels.moe.

``moe_mlp`` is a thin wrapper over two torch.library custom ops (FlashAttention's layering):

* ``m2mkd_fast::moe_triton_fwd`` — forward. Returns y and what the backward needs: the
  pre-activation Z and activation A of every kept pair (rows sorted by expert), and the dispatch
  index lists. Their shapes depend only on the input shapes (T·k rows, an upper bound), so the
  fake (meta) implementation needs no data and ``torch.compile(fullgraph=True)`` traces through.
  Z is only computed when a gradient will be needed (``save_for_backward``).
* ``m2mkd_fast::moe_triton_bwd`` — gradients of x, the routing weights, w1, b1, w2, b2,
  each only when asked for; wired to the forward op with ``torch.library.register_autograd``.

No host synchronisation anywhere: the number of tokens per expert never leaves the device.
Every expert parameter gets a gradient (zeros for an expert without tokens); a dropped pair's
routing weight gets zero. Results are bitwise deterministic (no atomics).
"""

from typing import Optional

import torch

from ..kernels import moe as _k
from ..library import forbid_double_backward, op_name
from ..reference.moe import ACTIVATIONS
from ..routing_result import Routing

_FWD, _BWD = op_name("moe", "triton", "fwd"), op_name("moe", "triton", "bwd")


@torch.library.custom_op(_FWD, mutates_args=(), device_types=("cuda", "cpu"))
def _moe_mlp_fwd(
    x: torch.Tensor,
    expert: torch.Tensor,
    weight: torch.Tensor,
    slot: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    approximate: str,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _k.moe_forward(x, expert, weight, slot, w1, b1, w2, b2, approximate, save_for_backward)


@_moe_mlp_fwd.register_fake
def _(x, expert, weight, slot, w1, b1, w2, b2, approximate, save_for_backward):
    T, d = x.shape
    E, _, h = w1.shape
    P = T * expert.shape[1]
    return (
        x.new_empty((T, d)),
        x.new_empty((P if save_for_backward else 0, h)),
        x.new_empty((P, h)),
        x.new_empty((P,), dtype=torch.int32),
        x.new_empty((P,), dtype=torch.int32),
        x.new_empty((E + 1,), dtype=torch.int32),
    )


@torch.library.custom_op(_BWD, mutates_args=(), device_types=("cuda", "cpu"))
def _moe_mlp_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    expert: torch.Tensor,
    weight: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    z: torch.Tensor,
    a: torch.Tensor,
    pair_of_row: torch.Tensor,
    row_of_pair: torch.Tensor,
    offsets: torch.Tensor,
    approximate: str,
    need_dx: bool,
    need_dweight: bool,
    need_dw1: bool,
    need_dw2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _k.moe_backward(
        dy, x, expert, weight, w1, b1, w2, b2, z, a, pair_of_row, row_of_pair, offsets, approximate,
        need_dx, need_dweight, need_dw1, need_dw2,
    )


@_moe_mlp_bwd.register_fake
def _(dy, x, expert, weight, w1, b1, w2, b2, z, a, pair_of_row, row_of_pair, offsets, approximate,
      need_dx, need_dweight, need_dw1, need_dw2):
    E, _, h = w1.shape
    d = x.shape[1]

    def maybe(flag, shape, ref):
        return ref.new_empty(shape if flag else (0,))

    return (
        maybe(need_dx, x.shape, x),
        maybe(need_dweight, weight.shape, weight),
        maybe(need_dw1, w1.shape, w1),
        maybe(need_dw1 and b1 is not None, (E, h), b1 if b1 is not None else w1),
        maybe(need_dw2, w2.shape, w2),
        maybe(need_dw2 and b2 is not None, (E, d), b2 if b2 is not None else w2),
    )


forbid_double_backward(_BWD)


def _setup_context(ctx, inputs, output):
    x, expert, weight, slot, w1, b1, w2, b2, approximate, save_for_backward = inputs
    _, z, a, pair_of_row, row_of_pair, offsets = output
    ctx.approximate = approximate
    ctx.saved = save_for_backward
    ctx.save_for_backward(x, expert, weight, w1, b1, w2, b2, z, a, pair_of_row, row_of_pair, offsets)


def _backward(ctx, dy, *_unused):
    x, expert, weight, w1, b1, w2, b2, z, a, pair_of_row, row_of_pair, offsets = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dweight = need[0], need[2]
    need_dw1 = need[4] or (b1 is not None and need[5])
    need_dw2 = need[6] or (b2 is not None and need[7])
    if not (need_dx or need_dweight or need_dw1 or need_dw2):
        return (None,) * 10
    if not ctx.saved:
        raise RuntimeError("moe_mlp: backward through a forward that ran without gradients (save_for_backward=False)")
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dweight, dw1, db1, dw2, db2 = _moe_mlp_bwd(
        dy, x, expert, weight, w1, b1, w2, b2, z, a, pair_of_row, row_of_pair, offsets, ctx.approximate,
        need_dx, need_dweight, need_dw1, need_dw2,
    )
    return (
        dx if need_dx else None,
        None,
        dweight if need_dweight else None,
        None,
        dw1 if need[4] else None,
        db1 if (b1 is not None and need[5]) else None,
        dw2 if need[6] else None,
        db2 if (b2 is not None and need[7]) else None,
        None,
        None,
    )


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def moe_mlp(
    x: torch.Tensor,
    r: Routing,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "gelu",
) -> torch.Tensor:
    """Mixture-of-experts MLP on Triton (arguments validated by ``m2mkd_fast.ops.moe_mlp``).

    x [T, d] (any strides) · r: Routing (expert [T, k] int64, weight [T, k] — cast to x.dtype —,
    slot [T, k] int64, −1 = dropped) · w1 [E, d, h] · b1 [E, h] | None · w2 [E, h, d] ·
    b2 [E, d] | None · activation "gelu" | "gelu_tanh"  →  y [T, d].
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. d and h multiples of 8.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if x.dtype == torch.float64:
        raise ValueError("moe_mlp (triton): x is float64, which the Triton kernels do not compute; use float32/bf16/fp16 or backend='cpp'/'torch'")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()  # the gathered loads want unit-stride rows
    tensors = (x, r.weight, w1, b1, w2, b2)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _moe_mlp_fwd(x, r.expert, r.weight, r.slot, w1, b1, w2, b2, ACTIVATIONS[activation], save)[0]
