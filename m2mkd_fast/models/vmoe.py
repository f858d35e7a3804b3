"""V-MoE on timm (docs/design.md §2.1, §2.6), split into m2mKD stages.

:class:`VisionMoE` is a :class:`~m2mkd_fast.models.vit_stages.StagedVisionTransformer` whose
MLP in the chosen blocks is a :class:`~m2mkd_fast.layers.MoEMLP` (state-dict names
``blocks.<i>.mlp.{gate_weight, gate_bias, w1, b1, w2, b2}``); everything else is timm's ViT:
exact GELU, LayerNorm eps 1e-6, DropPath linspace(0, ``drop_path_rate`` = 0.1), attention and
router trunc_normal(0.02), experts kaiming_uniform(a=√5) with zero biases.

Routing groups hold whole images: ``group_images`` images (8 in V-MoE) of N tokens each form a
group of S = 8·N tokens; when the batch is not a multiple of it, the largest divisor of the batch
not above ``group_images`` is used (capacity scales with S, so the per-token budget is unchanged).

After a forward, ``model.aux_loss`` is the sum of the aux losses of the MoE layers (add it to the
training loss; a forward over stages [start, end) refreshes those stages' layers only, and
``model.stages[i].aux_loss`` is stage i's own), ``model.moe_stats()`` their {"load", "dropped"}
per block.

Stages: as the teacher's (stage 0 embeds, the last has norm + head), consecutive blocks.

Registered names (kwargs: ``num_stages``, ``stage_depths``, ``moe_layers``, ``num_experts``,
``top_k``, ``gate``, ``capacity_factor``, ``group_images``, ``batch_priority``, ``noise_std``,
``moe_activation``, ``moe_backend`` and timm ViT kwargs):

* ``vmoe_{small,base,large}_patch16_224``: V-MoE (Riquelme et al.): MoE every 2nd block (1,3,5,…),
  gate "vmoe", E=8, k=2, capacity factor 1.05, 8-image groups; 4 stages;
* ``vmoe_{small,base,large}_all_patch16_224``: the m2mKD reference's V-MoE: MoE in every block,
  gate "naive" (FastMoE's NaiveGate), dropless; 4 stages (3 blocks each for base);
* ``vmoe_micro`` / ``vmoe_micro_all``: the same two on the CPU preset (28×28×1, patch 4, width 96,
  depth 6, 3 heads, 10 classes); 3 stages.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn

from ..layers import MoEMLP
from .vit_stages import StagedVisionTransformer, _timm_cfg, micro_cfg
from .weights import check_pretrained

__all__ = ["VisionMoE", "VMoEMLP", "moe_block_indices"]


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for g in range(min(n, cap), 0, -1):
        if n % g == 0:
            return g
    return 1


def moe_block_indices(spec: Union[str, Sequence[int]], depth: int) -> List[int]:
    """Blocks (0-based) whose MLP is an MoE.

    ``"every2"`` (V-MoE's "Every 2": 1, 3, 5, …), ``"everyN"`` (N−1, 2N−1, …), ``"all"``,
    ``"lastN"`` (the last N blocks), ``"none"``, or an explicit list of indices.
    """
    if isinstance(spec, str):
        key = spec.replace("_", "").replace("-", "").lower()
        if key == "all":
            return list(range(depth))
        if key == "none":
            return []
        for prefix in ("every", "last"):
            if key.startswith(prefix) and key[len(prefix):].isdigit() and int(key[len(prefix):]) >= 1:
                n = int(key[len(prefix):])
                return list(range(n - 1, depth, n)) if prefix == "every" else list(range(max(depth - n, 0), depth))
        raise ValueError(f"moe_layers: unknown spec {spec!r}; expected 'all', 'none', 'everyN', 'lastN' or a list")
    idx = sorted({int(i) for i in spec})
    if any(i < 0 or i >= depth for i in idx):
        raise ValueError(f"moe_layers: block indices must be in [0, {depth}), got {list(spec)}")
    return idx


class VMoEMLP(MoEMLP):
    """:class:`MoEMLP` inside a ViT block: routing groups of whole images, a record of its last call.

    ``group_images``: images per routing group (tokens are [B, N, D], so a group is
    g·N consecutive tokens with g the largest divisor of B not above ``group_images``);
    None keeps ``group_size`` as given (None: the whole batch is one group).
    ``last_aux_loss`` is the aux loss of the latest call, None when the model reset it before a
    forward that has not reached this layer (yet).
    """

    def __init__(self, *args, group_images: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if group_images is not None and (isinstance(group_images, bool) or int(group_images) < 1):
            raise ValueError(f"group_images must be an int >= 1 or None, got {group_images!r}")
        self.group_images = None if group_images is None else int(group_images)
        self.last_aux_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_images is not None:
            if x.dim() != 3:
                raise ValueError(f"VMoEMLP with group_images needs tokens [B, N, D], got shape {tuple(x.shape)}")
            batch, tokens = x.shape[:2]
            self.group_size = _largest_divisor_at_most(batch, self.group_images) * tokens if batch * tokens > 0 else None
        y = super().forward(x)
        self.last_aux_loss = self.aux_loss
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group_images={self.group_images}" if self.group_images is not None else "")


class VisionMoE(StagedVisionTransformer):
    """ViT with MoE MLPs in ``moe_layers`` blocks, in m2mKD stages.

    Args:
        moe_layers: which blocks get an MoE MLP (:func:`moe_block_indices`), default "every2".
        num_experts, top_k, gate, capacity_factor, batch_priority, noise_std: MoEMLP's
            (``num_experts`` E, ``top_k`` k; capacity factor None = dropless).
        group_images: images per routing group (None: the whole batch is one group).
        moe_activation: "gelu" (exact, timm's) or "gelu_tanh" (V-MoE's JAX experts).
        moe_backend: backend of the routing / expert ops (None = auto).
        num_stages, stage_depths: the stage split; other kwargs go to timm's VisionTransformer
            (defaults here: drop_path_rate 0.1).
    """

    def __init__(self, *args, moe_layers: Union[str, Sequence[int]] = "every2", num_experts: int = 8, top_k: int = 2,
                 gate: str = "vmoe", capacity_factor: Optional[float] = 1.05, group_images: Optional[int] = 8,
                 batch_priority: bool = False, noise_std: Optional[float] = None, moe_activation: str = "gelu",
                 moe_backend: Optional[str] = None, **kwargs):
        kwargs.setdefault("drop_path_rate", 0.1)
        super().__init__(*args, **kwargs)
        self.moe_layers = tuple(moe_block_indices(moe_layers, len(self.blocks)))
        self.num_experts, self.top_k, self.gate = int(num_experts), int(top_k), gate
        for i in self.moe_layers:
            mlp = self.blocks[i].mlp
            dim, hidden = mlp.fc1.in_features, mlp.fc1.out_features
            device = mlp.fc1.weight.device
            with torch.device(device):
                self.blocks[i].mlp = VMoEMLP(dim, hidden, self.num_experts, k=self.top_k, gate=gate,
                                             capacity_factor=capacity_factor, batch_priority=batch_priority,
                                             noise_std=noise_std, group_size=None, activation=moe_activation,
                                             backend=moe_backend, group_images=group_images)

    def moe_modules(self) -> Dict[int, VMoEMLP]:
        """{block index: its MoE MLP}."""
        return {i: self.blocks[i].mlp for i in self.moe_layers}

    def moe_stats(self) -> Dict[int, dict]:
        """{block index: {"load": [E], "dropped": [E]}} of the MoE layers that ran last forward."""
        return {i: m.stats for i, m in self.moe_modules().items() if m.last_aux_loss is not None}


# --------------------------------------------------------------------------------- registry
_WIDTHS = {
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "micro": dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3),
}
_VMOE = dict(moe_layers="every2", gate="vmoe", num_experts=8, top_k=2, capacity_factor=1.05, group_images=8)
_M2MKD = dict(moe_layers="all", gate="naive", num_experts=8, top_k=2, capacity_factor=None, group_images=None)


def _imagenet_cfg() -> dict:
    return _timm_cfg("deit_base_patch16_224", weights=False)  # ImageNet geometry and statistics, no weights


default_cfgs = generate_default_cfgs({
    **{f"vmoe_{w}_patch16_224": _imagenet_cfg() for w in ("small", "base", "large")},
    **{f"vmoe_{w}_all_patch16_224": _imagenet_cfg() for w in ("small", "base", "large")},
    "vmoe_micro": micro_cfg(),
    "vmoe_micro_all": micro_cfg(),
})


def _create_vmoe(variant: str, width: str, moe: dict, pretrained: bool = False, **kwargs) -> VisionMoE:
    check_pretrained(variant, pretrained, kwargs)
    default_stages = 3 if width == "micro" else 4
    kwargs = {**_WIDTHS[width], **moe, **kwargs}
    if kwargs.get("stage_depths") is None:
        kwargs.setdefault("num_stages", default_stages)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VisionMoE, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


@register_model
def vmoe_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """V-MoE-S/16: MoE every 2nd block, vmoe gate, E=8, k=2, capacity 1.05, 8-image groups."""
    return _create_vmoe("vmoe_small_patch16_224", "small", _VMOE, pretrained, **kwargs)


@register_model
def vmoe_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """V-MoE-B/16: MoE in blocks 1,3,…,11, vmoe gate, E=8, k=2, capacity 1.05, 8-image groups."""
    return _create_vmoe("vmoe_base_patch16_224", "base", _VMOE, pretrained, **kwargs)


@register_model
def vmoe_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """V-MoE-L/16: MoE every 2nd block, vmoe gate, E=8, k=2, capacity 1.05, 8-image groups."""
    return _create_vmoe("vmoe_large_patch16_224", "large", _VMOE, pretrained, **kwargs)


@register_model
def vmoe_small_all_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """m2mKD's V-MoE at S/16 width: MoE in every block, naive gate, dropless."""
    return _create_vmoe("vmoe_small_all_patch16_224", "small", _M2MKD, pretrained, **kwargs)


@register_model
def vmoe_base_all_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """m2mKD's V-MoE-B: MoE in all 12 blocks, naive gate (FastMoE), E=8, k=2, dropless; 4×3 stages."""
    return _create_vmoe("vmoe_base_all_patch16_224", "base", _M2MKD, pretrained, **kwargs)


@register_model
def vmoe_large_all_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """m2mKD's V-MoE at L/16 width: MoE in every block, naive gate, dropless."""
    return _create_vmoe("vmoe_large_all_patch16_224", "large", _M2MKD, pretrained, **kwargs)


@register_model
def vmoe_micro(pretrained: bool = False, **kwargs) -> VisionMoE:
    """CPU preset V-MoE: 28×28×1, patch 4, width 96, depth 6, 3 heads; MoE in blocks 1,3,5 (vmoe
    gate, E=8, k=2, capacity 1.05, 8-image groups); 3 stages of 2 blocks."""
    return _create_vmoe("vmoe_micro", "micro", _VMOE, pretrained, **kwargs)


@register_model
def vmoe_micro_all(pretrained: bool = False, **kwargs) -> VisionMoE:
    """CPU preset of m2mKD's V-MoE: MoE in all 6 blocks, naive gate, dropless; 3 stages."""
    return _create_vmoe("vmoe_micro_all", "micro", _M2MKD, pretrained, **kwargs)
