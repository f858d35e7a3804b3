"""ModFC, NAC's code-conditioned linear layer (docs/design.md §2.2), as a plain function.

    ModFC(x, c) = W · (x ⊙ s(c)) + b,    s(c) = 1 + γ · LN(S · c)

LN has no affine and normalises over in_features (eps 1e-5); γ is a learnable scalar; S is a
bias-free linear map code -> in_features (weight ``scale_weight`` [in, Dc], nn.Linear layout).
"""

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["modfc", "modfc_scale"]


def modfc_scale(code: torch.Tensor, scale_weight: torch.Tensor, gain, eps: float = 1e-5) -> torch.Tensor:
    """s(c) = 1 + γ · LN(S · c): code [..., Dc] -> scale [..., in_features]."""
    projected = code @ scale_weight.t()
    return 1 + gain * F.layer_norm(projected, (projected.shape[-1],), eps=eps)


def modfc(
    x: torch.Tensor,
    code: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale_weight: torch.Tensor,
    gain,
    eps: float = 1e-5,
) -> torch.Tensor:
    """W · (x ⊙ (1 + γ · LN(S · c))) + b.

    x [..., N, in] · code [N, Dc] (or anything broadcastable to [..., N, Dc]) · weight [out, in]
    · bias [out] | None · scale_weight [in, Dc] · gain: scalar (0-dim tensor or float)
    -> [..., N, out]
    """
    scale = modfc_scale(code, scale_weight, gain, eps)
    return F.linear(x * scale, weight, bias)
