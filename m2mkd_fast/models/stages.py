"""What every m2mKD-staged model shares: the stage split of a depth, and stage views.

A staged model is cut into ``num_stages`` consecutive stages (docs/design.md §2.5). It offers

* ``model.num_stages`` and ``model.stages``: an ``nn.ModuleList`` of :class:`ModelStage` views,
  built afresh on each access. A view holds (shares, never copies) the model's own modules and
  parameters of that stage, so ``model.stages[i].parameters()`` are the parameters to train for
  module pair i, ``model.stages[i].state_dict()`` cuts the module out and
  ``model.stages[i].load_state_dict(sd)`` puts it back into the model in place. Calling a view
  runs that stage of the model: ``model.stages[i](x) == model(x, start=i, end=i + 1)``.
* ``model(x, start=0, end=None)``: runs stages ``[start, end)``; an empty range returns ``x``.

Views are not registered as submodules of the model (the model's ``state_dict`` keeps its own
names), and replacing a module inside a view does not change the model: assign into the model.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["ModelStage", "split_depth", "check_stage_range", "collect_aux_loss"]


def split_depth(depth: int, num_stages: Optional[int] = None,
                stage_depths: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """Blocks per stage for ``depth`` consecutive blocks.

    With ``stage_depths`` given it is checked (non-negative, sums to ``depth``, and has
    ``num_stages`` entries if that is given too); otherwise the blocks are spread as evenly as
    possible, the first ``depth % num_stages`` stages taking one block more (24 blocks in 4 stages:
    6,6,6,6; 32 in 10: 4,4,3,3,3,3,3,3,3,3).
    """
    depth = int(depth)
    if stage_depths is not None:
        stage_depths = tuple(int(d) for d in stage_depths)
        if num_stages is not None and len(stage_depths) != int(num_stages):
            raise ValueError(f"stage_depths has {len(stage_depths)} entries but num_stages={num_stages}")
        if len(stage_depths) < 1 or any(d < 0 for d in stage_depths):
            raise ValueError(f"stage_depths must be a non-empty list of non-negative ints, got {stage_depths}")
        if sum(stage_depths) != depth:
            raise ValueError(f"stage_depths {stage_depths} sum to {sum(stage_depths)}, expected the depth {depth}")
        return stage_depths
    if num_stages is None:
        raise ValueError("give num_stages or stage_depths")
    num_stages = int(num_stages)
    if num_stages < 1 or num_stages > depth:
        raise ValueError(f"num_stages must be in [1, depth={depth}] so every stage holds a block, got {num_stages}; "
                         f"pass stage_depths to allow empty stages")
    base, extra = divmod(depth, num_stages)
    return tuple(base + (1 if i < extra else 0) for i in range(num_stages))


def check_stage_range(start: int, end: Optional[int], num_stages: int) -> Tuple[int, int]:
    """Validate a ``[start, end)`` stage range (``end=None`` means to the last stage)."""
    end = num_stages if end is None else end
    if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
        raise TypeError(f"start and end must be ints, got start={start!r}, end={end!r}")
    if not 0 <= start <= end <= num_stages:
        raise ValueError(f"expected 0 <= start <= end <= num_stages={num_stages}, got start={start}, end={end}")
    return start, end


def collect_aux_loss(modules: Iterable[nn.Module], like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of ``last_aux_loss`` over the modules that ran in the latest forward (0 when none did)."""
    total = None
    for m in modules:
        loss = getattr(m, "last_aux_loss", None)
        if loss is not None:
            total = loss if total is None else total + loss
    if total is None:
        device = like.device if like is not None else None
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
        total = torch.zeros((), device=device, dtype=dtype)
    return total


class ModelStage(nn.Module):
    """Stage ``index`` of a staged model: a view sharing that stage's modules and parameters.

    Calling it runs ``owner(x, start=index, end=index + 1)``. ``is_first`` stages take the model
    input (images), ``is_last`` stages return logits; the others map the model's inter-stage state
    to the next one (token tensors for ViT and V-MoE, :class:`~m2mkd_fast.models.nac.NACState` for
    NAC).
    """

    def __init__(self, owner: nn.Module, index: int, modules: Dict[str, nn.Module],
                 parameters: Optional[Dict[str, nn.Parameter]] = None, name: str = ""):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycles, no duplicate state
        self.index = int(index)
        self.num_stages = int(owner.num_stages)
        self.stage_name = name or f"stage{index}"
        for key, module in modules.items():
            self.add_module(key, module)
        for key, param in (parameters or {}).items():
            if param is not None:
                self.register_parameter(key, param)

    @property
    def owner(self) -> nn.Module:
        return self._owner

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary (MoE load-balancing) losses of this stage's latest forward."""
        return collect_aux_loss(self.modules(), like=next(self.parameters(), None))

    def forward(self, x):
        return self._owner.forward(x, start=self.index, end=self.index + 1)

    def extra_repr(self) -> str:
        return f"index={self.index}, num_stages={self.num_stages}, name={self.stage_name!r}"
