"""MoEMLP: shapes, gradients for every parameter, noise and determinism, stats, aux loss, init."""

import math

import pytest
import torch

from m2mkd_fast.layers.moe import MoEMLP
from m2mkd_fast.reference.moe import moe_mlp as ref_moe_mlp
from m2mkd_fast.reference.routing import route as ref_route
from m2mkd_fast.reference.routing import vmoe_aux_loss as ref_aux_loss
from tolerance import assert_close_to_reference

CONFIGS = [
    dict(gate="vmoe"),
    dict(gate="vmoe", capacity_factor=0.5, batch_priority=True, group_size=7),
    dict(gate="vmoe", k=1, capacity_factor=1.0, activation="gelu_tanh"),
    dict(gate="naive"),
    dict(gate="naive", k=3, capacity_factor=0.75, group_size=14),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_shapes_grads_and_stats(config):
    layer = MoEMLP(16, 24, 4, **config)
    x = torch.randn(2, 14, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y.square().mean() + layer.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert x.grad is not None
    k = config.get("k", 2)
    load, dropped = layer.stats["load"], layer.stats["dropped"]
    assert load.shape == dropped.shape == (4,) and load.dtype == dropped.dtype == torch.int64
    assert int(load.sum() + dropped.sum()) == 28 * k
    if config.get("capacity_factor") is None:
        assert dropped.sum() == 0
    assert layer.aux_loss.dim() == 0
    if config["gate"] == "naive":
        assert layer.aux_loss.item() == 0
        assert {n for n, _ in layer.named_parameters()} == {"gate_weight", "gate_bias", "w1", "b1", "w2", "b2"}
    else:
        assert layer.aux_loss.item() > 0
        assert {n for n, _ in layer.named_parameters()} == {"gate_weight", "w1", "b1", "w2", "b2"}


def test_every_parameter_gets_a_gradient_even_unused_experts():
    layer = MoEMLP(8, 12, 6, k=1, gate="naive")
    with torch.no_grad():
        layer.gate_bias.copy_(torch.tensor([50.0, -50, -50, -50, -50, -50]))  # all tokens → expert 0
    y = layer(torch.randn(10, 8))
    y.sum().backward()
    assert layer.stats["load"].tolist() == [10, 0, 0, 0, 0, 0]
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad[1:].abs().sum() == 0 and grad[0].abs().sum() > 0, name


def test_dropping_is_reported():
    layer = MoEMLP(8, 12, 4, k=2, capacity_factor=0.25, group_size=16).eval()
    layer(torch.randn(32, 8))
    # C = ceil(16·2·0.25/4) = 2 → 4 per expert per group: at most 2 groups × 4 × 4 = 32 of 64 kept.
    assert int(layer.stats["load"].sum()) <= 32
    assert int(layer.stats["dropped"].sum()) == 64 - int(layer.stats["load"].sum())
    assert (layer.stats["load"] <= 8).all()


def test_eval_is_deterministic_and_training_is_noisy():
    layer = MoEMLP(16, 32, 8, k=2)
    x = torch.randn(40, 16)
    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.equal(a, b)  # σ = 1/E noise changes gates (and maybe choices)
    quiet = MoEMLP(16, 32, 8, k=2, noise_std=0.0)
    quiet.load_state_dict(layer.state_dict())
    torch.manual_seed(1)
    c = quiet(x)
    torch.manual_seed(2)
    assert torch.equal(c, quiet(x))
    assert torch.equal(c, layer.eval()(x))


@pytest.mark.parametrize("gate", ["vmoe", "naive"])
def test_eval_output_and_aux_loss_match_the_oracle(gate):
    layer = MoEMLP(12, 20, 5, k=2, gate=gate, capacity_factor=0.8, batch_priority=True, group_size=9).eval()
    x = torch.randn(3, 9, 12)
    y = layer(x)
    tokens = x.reshape(-1, 12)
    out = {}
    for dt in (torch.float32, torch.float64):
        p = {n: v.detach().to(dt) for n, v in layer.named_parameters()}
        logits = tokens.to(dt) @ p["gate_weight"] + (p["gate_bias"] if gate == "naive" else 0)
        r = ref_route(logits, 2, gate, 0.8, True, 9)
        out[dt] = ref_moe_mlp(tokens.to(dt), r, p["w1"], p["b1"], p["w2"], p["b2"])
        if dt == torch.float32:
            assert torch.equal(layer.stats["load"], r.counts)
            if gate == "vmoe":
                want = ref_aux_loss(logits, None, 2, 1.0, group_size=9, training=False)
                torch.testing.assert_close(layer.aux_loss, want)
    assert_close_to_reference(y.reshape(-1, 12), out[torch.float64], out[torch.float32])


def test_training_aux_loss_matches_oracle_with_the_same_noise():
    layer = MoEMLP(12, 20, 4, k=2, group_size=8)
    x = torch.randn(16, 12)
    torch.manual_seed(5)
    layer(x)
    clean = x @ layer.gate_weight.detach()
    torch.manual_seed(5)
    noisy = clean + 0.25 * torch.randn_like(clean)  # σ = 1/E
    want = ref_aux_loss(clean, noisy, 2, 1.0, group_size=8, training=True)
    torch.testing.assert_close(layer.aux_loss.detach(), want, rtol=1e-5, atol=1e-8)


def test_bfloat16_router_runs_in_float32():
    layer = MoEMLP(16, 32, 4).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert layer.aux_loss.dtype == torch.float32
    (y.float().sum() + layer.aux_loss).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in layer.parameters())


def test_empty_batch():
    layer = MoEMLP(8, 12, 4)
    x = torch.randn(0, 3, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 8)
    (y.sum() + layer.aux_loss).backward()
    assert layer.stats["load"].tolist() == [0, 0, 0, 0]
    assert all(p.grad is not None for p in layer.parameters())


def test_initialisation_follows_the_seed():
    torch.manual_seed(0)
    layer = MoEMLP(64, 256, 4)
    assert layer.b1.abs().sum() == 0 and layer.b2.abs().sum() == 0
    # kaiming_uniform(a=√5) as nn.Linear: U(−1/√fan_in, 1/√fan_in), fan_in = the input width.
    for w, fan_in in ((layer.w1, 64), (layer.w2, 256)):
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert layer.gate_weight.std().item() == pytest.approx(0.02, rel=0.1)  # timm's trunc_normal_(std=.02)


def test_extra_repr_and_validation():
    text = repr(MoEMLP(16, 32, 8, k=2, capacity_factor=1.05, group_size=4, batch_priority=True))
    for part in ("dim=16", "hidden_dim=32", "num_experts=8", "k=2", "gate='vmoe'", "capacity_factor=1.05", "batch_priority=True", "noise_std=1", "group_size=4"):
        assert part in text, part
    assert "dropless" in repr(MoEMLP(16, 32, 8, gate="naive")) and "noise_std=0" in repr(MoEMLP(16, 32, 8, gate="naive"))
    with pytest.raises(ValueError, match="k=3 > num_experts=2"):
        MoEMLP(8, 8, 2, k=3)
    with pytest.raises(ValueError, match="gate must be one of"):
        MoEMLP(8, 8, 2, gate="switch")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEMLP(8, 8, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="activation"):
        MoEMLP(8, 8, 2, activation="relu")
    with pytest.raises(ValueError, match="noise_std"):
        MoEMLP(8, 8, 2, noise_std=-1.0)
    with pytest.raises(ValueError, match=r"x must be \[..., dim=8\]"):
        MoEMLP(8, 8, 2)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="group_size=4 must divide"):
        MoEMLP(8, 8, 2, group_size=4)(torch.randn(6, 8))


