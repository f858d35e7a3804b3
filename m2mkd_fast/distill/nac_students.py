"""NAC students for m2mKD (docs/design.md §2.5): read-in, mediator and read-out modules that act on the
meta model's token sequence.

During m2mKD the NAC modules are not graph attention:

* **read-in** (module 0): the NAC's tokenizer + read-in block; its receivers are drawn as the
  reference draws them, ``randn(B, 1, D)``: one fresh random latent per sample on every call
  (not learned); its output (one token per image) goes through a post-stitch Linear (NAC
  width → meta width) into the meta model's remaining stages.
* **mediator** t (module 1 + t): the NAC's propagator t run *without* the kernel (dense softmax
  attention, no signatures, no β) whose receivers = senders = the meta tokens after the
  pre-stitch Linear (meta width → NAC width); a post-stitch maps back.
* **read-out** (last module): the NAC's read-out block with one fresh random receiver per
  sample and call (``randn(B, 1, D)``, as the read-in) attending to the pre-stitched meta
  tokens, then the NAC's pooling and head (it produces the logits itself).

Every latent of every student shares one fixed random code ``[Dc]`` (a buffer: not learned,
no code noise). The blocks are the full student's own modules, so their parameter names are the
NAC's; :func:`nac_assemble` loads the attention, FFN, tokenizer, pooling and head weights
non-strictly into a fresh NAC — signatures, β, codes and the latent seeder start fresh.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.stitch import Stitch
from .checkpoint import CheckpointError


def _fixed(seed: int, index: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 7919 + 104729 * (int(index) + 1))
    return torch.randn(*shape, generator=g)


def _fresh_receivers(like: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, 1, dim] standard-normal receivers, drawn anew on every call (the reference's
    ``torch.randn(B, 1, D)``), on ``like``'s device and dtype (B = like.shape[0])."""
    return torch.randn(like.shape[0], 1, dim, device=like.device, dtype=like.dtype)


def _no_kernel_params(block: nn.Module):
    """β is not used without signatures: freeze it (no grad, no DDP unused-parameter error)."""
    attn = getattr(block, "attn", None)
    if attn is not None and isinstance(getattr(attn, "bandwidth", None), nn.Parameter):
        attn.bandwidth.requires_grad_(False)


class _NACStudentBase(nn.Module):
    kind = ""

    def __init__(self, nac: nn.Module, index: int, seed: int):
        super().__init__()
        self.index = int(index)
        self.num_stages = int(nac.num_stages)
        self.register_buffer("code", _fixed(seed, index, nac.code_dim))

    def codes(self, n: int) -> torch.Tensor:
        return self.code.expand(n, -1)


class NACReadInStudent(_NACStudentBase):
    """Module 0: images → tokenizer → read-in (one fresh random receiver per image) → post-stitch →
    one meta token per image [B, 1, meta_dim]."""

    kind = "read_in"

    def __init__(self, nac: nn.Module, meta_dim: int, seed: int):
        super().__init__(nac, 0, seed)
        self.tokenizer = nac.tokenizer
        self.read_in = nac.read_in
        self.read_in.code_noise = 0.0
        self.dim = nac.embed_dim
        self.stitch_out = Stitch(nac.embed_dim, meta_dim, norm=False)

    def forward(self, x):
        tokens = self.tokenizer(x)
        z = _fresh_receivers(tokens, self.dim)
        z = self.read_in(z, self.codes(z.shape[1]), tokens)
        return self.stitch_out(z)


class NACMediatorStudent(_NACStudentBase):
    """Module 1 + t: pre-stitch → propagator t as dense self-attention over the meta tokens → post-stitch."""

    kind = "mediator"

    def __init__(self, nac: nn.Module, index: int, meta_dim: int, seed: int):
        super().__init__(nac, index, seed)
        self.propagator = nac.propagators[index - 1]
        self.propagator.code_noise = 0.0
        _no_kernel_params(self.propagator)
        self.stitch_in = Stitch(meta_dim, nac.embed_dim, norm=False)
        self.stitch_out = Stitch(nac.embed_dim, meta_dim, norm=False)

    def forward(self, h):
        z = self.stitch_in(h)
        c = self.codes(z.shape[1])
        z = self.propagator(z, c, None, z, c, None)
        return self.stitch_out(z)


class NACReadOutStudent(_NACStudentBase):
    """Last module: pre-stitch → read-out (one fresh random receiver per image) → pooling → head (logits)."""

    kind = "read_out"

    def __init__(self, nac: nn.Module, meta_dim: int, seed: int):
        super().__init__(nac, nac.num_stages - 1, seed)
        self.read_out = nac.read_out
        self.read_out.code_noise = 0.0
        _no_kernel_params(self.read_out)
        self.pool_scorer = nac.pool_scorer
        self.head_drop = nac.head_drop
        self.head = nac.head
        object.__setattr__(self, "_nac", nac)  # for its pooling function (no parameters of its own)
        self.dim = nac.embed_dim
        self.stitch_in = Stitch(meta_dim, nac.embed_dim, norm=False)

    def forward(self, h):
        s = self.stitch_in(h)
        z = _fresh_receivers(s, self.dim)
        out = self.read_out(z, self.codes(z.shape[1]), None, s, self.codes(s.shape[1]), None)
        return self.head(self.head_drop(self._nac.pool(out)))


def nac_pair_student(nac: nn.Module, index: int, meta_dim: int, seed: int = 0) -> nn.Module:
    n = nac.num_stages
    if not 0 <= index < n:
        raise ValueError(f"NAC module index must be in [0, {n - 1}], got {index}")
    if index == 0:
        return NACReadInStudent(nac, meta_dim, seed)
    if index == n - 1:
        return NACReadOutStudent(nac, meta_dim, seed)
    return NACMediatorStudent(nac, index, meta_dim, seed)


_SKIP = ("stitch_in.", "stitch_out.", "code")


def nac_module_state(student: nn.Module) -> dict:
    """NAC state-dict entries of a distilled student module (names as in the full NAC); β is left
    out (it was not used, it starts fresh)."""
    out = {}
    for k, v in student.state_dict().items():
        if k.startswith(_SKIP) or k.endswith("attn.bandwidth"):
            continue
        if isinstance(student, NACMediatorStudent):
            k = k.replace("propagator.", f"propagators.{student.index - 1}.", 1)
        out[k] = v
    return out


def nac_assemble(model: nn.Module, states: list) -> dict:
    """Load every module's entries into ``model`` (non-strict: signatures, β, codes and the seeder
    stay as initialised); an entry the NAC lacks, or of another shape, is an error."""
    own = model.state_dict()
    merged = {}
    for i, sd in enumerate(states):
        for k, v in sd.items():
            if k not in own:
                raise CheckpointError(f"distilled NAC module {i} has {k!r}, which the NAC does not have")
            if tuple(own[k].shape) != tuple(v.shape):
                raise CheckpointError(f"distilled NAC module {i}: {k} is {tuple(v.shape)}, the NAC's is {tuple(own[k].shape)}")
            if k in merged:
                raise CheckpointError(f"{k!r} comes from two distilled modules")
            merged[k] = v
    missing, unexpected = model.load_state_dict(merged, strict=False)
    assert not unexpected
    loaded = sum(v.numel() for v in merged.values())
    total = sum(p.numel() for p in model.parameters())
    return {"loaded_tensors": len(merged), "loaded_params": loaded, "total_params": total,
            "fresh": sorted({k.split(".")[0] for k in missing})}
