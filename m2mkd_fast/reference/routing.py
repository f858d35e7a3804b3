"""Oracle of top-k expert routing and of the V-MoE auxiliary loss (docs/design.md §2.1).

Written to be obviously right, not fast: the expert choice and the slot assignment are plain
Python loops over groups, tokens and choices. Every backend's ``route`` must return exactly the
same integers (expert, slot, counts, capacity) and the same weights up to rounding.

Conventions (shared by every backend, documented once here):

* ``weight`` holds the gate value of every chosen pair, also of a pair dropped for capacity: it
  is NOT zeroed. A dropped pair is marked by ``slot == -1`` and contributes nothing to
  ``moe_mlp`` (so its weight receives a zero gradient from the MoE output).
* Batch-prioritised routing (BPR) ranks the tokens of a group by the weight of their first
  choice (for gate "vmoe" the top-1 softmax value, the noisy one in training since the layer
  passes noisy logits), descending, ties by token order; the same order serves every round.
* An empty input (T = 0) gives empty tensors; with a capacity factor and no ``group_size`` its
  capacity is 0 (there is no group to hold anything).
"""

import math
from typing import Optional

import torch

from ..routing_result import GATES, Routing

AUX_LOSS_WEIGHT = 0.005


def _group_size(num_tokens: int, group_size: Optional[int]) -> int:
    if group_size is None:
        return num_tokens
    if group_size < 1 or num_tokens % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of tokens T={num_tokens}")
    return group_size


def _capacity(group_size: int, k: int, capacity_factor: Optional[float], num_experts: int) -> Optional[int]:
    """C = ceil((S·k)·cf/E) on Python floats, in that order, rounded up to a multiple of 4 (None:
    dropless; 0 for an empty group). Written out here, not shared, so that it checks the backends'."""
    if capacity_factor is None:
        return None
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
    if group_size == 0:
        return 0
    slots = math.ceil(float(group_size * k) * float(capacity_factor) / float(num_experts))
    if slots < 1:
        raise ValueError(f"expert capacity {slots} < 1 (group_size={group_size}, k={k}, capacity_factor={capacity_factor})")
    return 4 * math.ceil(slots / 4)


def _stable_top_k(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first, ties broken by the lower index."""
    return sorted(range(len(values)), key=lambda e: (-values[e], e))[:k]


def route(
    logits: torch.Tensor,
    k: int,
    gate: str = "vmoe",
    capacity_factor: Optional[float] = None,
    batch_priority: bool = False,
    group_size: Optional[int] = None,
) -> Routing:
    """Top-k routing of T tokens over E experts (docs/design.md §2.1). Returns a :class:`Routing`.

    logits [T, E] float (already noisy in training; the layer adds the noise).
    gate "vmoe": g = softmax(logits) over all E, choose the top-k of g (ties → lower expert),
        weight = g of the chosen experts (not renormalised).
    gate "naive": choose the top-k of the logits (ties → lower expert), weight = softmax over
        the k chosen logits.
    Groups of ``group_size`` consecutive tokens (None: one group of all T) each have a buffer of
    ``capacity`` slots per expert; slots are filled k-major (all first choices in token order
    — or in BPR order —, then all second choices, ...); a pair whose slot would be ≥ capacity is
    dropped (slot -1). capacity_factor None = dropless.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must satisfy 1 <= k <= num_experts={num_experts}")
    S = _group_size(num_tokens, group_size)
    capacity = _capacity(S, k, capacity_factor, num_experts)

    # 1. Which experts, with which weights.
    scores = torch.softmax(logits, dim=-1) if gate == "vmoe" else logits
    score_rows = scores.detach().tolist()  # Python floats (exact for every float dtype)
    chosen = [_stable_top_k(row, k) for row in score_rows]
    expert = torch.tensor(chosen, dtype=torch.long, device=logits.device).reshape(num_tokens, k)
    picked = scores.gather(1, expert)
    weight = picked if gate == "vmoe" else torch.softmax(picked, dim=-1)

    # 2. Where in each expert's buffer, group by group.
    slot = [[-1] * k for _ in range(num_tokens)]
    counts = [0] * num_experts
    top1 = weight[:, 0].detach().tolist() if num_tokens else []
    for start in range(0, num_tokens, max(S, 1)):
        tokens = list(range(start, start + S))
        if batch_priority:
            tokens = sorted(tokens, key=lambda t: (-top1[t], t))
        filled = [0] * num_experts
        for j in range(k):
            for t in tokens:
                e = chosen[t][j]
                position = filled[e]
                filled[e] += 1
                if capacity is None or position < capacity:
                    slot[t][j] = position
                    counts[e] += 1
    slot_t = torch.tensor(slot, dtype=torch.long, device=logits.device).reshape(num_tokens, k)
    counts_t = torch.tensor(counts, dtype=torch.long, device=logits.device)
    return Routing(expert, weight, slot_t, counts_t, capacity)


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    """(std / mean)² with the population std."""
    return (v.std(unbiased=False) / v.mean()) ** 2


def vmoe_aux_loss(
    clean_logits: torch.Tensor,
    noisy_logits: Optional[torch.Tensor],
    k: int,
    noise_std: float,
    group_size: Optional[int] = None,
    training: bool = True,
) -> torch.Tensor:
    """V-MoE's auxiliary loss, per group then the mean over groups (docs/design.md §2.1).

    importance_e = Σ_t softmax(clean)_e;  load_e = mean_t [1 − Φ((τ_t − clean_e)/σ)] with
    τ_t the k-th largest noisy logit of token t and σ = noise_std / E.
    Training (and noise_std > 0): 0.005·CV²(importance) + 0.005·CV²(load); otherwise
    0.005·CV²(importance) only (noisy_logits may then be None). T = 0 gives 0.
    """
    num_tokens, num_experts = clean_logits.shape
    S = _group_size(num_tokens, group_size)
    use_load = training and noise_std > 0
    if num_tokens == 0:
        return clean_logits.sum() * 0.0
    sigma = noise_std / num_experts
    losses = []
    for start in range(0, num_tokens, S):
        clean = clean_logits[start : start + S]
        importance = torch.softmax(clean, dim=-1).sum(dim=0)
        loss = AUX_LOSS_WEIGHT * _cv_squared(importance)
        if use_load:
            noisy = noisy_logits[start : start + S]
            threshold = torch.sort(noisy, dim=-1, descending=True).values[:, k - 1]  # τ_t
            z = (threshold[:, None] - clean) / sigma
            p = 0.5 * torch.special.erfc(z / math.sqrt(2.0))  # 1 − Φ(z), without cancellation
            load = p.mean(dim=0)
            loss = loss + AUX_LOSS_WEIGHT * _cv_squared(load)
        losses.append(loss)
    return torch.stack(losses).mean()
