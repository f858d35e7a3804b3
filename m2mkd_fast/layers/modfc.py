"""NAC's code-conditioned layers (docs/design.md §2.2, §2.6): ModFC, ModFFN and the code noise."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale

__all__ = ["ModFC", "ModFFN", "code_noise"]


def code_noise(code: torch.Tensor, amount: float = 0.05) -> torch.Tensor:
    """c + U(−a·|c|, a·|c|) elementwise, the noise detached (NAC's training-time code noise, §2.2).

    The gradient with respect to ``code`` is the identity. Draws from torch's default generator.
    """
    if amount == 0:
        return code
    with torch.no_grad():
        noise = (torch.rand_like(code) * 2 - 1) * (amount * code.abs())
    return code + noise


class ModFC(nn.Module):
    """ModFC(x, c) = W · (x ⊙ s(c)) + b with s(c) = 1 + γ · LN(S · c) (docs/design.md §2.2).

    LN has no affine and normalises over in_features (eps 1e-5); γ (``gain``) is a learnable
    scalar initialised to ``gain_init``; S (``code_proj``) is a bias-free Linear code -> in.
    ``weight`` [out, in] and ``bias`` [out] are initialised as nn.Linear's weight and zero.

    forward(x [..., N, in], code [N, Dc]) -> [..., N, out]: token n is modulated by code n.
    """

    def __init__(self, in_features: int, out_features: int, code_features: int, bias: bool = True, gain_init: float = 0.1):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.code_features = code_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.code_proj = nn.Linear(code_features, in_features, bias=False)
        self.gain = nn.Parameter(torch.tensor(float(gain_init)))
        self.eps = 1e-5
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def scale(self, code: torch.Tensor) -> torch.Tensor:
        """s(c) = 1 + γ · LN(S · c): code [N, Dc] -> [N, in]."""
        projected = self.code_proj(code)
        return 1 + self.gain * F.layer_norm(projected, (self.in_features,), eps=self.eps)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.scale(code), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, code_features={self.code_features}, bias={self.bias is not None}"


class ModFFN(nn.Module):
    """NAC's feed-forward block: x + DropPath(LayerScale(ModFC(GEGLU(ModFC(LN(x), c)), c))).

    ModFC dim -> 2·hidden, GEGLU with the first half as the value (a · gelu(g), exact GELU),
    ModFC hidden -> dim; LayerScale starts at ``layer_scale``. forward(x [B, N, dim], code [N, Dc]).
    """

    def __init__(self, dim: int, hidden_dim: int, code_features: int, layer_scale: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = ModFC(dim, 2 * hidden_dim, code_features)
        self.fc2 = ModFC(hidden_dim, dim, code_features)
        self.layer_scale = LayerScale(dim, init_values=layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(self.norm(x), code).chunk(2, dim=-1)
        hidden = value * F.gelu(gate)
        return x + self.drop_path(self.layer_scale(self.fc2(hidden, code)))
