"""Neural Attentive Circuits (Rahaman et al. 2022) as used by m2mKD (docs/design.md §2.2–§2.6).

Data flow of :class:`NeuralAttentiveCircuit` (D state width, Dc = D code width, S signature width):

1. **read-in** (stage 0): tokens = tokenizer(images) ``[B, V, Din]``; the latent seeder gives the
   initial states of the input latents ``[B, U_in, D]`` and of the mediators ``[B, U_m, D]``;
   the input latents read the tokens (:class:`ReadInAttention` + :class:`ModFFN`).
2. **propagators** t = 0..T−1 (stages 1..T): senders = input latents + mediators, receivers =
   mediators; :class:`KernelModulatedAttention` (truncation 0.9, relaxed-Bernoulli sampling at
   temperature 0.5 in training, "no_sample" in eval, own β, LayerScale 0.1, DropPath 0.1) +
   ModFFN. The input latents' states stay as the read-in left them.
3. **read-out** (stage T+1): the seeder gives the output latents' states ``[B, U_out, D]``; they
   attend to input latents + mediators with a dense kernel (no truncation, no sampling, own sender
   LayerNorm, no residual around the attention, DropPath 0) + ModFFN; then a soft Gumbel-softmax
   (τ = 1, train and eval) over the output latents of a learned confidence pools them to
   ``[B, D]`` and the head gives logits.

Latents: codes ~ N(0, 1) ``[U, Dc]`` (mediator codes shared by all iterations), signatures
``[U, S]`` (input/output latents N(0, 1); mediators fitted to a graph prior, see
:mod:`.graph_priors`). The seeder: μ(LN(c̃)) + N(0, 1)·exp(½·logvar(LN(c̃))) with logvar's bias
−5, fresh noise per batch element in eval too. Code noise (training only, amount 0.05): one draw
per block call for the receiver codes (q, exit and FFN) and one for the sender codes (k, v); the
seeder draws its own.

**m2mKD stages** (``num_stages = T + 2``): ``model.stages[0]`` (tokenizer + read-in),
``model.stages[1 + t]`` (propagator t), ``model.stages[T + 1]`` (read-out, pooling, head).
What flows between stages is a :class:`NACState` ``(inputs [B, U_in, D], mediators [B, U_m, D])``:
``model(x, 0, k)`` for 0 < k ≤ T+1 returns a NACState; ``model(state, k, T + 2)`` returns logits.
Latent codes, signatures and the seeder belong to no stage (m2mKD transfers the attention and
FFN weights and the tokenizer; signatures, β and codes start fresh).

Registered names (kwargs override any preset value, e.g. ``graph_prior``, ``prior_steps``,
``num_iterations`` or ``num_stages`` = iterations + 2, ``backend``):

* ``nac_tinyimagenet`` (+ ``_erdos_renyi``, ``_planted_partition``, ``_ring_of_cliques``):
  64×64, 200 classes, D=384, tokenizer (96, 192) + 64 → Din=256, V=64, U_in=64, U_m=256,
  U_out=64, T=8, 6 heads × 64, FFN hidden 2D; prior Barabási–Albert n=256 m=2;
* ``nac_imagenet`` (+ the same three): 224×224, 1000 classes, D=512, Din=320, V=784, U_in=192,
  U_m=768, U_out=64, T=8, 8 heads × 64, FFN hidden D; prior Barabási–Albert n=768 m=6;
* ``nac_micro``: CPU preset, 28×28×1, 10 classes, D=64, tokenizer (16, 32) stride 2 + 16 → Din=48,
  V=49, U_in=16, U_m=32, U_out=8, T=2 (4 stages), 2 heads × 32, S=16, prior BA n=32 m=2 fitted
  for 200 steps.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..layers import KernelModulatedAttention, ModFFN, ReadInAttention, code_noise
from .graph_priors import cosine_distance, graph_prior_signatures
from .nac_tokenizer import NACTokenizer
from .stages import ModelStage, check_stage_range
from .vit_stages import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from .weights import check_pretrained

__all__ = ["NACState", "LatentSet", "LatentSeeder", "NACReadIn", "NACPropagator", "NeuralAttentiveCircuit"]


class NACState(NamedTuple):
    """The state passed between NAC stages."""

    inputs: torch.Tensor  # [B, U_in, D] input latent states (after the read-in)
    mediators: torch.Tensor  # [B, U_m, D] mediator states


class LatentSet(nn.Module):
    """U latents: learnable ``codes [U, Dc]`` ~ N(0, 1) and ``signatures [U, S]``."""

    def __init__(self, num_latents: int, code_dim: int, signature_dim: int, signatures: Optional[torch.Tensor] = None):
        super().__init__()
        self.codes = nn.Parameter(torch.randn(num_latents, code_dim))
        sig = torch.randn(num_latents, signature_dim) if signatures is None else signatures
        if tuple(sig.shape) != (num_latents, signature_dim):
            raise ValueError(f"LatentSet: signatures must be [{num_latents}, {signature_dim}], got {tuple(sig.shape)}")
        self.signatures = nn.Parameter(sig.to(self.codes.device, self.codes.dtype))

    @property
    def num_latents(self) -> int:
        return self.codes.shape[0]


class LatentSeeder(nn.Module):
    """Initial states from codes: μ(LN(c̃)) + ε·exp(½·logvar(LN(c̃))), ε ~ N(0, 1) per batch element.

    c̃ is the code with code noise in training (``code_noise`` amount). logvar's bias starts at −5.
    forward(codes [U, Dc], batch_size) → [B, U, D].
    """

    def __init__(self, state_dim: int, code_dim: int, code_noise: float = 0.05, logvar_bias_init: float = -5.0):
        super().__init__()
        self.code_noise = float(code_noise)
        self.norm = nn.LayerNorm(code_dim)
        self.mu = nn.Linear(code_dim, state_dim)
        self.logvar = nn.Linear(code_dim, state_dim)
        nn.init.constant_(self.logvar.bias, logvar_bias_init)

    def forward(self, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.training and self.code_noise > 0:
            codes = code_noise(codes, self.code_noise)
        codes = self.norm(codes)
        mu = self.mu(codes)
        std = self.logvar(codes).mul(0.5).exp()
        eps = torch.randn(batch_size, *mu.shape, device=mu.device, dtype=mu.dtype)
        return mu + eps * std


class NACReadIn(nn.Module):
    """Read-in block: ``ReadInAttention`` (LayerScale 1.0, residual) then ``ModFFN`` (DropPath 0).

    forward(z [B, U, D], code [U, Dc], x [B, V, Din]) → [B, U, D]; in training the codes get one
    noise draw (``code_noise``; set it to 0 for m2mKD students) used by the attention and FFN.
    """

    def __init__(self, dim: int, input_dim: int, code_dim: int, num_heads: int, head_dim: int, ffn_hidden: int,
                 layer_scale: float = 1.0, ffn_layer_scale: float = 0.1, code_noise: float = 0.05,
                 backend: Optional[str] = None):
        super().__init__()
        self.code_noise = float(code_noise)
        self.attn = ReadInAttention(dim, input_dim, code_dim, num_heads, head_dim, layer_scale=layer_scale,
                                    backend=backend)
        self.ffn = ModFFN(dim, ffn_hidden, code_dim, layer_scale=ffn_layer_scale, drop_path=0.0)

    def forward(self, z: torch.Tensor, code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.code_noise > 0:
            code = code_noise(code, self.code_noise)
        return self.ffn(self.attn(z, code, x), code)


class NACPropagator(nn.Module):
    """Propagator (and read-out) block: ``KernelModulatedAttention`` then ``ModFFN``.

    forward(z_r [B, U, D], code_r [U, Dc], sig_r [U, S] | None, z_s [B, V, D], code_s [V, Dc],
    sig_s [V, S] | None) → [B, U, D]. In training the receiver codes get one noise draw (q, exit,
    FFN) and the sender codes another (k, v). Signatures None: plain softmax attention without
    kernel (the m2mKD mediator student; β then gets no gradient).
    ``attn_kwargs`` go to KernelModulatedAttention (truncation, temperature, eval_mode, residual,
    sender_norm, drop_path, layer_scale, signature_dim, backend).
    """

    def __init__(self, dim: int, code_dim: int, num_heads: int, head_dim: int, ffn_hidden: int,
                 ffn_layer_scale: float = 0.1, ffn_drop_path: float = 0.0, code_noise: float = 0.05,
                 **attn_kwargs):
        super().__init__()
        self.code_noise = float(code_noise)
        self.attn = KernelModulatedAttention(dim, code_dim, num_heads, head_dim, **attn_kwargs)
        self.ffn = ModFFN(dim, ffn_hidden, code_dim, layer_scale=ffn_layer_scale, drop_path=ffn_drop_path)

    def forward(self, z_r: torch.Tensor, code_r: torch.Tensor, sig_r: Optional[torch.Tensor], z_s: torch.Tensor,
                code_s: torch.Tensor, sig_s: Optional[torch.Tensor]) -> torch.Tensor:
        if self.training and self.code_noise > 0:
            code_r = code_noise(code_r, self.code_noise)
            code_s = code_noise(code_s, self.code_noise)
        return self.ffn(self.attn(z_r, code_r, sig_r, z_s, code_s, sig_s), code_r)


def _check_tokens(name: str, t: torch.Tensor, count: int, dim: int) -> None:
    if t.dim() != 3 or t.shape[1] != count or t.shape[2] != dim:
        raise ValueError(f"NeuralAttentiveCircuit: {name} must be [B, {count}, {dim}], got {tuple(t.shape)}")


class NeuralAttentiveCircuit(nn.Module):
    """NAC with m2mKD stages; see the module docstring for the data flow and the stage API.

    Args (defaults = the Tiny-ImageNet configuration):
        img_size, in_chans, num_classes: input geometry and classes.
        embed_dim: D, the latent state width; ``code_dim`` defaults to D.
        tokenizer_dims, tokenizer_depths, stem_stride, pos_dim: the tokenizer (dims default (D/4, D/2)).
        num_input_latents, num_mediators, num_output_latents, num_iterations: U_in, U_m, U_out, T
            (T defaults to 8).
        num_stages: alternative to ``num_iterations`` (= T + 2).
        num_heads, head_dim, signature_dim: attention heads, their width, S.
        ffn_ratio: ModFFN hidden width / D (GEGLU doubles the first projection).
        truncation, temperature, eval_mode: propagator kernels (read-out: none, none).
        drop_path_rate: DropPath of every propagator's attention and FFN (read-in, read-out: 0).
        layer_scale, read_in_layer_scale: LayerScale inits (0.1 everywhere but the read-in attention, 1.0).
        code_noise: training code noise amount (0 disables).
        graph_prior, graph_kwargs: the mediators' prior (None: random normal signatures).
        prior_steps, prior_truncation, prior_lr, prior_seed: the signature fit.
        pool: "gumbel" (soft Gumbel-softmax, the seed's) or "softmax"; pool_temperature τ.
        drop_rate: dropout before the head.  backend: op backend of all NAC layers.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 64, in_chans: int = 3, num_classes: int = 200,
                 embed_dim: int = 384, code_dim: Optional[int] = None,
                 tokenizer_dims: Optional[Sequence[int]] = None, tokenizer_depths: Sequence[int] = (3, 3),
                 stem_stride: int = 4, pos_dim: int = 64,
                 num_input_latents: int = 64, num_mediators: int = 256, num_output_latents: int = 64,
                 num_iterations: Optional[int] = None, num_stages: Optional[int] = None,
                 num_heads: int = 6, head_dim: int = 64, signature_dim: int = 64, ffn_ratio: float = 2.0,
                 truncation: Optional[float] = 0.9, temperature: Optional[float] = 0.5, eval_mode: str = "no_sample",
                 drop_path_rate: float = 0.1, layer_scale: float = 0.1, read_in_layer_scale: float = 1.0,
                 code_noise: float = 0.05,
                 graph_prior: Optional[str] = "barabasi-albert", graph_kwargs: Optional[Dict[str, Any]] = None,
                 prior_steps: int = 1000, prior_truncation: float = 0.8, prior_lr: float = 1e-3,
                 prior_seed: Optional[int] = None,
                 pool: str = "gumbel", pool_temperature: float = 1.0, drop_rate: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        if num_stages is not None:
            if num_iterations is not None and num_iterations != num_stages - 2:
                raise ValueError(f"NAC: num_stages={num_stages} needs num_iterations={num_stages - 2}, got {num_iterations}")
            num_iterations = int(num_stages) - 2
        if num_iterations is None:
            num_iterations = 8
        if num_iterations < 0:
            raise ValueError(f"NAC: num_iterations must be >= 0 (num_stages >= 2), got {num_iterations}")
        if pool not in ("gumbel", "softmax"):
            raise ValueError(f"NAC: pool must be 'gumbel' or 'softmax', got {pool!r}")
        D = int(embed_dim)
        Dc = int(code_dim or D)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        dims = tuple(tokenizer_dims) if tokenizer_dims is not None else (D // 4, D // 2)
        hidden = int(round(ffn_ratio * D))
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.embed_dim = self.num_features = self.head_hidden_size = D
        self.code_dim, self.signature_dim, self.num_iterations = Dc, int(signature_dim), int(num_iterations)
        self.pool_type, self.pool_temperature = pool, float(pool_temperature)
        self.grad_checkpointing = False

        self.tokenizer = NACTokenizer(in_chans, img_size, dims, tokenizer_depths, stem_stride, pos_dim)
        self.input_latents = LatentSet(num_input_latents, Dc, signature_dim)
        self.mediator_latents = LatentSet(num_mediators, Dc, signature_dim)
        self.output_latents = LatentSet(num_output_latents, Dc, signature_dim)
        self.graph_prior = graph_prior
        if graph_prior is not None and not self.mediator_latents.signatures.is_meta:
            sig = graph_prior_signatures(graph_prior, num_mediators, signature_dim, steps=prior_steps,
                                         truncation=prior_truncation, lr=prior_lr, seed=prior_seed,
                                         **(graph_kwargs or {}))
            with torch.no_grad():
                self.mediator_latents.signatures.copy_(sig)
        self.seeder = LatentSeeder(D, Dc, code_noise=code_noise)
        self.read_in = NACReadIn(D, self.tokenizer.output_dim, Dc, num_heads, head_dim, hidden,
                                 layer_scale=read_in_layer_scale, ffn_layer_scale=layer_scale,
                                 code_noise=code_noise, backend=backend)
        self.propagators = nn.ModuleList(
            NACPropagator(D, Dc, num_heads, head_dim, hidden, ffn_layer_scale=layer_scale,
                          ffn_drop_path=drop_path_rate, code_noise=code_noise, signature_dim=signature_dim,
                          truncation=truncation, temperature=temperature, eval_mode=eval_mode,
                          layer_scale=layer_scale, drop_path=drop_path_rate, residual=True, sender_norm=False,
                          backend=backend)
            for _ in range(self.num_iterations))
        self.read_out = NACPropagator(D, Dc, num_heads, head_dim, hidden, ffn_layer_scale=layer_scale,
                                      ffn_drop_path=0.0, code_noise=code_noise, signature_dim=signature_dim,
                                      truncation=None, temperature=None, eval_mode="no_sample",
                                      layer_scale=layer_scale, drop_path=0.0, residual=False, sender_norm=True,
                                      backend=backend)
        self.pool_scorer = nn.Linear(D, 1)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(D, self.num_classes) if self.num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each read-in / propagator / read-out block in backward (outputs unchanged)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New head with ``num_classes`` outputs (0: identity). ``global_pool``: "gumbel"/"softmax"."""
        if global_pool is not None:
            if global_pool not in ("gumbel", "softmax"):
                raise ValueError(f"NAC: global_pool must be 'gumbel' or 'softmax', got {global_pool!r}")
            self.pool_type = global_pool
        self.num_classes = int(num_classes)
        ref = self.pool_scorer.weight
        self.head = (nn.Linear(self.embed_dim, self.num_classes, device=ref.device, dtype=ref.dtype)
                     if self.num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^tokenizer|^input_latents|^mediator_latents|^output_latents|^seeder",
                    blocks=[(r"^read_in", (0,)), (r"^propagators\.(\d+)", None), (r"^read_out|^pool_scorer", (99998,)),
                            (r"^head", (99999,))])

    # ----------------------------------------------------------------------------- stages
    @property
    def num_stages(self) -> int:
        return self.num_iterations + 2

    @property
    def stages(self) -> nn.ModuleList:
        """Views: [tokenizer + read-in, propagator 0, …, propagator T−1, read-out + pooling + head]."""
        views = [ModelStage(self, 0, dict(tokenizer=self.tokenizer, read_in=self.read_in), name="read_in")]
        for t, prop in enumerate(self.propagators):
            views.append(ModelStage(self, t + 1, dict(propagator=prop), name=f"propagator{t}"))
        views.append(ModelStage(self, self.num_stages - 1,
                                dict(read_out=self.read_out, pool_scorer=self.pool_scorer, head_drop=self.head_drop,
                                     head=self.head), name="read_out"))
        return nn.ModuleList(views)

    def _block(self, block: nn.Module, *args) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _senders(self, state: NACState):
        inp, med = self.input_latents, self.mediator_latents
        return (torch.cat([state.inputs, state.mediators], dim=1), torch.cat([inp.codes, med.codes], dim=0),
                torch.cat([inp.signatures, med.signatures], dim=0))

    def _check_state(self, state) -> NACState:
        if not isinstance(state, tuple) or len(state) != 2:
            raise TypeError(f"NeuralAttentiveCircuit: a stage > 0 takes a NACState (inputs, mediators), got {type(state).__name__}")
        state = NACState(*state)
        _check_tokens("state.inputs", state.inputs, self.input_latents.num_latents, self.embed_dim)
        _check_tokens("state.mediators", state.mediators, self.mediator_latents.num_latents, self.embed_dim)
        if state.inputs.shape[0] != state.mediators.shape[0]:
            raise ValueError("NeuralAttentiveCircuit: state.inputs and state.mediators have different batch sizes")
        return state

    def forward_read_in(self, x: torch.Tensor) -> NACState:
        """Stage 0: images → NACState (input latents after the read-in, mediators as seeded)."""
        tokens = self.tokenizer(x)
        batch = tokens.shape[0]
        inputs = self.seeder(self.input_latents.codes, batch)
        mediators = self.seeder(self.mediator_latents.codes, batch)
        inputs = self._block(self.read_in, inputs, self.input_latents.codes, tokens)
        return NACState(inputs, mediators)

    def forward_propagator(self, t: int, state: NACState) -> NACState:
        """Stage 1 + t: propagator t updates the mediators."""
        senders, codes_s, sig_s = self._senders(state)
        med = self.mediator_latents
        mediators = self._block(self.propagators[t], state.mediators, med.codes, med.signatures, senders, codes_s, sig_s)
        return NACState(state.inputs, mediators)

    def forward_read_out(self, state: NACState) -> torch.Tensor:
        """Read-out: NACState → output latent states ``[B, U_out, D]`` (before pooling)."""
        senders, codes_s, sig_s = self._senders(state)
        out = self.output_latents
        z = self.seeder(out.codes, senders.shape[0])
        return self._block(self.read_out, z, out.codes, out.signatures, senders, codes_s, sig_s)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Confidence-weighted sum of the output latents ``[B, U_out, D] → [B, D]``."""
        scores = self.pool_scorer(x)[..., 0]
        if self.pool_type == "gumbel":
            weights = F.gumbel_softmax(scores, tau=self.pool_temperature, hard=False, dim=-1)
        else:
            weights = torch.softmax(scores / self.pool_temperature, dim=-1)
        return torch.einsum("buc,bu->bc", x, weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images → output latent states ``[B, U_out, D]``."""
        return self.forward_read_out(self.forward(x, 0, self.num_stages - 1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Output latent states → pooled ``[B, D]`` (``pre_logits``) or logits."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def _forward_stage(self, i: int, x):
        last = self.num_stages - 1
        if i == 0:
            if x.dim() != 4:
                raise ValueError(f"NeuralAttentiveCircuit: stage 0 takes images [B, C, H, W], got shape {tuple(x.shape)}")
            return self.forward_read_in(x)
        state = self._check_state(x)
        if i < last:
            return self.forward_propagator(i - 1, state)
        return self.forward_head(self.forward_read_out(state))

    def forward(self, x, start: int = 0, end: Optional[int] = None):
        """Run stages ``[start, end)``: images in at 0, a NACState between stages, logits out of the last."""
        start, end = check_stage_range(start, end, self.num_stages)
        for i in range(start, end):
            x = self._forward_stage(i, x)
        return x

    # ----------------------------------------------------------------------------- regulariser
    def all_signatures(self) -> torch.Tensor:
        """Input, mediator and output signatures stacked ``[U_in + U_m + U_out, S]``."""
        return torch.cat([self.input_latents.signatures, self.mediator_latents.signatures,
                          self.output_latents.signatures], dim=0)

    def signature_regulariser(self, weight: float = 0.1, hinge: float = 0.4) -> torch.Tensor:
        """weight × (−Σ_{i<j, d_ij < hinge} d_ij), d = 1 − cos over all signatures (no β): pushes
        signatures closer than ``hinge`` apart (the seed's SignatureHingeRepulsion, weight 0.1)."""
        d = cosine_distance(self.all_signatures())
        n = d.shape[0]
        lower = torch.tril(torch.ones(n, n, dtype=torch.bool, device=d.device), diagonal=-1)
        d = d[lower]
        close = d.detach() < hinge
        return -weight * d[close].sum()


# --------------------------------------------------------------------------------- registry
_TINY = dict(img_size=64, in_chans=3, num_classes=200, embed_dim=384, stem_stride=4, pos_dim=64,
             num_input_latents=64, num_mediators=256, num_output_latents=64, num_iterations=8, num_heads=6,
             head_dim=64, signature_dim=64, ffn_ratio=2.0, graph_prior="barabasi-albert", graph_kwargs=dict(m=2))
_IMNET = dict(img_size=224, in_chans=3, num_classes=1000, embed_dim=512, stem_stride=4, pos_dim=64,
              num_input_latents=192, num_mediators=768, num_output_latents=64, num_iterations=8, num_heads=8,
              head_dim=64, signature_dim=64, ffn_ratio=1.0, graph_prior="barabasi-albert", graph_kwargs=dict(m=6))
_MICRO = dict(img_size=28, in_chans=1, num_classes=10, embed_dim=64, tokenizer_dims=(16, 32), stem_stride=2,
              pos_dim=16, num_input_latents=16, num_mediators=32, num_output_latents=8, num_iterations=2, num_heads=2,
              head_dim=32, signature_dim=16, ffn_ratio=2.0, graph_prior="barabasi-albert", graph_kwargs=dict(m=2),
              prior_steps=200)
_PRIORS = {
    "tiny": {"erdos_renyi": ("erdos-renyi", dict(p=0.1)),
             "planted_partition": ("planted-partition", dict(l=8, k=32, p_in=0.9, p_out=0.2)),
             "ring_of_cliques": ("ring-of-cliques", dict(num_cliques=8, clique_size=32))},
    "imagenet": {"erdos_renyi": ("erdos-renyi", dict(p=0.1)),
                 "planted_partition": ("planted-partition", dict(l=12, k=64, p_in=0.9, p_out=0.2)),
                 "ring_of_cliques": ("ring-of-cliques", dict(num_cliques=12, clique_size=64))},
}


def _nac_cfg(input_size, num_classes, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **kwargs):
    return {"url": "", "num_classes": num_classes, "input_size": input_size, "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": mean, "std": std,
            "first_conv": "tokenizer.stem.0", "classifier": "head", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    **{name: _nac_cfg((3, 64, 64), 200) for name in
       ["nac_tinyimagenet"] + [f"nac_tinyimagenet_{p}" for p in _PRIORS["tiny"]]},
    **{name: _nac_cfg((3, 224, 224), 1000) for name in
       ["nac_imagenet"] + [f"nac_imagenet_{p}" for p in _PRIORS["imagenet"]]},
    "nac_micro": _nac_cfg((1, 28, 28), 10, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, crop_pct=1.0,
                          interpolation="bilinear"),
})


def _create_nac(variant: str, preset: dict, pretrained: bool = False, prior: Optional[tuple] = None,
                **kwargs) -> NeuralAttentiveCircuit:
    check_pretrained(variant, pretrained, kwargs)
    args = dict(preset)
    if prior is not None:
        args["graph_prior"], args["graph_kwargs"] = prior
    if "graph_prior" in kwargs and "graph_kwargs" not in kwargs:
        args.pop("graph_kwargs", None)
    if "num_stages" in kwargs and "num_iterations" not in kwargs:
        args.pop("num_iterations", None)
    args.update(kwargs)
    return build_model_with_cfg(NeuralAttentiveCircuit, variant, pretrained, **args)


@register_model
def nac_tinyimagenet(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for Tiny-ImageNet (64 px, 200 classes), Barabási–Albert prior (n=256, m=2); 10 stages."""
    return _create_nac("nac_tinyimagenet", _TINY, pretrained, **kwargs)


@register_model
def nac_tinyimagenet_erdos_renyi(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for Tiny-ImageNet with an Erdős–Rényi prior (p=0.1)."""
    return _create_nac("nac_tinyimagenet_erdos_renyi", _TINY, pretrained, _PRIORS["tiny"]["erdos_renyi"], **kwargs)


@register_model
def nac_tinyimagenet_planted_partition(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for Tiny-ImageNet with a planted-partition prior (8×32, p_in 0.9, p_out 0.2)."""
    return _create_nac("nac_tinyimagenet_planted_partition", _TINY, pretrained, _PRIORS["tiny"]["planted_partition"],
                       **kwargs)


@register_model
def nac_tinyimagenet_ring_of_cliques(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for Tiny-ImageNet with a ring-of-cliques prior (8 cliques of 32)."""
    return _create_nac("nac_tinyimagenet_ring_of_cliques", _TINY, pretrained, _PRIORS["tiny"]["ring_of_cliques"],
                       **kwargs)


@register_model
def nac_imagenet(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for ImageNet (224 px, 1000 classes), Barabási–Albert prior (n=768, m=6); 10 stages."""
    return _create_nac("nac_imagenet", _IMNET, pretrained, **kwargs)


@register_model
def nac_imagenet_erdos_renyi(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for ImageNet with an Erdős–Rényi prior (p=0.1)."""
    return _create_nac("nac_imagenet_erdos_renyi", _IMNET, pretrained, _PRIORS["imagenet"]["erdos_renyi"], **kwargs)


@register_model
def nac_imagenet_planted_partition(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for ImageNet with a planted-partition prior (12×64, p_in 0.9, p_out 0.2)."""
    return _create_nac("nac_imagenet_planted_partition", _IMNET, pretrained,
                       _PRIORS["imagenet"]["planted_partition"], **kwargs)


@register_model
def nac_imagenet_ring_of_cliques(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """NAC for ImageNet with a ring-of-cliques prior (12 cliques of 64)."""
    return _create_nac("nac_imagenet_ring_of_cliques", _IMNET, pretrained, _PRIORS["imagenet"]["ring_of_cliques"],
                       **kwargs)


@register_model
def nac_micro(pretrained: bool = False, **kwargs) -> NeuralAttentiveCircuit:
    """CPU preset: 28×28×1, 10 classes, D=64, 16/32/8 latents, 2 propagators (4 stages)."""
    return _create_nac("nac_micro", _MICRO, pretrained, **kwargs)
