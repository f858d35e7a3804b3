"""The m2mKD loss (docs/design.md §2.5) and the targets it is computed against.

soft:  L = (1 − α) · SoftTargetCE(s, y') + α · τ² · Σ_{b,k} p_T (log p_T − log p_S) / (B · K)
       with p = softmax(logits / τ) and y' the (mixup/cutmix, label-smoothed) soft targets —
       the KL is summed and divided by batch × classes (DeiT's convention), not the batch mean.
hard:  L = (1 − α) · SoftTargetCE(s, y') + α · CE(s, argmax t)   (DeiT's hard distillation;
       α = 1 gives the plain cross-entropy against the teacher's argmax)
none:  L = SoftTargetCE(s, y')  (ordinary training, used by the end-to-end phases)

Targets y' are always a [B, K] distribution: integer labels are one-hot (smoothed when asked),
mixup/cutmix produce their mixtures (timm's Mixup does smoothing and mixing together).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_TYPES = ("none", "soft", "hard")


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b Σ_k −y'[b,k] · log softmax(logits)[b,k]  (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · Σ_{b,k} p_T (log p_T − log p_S) / (B · K) with p = softmax(logits / τ)."""
    ls = F.log_softmax(student / tau, dim=-1)
    lt = F.log_softmax(teacher / tau, dim=-1)
    return F.kl_div(ls, lt, reduction="sum", log_target=True) * (tau * tau) / student.numel()


def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Label-smoothed one-hot [B, K]: 1 − ε + ε/K on the label, ε/K elsewhere (timm's convention)."""
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=dtype)
    return y.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


class DistillationLoss(torch.nn.Module):
    """m2mKD / DeiT distillation loss on logits: ``loss(student_logits, targets, teacher_logits)``.

    ``targets`` are soft [B, K] (see module docstring) or integer labels [B]; teacher logits are
    detached here (the teacher never gets gradients), and may be None only when
    ``distill_type == "none"``.
    """

    def __init__(self, distill_type: str = "soft", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distill_type not in DISTILL_TYPES:
            raise ValueError(f"distill_type must be one of {DISTILL_TYPES}, got {distill_type!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.distill_type, self.alpha, self.tau = distill_type, float(alpha), float(tau)

    def forward(self, student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None):
        if targets.dim() == 1:
            targets = one_hot_targets(targets, student.shape[-1], dtype=student.dtype)
        if targets.shape != student.shape:
            raise ValueError(f"targets {tuple(targets.shape)} do not match student logits {tuple(student.shape)}")
        base = soft_target_cross_entropy(student, targets)
        if self.distill_type == "none":
            return base
        if teacher is None:
            raise ValueError(f"distill_type={self.distill_type!r} needs teacher logits")
        if teacher.shape != student.shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match student logits {tuple(student.shape)}")
        teacher = teacher.detach()
        if self.distill_type == "soft":
            kd = kd_kl(student, teacher, self.tau)
        else:
            kd = F.cross_entropy(student, teacher.argmax(dim=-1))
        return (1.0 - self.alpha) * base + self.alpha * kd

    def extra_repr(self):
        return f"distill_type={self.distill_type}, alpha={self.alpha}, tau={self.tau}"
