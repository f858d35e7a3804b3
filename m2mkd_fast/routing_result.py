"""The result of top-k expert routing, shared by the oracle and every backend."""

from typing import NamedTuple, Optional

import torch


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
