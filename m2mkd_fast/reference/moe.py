"""Oracle of the MoE MLP, plus the two formulations users have today (docs/design.md §2.1, §3).

y[t] = Σ over kept (t, j) of weight[t, j] · Expert_{expert[t, j]}(x[t]),
Expert_e(x) = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]   (timm's Mlp: fc1, GELU, fc2).

* :func:`moe_mlp` — the oracle: every expert runs on every token and a dense [T, E] combine
  matrix picks what counts. E times the FLOPs of the real thing, obviously right.
* :func:`moe_mlp_expert_loop` — the seed's / FastMoE-like formulation: a Python loop over
  experts, each gathering its tokens.
* :func:`moe_mlp_onehot_einsum` — the original V-MoE formulation: one-hot dispatch and combine
  tensors [G, S, E, C] and an E×C buffer per group, moved with einsums (needs a capacity).

All three give the same numbers up to rounding. Dropped pairs (slot -1) contribute nothing.
``r.weight`` is cast to ``x.dtype`` before use.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ..routing_result import Routing

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # activation name -> F.gelu(approximate=...), for every backend


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return F.gelu(h, approximate=ACTIVATIONS[activation])


def _expert(x, e, w1, b1, w2, b2, activation):
    h = x @ w1[e]
    if b1 is not None:
        h = h + b1[e]
    out = _act(h, activation) @ w2[e]
    if b2 is not None:
        out = out + b2[e]
    return out


def combine_matrix(r: Routing, num_tokens: int, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, E]: c[t, e] = Σ_j weight[t, j] over the kept choices j of token t with expert e."""
    w = torch.where(r.slot >= 0, r.weight.to(dtype), torch.zeros((), dtype=dtype, device=r.weight.device))
    one_hot = F.one_hot(r.expert, num_experts).to(dtype)  # [T, k, E]
    return (w[:, :, None] * one_hot).sum(dim=1).reshape(num_tokens, num_experts)


def moe_mlp(
    x: torch.Tensor,
    r: Routing,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "gelu",
) -> torch.Tensor:
    """x [T, d], w1 [E, d, h], b1 [E, h] | None, w2 [E, h, d], b2 [E, d] | None → y [T, d].

    activation: "gelu" (exact, timm's Mlp) or "gelu_tanh" (tanh approximation, V-MoE).
    """
    num_tokens, num_experts = x.shape[0], w1.shape[0]
    c = combine_matrix(r, num_tokens, num_experts, x.dtype)
    y = torch.zeros_like(x)
    for e in range(num_experts):
        y = y + c[:, e : e + 1] * _expert(x, e, w1, b1, w2, b2, activation)
    return y


def moe_mlp_expert_loop(
    x: torch.Tensor,
    r: Routing,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "gelu",
) -> torch.Tensor:
    """Per-expert Python loop (FastMoE-like, the m2mKD seed): gather, MLP, weighted scatter-add."""
    _act(x[:0], activation)  # validates the name even when no expert has a token
    weight = r.weight.to(x.dtype)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, choice = torch.nonzero((r.expert == e) & (r.slot >= 0), as_tuple=True)
        out = _expert(x[token], e, w1, b1, w2, b2, activation)
        y = y.index_add(0, token, out * weight[token, choice][:, None])
    return y


def moe_mlp_onehot_einsum(
    x: torch.Tensor,
    r: Routing,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "gelu",
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """Original V-MoE: one-hot dispatch/combine tensors [G, S, E, C] and einsums.

    ``group_size`` must be the one given to ``route`` (the slots are per group); the routing
    must have a capacity (``capacity_factor`` not None).
    """
    if r.capacity is None:
        raise ValueError("moe_mlp_onehot_einsum needs a capacity: route with capacity_factor not None")
    num_tokens, d = x.shape
    num_experts, C = w1.shape[0], r.capacity
    S = num_tokens if group_size is None else group_size
    if S == 0:
        return torch.zeros_like(x) + 0.0 * (w1.sum() + w2.sum())
    if num_tokens % S:
        raise ValueError(f"group_size={group_size} must divide T={num_tokens}")
    G = num_tokens // S
    kept = r.slot >= 0
    expert_1h = F.one_hot(r.expert, num_experts).to(x.dtype)  # [T, k, E]
    slot_1h = F.one_hot(torch.where(kept, r.slot, 0), C).to(x.dtype) * kept[..., None].to(x.dtype)  # [T, k, C]
    dispatch = torch.einsum("tke,tkc->tec", expert_1h, slot_1h)  # [T, E, C], entries 0/1
    combine = torch.einsum("tke,tkc,tk->tec", expert_1h, slot_1h, r.weight.to(x.dtype))
    dispatch = dispatch.reshape(G, S, num_experts, C)
    combine = combine.reshape(G, S, num_experts, C)
    xg = x.reshape(G, S, d)
    buf = torch.einsum("gsec,gsd->gecd", dispatch, xg)  # [G, E, C, d]
    h = torch.einsum("gecd,edh->gech", buf, w1)
    if b1 is not None:
        h = h + b1[None, :, None, :]
    out = torch.einsum("gech,ehd->gecd", _act(h, activation), w2)
    if b2 is not None:
        out = out + b2[None, :, None, :]
    y = torch.einsum("gsec,gecd->gsd", combine, out)
    return y.reshape(num_tokens, d)
