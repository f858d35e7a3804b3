"""Mixed precision (docs/design.md §2.7): float32 routing under autocast, matmul ops that follow
autocast on every backend, fp16 safety, and every op × backend × precision against float64."""

import pytest
import torch

from m2mkd_fast.backend import available_backends
from m2mkd_fast.layers.moe import MoEMLP

BACKENDS = available_backends("cpu")
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _layer_call(layer, x, seed, autocast_dtype=None):
    """(y, aux_loss, load, dropped, expert choices) of one MoEMLP call."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = layer(x)
    return y, layer.aux_loss, layer.stats["load"], layer.stats["dropped"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("training", [False, True])
def test_moe_layer_routes_in_float32_under_autocast(backend, autocast_dtype, training):
    """The issue's case (7 of 200 tokens changed experts under bf16 routing): under autocast the
    layer makes exactly the float32 decisions, its aux loss is float32, its output the autocast dtype."""
    torch.manual_seed(0)
    layer = MoEMLP(64, 128, 8, k=2, capacity_factor=1.05, backend=backend).train(training)
    x = torch.randn(200, 64)
    y32, aux32, load32, dropped32 = _layer_call(layer, x, seed=1)
    y, aux, load, dropped = _layer_call(layer, x, seed=1, autocast_dtype=autocast_dtype)
    assert y.dtype == autocast_dtype and aux.dtype == torch.float32
    assert torch.equal(load, load32) and torch.equal(dropped, dropped32)
    torch.testing.assert_close(aux, aux32, rtol=0, atol=0)
    assert dropped32.sum() > 0  # capacity 1.05 drops pairs: the slots are exercised too


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_expert_choices_match_float32_under_autocast(backend, monkeypatch):
    """Beyond the counts: every token's experts and slots equal those of float32."""
    import m2mkd_fast.layers.moe as moe_layer

    seen = []
    route = moe_layer.route
    monkeypatch.setattr(moe_layer, "route", lambda *a, **kw: seen.append(route(*a, **kw)) or seen[-1])
    torch.manual_seed(0)
    layer = MoEMLP(64, 128, 8, k=2, capacity_factor=1.05, backend=backend).eval()
    x = torch.randn(200, 64)
    _layer_call(layer, x, seed=1)
    for dtype in AUTOCAST_DTYPES:
        _layer_call(layer, x, seed=1, autocast_dtype=dtype)
    for r in seen[1:]:
        assert torch.equal(r.expert, seen[0].expert) and torch.equal(r.slot, seen[0].slot)
        assert r.weight.dtype == torch.float32
        torch.testing.assert_close(r.weight, seen[0].weight, rtol=0, atol=0)
