"""moe_mlp on the C++ extension (docs/design.md §2.1): sorted pairs, per-expert GEMMs through ATen.

torch.ops.m2mkd_fast.moe_cpp_fwd counting-sorts the kept (token, choice) pairs by expert
once, gathers x into one [M, d] buffer (M = kept pairs; no padded E × C buffer), runs fc1 as
addmm with its bias, ATen's vectorised GELU and fc2 as addmm per expert slice, and combines the
k choices per token with their routing weights (a parallel loop over tokens, no atomics). It
saves the hidden pre-activation and the expert outputs; moe_cpp_bwd gathers dy with the
weights applied, forms the routing-weight gradient per pair, recomputes the GELU per expert
and sums the k choices' dx per token. Every expert parameter gets a gradient (zeros for an
expert without tokens); dropped pairs (slot −1) contribute nothing and get a zero weight
gradient.

float32 and float64 run natively; bfloat16 / float16 inputs are computed in float32 (weights
and activations) and the result is cast back.
"""

from typing import Optional

import torch

from .. import _C  # noqa: F401  (registers the m2mkd_fast::*_cpp_* ops)
from ..library import forbid_double_backward, op_name
from ..reference.moe import ACTIVATIONS
from ..routing_result import Routing

__all__ = ["moe_mlp"]

_ops = torch.ops.m2mkd_fast


@torch.library.register_fake(op_name("moe", "cpp", "fwd"))
def _moe_forward_fake(x, expert, slot, weight, w1, b1, w2, b2, approximate, save):
    rows = expert.numel() if save else 0
    return torch.empty_like(x), x.new_empty(rows, w1.shape[2]), x.new_empty(rows, x.shape[1])


@torch.library.register_fake(op_name("moe", "cpp", "bwd"))
def _moe_backward_fake(grad_y, x, expert, slot, weight, w1, w2, hidden, out, approximate, bias_grads):
    E, d, h = w1.shape
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(w1),
        x.new_empty((E, h) if bias_grads else (0,)),
        torch.empty_like(w2),
        x.new_empty((E, d) if bias_grads else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, expert, slot, weight, w1, b1, w2, b2, approximate, save = inputs
    _, hidden, out = output
    ctx.mark_non_differentiable(hidden, out)
    ctx.save_for_backward(x, expert, slot, weight, w1, w2, hidden, out)
    ctx.approximate, ctx.saved = approximate, save
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None


def _backward(ctx, grad_y, _grad_hidden, _grad_out):
    x, expert, slot, weight, w1, w2, hidden, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not ctx.saved:
        raise RuntimeError("moe_mlp (cpp backend): backward through a forward that ran without gradients (save=False)")
    bias_grads = (ctx.has_b1 and need[5]) or (ctx.has_b2 and need[7])
    gx, gw, gw1, gb1, gw2, gb2 = _ops.moe_cpp_bwd(
        grad_y, x, expert, slot, weight, w1, w2, hidden, out, ctx.approximate, bias_grads
    )
    return (
        gx,
        None,
        None,
        gw,
        gw1,
        gb1 if ctx.has_b1 and bias_grads else None,
        gw2,
        gb2 if ctx.has_b2 and bias_grads else None,
        None,
        None,
    )


torch.library.register_autograd(op_name("moe", "cpp", "fwd"), _backward, setup_context=_setup_context)
forbid_double_backward(op_name("moe", "cpp", "bwd"))


def moe_mlp(
    x: torch.Tensor,
    r: Routing,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "gelu",
) -> torch.Tensor:
    """x [T,d] · r (Routing) · w1 [E,d,h] · b1 [E,h]|None · w2 [E,h,d] · b2 [E,d]|None -> y [T,d]."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if x.device.type != "cpu":
        raise ValueError(f"moe_mlp (cpp backend): expected CPU tensors, got {x.device}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def cast(t):
        return None if t is None else t.to(dtype).contiguous()

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, r.weight, w1, b1, w2, b2)
    )
    args = (cast(x), r.expert.contiguous(), r.slot.contiguous(), cast(r.weight), cast(w1), cast(b1), cast(w2), cast(b2))
    y = _ops.moe_cpp_fwd(*args, ACTIVATIONS[activation], needs_grad)[0]
    return y.to(x.dtype)
