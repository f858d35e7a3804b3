"""Benchmark cases for each op family: every formulation a user could pick, at docs/design.md §3 shapes.

A case builds its inputs once and returns a callable for one pass ("fwd" or "fwd+bwd").
Formulations: the seed's (mk.reference), the peers of docs/design.md §3 (dense MLP floor, one-hot
einsum, SDPA with a float bias) and every available backend of our ops.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import backend as backends
from .. import ops, reference, roofline


@dataclass
class Case:
    family: str
    formulation: str
    shape: str
    build: Callable[[str], Callable[[], object]]  # pass name -> callable
    flops: dict  # pass name -> FLOPs (0 when not meaningful)
    min_bytes: dict
    note: str = ""
    autocast: bool = False  # also time it under torch.autocast(bf16) on its float32/bf16 inputs


def _leaf(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def _runner(forward: Callable[[], torch.Tensor], params: list) -> Callable[[str], Callable[[], object]]:
    def build(pass_name: str):
        if pass_name == "fwd":
            def run():
                with torch.no_grad():
                    return forward()
            return run

        def run():
            for p in params:
                p.grad = None
            out = forward()
            out.backward(torch.ones_like(out))
        return run
    return build


def _backend_names(device: torch.device, op: str) -> list[str]:
    """Backends to time: every available one, except Triton's CPU interpreter (a test tool)."""
    names = []
    for name in backends.available_backends(device):
        if name == "triton" and device.type == "cpu":
            continue
        try:
            backends.select(op, device, name)
        except backends.BackendUnavailable:
            continue
        names.append(name)
    return names


def shapes(device: torch.device, quick: bool) -> dict:
    """The benchmark shapes: docs/design.md §3's CPU (tiny) or GPU (full) shapes, or smaller with quick."""
    if device.type == "cuda":
        return {
            "moe": dict(T=25216, d=768, h=3072, E=8, k=2),
            "readin": dict(B=128, U=192, V=784, H=8, C=64, Din=320),
            "graph": dict(B=64, H=8, U=768, V=960, C=64, S=64),
        }
    if quick:
        return {
            "moe": dict(T=256, d=32, h=64, E=4, k=2),
            "readin": dict(B=2, U=16, V=16, H=2, C=16, Din=32),
            "graph": dict(B=2, H=2, U=32, V=40, C=16, S=16),
        }
    return {
        "moe": dict(T=3200, d=192, h=768, E=8, k=2),
        "readin": dict(B=8, U=64, V=64, H=6, C=64, Din=256),
        "graph": dict(B=8, H=6, U=256, V=320, C=64, S=64),
    }


