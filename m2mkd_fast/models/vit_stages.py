"""timm's VisionTransformer split into m2mKD stages, the teacher and meta models (docs/design.md §2.5).

:class:`StagedVisionTransformer` is timm's ``VisionTransformer`` (same parameter names, so timm's
pretrained checkpoints load unchanged) whose blocks are grouped into ``num_stages`` consecutive
stages:

* stage 0: patch embedding, class/register tokens, position embedding (+ patch/pos dropout,
  pre-norm) and its blocks; it takes images ``[B, C, H, W]`` and returns tokens ``[B, N, D]``;
* middle stages: their blocks, tokens ``[B, N, D]`` in and out;
* the last stage: its blocks, the final norm, pooling, fc-norm, head dropout and head; returns
  logits ``[B, num_classes]`` (pre-logits ``[B, D]`` when ``num_classes == 0``).

``model(x, start=0, end=None)`` runs stages ``[start, end)``; composing stages is bit-identical to
timm's own forward. ``model.stages[i]`` is a view of stage i (see :mod:`.stages`).

Registered names (``timm.create_model(name, num_stages=..., stage_depths=..., **timm_kwargs)``):

* teachers ``staged_<timm name>`` for deit_{tiny,small,base}_patch16_224,
  deit3_large_patch16_224, vit_{tiny,small,base,large}_patch16_224, vit_huge_patch14_224 (timm's
  pretrained cfgs, so ``pretrained=True`` loads timm's weights), and ``staged_vit_micro``
  (Fashion-MNIST: 28×28×1, patch 4, width 96, depth 6, 3 heads, 10 classes);
* meta models ``meta_<same names>``: the same width and heads, ``num_stages`` blocks, one per stage
  (Deep Incubation). Default stages: 4 (ViT-H/14: 10, micro: 3).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.models import (VisionTransformer, build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg,
                         register_model)
from timm.models.vision_transformer import checkpoint_filter_fn

from ..data.fashion_mnist import MEAN as FASHION_MNIST_MEAN
from ..data.fashion_mnist import STD as FASHION_MNIST_STD
from .stages import ModelStage, check_stage_range, collect_aux_loss, split_depth
from .weights import check_pretrained

__all__ = ["StagedVisionTransformer", "as_staged", "VIT_CONFIGS", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD"]


class StagedVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with m2mKD stages.

    Args:
        num_stages: number of stages (blocks spread as evenly as possible, earlier stages first).
        stage_depths: explicit blocks per stage (overrides the even split; may contain zeros).
        *args, **kwargs: timm ``VisionTransformer`` arguments.
    """

    def __init__(self, *args, num_stages: int = 4, stage_depths: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.configure_stages(num_stages, stage_depths)

    # ----------------------------------------------------------------------------- stages
    def configure_stages(self, num_stages: Optional[int] = None, stage_depths: Optional[Sequence[int]] = None) -> None:
        """(Re)split the blocks into stages; see :func:`~m2mkd_fast.models.stages.split_depth`."""
        depths = split_depth(len(self.blocks), num_stages, stage_depths)
        bounds, begin = [], 0
        for d in depths:
            bounds.append((begin, begin + d))
            begin += d
        self.stage_depths = depths
        self.stage_block_ranges = tuple(bounds)

    @property
    def num_stages(self) -> int:
        return len(self.stage_depths)

    @property
    def stages(self) -> nn.ModuleList:
        """Views of the stages (fresh each access; they share the model's parameters)."""
        views = []
        for i, (a, b) in enumerate(self.stage_block_ranges):
            modules: Dict[str, nn.Module] = {}
            params: Dict[str, Optional[nn.Parameter]] = {}
            if i == 0:
                modules.update(patch_embed=self.patch_embed, pos_drop=self.pos_drop,
                               patch_drop=self.patch_drop, norm_pre=self.norm_pre)
                params.update(cls_token=self.cls_token, reg_token=self.reg_token, pos_embed=self.pos_embed)
            modules["blocks"] = nn.Sequential(*[self.blocks[j] for j in range(a, b)])
            if i == self.num_stages - 1:
                modules.update(norm=self.norm, fc_norm=self.fc_norm, head_drop=self.head_drop, head=self.head)
                if self.attn_pool is not None:
                    modules["attn_pool"] = self.attn_pool
            views.append(ModelStage(self, i, modules, params, name=f"blocks[{a}:{b}]"))
        return nn.ModuleList(views)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _run_blocks(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for j in range(a, b):
            blk = self.blocks[j]
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return x

    def _forward_stage(self, i: int, x: torch.Tensor, head: bool = True) -> torch.Tensor:
        if i == 0:
            x = self._embed(x)
        a, b = self.stage_block_ranges[i]
        x = self._run_blocks(x, a, b)
        if i == self.num_stages - 1:
            x = self.norm(x)
            if head:
                x = self.forward_head(x)
        return x

    def _reset_aux(self, start: int, end: int) -> None:
        """Forget the aux losses of the layers in stages [start, end) (about to run again)."""
        if start >= end:
            return
        a, b = self.stage_block_ranges[start][0], self.stage_block_ranges[end - 1][1]
        for j in range(a, b):
            for m in self.blocks[j].modules():
                if hasattr(m, "last_aux_loss"):
                    m.last_aux_loss = None

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary losses of the layers as of their latest run (0 for a ViT).

        A forward over stages [start, end) replaces the losses of those stages' layers only, so
        after a full forward (or after running every stage once, in any calls) this is the
        model's total; ``model.stages[i].aux_loss`` is stage i's own.
        """
        return collect_aux_loss(self.modules(), like=self.patch_embed.proj.weight)

    # ----------------------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """Embeddings, all blocks and the final norm: tokens ``[B, N, D]`` (as timm's)."""
        if attn_mask is not None or is_causal:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        self._reset_aux(0, self.num_stages)
        for i in range(self.num_stages):
            x = self._forward_stage(i, x, head=False)
        return x

    def forward(self, x: torch.Tensor, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """Run stages ``[start, end)``: images in when ``start == 0``, logits out when ``end`` is the last."""
        start, end = check_stage_range(start, end, self.num_stages)
        self._reset_aux(start, end)
        for i in range(start, end):
            x = self._forward_stage(i, x)
        return x


def as_staged(model: VisionTransformer, num_stages: int = 4, stage_depths: Optional[Sequence[int]] = None
              ) -> StagedVisionTransformer:
    """Give a timm ``VisionTransformer`` (e.g. from ``timm.create_model("deit_small_patch16_224")``)
    m2mKD stages, in place: same object, same parameters and state-dict names. Returns it."""
    if not isinstance(model, StagedVisionTransformer):
        if type(model) is not VisionTransformer:
            raise TypeError(f"as_staged: expected a timm VisionTransformer, got {type(model).__name__} "
                            "(subclasses with extra tokens or a different forward are not supported)")
        model.__class__ = StagedVisionTransformer
    model.configure_stages(num_stages, stage_depths)
    return model


# --------------------------------------------------------------------------------- registry
# name -> (timm VisionTransformer args, default number of stages)
VIT_CONFIGS: Dict[str, tuple] = {
    "deit_tiny_patch16_224": (dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), 4),
    "deit_small_patch16_224": (dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), 4),
    "deit_base_patch16_224": (dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), 4),
    "deit3_large_patch16_224": (dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                     no_embed_class=True, init_values=1e-6), 4),
    "vit_tiny_patch16_224": (dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), 4),
    "vit_small_patch16_224": (dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), 4),
    "vit_base_patch16_224": (dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), 4),
    "vit_large_patch16_224": (dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), 4),
    "vit_huge_patch14_224": (dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), 10),
    "vit_micro": (dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3), 3),
}


