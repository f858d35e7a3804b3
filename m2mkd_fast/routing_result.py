"""The result of top-k expert routing, shared by the oracle and every backend."""

import math
from typing import NamedTuple, Optional

import torch

GATES = ("vmoe", "naive")  # top-k of softmax over all experts / of the logits, softmax over the k


class Routing(NamedTuple):
    """Which experts each token goes to, with what weight, and where in the expert's buffer.

    expert   [T, k] int64  chosen experts, in choice order (1st choice first)
    weight   [T, k] float  combine weight of each choice (differentiable w.r.t. the logits)
    slot     [T, k] int64  position in the expert's buffer within the token's group; -1 = dropped
    counts   [E]    int64  kept (token, choice) pairs per expert, summed over groups
    capacity int | None    per-expert, per-group capacity; None = dropless
    """

    expert: torch.Tensor
    weight: torch.Tensor
    slot: torch.Tensor
    counts: torch.Tensor
    capacity: Optional[int]

    @property
    def kept(self) -> torch.Tensor:
        """[T, k] bool: pairs that were not dropped."""
        return self.slot >= 0

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]


def expert_capacity(group_size: int, k: int, capacity_factor: Optional[float], num_experts: int) -> Optional[int]:
    """Per-expert, per-group capacity (docs/design.md §2.1): ceil((S·k)·cf/E) on Python floats, in that
    order, rounded up to a multiple of 4.

    None when dropless (capacity_factor None); 0 for an empty group; ValueError if cf ≤ 0 or the
    capacity is below 1. With S·k = 100, cf = 2.2, E = 11: (100·2.2)/11 = 20.000000000000004 → 21 → 24.
    """
    if capacity_factor is None:
        return None
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
    if group_size == 0:
        return 0
    capacity = math.ceil((group_size * k) * capacity_factor / num_experts)
    if capacity < 1:
        raise ValueError(
            f"expert capacity {capacity} < 1 (group_size={group_size}, k={k}, "
            f"capacity_factor={capacity_factor}, num_experts={num_experts})"
        )
    return -(-capacity // 4) * 4