def moe_cases(device, dtype, s, quick) -> list[Case]:
    T, d, h, E, k = s["T"], s["d"], s["h"], s["E"], s["k"]
    x = _leaf(T, d, device=device, dtype=dtype)
    logits = torch.randn(T, E, device=device)
    w1 = _leaf(E, d, h, device=device, dtype=dtype, scale=d**-0.5)
    b1 = _leaf(E, h, device=device, dtype=dtype)
    w2 = _leaf(E, h, d, device=device, dtype=dtype, scale=h**-0.5)
    b2 = _leaf(E, d, device=device, dtype=dtype)
    params = [x, w1, b1, w2, b2]
    r = ops.route(logits, k, gate="naive", backend="torch")
    r_cap = ops.route(logits, k, gate="vmoe", capacity_factor=1.05, backend="torch")
    dense_w1 = _leaf(d, k * h, device=device, dtype=dtype, scale=d**-0.5)
    dense_w2 = _leaf(k * h, d, device=device, dtype=dtype, scale=h**-0.5)
    line = roofline.moe_mlp_roofline(T, d, h, E, k, elem=x.element_size())
    flops = {"fwd": line.flops / 3, "fwd+bwd": line.flops}
    nbytes = {"fwd": roofline.moe_mlp_roofline(T, d, h, E, k, x.element_size(), backward=False).min_bytes, "fwd+bwd": line.min_bytes}
    shape = f"T={T} d={d} h={h} E={E} k={k}"
    cases = [
        Case("moe_mlp", "dense MLP, equal active FLOPs (floor)", shape,
             _runner(lambda: F.linear(F.gelu(x @ dense_w1), dense_w2.t()), [x, dense_w1, dense_w2]), flops, nbytes),
        Case("moe_mlp", "per-expert loop (seed)", shape,
             _runner(lambda: reference.moe_mlp_expert_loop(x, r, w1, b1, w2, b2), params), flops, nbytes),
        Case("moe_mlp", "one-hot einsum, cf 1.05 (V-MoE)", shape,
             _runner(lambda: reference.moe_mlp_onehot_einsum(x, r_cap, w1, b1, w2, b2), params), flops, nbytes),
    ]
    for name in _backend_names(device, "moe_mlp"):
        cases.append(Case("moe_mlp", f"mk.ops backend={name}", shape,
                          _runner(lambda name=name: ops.moe_mlp(x, r, w1, b1, w2, b2, backend=name), params), flops, nbytes,
                          autocast=True))
    route_shape = f"T={T} E={E} k={k} cf=1.05"
    for name in _backend_names(device, "route"):
        cases.append(Case("route", f"mk.ops backend={name}", route_shape,
                          lambda p, name=name: (lambda: ops.route(logits, k, gate="vmoe", capacity_factor=1.05, backend=name)),
                          {"fwd": 0}, {"fwd": logits.numel() * 4}, autocast=True))
    if T <= 4096:
        cases.append(Case("route", "mk.reference (oracle, Python loops)", route_shape,
                          lambda p: (lambda: reference.route(logits, k, gate="vmoe", capacity_factor=1.05)),
                          {"fwd": 0}, {"fwd": logits.numel() * 4}))
    return cases


def readin_cases(device, dtype, s, quick) -> list[Case]:
    B, U, V, H, C, Din = s["B"], s["U"], s["V"], s["H"], s["C"], s["Din"]
    q = _leaf(B, U, H, C, device=device, dtype=dtype)
    x = _leaf(B, V, Din, device=device, dtype=dtype)
    w_k = _leaf(H, C, Din, device=device, dtype=dtype, scale=Din**-0.5)
    w_v = _leaf(H, C, Din, device=device, dtype=dtype, scale=Din**-0.5)
    s_k = (1 + 0.1 * torch.randn(U, Din, device=device)).to(dtype).requires_grad_()
    s_v = (1 + 0.1 * torch.randn(U, Din, device=device)).to(dtype).requires_grad_()
    params = [q, x, w_k, w_v, s_k, s_v]
    args = (q, x, w_k, w_v, s_k, s_v)
    line = roofline.readin_attention_roofline(B, U, V, H, C, Din, elem=q.element_size())
    flops = {"fwd": roofline.readin_attention_roofline(B, U, V, H, C, Din, q.element_size(), backward=False).flops, "fwd+bwd": line.flops}
    nbytes = {"fwd": line.min_bytes / 2, "fwd+bwd": line.min_bytes}
    shape = f"B={B} U={U} V={V} H={H} C={C} Din={Din}"
    cases = []
    materialised_bytes = 2 * B * V * U * H * C * q.element_size()
    if device.type == "cpu" or materialised_bytes < 0.25 * torch.cuda.get_device_properties(device).total_memory:
        cases.append(Case("readin_attention", "materialised K/V (seed)", shape,
                          _runner(lambda: reference.readin_attention_materialised(*args), params), flops, nbytes))
    for name in _backend_names(device, "readin_attention"):
        label = "folded + SDPA (backend=torch)" if name == "torch" else f"mk.ops backend={name}"
        cases.append(Case("readin_attention", label, shape,
                          _runner(lambda name=name: ops.readin_attention(*args, backend=name), params), flops, nbytes,
                          autocast=True))
    return cases


