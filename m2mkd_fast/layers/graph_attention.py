"""NAC's propagator attention, kernel-modulated by signatures, as a drop-in layer (docs/design.md §2.4)."""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale

from .. import ops
from .modfc import ModFC

__all__ = ["KernelModulatedAttention"]

EVAL_MODES = ("no_sample", "threshold", "sample")


class KernelModulatedAttention(nn.Module):
    """Receivers attend to senders with a kernel bias from their signatures (NAC's propagator).

    q = ModFC_q(LN_r(z_r), c_r); k, v = ModFC(LN(z_s), c_s) with each sender's own code (LN is
    the receivers' LayerNorm unless ``sender_norm`` gives the senders their own); attention
    through :func:`m2mkd_fast.ops.graph_attention` with the learnable bandwidth β (init
    ``bandwidth_init``), ``truncation`` (None: no truncation, as in the read-out) and, in
    training, a relaxed-Bernoulli sample at ``temperature`` seeded per call from torch's default
    CPU generator (so ``torch.manual_seed`` makes it reproducible). Evaluation: ``eval_mode``
    "no_sample" (ℓ), "threshold" (0/−∞) or "sample". Then out = z_r + DropPath(LayerScale(exit(m,
    c_r))) (``residual=False``: no z_r). Code noise is the caller's business.

    forward(z_r [B, U, dim], code_r [U, Dc], sig_r [U, S] | None,
            z_s [B, V, dim], code_s [V, Dc], sig_s [V, S] | None) -> [B, U, dim].
    sig_r = sig_s = None: no kernel, plain softmax attention (the m2mKD mediator student).
    """

    def __init__(
        self,
        dim: int,
        code_features: int,
        num_heads: int,
        head_dim: int,
        signature_dim: int = 64,
        truncation: Optional[float] = 0.9,
        temperature: Optional[float] = 0.5,
        eval_mode: str = "no_sample",
        bandwidth_init: float = 1.0,
        layer_scale: float = 0.1,
        drop_path: float = 0.0,
        residual: bool = True,
        sender_norm: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"KernelModulatedAttention: eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        if eval_mode == "sample" and temperature is None:
            raise ValueError("KernelModulatedAttention: eval_mode='sample' needs a temperature")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.signature_dim = signature_dim
        self.truncation = truncation
        self.temperature = temperature
        self.eval_mode = eval_mode
        self.residual = residual
        self.backend = backend
        inner = num_heads * head_dim
        self.bandwidth = nn.Parameter(torch.tensor(float(bandwidth_init)))
        self.norm_receiver = nn.LayerNorm(dim)
        self.norm_sender = nn.LayerNorm(dim) if sender_norm else None
        self.q = ModFC(dim, inner, code_features, bias=False)
        self.k = ModFC(dim, inner, code_features, bias=False)
        self.v = ModFC(dim, inner, code_features, bias=False)
        self.exit = ModFC(inner, dim, code_features, bias=True)
        self.layer_scale = LayerScale(dim, init_values=layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = t.shape
        return t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,N,C]

    def forward(
        self,
        z_r: torch.Tensor,
        code_r: torch.Tensor,
        sig_r: Optional[torch.Tensor],
        z_s: torch.Tensor,
        code_s: torch.Tensor,
        sig_s: Optional[torch.Tensor],
    ) -> torch.Tensor:
        if (sig_r is None) != (sig_s is None):
            raise ValueError("KernelModulatedAttention: give both sig_r and sig_s, or neither (no kernel)")
        norm_s = self.norm_sender if self.norm_sender is not None else self.norm_receiver
        q = self._heads(self.q(self.norm_receiver(z_r), code_r))
        senders = norm_s(z_s)
        k = self._heads(self.k(senders, code_s))
        v = self._heads(self.v(senders, code_s))
        if sig_r is None:
            m = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim))
        else:
            sampling = self.temperature is not None and (self.training or self.eval_mode == "sample")
            threshold = not self.training and self.eval_mode == "threshold"
            seed = torch.randint(0, 2**62, (), device="cpu") if sampling else None
            m = ops.graph_attention(
                q,
                k,
                v,
                sig_r,
                sig_s,
                self.bandwidth,
                truncation=self.truncation,
                temperature=self.temperature if sampling else None,
                seed=seed,
                threshold=threshold,
                backend=self.backend,
            )
        batch, _, receivers, _ = m.shape
        out = self.exit(m.transpose(1, 2).reshape(batch, receivers, self.num_heads * self.head_dim), code_r)
        out = self.drop_path(self.layer_scale(out))
        return z_r + out if self.residual else out

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, truncation={self.truncation}, "
            f"temperature={self.temperature}, eval_mode={self.eval_mode!r}, residual={self.residual}"
        )
