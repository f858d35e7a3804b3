"""NaN / Inf in any floating input of any op: a ValueError naming the argument on CPU, on every
backend; CUDA checks only when switched on; no backend hides a NaN the oracle propagates;
graph_attention's bandwidth and truncation ranges (docs/design.md §2.8)."""

import pytest
import torch

import m2mkd_fast as mk
from m2mkd_fast import checks
from m2mkd_fast.reference import readin_attention as ref_readin
from m2mkd_fast.torch_backend.readin import readin_attention as torch_readin

CPU_BACKENDS = mk.available_backends("cpu")


def _moe_args():
    g = torch.Generator().manual_seed(0)
    x, logits = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    r = mk.ops.route(logits, 2, gate="naive")
    return dict(x=x, r=r, w1=torch.randn(3, 4, 5, generator=g), b1=torch.randn(3, 5, generator=g),
                w2=torch.randn(3, 5, 4, generator=g), b2=torch.randn(3, 4, generator=g))


def _readin_args():
    g = torch.Generator().manual_seed(1)
    return dict(q=torch.randn(2, 3, 2, 4, generator=g), x=torch.randn(2, 5, 6, generator=g),
                w_k=torch.randn(2, 4, 6, generator=g), w_v=torch.randn(2, 4, 6, generator=g),
                s_k=torch.randn(3, 6, generator=g), s_v=torch.randn(3, 6, generator=g), b_v=torch.randn(2, 4, generator=g))


def _graph_args():
    g = torch.Generator().manual_seed(2)
    return dict(q=torch.randn(2, 2, 3, 4, generator=g), k=torch.randn(2, 2, 5, 4, generator=g),
                v=torch.randn(2, 2, 5, 4, generator=g), sig_r=torch.randn(3, 8, generator=g),
                sig_s=torch.randn(5, 8, generator=g), bandwidth=torch.tensor(0.7))


def _poison(t, value):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


CASES = [
    ("route", lambda: dict(logits=torch.randn(8, 3), k=2), ["logits"]),
    ("moe_mlp", _moe_args, ["x", "w1", "b1", "w2", "b2", "r.weight"]),
    ("readin_attention", _readin_args, ["q", "x", "w_k", "w_v", "s_k", "s_v", "b_v"]),
    ("graph_attention", _graph_args, ["q", "k", "v", "sig_r", "sig_s"]),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("op, make, names", CASES, ids=[c[0] for c in CASES])
def test_non_finite_inputs_are_named(op, make, names, value, backend):
    fn = getattr(mk.ops, op)
    fn(**make(), backend=backend)  # the clean inputs pass
    for name in names:
        args = make()
        if name == "r.weight":
            args["r"] = args["r"]._replace(weight=_poison(args["r"].weight, value))
        else:
            args[name] = _poison(args[name], value)
        with pytest.raises(ValueError, match=f"{op}: {name} contains NaN or infinite values"):
            fn(**args, backend=backend)


def test_set_checks_switches_cuda_checks_only(monkeypatch):
    monkeypatch.delenv(checks.ENV_VAR, raising=False)
    assert not checks.checks_enabled()
    monkeypatch.setenv(checks.ENV_VAR, "1")
    assert checks.checks_enabled()
    try:
        mk.set_checks(False)
        assert not checks.checks_enabled()
        args = _graph_args()
        args["q"] = _poison(args["q"], float("nan"))
        with pytest.raises(ValueError, match="graph_attention: q"):  # CPU inputs are always checked
            mk.ops.graph_attention(**args)
        mk.set_checks(True)
        assert checks.checks_enabled()
        with pytest.raises(TypeError):
            mk.set_checks(1)
    finally:
        mk.set_checks(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checks_are_off_by_default_and_assert_when_on(monkeypatch):
    monkeypatch.delenv(checks.ENV_VAR, raising=False)
    args = {k: v.cuda() for k, v in _graph_args().items()}
    args["k"] = _poison(args["k"], float("nan"))
    mk.ops.graph_attention(**args)  # no check, no sync
    torch.cuda.synchronize()
    try:
        mk.set_checks(True)
        with pytest.raises(RuntimeError):
            mk.ops.graph_attention(**args)
            torch.cuda.synchronize()
    finally:
        mk.set_checks(None)


def test_torch_readin_propagates_nan_like_the_oracle():
    args = _readin_args()
    args["q"] = _poison(args["q"], float("nan"))  # one query row (one latent, one head) is NaN
    want = ref_readin(**args)
    got = torch_readin(**args)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())


def test_truncation_of_2_or_more_keeps_every_edge():
    args = _graph_args()
    none = mk.ops.graph_attention(**args, truncation=None, backend="torch")
    for t in (2, 2.0, 3.5, float("inf")):
        torch.testing.assert_close(mk.ops.graph_attention(**args, truncation=t, backend="torch"), none, rtol=0, atol=0)
