"""Top-k expert routing in plain, vectorised PyTorch (docs/design.md §2.1; same results as the oracle).

No Python loop over tokens, experts or groups and no host synchronisation: the capacity comes
from Python ints (shapes), the expert choice from a stable descending sort (ties → lower expert
index, which ``torch.topk`` does not promise), the slots from a stable sort of each group's
k-major sequence of choices. It runs unchanged under ``torch.compile(fullgraph=True)`` and in
CUDA graphs. Conventions (dropped pairs keep their weight, BPR priority = first-choice weight,
T = 0) are those of ``m2mkd_fast.reference.routing``.
"""

import math
from typing import Optional

import torch

from ..routing_result import Routing, expert_capacity


def choose_experts(logits: torch.Tensor, k: int, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert [T, k] int64, weight [T, k]) for gate "vmoe" or "naive"; ties → lower index."""
    scores = torch.softmax(logits, dim=-1) if gate == "vmoe" else logits
    expert = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    picked = scores.gather(1, expert)
    weight = picked if gate == "vmoe" else torch.softmax(picked, dim=-1)
    return expert, weight


def assign_slots(
    expert: torch.Tensor,
    priority: Optional[torch.Tensor],
    num_experts: int,
    group_size: int,
    capacity: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [T, k] (−1 = dropped) and kept counts [E] for the choices ``expert`` [T, k].

    Per group of ``group_size`` tokens, the choices are read k-major (all first choices, then
    all second ...), tokens in order or, if ``priority`` [T] is given, by descending priority
    (stable). A choice's slot is the number of earlier choices of the same expert in that
    sequence, found with one stable sort of each group's sequence.
    """
    T, k = expert.shape
    G, S = T // group_size, group_size
    dev = expert.device
    seq = expert.reshape(G, S, k)
    if priority is not None:
        perm = torch.sort(priority.reshape(G, S), dim=1, descending=True, stable=True).indices  # [G, S]
        perm_k = perm[:, :, None].expand(G, S, k)
        seq = seq.gather(1, perm_k)
    seq = seq.transpose(1, 2).reshape(G, k * S)  # k-major sequence of each group
    order = torch.sort(seq, dim=1, stable=True).indices  # [G, kS]: by expert, then by sequence position
    sorted_expert = seq.gather(1, order)
    per_expert = torch.zeros(G, num_experts, dtype=torch.long, device=dev)
    per_expert.scatter_add_(1, seq, torch.ones_like(seq))
    start = per_expert.cumsum(1) - per_expert  # first sorted position of each expert
    rank = torch.arange(k * S, device=dev).expand(G, k * S) - start.gather(1, sorted_expert)
    position = torch.empty_like(seq).scatter_(1, order, rank)  # back to sequence order
    if capacity is not None:
        position = torch.where(position < capacity, position, -1)
        per_expert = per_expert.clamp(max=capacity)
    slot = position.reshape(G, k, S).transpose(1, 2)  # [G, S, k], tokens in sequence order
    if priority is not None:
        slot = torch.empty_like(slot).scatter_(1, perm_k, slot)
    return slot.reshape(T, k), per_expert.sum(0)


def route(
    logits: torch.Tensor,
    k: int,
    gate: str = "vmoe",
    capacity_factor: Optional[float] = None,
    batch_priority: bool = False,
    group_size: Optional[int] = None,
) -> Routing:
    """Vectorised top-k routing; the arguments are those of ``m2mkd_fast.ops.route``."""
    T, E = logits.shape
    S = T if group_size is None else group_size
    if group_size is not None and (group_size < 1 or T % group_size):
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of tokens T={T}")
    capacity = expert_capacity(S, k, capacity_factor, E)
    expert, weight = choose_experts(logits, k, gate)
    if T == 0:
        slot = torch.empty(0, k, dtype=torch.long, device=logits.device)
        return Routing(expert, weight, slot, torch.zeros(E, dtype=torch.long, device=logits.device), capacity)
    priority = weight[:, 0].detach() if batch_priority else None
    slot, counts = assign_slots(expert, priority, E, S, capacity)
    return Routing(expert, weight, slot, counts, capacity)


AUX_LOSS_WEIGHT = 0.005


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    """(std/mean)² along the last dim, population std."""
    return v.var(dim=-1, unbiased=False) / v.mean(dim=-1) ** 2


def vmoe_aux_loss(
    clean_logits: torch.Tensor,
    noisy_logits: Optional[torch.Tensor],
    k: int,
    noise_std: float,
    group_size: Optional[int],
    use_load: bool,
) -> torch.Tensor:
    """V-MoE's auxiliary loss vectorised over groups (arguments validated by
    ``m2mkd_fast.ops.vmoe_aux_loss``): 0.005·CV²(importance) [+ 0.005·CV²(load) with use_load]
    per group of S tokens, mean over groups; 0-dim, 0 for T = 0."""
    num_tokens, num_experts = clean_logits.shape
    if num_tokens == 0:
        return clean_logits.sum() * 0.0
    S = num_tokens if group_size is None else group_size
    G = num_tokens // S
    clean = clean_logits.reshape(G, S, num_experts)
    importance = torch.softmax(clean, dim=-1).sum(dim=1)  # [G, E]
    loss = AUX_LOSS_WEIGHT * _cv_squared(importance)
    if use_load:
        sigma = noise_std / num_experts
        threshold = torch.topk(noisy_logits, k, dim=-1, sorted=True).values[:, k - 1].reshape(G, S, 1)
        p = 0.5 * torch.special.erfc((threshold - clean) / (sigma * math.sqrt(2.0)))  # 1 − Φ
        loss = loss + AUX_LOSS_WEIGHT * _cv_squared(p.mean(dim=1))
    return loss.mean()
