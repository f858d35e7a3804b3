"""Every custom op of every backend (namespace m2mkd_fast, <family>_<backend>_<stage>) passes
torch.library.opcheck with and without inputs that require grad; backward ops refuse a second
derivative with a clear error."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from m2mkd_fast import ops
from m2mkd_fast.backend import unavailable_reason
from m2mkd_fast.reference.routing import route as ref_route

BACKEND_MODULES = {
    "torch": "m2mkd_fast.torch_backend",
    "cpp": "m2mkd_fast.cpp_backend",
    "triton": "m2mkd_fast.triton_backend",
}
FAMILIES = ("routing", "moe", "readin", "graph")
CASES = {}


def _available(backend: str) -> bool:
    return unavailable_reason(backend, torch.device("cpu")) is None


for _backend, _package in BACKEND_MODULES.items():
    if _available(_backend):
        for _family in FAMILIES:
            importlib.import_module(f"{_package}.{_family}")


def case(name: str):
    """Register the builder of op ``name``'s sample arguments."""

    def register(build):
        CASES[name] = build
        return build

    return register


def _op(name: str):
    return getattr(torch.ops.m2mkd_fast, name).default


def _run(name: str, *args):
    with torch.no_grad():
        return _op(name)(*args)


def _routing(T=12, E=4, k=2):
    return ref_route(torch.randn(T, E), k, capacity_factor=1.0)


# ------------------------------------------------------------------------------ routing
@case("routing_triton_fwd")
def _():
    return (torch.randn(14, 5), 2, "vmoe", 8, True, 7)


@case("routing_triton_bwd")
def _():
    logits = torch.randn(14, 5)
    _, expert, _, _ = _run("routing_triton_fwd", logits, 2, "naive", -1, False, 14)
    return (torch.randn(14, 2), logits, expert, "naive")


@case("routing_cpp_topk")
def _():
    return (torch.randn(9, 4), 2)


@case("routing_cpp_slots")
def _():
    scores = torch.randn(9, 4)
    return (_run("routing_cpp_topk", scores, 2), scores[:, 0], 4, 4, 3)


# ------------------------------------------------------------------------------ moe
def _moe_params(T=12, d=6, h=8, E=4):
    r = _routing(T, E)
    return r, [torch.randn(T, d), r.weight.float(), torch.randn(E, d, h) / d**0.5, 0.1 * torch.randn(E, h),
               torch.randn(E, h, d) / h**0.5, 0.1 * torch.randn(E, d)]


@case("moe_torch_fwd")
def _():
    r, (x, weight, w1, b1, w2, b2) = _moe_params()
    return (x, r.expert, r.slot, weight, w1, b1, w2, b2, "none", True)


@case("moe_torch_bwd")
def _():
    r, (x, weight, w1, b1, w2, b2) = _moe_params()
    y, hidden, out = _run("moe_torch_fwd", x, r.expert, r.slot, weight, w1, b1, w2, b2, "none", True)
    return (torch.randn_like(y), x, r.expert, r.slot, weight, w1, w2, hidden, out, "none", True)


@case("moe_cpp_fwd")
def _():
    r, (x, weight, w1, b1, w2, b2) = _moe_params()
    return (x, r.expert, r.slot, weight, w1, b1, w2, b2, "tanh", True)


@case("moe_cpp_bwd")
def _():
    r, (x, weight, w1, b1, w2, b2) = _moe_params()
    y, hidden, out = _run("moe_cpp_fwd", x, r.expert, r.slot, weight, w1, b1, w2, b2, "none", True)
    return (torch.randn_like(y), x, r.expert, r.slot, weight, w1, w2, hidden, out, "none", True)


@case("moe_triton_fwd")
def _():
    r, (x, weight, w1, b1, w2, b2) = _moe_params()
    return (x, r.expert, weight, r.slot, w1, b1, w2, b2, "tanh", True)


@case("moe_triton_bwd")
def _():
    r, (x, weight, w1, b1, w2, b2) = _moe_params()
    y, z, a, pair_of_row, row_of_pair, offsets = _run("moe_triton_fwd", x, r.expert, weight, r.slot, w1, b1, w2, b2,
                                                      "none", True)
    return (torch.randn_like(y), x, r.expert, weight, w1, b1, w2, b2, z, a, pair_of_row, row_of_pair, offsets, "none",
            True, True, True, True)


# ------------------------------------------------------------------------------ readin
def _readin_inputs(B=2, U=3, V=4, Din=8, H=2, C=3):
    return [torch.randn(B, U, H, C), torch.randn(B, V, Din), torch.randn(H, C, Din) / Din**0.5,
            torch.randn(H, C, Din) / Din**0.5, 1 + 0.3 * torch.randn(U, Din), 1 + 0.3 * torch.randn(U, Din),
            torch.randn(H, C)]


