"""Expert parallelism on torch.distributed (docs/design.md §4).

``expert_parallel(module)`` shards the experts of every :class:`~m2mkd_fast.layers.MoEMLP` in
``module`` over the ranks of a process group: rank r of W keeps experts [r·E/W, (r+1)·E/W).
Routing stays local to the rank (its groups, capacity, aux loss and stats); the kept
(token, expert) copies travel to the rank that holds their expert and back with
``all_to_all_single`` (counts first), and the backward pass is the reverse exchange, so a local
expert's weight gradient sums the tokens of every rank. Router and other parameters stay
replicated: train them data-parallel and leave :func:`expert_parameter_names` out of DDP.

Checkpoints do not depend on W: a full state dict loads into a sharded model (each rank keeps
its slice) and :func:`full_state_dict` gathers one from it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .layers.moe import MoEMLP
from .ops.moe import moe_mlp
from .routing_result import Routing

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def _exchange(x: torch.Tensor, send_splits: list, recv_splits: list, group) -> torch.Tensor:
    """all_to_all_single of the rows of x [N, ...]: send_splits[w] rows to rank w → [sum(recv_splits), ...]."""
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable row exchange; the backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


def _local_routing(counts: torch.Tensor, dtype: torch.dtype) -> Routing:
    """Dropless Routing of received rows, ordered by (source rank, local expert).

    counts [W, E_local] int64: rows from each source rank for each local expert.
    Returns expert/weight/slot [N, 1] (weight 1; the sender applies the gate weights).
    """
    W, num_local = counts.shape
    flat = counts.reshape(-1)
    expert = torch.repeat_interleave(torch.arange(num_local, device=counts.device).repeat(W), flat)
    block_start = torch.cumsum(flat, 0) - flat  # first row of each (rank, expert) block
    before = (torch.cumsum(counts, 0) - counts).reshape(-1)  # same-expert rows from lower ranks
    rows = torch.arange(expert.shape[0], device=counts.device)
    slot = rows - torch.repeat_interleave(block_start - before, flat)
    weight = torch.ones(expert.shape[0], 1, dtype=dtype, device=counts.device)
    return Routing(expert[:, None], weight, slot[:, None], counts.sum(0), None)


class ExpertParallelMoEMLP(MoEMLP):
    """A :class:`MoEMLP` holding experts [offset, offset + E_local) of E; made by :func:`expert_parallel`
    (a layer of a MoEMLP subclass C becomes an ``ExpertParallelC``, a subclass of both).

    ``w1`` [E_local, dim, h], ``b1`` [E_local, h], ``w2`` [E_local, h, dim], ``b2`` [E_local, dim].
    ``load_state_dict`` accepts the full [E, ...] tensors (keeps its slice) or the shard.
    """

    group: Optional[dist.ProcessGroup]
    expert_offset: int
    num_local_experts: int

    def run_experts(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """y [T, d] from tokens x [T, d] and their Routing over all E experts."""
        T, k = r.expert.shape
        W = self.num_experts // self.num_local_experts
        pair = r.kept.reshape(-1).nonzero().squeeze(1)
        expert = r.expert.reshape(-1)[pair]
        order = torch.argsort(expert, stable=True)
        pair, expert = pair[order], expert[order]
        send_counts = torch.bincount(expert, minlength=self.num_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_counts = recv_counts.reshape(W, self.num_local_experts)
        splits = send_counts.reshape(W, -1).sum(1).tolist(), recv_counts.sum(1).tolist()
        received = _AllToAll.apply(x[pair // k], splits[0], splits[1], self.group)
        local = _local_routing(recv_counts, received.dtype)
        out = moe_mlp(received, local, self.w1, self.b1, self.w2, self.b2, self.activation, backend=self.backend)
        back = _AllToAll.apply(out, splits[1], splits[0], self.group)
        copies = back.new_zeros(T * k, x.shape[1]).index_copy(0, pair, back)
        acc = torch.promote_types(back.dtype, torch.float32)
        y = (copies.view(T, k, -1).to(acc) * r.weight.to(acc).unsqueeze(-1)).sum(1)
        return y.to(back.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in EXPERT_PARAMS:
            if prefix + name in state_dict:
                state_dict[prefix + name] = local_experts(state_dict[prefix + name], self)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        lo, hi = self.expert_offset, self.expert_offset + self.num_local_experts
        return f"{super().extra_repr()}, local_experts=[{lo}, {hi})"


@functools.lru_cache(maxsize=None)
def _sharded_class(cls: type) -> type:
    """The expert-parallel version of a MoEMLP class (subclasses keep their own forward)."""
    if cls is MoEMLP:
        return ExpertParallelMoEMLP
    return type(f"ExpertParallel{cls.__name__}", (ExpertParallelMoEMLP, cls), {"__module__": cls.__module__})


def _moe_layers(module: nn.Module) -> list:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoEMLP)]


def expert_parallel(module: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Shard the experts of every MoEMLP in ``module`` over ``group`` (default WORLD), in place.

    Rank r of W keeps experts [r·E/W, (r+1)·E/W); E % W must be 0. With W == 1 the module is
    returned unchanged (no collective calls). Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    layers = _moe_layers(module)
    if not layers:
        raise ValueError(f"module ({type(module).__name__}) contains no MoEMLP layer to shard")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel needs torch.distributed: call torch.distributed.init_process_group first (or launch with torchrun)")
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    for name, layer in layers:
        if isinstance(layer, ExpertParallelMoEMLP):
            raise ValueError(f"MoEMLP {name or '(module)'} is already expert-parallel")
        if layer.num_experts % W:
            raise ValueError(
                f"num_experts={layer.num_experts} of MoEMLP {name or '(module)'} is not divisible by the group size {W}"
            )
    if W == 1:
        return module
    for _, layer in layers:
        num_local = layer.num_experts // W
        lo = rank * num_local
        with torch.no_grad():
            for pname in EXPERT_PARAMS:
                param = getattr(layer, pname)
                if param is not None:
                    setattr(layer, pname, nn.Parameter(param[lo:lo + num_local].clone(), requires_grad=param.requires_grad))
        layer.__class__ = _sharded_class(type(layer))
        layer.group, layer.expert_offset, layer.num_local_experts = group, lo, num_local
    return module


def expert_parameters(module: nn.Module) -> list:
    """(qualified name, parameter, layer) of every sharded expert parameter in ``module``."""
    out = []
    for name, layer in _moe_layers(module):
        if isinstance(layer, ExpertParallelMoEMLP):
            for pname in EXPERT_PARAMS:
                param = getattr(layer, pname)
                if param is not None:
                    out.append((f"{name}.{pname}" if name else pname, param, layer))
    return out


def expert_parameter_names(module: nn.Module) -> list:
    """Qualified names of the sharded expert parameters in ``module`` (to leave out of DDP)."""
    return [name for name, _, _ in expert_parameters(module)]


def gather_experts(shard: torch.Tensor, layer: ExpertParallelMoEMLP) -> torch.Tensor:
    """[E_local, ...] tensors of every rank of ``layer``'s group → [E, ...] (a collective)."""
    parts = [torch.empty_like(shard) for _ in range(layer.num_experts // layer.num_local_experts)]
    dist.all_gather(parts, shard.contiguous(), group=layer.group)
    return torch.cat(parts)


def local_experts(full: torch.Tensor, layer: ExpertParallelMoEMLP) -> torch.Tensor:
    """This rank's slice [E_local, ...] of a full [E, ...] tensor (a shard is returned as it is)."""
    if full.dim() and full.shape[0] == layer.num_experts != layer.num_local_experts:
        return full[layer.expert_offset:layer.expert_offset + layer.num_local_experts]
    return full


def full_state_dict(module: nn.Module) -> dict:
    """The state dict of ``module`` with every sharded expert tensor gathered to [E, ...].

    A collective: every rank of each layer's group must call it. Returns the same dict on every rank.
    """
    state = module.state_dict()
    for name, _, layer in expert_parameters(module):
        state[name] = gather_experts(state[name], layer)
    return state
