"""Student models and their m2mKD modules (docs/design.md §2.5).

``build_model`` makes any staged model of the config (meta, teacher, students) through timm's
registry. For a student kind ("vmoe", "nac"):

* :func:`pair_student` cuts module i out of a full student and wraps it with stitch layers;
* :func:`module_state` is what a distilled module contributes to the assembled student;
* :func:`assemble` loads every distilled module into a fresh full student.

V-MoE: module i is stage i of the student (a few MoE blocks; stage 0 has the patch embedding,
the last the norm and head), wrapped by LayerNorm+Linear stitches; assembly loads each stage
back, strictly. NAC: see :mod:`.nac_students`.
"""

from __future__ import annotations

import inspect

import timm
import torch
import torch.nn as nn

from ..layers.stitch import Stitch
from .checkpoint import CheckpointError, load_state_checked
from .tasks import StitchedModule


def _ensure_registered():
    import m2mkd_fast.models  # noqa: F401 - registers the models with timm


def build_model(name: str, kwargs: dict, data, **extra) -> nn.Module:
    """``timm.create_model(name, num_classes, in_chans, img_size, **kwargs)`` for the data at
    hand (num_classes / in_chans / img_size are given only when the constructor takes them and
    the config's kwargs do not set them)."""
    _ensure_registered()
    if not timm.models.is_model(name):
        near = [m for m in timm.list_models() if m.startswith(name.split("_")[0])][:8]
        raise ValueError(f"unknown model {name!r} (not in timm's registry); similar: {', '.join(near) or 'none'}")
    kw = dict(kwargs or {})
    kw.update(extra)
    added = [k for k in ("num_classes", "in_chans", "img_size") if k not in kw]
    kw.setdefault("num_classes", data.num_classes)
    kw.setdefault("in_chans", data.in_chans)
    kw.setdefault("img_size", data.img_size)
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kw)
        except TypeError as err:
            # a constructor without img_size / in_chans: drop the ones we added and retry
            drop = [k for k in added if k in kw and k != "num_classes" and f"'{k}'" in str(err)]
            if not drop:
                raise
            for k in drop:
                kw.pop(k)


def width(model: nn.Module) -> int:
    for attr in ("embed_dim", "num_features", "dim"):
        v = getattr(model, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"cannot tell the token width of {type(model).__name__} (no embed_dim / num_features)")


# ------------------------------------------------------------------------------- V-MoE (generic)


def _stitched_stage(model: nn.Module, index: int, meta_dim: int, norm: bool) -> StitchedModule:
    n = model.num_stages
    d = width(model)
    stage = model.stages[index]
    s_in = Stitch(meta_dim, d, norm=norm) if index > 0 else None
    s_out = Stitch(d, meta_dim, norm=norm) if index < n - 1 else None
    return StitchedModule(stage, s_in, s_out)


def pair_student(kind: str, model: nn.Module, index: int, meta_dim: int, seed: int = 0) -> nn.Module:
    """Student module ``index`` of ``model`` with its stitch layers."""
    if kind == "vmoe":
        return _stitched_stage(model, index, meta_dim, norm=True)
    if kind == "nac":
        from .nac_students import nac_pair_student

        return nac_pair_student(model, index, meta_dim, seed)
    raise ValueError(f"unknown student kind {kind!r}; choose 'vmoe' or 'nac'")


def module_state(kind: str, student: nn.Module) -> dict:
    """The part of a distilled pair student that goes into the assembled student."""
    if kind == "vmoe":
        return dict(student.module.state_dict())
    if kind == "nac":
        from .nac_students import nac_module_state

        return nac_module_state(student)
    raise ValueError(f"unknown student kind {kind!r}")


def assemble(kind: str, model: nn.Module, states: list) -> dict:
    """Load every module's state (index = module) into ``model``; returns a report dict."""
    n = model.num_stages
    if len(states) != n:
        raise CheckpointError(f"the {kind} student has {n} modules but {len(states)} distilled modules were given")
    if kind == "vmoe":
        stages = model.stages
        for i, sd in enumerate(states):
            load_state_checked(stages[i], sd, f"distilled module {i}")
        total = sum(p.numel() for p in model.parameters())
        return {"loaded_tensors": sum(len(s) for s in states), "loaded_params": total, "total_params": total}
    if kind == "nac":
        from .nac_students import nac_assemble

        return nac_assemble(model, states)
    raise ValueError(f"unknown student kind {kind!r}")


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def check_stage_composition(model: nn.Module, x: torch.Tensor) -> float:
    """max |model(x) − stages composed| (should be 0): guards split/assembly bugs."""
    model.eval()
    full = model(x)
    h = x
    for i in range(model.num_stages):
        h = model(h, start=i, end=i + 1)
    return float((full - h).abs().max())