@case("readin_cpp_fwd")
def _():
    return tuple(_readin_inputs())


@case("readin_cpp_bwd")
def _():
    q, x, w_k, w_v, s_k, s_v, b_v = _readin_inputs()
    m, tk, a, lse = _run("readin_cpp_fwd", q, x, w_k, w_v, s_k, s_v, None)
    return (torch.randn_like(m), q, x, w_k, w_v, s_k, s_v, tk, a, lse)


@case("readin_triton_fwd")
def _():
    return (torch.randn(2, 10, 32), torch.randn(2, 7, 32), 0.25)


@case("readin_triton_bwd")
def _():
    qp, x = torch.randn(2, 10, 32), torch.randn(2, 7, 32)
    o, stats = _run("readin_triton_fwd", qp, x, 0.25)
    return (torch.randn_like(o), qp, x, o, stats, 0.25)


# ------------------------------------------------------------------------------ graph
def _graph_inputs(B=1, H=2, U=7, V=9, C=16, S=4):
    return [torch.randn(B, H, U, C), torch.randn(B, H, V, C), torch.randn(B, H, V, C),
            F.normalize(torch.randn(U, S), dim=-1), F.normalize(torch.randn(V, S), dim=-1), torch.tensor(0.8)]


def _graph_edges():
    from m2mkd_fast.cpp_backend.graph import edge_list

    q, k, v, sig_r, sig_s, beta = _graph_inputs(B=2)
    row_ptr, row, col, logit = edge_list(sig_r, sig_s, beta, truncation=None)
    return q, k, v, row_ptr, row, col, logit.detach()


@case("graph_cpp_fwd")
def _():
    q, k, v, row_ptr, _, col, logit = _graph_edges()
    return (q, k, v, row_ptr, col, logit[None].repeat(2, 1), 0.25)


@case("graph_cpp_bwd")
def _():
    q, k, v, row_ptr, _, col, logit = _graph_edges()
    bias = logit[None].repeat(2, 1)
    out, lse = _run("graph_cpp_fwd", q, k, v, row_ptr, col, bias, 0.25)
    return (torch.randn_like(out), q, k, v, out, lse, row_ptr, col, bias, 0.25, True)


@case("graph_cpp_sample")
def _():
    _, _, _, _, row, col, logit = _graph_edges()
    return (logit, row, col, 2, 7, 9, torch.tensor(3), 0.5)


@case("graph_cpp_philox")
def _():
    return (3, torch.arange(10))


@case("graph_triton_fwd")
def _():
    return (*_graph_inputs(), 0.9, 0.5, torch.tensor(3), False, 16, 16)


@case("graph_triton_bwd")
def _():
    q, k, v, sr, ss, beta = _graph_inputs()
    seed = torch.tensor(3)
    o, lse = _run("graph_triton_fwd", q, k, v, sr, ss, beta, 0.9, 0.5, seed, False, 16, 16)
    return (torch.randn_like(o), q, k, v, o, lse, sr, ss, beta, 0.9, 0.5, seed, False, 16, 16, 0, True)


# ------------------------------------------------------------------------------ tests
def _registered_ops() -> set:
    prefix = "m2mkd_fast::"
    return {name[len(prefix):].split(".")[0] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)}


def _backend_of(name: str) -> str:
    return name.split("_")[1]


def test_every_registered_op_has_a_case_and_follows_the_naming_scheme():
    registered = _registered_ops()
    expected = {name for name in CASES if _available(_backend_of(name))}
    assert registered == expected
    for name in registered:
        family, backend, *_ = name.split("_")
        assert family in FAMILIES and backend in BACKEND_MODULES, name


def _with_grad(args, requires_grad: bool) -> tuple:
    return tuple(
        a.detach().clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name, requires_grad):
    if not _available(_backend_of(name)):
        pytest.skip(f"backend {_backend_of(name)} unavailable")
    args = _with_grad(CASES[name](), requires_grad)
    op = _op(name)
    if name.endswith("_bwd") and requires_grad:
        # a backward op has no derivative: opcheck's gradient comparison does not apply, and
        # differentiating it raises
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        outputs = [t for t in op(*args) if t.requires_grad]
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(sum(t.sum() for t in outputs), [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])
    else:
        torch.library.opcheck(op, args)


def test_double_backward_through_an_op_raises_clearly():
    """create_graph=True through moe_mlp (torch backend), then differentiating the gradient."""
    r = _routing(6, 3)
    x = torch.randn(6, 4, requires_grad=True)
    w1, w2 = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True)
    y = ops.moe_mlp(x, r, w1, None, w2, None, backend="torch")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
