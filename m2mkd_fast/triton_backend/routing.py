"""Top-k expert routing on Triton (docs/design.md §2.1): m2mkd_fast.kernels.routing.

``route`` wraps the torch.library custom op ``m2mkd_fast::routing_triton_fwd`` (weight, expert,
slot, counts; shapes from the input shapes only, so torch.compile traces through it) whose autograd
(``m2mkd_fast::routing_triton_bwd``) carries the gradient of the weights to the logits. The
capacity is computed on the host from Python numbers (T, k, cf, E): nothing is read back from
the device. Integer outputs equal the oracle's (m2mkd_fast.reference.routing) exactly.
"""

from typing import Optional

import torch

from ..kernels import routing as _k
from ..library import forbid_double_backward, op_name
from ..routing_result import GATES, Routing, expert_capacity

_FWD, _BWD = op_name("routing", "triton", "fwd"), op_name("routing", "triton", "bwd")


@torch.library.custom_op(_FWD, mutates_args=(), device_types=("cuda", "cpu"))
def _route_fwd(
    logits: torch.Tensor, k: int, gate: str, capacity: int, batch_priority: bool, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # weight first: the float output leads (torch.library.opcheck sums the outputs in order)
    expert, weight, slot, counts = _k.route_forward(logits, k, gate == "vmoe", None if capacity < 0 else capacity, batch_priority, group_size)
    return weight, expert, slot, counts


@_route_fwd.register_fake
def _(logits, k, gate, capacity, batch_priority, group_size):
    T, E = logits.shape
    return (
        logits.new_empty((T, k)),
        logits.new_empty((T, k), dtype=torch.int64),
        logits.new_empty((T, k), dtype=torch.int64),
        logits.new_empty((E,), dtype=torch.int64),
    )


@torch.library.custom_op(_BWD, mutates_args=(), device_types=("cuda", "cpu"))
def _route_bwd(grad_weight: torch.Tensor, logits: torch.Tensor, expert: torch.Tensor, gate: str) -> torch.Tensor:
    return _k.route_backward(grad_weight, logits, expert, gate == "vmoe")


@_route_bwd.register_fake
def _(grad_weight, logits, expert, gate):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


forbid_double_backward(_BWD)


def _setup_context(ctx, inputs, output):
    logits, _, gate, _, _, _ = inputs
    ctx.gate = gate
    ctx.save_for_backward(logits, output[1])


def _backward(ctx, grad_weight, _g_expert, _g_slot, _g_counts):
    logits, expert = ctx.saved_tensors
    if grad_weight is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    return _route_bwd(grad_weight, logits, expert, ctx.gate), None, None, None, None, None


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def route(
    logits: torch.Tensor,
    k: int,
    gate: str = "vmoe",
    capacity_factor: Optional[float] = None,
    batch_priority: bool = False,
    group_size: Optional[int] = None,
) -> Routing:
    """Route T tokens to k of E experts on Triton (arguments validated by ``m2mkd_fast.ops.route``).

    logits [T, E] (any strides) → Routing(expert [T, k] int64, weight [T, k] logits.dtype,
    slot [T, k] int64 (−1 = dropped), counts [E] int64, capacity int | None). See
    m2mkd_fast.reference.routing for the conventions (weights of dropped pairs are kept, BPR
    ranks by first-choice weight, T = 0).
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if logits.dtype == torch.float64:
        raise ValueError("route (triton): logits are float64, which the Triton kernels do not compute; use float32/bf16/fp16 or backend='cpp'/'torch'")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must satisfy 1 <= k <= num_experts={E}")
    if group_size is None:
        S = T
    elif group_size < 1 or T % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of tokens T={T}")
    else:
        S = group_size
    capacity = expert_capacity(S, k, capacity_factor, E)
    weight, expert, slot, counts = _route_fwd(logits, k, gate, -1 if capacity is None else capacity, batch_priority, S)
    return Routing(expert, weight, slot, counts, capacity)