def test_fastmoe_state_dict_conversion():
    layer = MoEMLP(8, 12, 3, gate="naive")
    fastmoe = {
        "mlp.gate.gate.weight": layer.gate_weight.detach().t().clone(),
        "mlp.gate.gate.bias": torch.randn(3),
        "mlp.experts.htoh4.weight": layer.w1.detach().transpose(1, 2).clone(),
        "mlp.experts.htoh4.bias": torch.randn(3, 12),
        "mlp.experts.h4toh.weight": layer.w2.detach().transpose(1, 2).clone(),
        "mlp.experts.h4toh.bias": torch.randn(3, 8),
    }
    other = MoEMLP(8, 12, 3, gate="naive")
    other.load_state_dict(MoEMLP.convert_fastmoe_state_dict(fastmoe, prefix="mlp."))
    assert torch.equal(other.w1, layer.w1) and torch.equal(other.w2, layer.w2)
    assert torch.equal(other.gate_weight, layer.gate_weight)
    assert torch.equal(other.gate_bias, fastmoe["mlp.gate.gate.bias"])


def test_compiled_layer_matches_eager(compiler="aot_eager"):
    """torch.compile(fullgraph=True): one graph through routing, the MoE custom op and its backward."""
    torch._dynamo.reset()
    layer = MoEMLP(16, 32, 4, k=2, capacity_factor=1.0, batch_priority=True, group_size=8, noise_std=0.0)
    x = torch.randn(24, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    y = compiled(x)
    (y.square().sum() + compiled.aux_loss).backward()
    grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    stats = dict(layer.stats)
    layer.zero_grad()
    x.grad = None
    y0 = layer(x)
    (y0.square().sum() + layer.aux_loss).backward()
    torch.testing.assert_close(y, y0)
    for got, want in zip(grads, [p.grad for p in layer.parameters()] + [x.grad]):
        torch.testing.assert_close(got, want)
    assert torch.equal(stats["load"], layer.stats["load"]) and torch.equal(stats["dropped"], layer.stats["dropped"])
