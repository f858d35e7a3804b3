"""MoEMLP: the drop-in mixture-of-experts MLP of V-MoE blocks (docs/design.md §2.1, §4)."""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.moe import ACTIVATIONS, moe_mlp
from ..ops.precision import autocast_off
from ..ops.routing import GATES, route, vmoe_aux_loss


class MoEMLP(nn.Module):
    """Mixture of ``num_experts`` MLPs (dim → hidden_dim → dim), k experts per token.

    Args:
        dim, hidden_dim: widths of every expert (fc1: dim→hidden_dim, GELU, fc2: hidden_dim→dim).
        num_experts: E.  k: experts per token (1 <= k <= E).
        gate: "vmoe" (softmax over E then top-k, bias-free router, noise in training, aux loss)
            or "naive" (FastMoE's NaiveGate: router with bias, top-k of the logits, softmax
            over the k, no aux loss).
        capacity_factor: None = dropless; else per-group expert capacity (see ``ops.route``).
        batch_priority: batch-prioritised routing (fill buffers by descending top-1 gate).
        noise_std: router noise in training, σ = noise_std / E added to the logits. None: 1.0
            for "vmoe", 0 for "naive". 0 disables the noise (and the load term of the aux loss).
        group_size: tokens per routing group (consecutive in the flattened input); None = all.
        activation: "gelu" (exact, timm) or "gelu_tanh" (V-MoE).
        backend: None | "auto" | "torch" | "cpp" | "triton" for both ops.

    forward(x [..., dim]) → [..., dim]. After each call:
        ``aux_loss``: 0-dim tensor, V-MoE's auxiliary loss (zero for "naive"); add it to the
        training loss (a model sums its layers').
        ``stats``: {"load": [E] int64 kept pairs per expert, "dropped": [E] int64 pairs dropped
        for capacity per expert}; computed on the device, without a host sync.

    Routing is float32 always (docs/design.md §2.7): the router logits, noise, softmax, top-k,
    weights and aux loss run with autocast disabled on float32 copies (float64 stays float64), so
    16-bit inputs and autocast make the float32 routing decisions. The experts run in x's dtype,
    or in the autocast dtype under autocast.
    Parameters: ``gate_weight`` [dim, E] (+ ``gate_bias`` [E] for "naive"), ``w1`` [E, dim, h],
    ``b1`` [E, h], ``w2`` [E, h, dim], ``b2`` [E, dim]. :meth:`convert_fastmoe_state_dict`
    maps a FastMoE ``FMoETransformerMLP`` state dict onto these names.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        k: int = 2,
        gate: str = "vmoe",
        capacity_factor: Optional[float] = None,
        batch_priority: bool = False,
        noise_std: Optional[float] = None,
        group_size: Optional[int] = None,
        activation: str = "gelu",
        backend: Optional[str] = None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if k > num_experts:
            raise ValueError(f"k={k} > num_experts={num_experts}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be an int >= 1 or None, got {group_size!r}")
        if noise_std is None:
            noise_std = 1.0 if gate == "vmoe" else 0.0
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.dim, self.hidden_dim, self.num_experts, self.k = dim, hidden_dim, num_experts, k
        self.gate, self.capacity_factor, self.batch_priority = gate, capacity_factor, batch_priority
        self.noise_std, self.group_size, self.activation, self.backend = float(noise_std), group_size, activation, backend

        self.gate_weight = nn.Parameter(torch.empty(dim, num_experts))
        self.gate_bias = nn.Parameter(torch.empty(num_experts)) if gate == "naive" else None
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict = {}

    def reset_parameters(self) -> None:
        """Seed initialisation (docs/design.md §2.6): router trunc_normal(0.02), zero bias; each expert's
        fc1/fc2 kaiming_uniform(a=√5) as nn.Linear (fan-in = its input width), zero biases."""
        nn.init.trunc_normal_(self.gate_weight, std=0.02)
        if self.gate_bias is not None:
            nn.init.zeros_(self.gate_bias)
        with torch.no_grad():
            for e in range(self.num_experts):
                # w[e] is [in, out]; its transpose is nn.Linear's [out, in] layout (fan_in = in).
                nn.init.kaiming_uniform_(self.w1[e].t(), a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.w2[e].t(), a=math.sqrt(5))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Clean router logits [T, E] of the flattened tokens x [T, dim], float32 (or float64);
        call with autocast disabled."""
        router_dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.gate_weight.to(router_dtype)
        bias = None if self.gate_bias is None else self.gate_bias.to(router_dtype)
        return F.linear(x.to(router_dtype), weight.t(), bias)

    def _route(self, tokens: torch.Tensor) -> tuple:
        """(Routing, clean logits, noisy logits) of tokens [T, dim], in float32 (or float64)."""
        clean = self.router_logits(tokens)
        noisy = clean
        if self.training and self.noise_std > 0:
            noisy = clean + (self.noise_std / self.num_experts) * torch.randn_like(clean)
        r = route(noisy, self.k, self.gate, self.capacity_factor, self.batch_priority, self.group_size, backend=self.backend)
        return r, clean, noisy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., dim={self.dim}], got shape {tuple(x.shape)}")
        shape = x.shape
        tokens = x.reshape(-1, self.dim)
        with autocast_off(tokens):
            r, clean, noisy = self._route(tokens)
            if self.gate == "vmoe":
                self.aux_loss = vmoe_aux_loss(clean, noisy, self.k, self.noise_std, self.group_size, self.training)
            else:
                self.aux_loss = clean.new_zeros(())
        y = self.run_experts(tokens, r)
        with torch.no_grad():
            dropped = torch.zeros_like(r.counts).scatter_add_(0, r.expert.reshape(-1), (r.slot < 0).reshape(-1).long())
        self.stats = {"load": r.counts.detach(), "dropped": dropped}
        return y.reshape(shape)

    def run_experts(self, x: torch.Tensor, r) -> torch.Tensor:
        """y [T, dim] of the experts for tokens x [T, dim] routed by r (expert parallelism overrides it)."""
        return moe_mlp(x, r, self.w1, self.b1, self.w2, self.b2, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        parts = [
            f"dim={self.dim}",
            f"hidden_dim={self.hidden_dim}",
            f"num_experts={self.num_experts}",
            f"k={self.k}",
            f"gate={self.gate!r}",
            "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}",
        ]
        if self.batch_priority:
            parts.append("batch_priority=True")
        parts.append(f"noise_std={self.noise_std:g}")
        if self.group_size is not None:
            parts.append(f"group_size={self.group_size}")
        parts.append(f"activation={self.activation!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    @staticmethod
    def convert_fastmoe_state_dict(state_dict: dict, prefix: str = "") -> dict:
        """Map a FastMoE ``FMoETransformerMLP`` (NaiveGate) state dict to MoEMLP's names.

        FastMoE stores ``gate.gate.weight`` [E, dim], ``gate.gate.bias`` [E],
        ``experts.htoh4.weight`` [E, h, dim], ``experts.htoh4.bias`` [E, h],
        ``experts.h4toh.weight`` [E, dim, h], ``experts.h4toh.bias`` [E, dim].
        Use with ``MoEMLP(..., gate="naive").load_state_dict(...)``.
        """
        sd = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        out = {
            "gate_weight": sd["gate.gate.weight"].t().contiguous(),
            "w1": sd["experts.htoh4.weight"].transpose(1, 2).contiguous(),
            "b1": sd["experts.htoh4.bias"],
            "w2": sd["experts.h4toh.weight"].transpose(1, 2).contiguous(),
            "b2": sd["experts.h4toh.bias"],
        }
        if "gate.gate.bias" in sd:
            out["gate_bias"] = sd["gate.gate.bias"]
        return out
