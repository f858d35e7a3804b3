"""route on the C++ extension (docs/design.md §2.1).

The scores are computed with the oracle's own ATen ops (softmax over all E in the logits' dtype
for gate "vmoe", the logits themselves for "naive"), so the C++ selection compares exactly the
values the oracle compares: torch.ops.m2mkd_fast.routing_cpp_topk picks the k largest per row
(largest first, ties to the lower expert index), routing_cpp_slots fills the per-group expert
buffers k-major in token (or BPR) order and counts the kept pairs. The weights are plain
autograd ops on [T, k] (a gather for "vmoe", a softmax over the k chosen logits for "naive"),
differentiable w.r.t. the logits. Every dtype torch.softmax accepts works.
"""

from typing import Optional

import torch

from .. import _C  # noqa: F401  (registers the m2mkd_fast::*_cpp_* ops)
from ..library import op_name, register_no_derivative
from ..routing_result import GATES, Routing, expert_capacity

__all__ = ["route"]

_ops = torch.ops.m2mkd_fast


@torch.library.register_fake(op_name("routing", "cpp", "topk"))
def _route_topk_fake(scores, k):
    return scores.new_empty(scores.shape[0], k, dtype=torch.long)


@torch.library.register_fake(op_name("routing", "cpp", "slots"))
def _route_slots_fake(expert, priority, num_experts, capacity, group_size):
    return torch.empty_like(expert), expert.new_empty(num_experts)


register_no_derivative(op_name("routing", "cpp", "topk"))
register_no_derivative(op_name("routing", "cpp", "slots"))


def route(
    logits: torch.Tensor,
    k: int,
    gate: str = "vmoe",
    capacity_factor: Optional[float] = None,
    batch_priority: bool = False,
    group_size: Optional[int] = None,
) -> Routing:
    """logits [T, E] -> Routing(expert, weight, slot, counts, capacity); see m2mkd_fast.ops.route."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must satisfy 1 <= k <= num_experts={num_experts}")
    S = num_tokens if group_size is None else group_size
    if S < 0 or (S > 0 and num_tokens % S) or (group_size is not None and group_size < 1):
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of tokens T={num_tokens}")
    capacity = expert_capacity(S, k, capacity_factor, num_experts)
    scores = torch.softmax(logits, dim=-1) if gate == "vmoe" else logits
    expert = _ops.routing_cpp_topk(scores.detach(), k)
    picked = scores.gather(1, expert)
    weight = picked if gate == "vmoe" else torch.softmax(picked, dim=-1)
    priority = weight[:, 0].detach() if batch_priority else None
    slot, counts = _ops.routing_cpp_slots(expert, priority, num_experts, -1 if capacity is None else capacity, S)
    return Routing(expert, weight, slot, counts, capacity)