def micro_cfg(**kwargs) -> Dict[str, Any]:
    """Pretrained cfg (no weights) of a Fashion-MNIST sized model."""
    return {
        "url": "", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bilinear", "fixed_input_size": True, "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD, "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", **kwargs,
    }


def _timm_cfg(name: str, weights: bool) -> Dict[str, Any]:
    """timm's default pretrained cfg of ``name`` (its weights too when ``weights``)."""
    cfg = get_pretrained_cfg(name).to_dict()
    for key in ("architecture", "tag"):
        cfg.pop(key, None)
    if not weights:
        for key in ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict"):
            cfg.pop(key, None)
        cfg["url"] = ""
        if not cfg.get("num_classes"):
            cfg["num_classes"] = 1000  # e.g. ViT-H/14's in21k features-only weights: a head for a fresh model
    return cfg


def _cfgs() -> Dict[str, Any]:
    cfgs = {}
    for name in VIT_CONFIGS:
        if name == "vit_micro":
            cfgs["staged_vit_micro"] = micro_cfg()
            cfgs["meta_vit_micro"] = micro_cfg()
            continue
        # under timm's tag of its default weights, so `pretrained=True` pulls the same checkpoint
        tag = get_pretrained_cfg(name).tag
        cfgs[f"staged_{name}.{tag}" if tag else f"staged_{name}"] = _timm_cfg(name, weights=True)
        cfgs[f"meta_{name}"] = _timm_cfg(name, weights=False)
    return cfgs


default_cfgs = generate_default_cfgs(_cfgs())


def _filter_fn(name: str):
    if name.startswith("deit"):
        return partial(checkpoint_filter_fn, adapt_layer_scale=True)
    return checkpoint_filter_fn


