"""NAC's attention layers: ReadInAttention and KernelModulatedAttention (docs/design.md §2.3, §2.4)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from m2mkd_fast.layers import KernelModulatedAttention, ReadInAttention
from m2mkd_fast.reference.graph import graph_attention as ref_graph
from m2mkd_fast.reference.modfc import modfc
from tolerance import TINY_ATOL, assert_close_to_reference


def _modfc_of(layer, x, code):
    return modfc(x, code, layer.weight, layer.bias, layer.code_proj.weight, layer.gain)


def _randomise(module: torch.nn.Module) -> None:
    """Move every parameter off its initial value so that wiring mistakes show."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)


# ---------------------------------------------------------------- read-in


def _readin_seed_form(layer: ReadInAttention, z, code, x):
    """The seed's read-in: per-(token, latent) keys and values from ModFC(x̂[b,v], c[u])."""
    batch, receivers, _ = z.shape
    senders = x.shape[1]
    heads, head_dim = layer.num_heads, layer.head_dim
    x_hat = F.layer_norm(x, x.shape[-1:], layer.norm_sender.weight, layer.norm_sender.bias)
    z_hat = F.layer_norm(z, z.shape[-1:], layer.norm_receiver.weight, layer.norm_receiver.bias)
    q = _modfc_of(layer.q, z_hat, code).view(batch, receivers, heads, head_dim)
    pairs = x_hat[:, :, None, :].expand(batch, senders, receivers, x.shape[-1])  # [B,V,U,Din]
    keys = _modfc_of(layer.k, pairs, code).view(batch, senders, receivers, heads, head_dim)
    values = _modfc_of(layer.v, pairs, code).view(batch, senders, receivers, heads, head_dim)
    attn = torch.softmax(torch.einsum("buhc,bvuhc->bhuv", q, keys) / math.sqrt(head_dim), dim=-1)
    m = torch.einsum("bhuv,bvuhc->buhc", attn, values).reshape(batch, receivers, heads * head_dim)
    return z + layer.layer_scale.gamma * _modfc_of(layer.exit, m, code)


def test_readin_matches_the_seed_formulation():
    layer = ReadInAttention(12, 10, 6, num_heads=3, head_dim=4, backend="torch").double()
    _randomise(layer)
    z = torch.randn(2, 5, 12, dtype=torch.float64)
    code = torch.randn(5, 6, dtype=torch.float64)
    x = torch.randn(2, 7, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(z, code, x), _readin_seed_form(layer, z, code, x), rtol=0, atol=1e-12)