def graph_inputs(device, dtype, s, signatures: Optional[tuple] = None, truncation: float = 0.9):
    B, H, U, V, C, S = s["B"], s["H"], s["U"], s["V"], s["C"], s["S"]
    q = _leaf(B, H, U, C, device=device, dtype=dtype)
    k = _leaf(B, H, V, C, device=device, dtype=dtype)
    v = _leaf(B, H, V, C, device=device, dtype=dtype)
    if signatures is None:
        sig_r = torch.randn(U, S, device=device)
        sig_s = torch.randn(V, S, device=device)
    else:
        sig_r, sig_s = (t.to(device) for t in signatures)
    sig_r = sig_r.clone().requires_grad_()
    sig_s = sig_s.clone().requires_grad_()
    beta = torch.ones((), device=device, requires_grad=True)
    dist = 1 - F.normalize(sig_r.detach(), dim=-1) @ F.normalize(sig_s.detach(), dim=-1).t()
    density = (dist <= truncation).float().mean().item()
    return (q, k, v, sig_r, sig_s, beta), density


def _sdpa_with_bias(q, k, v, sig_r, sig_s, beta, truncation, temperature, uniform):
    """The dense sampled bias [B,U,V] as the oracle builds it, then SDPA with a float mask."""
    bias = reference.graph.graph_sampled_bias(sig_r, sig_s, beta, truncation, temperature, uniform, False)
    empty = torch.isneginf(bias).all(-1, keepdim=True)  # [B,U,1]: receivers without an edge
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(empty, 0.0)[:, None].to(q.dtype))
    return out.masked_fill(empty[:, None], 0.0)


def graph_cases(device, dtype, s, quick, signatures=None, truncation=0.9, label="random signatures") -> list[Case]:
    args, density = graph_inputs(device, dtype, s, signatures, truncation)
    q, k, v, sig_r, sig_s, beta = args
    B, H, U, V, C, S = s["B"], s["H"], s["U"], s["V"], s["C"], s["S"]
    line = roofline.graph_attention_roofline(B, H, U, V, C, density, S, elem=q.element_size())
    flops = {"fwd": roofline.graph_attention_roofline(B, H, U, V, C, density, S, q.element_size(), backward=False).flops, "fwd+bwd": line.flops}
    nbytes = {"fwd": line.min_bytes / 2, "fwd+bwd": line.min_bytes}
    shape = f"B={B} H={H} U={U} V={V} C={C} density={density:.2f} ({label})"
    params = list(args)
    temperature, seed = 0.5, 1234
    uniform = torch.rand(B, U, V, device=device)
    cases = [
        Case("graph_attention", "eager, dense bias (seed)", shape,
             _runner(lambda: reference.graph_attention(*args, truncation=truncation, temperature=temperature, uniform=uniform), params), flops, nbytes),
        Case("graph_attention", "SDPA with float bias", shape,
             _runner(lambda: _sdpa_with_bias(*args, truncation, temperature, uniform), params), flops, nbytes),
    ]
    for name in _backend_names(device, "graph_attention"):
        cases.append(Case("graph_attention", f"mk.ops backend={name}", shape,
                          _runner(lambda name=name: ops.graph_attention(*args, truncation=truncation, temperature=temperature, seed=seed, backend=name), params),
                          flops, nbytes, autocast=True))
    return cases


def all_cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = shapes(device, quick)
    return moe_cases(device, dtype, s["moe"], quick) + readin_cases(device, dtype, s["readin"], quick) + graph_cases(device, dtype, s["graph"], quick)


def achieved(flops: float, min_bytes: float, ms: float) -> dict:
    seconds = ms * 1e-3
    return {"tflops": flops / seconds / 1e12 if flops else 0.0, "gbytes_per_s": min_bytes / seconds / 1e9}