def _create_staged(variant: str, base: str, pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    check_pretrained(variant, pretrained, kwargs)
    args, default_stages = VIT_CONFIGS[base]
    kwargs = dict(args, **kwargs)
    kwargs.setdefault("num_stages", default_stages if kwargs.get("stage_depths") is None else None)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(StagedVisionTransformer, variant, pretrained, pretrained_filter_fn=_filter_fn(base),
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _create_meta(variant: str, base: str, pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Deep-Incubation meta model: the teacher's width, one block per stage."""
    check_pretrained(variant, pretrained, kwargs)
    args, default_stages = VIT_CONFIGS[base]
    args = dict(args)
    args.pop("depth")
    stage_depths = kwargs.pop("stage_depths", None)
    num_stages = kwargs.pop("num_stages", None)
    if stage_depths is not None:
        if any(int(d) != 1 for d in stage_depths) or (num_stages is not None and int(num_stages) != len(stage_depths)):
            raise ValueError(f"{variant}: a meta model has one block per stage, got stage_depths={stage_depths}")
        num_stages = len(stage_depths)
    num_stages = int(default_stages if num_stages is None else num_stages)
    depth = kwargs.pop("depth", num_stages)
    if depth != num_stages:
        raise ValueError(f"{variant}: a meta model has one block per stage, got depth={depth} and num_stages={num_stages}")
    kwargs = dict(args, **kwargs)
    out_indices = kwargs.pop("out_indices", min(3, num_stages - 1))
    return build_model_with_cfg(StagedVisionTransformer, variant, pretrained, pretrained_filter_fn=_filter_fn(base),
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                depth=num_stages, num_stages=num_stages, **kwargs)


@register_model
def staged_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """DeiT-Ti/16 in m2mKD stages (4 by default)."""
    return _create_staged("staged_deit_tiny_patch16_224", "deit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def staged_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """DeiT-S/16 in m2mKD stages (4 by default)."""
    return _create_staged("staged_deit_small_patch16_224", "deit_small_patch16_224", pretrained, **kwargs)


@register_model
def staged_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """DeiT-B/16 in m2mKD stages (4 by default)."""
    return _create_staged("staged_deit_base_patch16_224", "deit_base_patch16_224", pretrained, **kwargs)


@register_model
def staged_deit3_large_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """DeiT-L/16 (DeiT III) in m2mKD stages: 4×6 blocks, the V-MoE teacher."""
    return _create_staged("staged_deit3_large_patch16_224", "deit3_large_patch16_224", pretrained, **kwargs)


@register_model
def staged_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """ViT-Ti/16 in m2mKD stages (4 by default)."""
    return _create_staged("staged_vit_tiny_patch16_224", "vit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def staged_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """ViT-S/16 in m2mKD stages (4 by default)."""
    return _create_staged("staged_vit_small_patch16_224", "vit_small_patch16_224", pretrained, **kwargs)


@register_model
def staged_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """ViT-B/16 in m2mKD stages (4 by default)."""
    return _create_staged("staged_vit_base_patch16_224", "vit_base_patch16_224", pretrained, **kwargs)


@register_model
def staged_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """ViT-L/16 in m2mKD stages (4 by default)."""
    return _create_staged("staged_vit_large_patch16_224", "vit_large_patch16_224", pretrained, **kwargs)


@register_model
def staged_vit_huge_patch14_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """ViT-H/14 in m2mKD stages: 10 by default, the NAC teacher (read-in, 8 mediators, read-out)."""
    return _create_staged("staged_vit_huge_patch14_224", "vit_huge_patch14_224", pretrained, **kwargs)


@register_model
def staged_vit_micro(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """CPU preset: 28×28×1 input, patch 4, width 96, depth 6, 3 heads, 10 classes; 3 stages."""
    return _create_staged("staged_vit_micro", "vit_micro", pretrained, **kwargs)


@register_model
def meta_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of DeiT-Ti/16: one block per stage (4 by default)."""
    return _create_meta("meta_deit_tiny_patch16_224", "deit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def meta_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of DeiT-S/16: one block per stage (4 by default)."""
    return _create_meta("meta_deit_small_patch16_224", "deit_small_patch16_224", pretrained, **kwargs)


@register_model
def meta_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of DeiT-B/16: one block per stage (4 by default)."""
    return _create_meta("meta_deit_base_patch16_224", "deit_base_patch16_224", pretrained, **kwargs)


@register_model
def meta_deit3_large_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of DeiT-L/16: one block per stage (4 by default)."""
    return _create_meta("meta_deit3_large_patch16_224", "deit3_large_patch16_224", pretrained, **kwargs)


@register_model
def meta_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of ViT-Ti/16: one block per stage (4 by default)."""
    return _create_meta("meta_vit_tiny_patch16_224", "vit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def meta_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of ViT-S/16: one block per stage (4 by default)."""
    return _create_meta("meta_vit_small_patch16_224", "vit_small_patch16_224", pretrained, **kwargs)


@register_model
def meta_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of ViT-B/16: one block per stage (4 by default)."""
    return _create_meta("meta_vit_base_patch16_224", "vit_base_patch16_224", pretrained, **kwargs)


@register_model
def meta_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of ViT-L/16: one block per stage (4 by default)."""
    return _create_meta("meta_vit_large_patch16_224", "vit_large_patch16_224", pretrained, **kwargs)


@register_model
def meta_vit_huge_patch14_224(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of ViT-H/14: one block per stage (10 by default)."""
    return _create_meta("meta_vit_huge_patch14_224", "vit_huge_patch14_224", pretrained, **kwargs)


@register_model
def meta_vit_micro(pretrained: bool = False, **kwargs) -> StagedVisionTransformer:
    """Meta model of the CPU preset: width 96, 3 heads, one block per stage (3 by default)."""
    return _create_meta("meta_vit_micro", "vit_micro", pretrained, **kwargs)
