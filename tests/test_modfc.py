"""ModFC, ModFFN and the code noise (docs/design.md §2.2, §2.6)."""

import math

import pytest
import torch
import torch.nn.functional as F

from m2mkd_fast.layers.modfc import ModFC, ModFFN, code_noise
from m2mkd_fast.reference.modfc import modfc
from tolerance import assert_close_to_reference


def test_reference_modfc_hand_computed():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)  # N=1, in=2
    code = torch.tensor([[1.0]], dtype=torch.float64)  # Dc=1
    scale_weight = torch.tensor([[3.0], [1.0]], dtype=torch.float64)  # S·c = [3, 1]: mean 2, var 1
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, -0.5], dtype=torch.float64)
    normed = 1 / math.sqrt(1 + 1e-5)  # LN([3, 1]) = [+1, -1] / sqrt(1 + eps)
    s = [1 + 0.1 * normed, 1 - 0.1 * normed]
    expected = torch.tensor([[1 * s[0] + 2 * s[1] + 0.5, 2 * s[0] - 2 * s[1] - 0.5]], dtype=torch.float64)
    out = modfc(x, code, weight, bias, scale_weight, torch.tensor(0.1, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    # gain 0: a plain linear layer
    torch.testing.assert_close(modfc(x, code, weight, None, scale_weight, 0.0), x @ weight.t(), rtol=0, atol=0)


def test_layer_matches_reference_forward_and_grads():
    layer = ModFC(6, 5, 4).double()
    with torch.no_grad():
        layer.bias.normal_()
        layer.gain.fill_(0.7)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    code = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    out = layer(x, code)
    assert out.shape == (3, 7, 5)
    params = [layer.weight, layer.bias, layer.code_proj.weight, layer.gain]
    ref = modfc(x, code, *params[:2], params[2], params[3])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, code] + params, grad)
    want = torch.autograd.grad(ref, [x, code] + params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.scale(code), 1 + layer.gain * F.layer_norm(code @ layer.code_proj.weight.t(), (6,)))


def test_layer_init_and_options():
    layer = ModFC(8, 3, 5)
    assert layer.weight.shape == (3, 8) and layer.code_proj.weight.shape == (8, 5) and layer.code_proj.bias is None
    assert layer.gain.shape == () and layer.gain.item() == pytest.approx(0.1)
    assert torch.count_nonzero(layer.bias) == 0
    assert ModFC(8, 3, 5, bias=False).bias is None
    assert ModFC(8, 3, 5, gain_init=0.3).gain.item() == pytest.approx(0.3)
    # one code per token, shared over leading batch dims
    x = torch.randn(2, 4, 8)
    code = torch.randn(4, 5)
    out = layer(x, code)
    torch.testing.assert_close(out[1], layer(x[1], code))
    torch.testing.assert_close(out[:, 2:3], layer(x[:, 2:3], code[2:3]))


def test_gradcheck_float64():
    layer = ModFC(4, 3, 2).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    code = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: layer(x, c), (x, code))


def test_code_noise_bounds_and_gradient():
    code = torch.randn(64, 32, requires_grad=True)
    noisy = code_noise(code, 0.05)
    delta = (noisy - code).detach()
    assert (delta.abs() <= 0.05 * code.detach().abs() + 1e-7).all()
    assert torch.count_nonzero(delta) > 0.99 * delta.numel()
    # values spread over the whole interval, both signs
    ratio = delta / (0.05 * code.detach().abs())
    assert ratio.min() < -0.9 and ratio.max() > 0.9
    (grad,) = torch.autograd.grad(noisy.sum(), code)
    torch.testing.assert_close(grad, torch.ones_like(code))
    assert code_noise(code, 0.0) is code
    zero = torch.zeros(3, 4)
    assert torch.equal(code_noise(zero), zero)
    torch.manual_seed(5)
    a = code_noise(code.detach())
    torch.manual_seed(5)
    assert torch.equal(a, code_noise(code.detach()))


def _layer_norm_by_hand(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)  # biased, as LayerNorm
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def _modfc_by_hand(params: dict, prefix: str, x, code):
    """W · (x ⊙ (1 + γ · LN(S · c))) + b from the parameters named ``prefix`` + weight, bias, ..."""
    projected = code @ params[prefix + "code_proj.weight"].t()
    scale = 1 + params[prefix + "gain"] * _layer_norm_by_hand(projected, eps=1e-5)
    return (x * scale) @ params[prefix + "weight"].t() + params[prefix + "bias"]


def _modffn_by_hand(ffn: ModFFN, x, code, dtype=None):
    """docs/design.md §2.6 written out, in ``dtype`` (default: x's): LN → ModFC(D→2h) → GEGLU (first half
    the value, exact GELU of the second) → ModFC(h→D) → LayerScale → residual; no DropPath."""
    dtype = dtype or x.dtype
    params = {name: p.detach().to(dtype) for name, p in ffn.named_parameters()}
    x, code = x.detach().to(dtype), code.detach().to(dtype)
    h = _layer_norm_by_hand(x, params["norm.weight"], params["norm.bias"], eps=ffn.norm.eps)
    h = _modfc_by_hand(params, "fc1.", h, code)
    hidden = h.shape[-1] // 2
    value, gate = h[..., :hidden], h[..., hidden:]
    h = value * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))  # exact GELU of the second half
    h = _modfc_by_hand(params, "fc2.", h, code)
    return x + params["layer_scale.gamma"] * h


def test_modffn_matches_hand_computation():
    ffn = ModFFN(12, 20, 6, layer_scale=0.1).double()
    assert ffn.fc1.weight.shape == (40, 12) and ffn.fc2.weight.shape == (12, 20)
    torch.testing.assert_close(ffn.layer_scale.gamma, torch.full((12,), 0.1, dtype=torch.float64))
    with torch.no_grad():
        for p in ffn.parameters():  # every parameter off its initial value: wiring mistakes show
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    code = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(ffn(x, code), _modffn_by_hand(ffn, x, code), rtol=0, atol=1e-12)


def test_modffn_backward_and_drop_path():
    ffn = ModFFN(8, 16, 4, drop_path=0.5)
    with torch.no_grad():
        for p in ffn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(16, 5, 8, requires_grad=True)
    code = torch.randn(5, 4, requires_grad=True)
    out = ffn(x, code)
    assert out.shape == x.shape
    out.square().sum().backward()
    for name, p in ffn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and torch.count_nonzero(p.grad) > 0, name
    assert x.grad is not None and code.grad is not None
    want64 = _modffn_by_hand(ffn, x, code, torch.float64)  # no DropPath
    want32 = _modffn_by_hand(ffn, x, code, torch.float32)
    # training: a dropped sample keeps only the residual, a kept one its branch scaled by 1/(1 − 0.5)
    out = out.detach()
    dropped = (out == x.detach()).flatten(1).all(1)
    assert dropped.any() and not dropped.all()
    kept = ~dropped
    branch = out[kept] - x.detach()[kept]
    assert_close_to_reference(branch, 2 * (want64 - x.double())[kept], 2 * (want32 - x.detach())[kept], name="kept branch")
    # eval: no drop, deterministic, the hand computation
    ffn.eval()
    got = ffn(x, code)
    assert torch.equal(got, ffn(x, code))
    assert_close_to_reference(got.detach(), want64, want32, name="eval output")
