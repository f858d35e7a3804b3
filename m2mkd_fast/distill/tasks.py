"""What the trainer trains: end-to-end models and m2mKD module pairs (docs/design.md §2.5).

A task's ``forward(images)`` returns ``(student_logits, teacher_logits | None, aux_loss | None)``;
its trainable parameters are those with ``requires_grad``. Frozen models (the meta model, the
teacher) are held outside the module tree, so a task's ``state_dict`` (what checkpoints store and
DDP synchronises) is exactly what is trained.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.stages import collect_aux_loss


def model_aux_loss(model: nn.Module):
    """A model's auxiliary loss after its forward, or None when it has none: V-MoE's
    load-balancing loss (``model.aux_loss``, the sum over its MoE layers) and NAC's signature
    regulariser (``model.signature_regulariser()``, docs/design.md §2.6)."""
    total = None
    aux = getattr(model, "aux_loss", None)
    if isinstance(aux, torch.Tensor):
        total = aux
    reg = getattr(model, "signature_regulariser", None)
    if callable(reg):
        r = reg()
        total = r if total is None else total + r
    return total


class EndToEnd(nn.Module):
    """Train a whole model: logits = model(x); its aux loss is added."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        return logits, None, model_aux_loss(self.model)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class StitchedModule(nn.Module):
    """Student module i of an N-stage pair, wrapped by stitch layers (V-MoE style):
    ``stitch_out(module(stitch_in(h)))``; stage 0 takes images (no stitch_in), the last stage
    returns logits (no stitch_out). ``module`` is a stage view of the full student (its
    ``state_dict`` is that stage's part of the student)."""

    def __init__(self, module: nn.Module, stitch_in: nn.Module | None, stitch_out: nn.Module | None):
        super().__init__()
        self.module = module
        self.stitch_in = stitch_in
        self.stitch_out = stitch_out

    def forward(self, h):
        if self.stitch_in is not None:
            h = self.stitch_in(h)
        h = self.module(h)
        if self.stitch_out is not None:
            h = self.stitch_out(h)
        return h

    @property
    def aux_loss(self):
        return collect_aux_loss(self.module.modules(), like=next(self.parameters()))


class PairTask(nn.Module):
    """m2mKD module pair i of N.

    h = meta[0:i](x) (no grad); teacher logits = meta[i+1:](T_i(h)); student logits =
    meta[i+1:](S_i(h)), gradients flowing through the frozen meta tail into S_i. For i = N−1
    the modules themselves produce the logits. The meta model and the teacher are frozen and
    kept in eval mode; only ``student`` (S_i with its stitch layers) trains. ``teacher`` None
    gives the no-KD ablation: the same pair on the labels only (teacher logits None).
    """

    def __init__(self, meta: nn.Module, teacher: nn.Module | None, student: nn.Module, index: int):
        super().__init__()
        n = int(meta.num_stages)
        if teacher is not None and int(teacher.num_stages) != n:
            raise ValueError(f"the meta model has {n} stages but the teacher has {teacher.num_stages}: "
                             "split the teacher into as many stages as the meta model has blocks")
        if not 0 <= index < n:
            raise ValueError(f"module index must be in [0, {n - 1}], got {index}")
        self.index, self.num_stages = int(index), n
        self.student = student
        frozen = (_freeze(meta),) if teacher is None else (_freeze(meta), _freeze(teacher))
        object.__setattr__(self, "_frozen", frozen)

    @property
    def meta(self):
        return self._frozen[0]

    @property
    def teacher(self):
        return self._frozen[1] if len(self._frozen) > 1 else None

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the frozen models too
        for m in self._frozen:
            m._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def forward(self, x):
        i, n = self.index, self.num_stages
        with torch.no_grad():
            h = self.meta(x, start=0, end=i) if i > 0 else x
            t_logits = None
            if self.teacher is not None:
                t = self.teacher(h, start=i, end=i + 1)
                t_logits = self.meta(t, start=i + 1, end=n) if i < n - 1 else t
        s = self.student(h)
        aux = getattr(self.student, "aux_loss", None)
        s_logits = self.meta(s, start=i + 1, end=n) if i < n - 1 else s
        return s_logits, t_logits, aux if isinstance(aux, torch.Tensor) else None

    @torch.no_grad()
    def forward_teacher(self, x):
        i, n = self.index, self.num_stages
        h = self.meta(x, start=0, end=i) if i > 0 else x
        t = self.teacher(h, start=i, end=i + 1)
        return self.meta(t, start=i + 1, end=n) if i < n - 1 else t


class IncubationTask(nn.Module):
    """Deep Incubation of module i: logits = meta[i+1:](module(meta[0:i](x))), trained on the
    labels with the meta model frozen (no teacher). ``module`` is a stage view of the teacher."""

    def __init__(self, meta: nn.Module, module: nn.Module, index: int):
        super().__init__()
        self.index, self.num_stages = int(index), int(meta.num_stages)
        if not 0 <= self.index < self.num_stages:
            raise ValueError(f"module index must be in [0, {self.num_stages - 1}], got {index}")
        self.module = module
        object.__setattr__(self, "_frozen", (_freeze(meta),))

    def _apply(self, fn, *args, **kwargs):
        self._frozen[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self._frozen[0].eval()
        return self

    def forward(self, x):
        i, n, meta = self.index, self.num_stages, self._frozen[0]
        with torch.no_grad():
            h = meta(x, start=0, end=i) if i > 0 else x
        s = self.module(h)
        logits = meta(s, start=i + 1, end=n) if i < n - 1 else s
        return logits, None, None