def test_readin_shapes_parameters_and_backward():
    layer = ReadInAttention(16, 24, 8, num_heads=2, head_dim=8, backend="torch")
    names = {n for n, _ in layer.named_parameters()}
    assert {"norm_sender.weight", "norm_receiver.weight", "q.weight", "k.weight", "v.weight", "exit.weight", "exit.bias", "layer_scale.gamma"} <= names
    assert layer.q.bias is None and layer.k.bias is None and layer.v.bias is None
    assert torch.all(layer.layer_scale.gamma == 1.0)
    z = torch.randn(3, 7, 16, requires_grad=True)
    code = torch.randn(7, 8, requires_grad=True)
    x = torch.randn(3, 11, 24, requires_grad=True)
    out = layer(z, code, x)
    assert out.shape == (3, 7, 16)
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(t.grad is not None for t in (z, code, x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readin_autocast_bf16(seed):
    """The layer's contribution out − z under bf16 autocast against float64, by the tolerance rule:
    error ≤ 2 × that of the seed formulation run under the same autocast (+ bf16 atol)."""
    torch.manual_seed(seed)
    layer = ReadInAttention(16, 24, 8, num_heads=2, head_dim=8, backend="torch")
    _randomise(layer)
    z, code, x = torch.randn(2, 5, 16), torch.randn(5, 8), torch.randn(2, 9, 24)
    layer64 = copy.deepcopy(layer).double()
    want64 = _readin_seed_form(layer64, z.double(), code.double(), x.double()) - z.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(z, code, x)
        ref = _readin_seed_form(layer, z, code, x)
    assert got.shape == z.shape and ref.dtype == got.dtype
    assert_close_to_reference(got - z, want64, ref - z, atol=TINY_ATOL[torch.bfloat16], name="read-in contribution")
    # the bf16 error is real (autocast did compute in bf16) and the contribution is not tiny
    assert (ref - z - want64).abs().max() > 1e-4 and want64.abs().max() > 0.5


# ---------------------------------------------------------------- kernel-modulated attention


def _kma_inputs(batch=2, receivers=5, senders=7, dim=12, code=6, sig=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(batch, receivers, dim), r(receivers, code), r(receivers, sig), r(batch, senders, dim), r(senders, code), r(senders, sig)


def _kma_by_hand(layer, z_r, c_r, s_r, z_s, c_s, s_s, **mode):
    heads, head_dim = layer.num_heads, layer.head_dim
    norm_s = layer.norm_sender or layer.norm_receiver
    zr = F.layer_norm(z_r, z_r.shape[-1:], layer.norm_receiver.weight, layer.norm_receiver.bias)
    zs = F.layer_norm(z_s, z_s.shape[-1:], norm_s.weight, norm_s.bias)

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    q, k, v = split(_modfc_of(layer.q, zr, c_r)), split(_modfc_of(layer.k, zs, c_s)), split(_modfc_of(layer.v, zs, c_s))
    if s_r is None:
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        m = attn @ v
    else:
        m = ref_graph(q, k, v, s_r, s_s, layer.bandwidth, truncation=layer.truncation, **mode)
    m = m.transpose(1, 2).reshape(z_r.shape[0], z_r.shape[1], heads * head_dim)
    out = layer.layer_scale.gamma * _modfc_of(layer.exit, m, c_r)
    return z_r + out if layer.residual else out


@pytest.mark.parametrize("sender_norm", [False, True])
def test_kma_eval_modes_match_the_oracle(sender_norm):
    layer = KernelModulatedAttention(12, 6, 3, 4, signature_dim=8, sender_norm=sender_norm, backend="torch").double()
    _randomise(layer)
    with torch.no_grad():
        layer.bandwidth.fill_(0.8)
    inputs = _kma_inputs(dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(*inputs), _kma_by_hand(layer, *inputs), rtol=0, atol=1e-12)
    layer.eval_mode = "threshold"
    torch.testing.assert_close(layer(*inputs), _kma_by_hand(layer, *inputs, threshold=True), rtol=0, atol=1e-12)
    no_kernel = inputs[:2] + (None,) + inputs[3:5] + (None,)
    torch.testing.assert_close(layer(*no_kernel), _kma_by_hand(layer, *no_kernel), rtol=0, atol=1e-12)


def test_kma_sampling_is_seeded_by_torch_default_generator():
    layer = KernelModulatedAttention(12, 6, 3, 4, signature_dim=8, backend="torch")
    inputs = _kma_inputs()
    layer.train()
    torch.manual_seed(3)
    a = layer(*inputs)
    b = layer(*inputs)
    torch.manual_seed(3)
    assert torch.equal(a, layer(*inputs))  # reproducible under torch.manual_seed
    assert not torch.equal(a, b)  # a fresh sample per call
    # the drawn seed is what the op receives
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, ()))
    layer.eval()
    layer.eval_mode = "sample"
    torch.manual_seed(3)
    got = layer(*inputs)
    torch.testing.assert_close(got, _kma_by_hand(layer, *inputs, temperature=layer.temperature, seed=seed), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, got, rtol=0, atol=0)
    layer.eval_mode = "no_sample"
    assert torch.equal(layer(*inputs), layer(*inputs))  # eval default: deterministic


def test_kma_gradients_reach_every_parameter_and_input():
    layer = KernelModulatedAttention(12, 6, 3, 4, signature_dim=8, drop_path=0.1, backend="torch").train()
    leaves = [t.requires_grad_() for t in _kma_inputs(batch=4)]
    layer(*leaves).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.bandwidth.grad.abs() > 0
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    # threshold eval mode: no gradient to the signatures or the bandwidth
    layer.eval()
    layer.eval_mode = "threshold"
    layer.zero_grad()
    for t in leaves:
        t.grad = None
    layer(*leaves).square().sum().backward()
    assert layer.bandwidth.grad is None or layer.bandwidth.grad == 0
    assert leaves[2].grad is None and leaves[5].grad is None and leaves[0].grad is not None


def test_kma_options():
    readout = KernelModulatedAttention(12, 6, 3, 4, signature_dim=8, truncation=None, residual=False, sender_norm=True, backend="torch")
    assert readout.norm_sender is not None and readout.truncation is None
    assert readout.bandwidth.item() == 1.0 and torch.all(readout.layer_scale.gamma == 0.1)
    inputs = _kma_inputs()
    readout.eval()
    out = readout(*inputs)
    assert out.shape == inputs[0].shape
    torch.testing.assert_close(out, _kma_by_hand(readout, *inputs), rtol=1e-5, atol=1e-6)
    layer = KernelModulatedAttention(12, 6, 3, 4, bandwidth_init=2.0, layer_scale=0.5)
    assert layer.bandwidth.item() == 2.0 and torch.all(layer.layer_scale.gamma == 0.5) and layer.norm_sender is None
    with pytest.raises(ValueError, match="eval_mode must be one of"):
        KernelModulatedAttention(12, 6, 3, 4, eval_mode="mean")
    with pytest.raises(ValueError, match="needs a temperature"):
        KernelModulatedAttention(12, 6, 3, 4, eval_mode="sample", temperature=None)
    with pytest.raises(ValueError, match="give both sig_r and sig_s"):
        layer(*inputs[:5], None)


def test_kma_deterministic_when_temperature_is_none():
    layer = KernelModulatedAttention(12, 6, 3, 4, temperature=None, backend="torch").train()
    inputs = _kma_inputs()
    assert torch.equal(layer(*inputs), layer(*inputs))


@pytest.mark.parametrize("mode", ["no_sample", "threshold", "sample", "no_kernel"])
def test_kma_autocast_bf16(mode):
    """The contribution out − z_r under bf16 autocast against float64, by the tolerance rule:
    error ≤ 2 × that of the by-hand computation (oracle graph attention) under the same autocast."""
    layer = KernelModulatedAttention(12, 6, 3, 4, signature_dim=8, backend="torch").eval()
    _randomise(layer)
    with torch.no_grad():
        layer.bandwidth.fill_(0.75)  # bf16-representable, as are the inputs: the layer casts the
        layer.layer_scale.gamma.fill_(1.0)  # signatures and β to q's dtype, and a rounded distance
    layer.eval_mode = "sample" if mode == "no_kernel" else mode  # flips edges at τ and at β·ln 2
    inputs = tuple(t.bfloat16().float() for t in _kma_inputs())
    if mode == "no_kernel":
        inputs = inputs[:2] + (None,) + inputs[3:5] + (None,)
    kwargs = {"threshold": dict(threshold=True), "sample": dict(temperature=layer.temperature, seed=None)}.get(mode, {})
    if mode == "sample":
        torch.manual_seed(11)
        kwargs["seed"] = int(torch.randint(0, 2**62, ()))  # what the layer draws after manual_seed(11)
    layer64 = copy.deepcopy(layer).double()
    inputs64 = tuple(None if t is None else t.double() for t in inputs)
    z = inputs[0]
    want64 = _kma_by_hand(layer64, *inputs64, **kwargs) - z.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(11)
        got = layer(*inputs)
        ref = _kma_by_hand(layer, *inputs, **kwargs)
    assert got.shape == z.shape
    assert_close_to_reference(got - z, want64, ref - z, atol=TINY_ATOL[torch.bfloat16], name=f"contribution ({mode})")
    assert (ref - z - want64).abs().max() > 1e-4 and want64.abs().max() > 0.5


def test_kma_compiles_fullgraph_in_eval():
    """torch.compile(fullgraph=True) through the layer, the op and the torch backend (eval
    modes; tests/test_compile.py covers training)."""
    torch._dynamo.reset()
    layer = KernelModulatedAttention(12, 6, 3, 4, signature_dim=8, backend="torch").eval()
    leaves = [t.requires_grad_() for t in _kma_inputs()]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()] + [t.grad.clone() for t in leaves]
    layer.zero_grad()
    for t in leaves:
        t.grad = None
    want = layer(*leaves)
    want.square().sum().backward()
    torch.testing.assert_close(out, want)
    for got, ref in zip(grads, [p.grad for p in layer.parameters()] + [t.grad for t in leaves]):
        torch.testing.assert_close(got, ref)
