"""CPU benchmark of the C++ backend against the torch backend and the seed's formulations.

Every op forward + backward (all gradients), fp32, at docs/design.md §3's CPU shapes; formulations of
one op are timed interleaved (round-robin, ``torch.utils.benchmark`` medians per round, then
the median over rounds), so a noisy shared machine hurts them alike. Peak RSS growth of one
step is measured in a fresh subprocess per formulation (peak reset through
/proc/self/clear_refs, then VmHWM minus the RSS before the step).

    python -m m2mkd_fast.bench.cpu_ops [--rounds 5] [--ops graph,graph_ba,readin,moe,routing]
                                       [--out benchmarks/results/cpu_ops.md]

The backends run through the public ops with ``backend=``; the seed formulations are the
oracle's (m2mkd_fast.reference).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

from .. import ops



# ------------------------------------------------------------------------------ the cases
def graph_case(prior: bool):
    """Tiny-ImageNet propagation: B=8, U=256 mediators, V=320 senders, H=6, C=64, S=64."""
    from m2mkd_fast.reference.graph import graph_attention as ref_graph
    from m2mkd_fast.reference.graph import graph_log_affinity, graph_sampled_bias

    torch.manual_seed(0)
    B, H, U, V, C, S = 8, 6, 256, 320, 64, 64
    # the prior's signatures are fitted with a hinge at 0.8: at the attention's 0.9 about 22% of
    # the pairs are kept (as for random signatures); at 0.8 the prior's own sparsity (~3%) shows
    truncation = 0.8 if prior else 0.9
    if prior:  # mediator signatures fitted to a Barabási–Albert graph (n=256, m=2)
        from m2mkd_fast.models import graph_priors

        adjacency = graph_priors.make_graph("barabasi-albert", U, seed=0, m=2)
        mediators = graph_priors.fit_signatures(adjacency, S, steps=300)
        sig_r = mediators.clone()
        sig_s = torch.cat([torch.randn(V - U, S), mediators])
    else:
        sig_r, sig_s = torch.randn(U, S), torch.randn(V, S)
    leaves = [torch.randn(B, H, U, C), torch.randn(B, H, V, C), torch.randn(B, H, V, C), sig_r, sig_s, torch.tensor(1.0)]
    leaves = [t.requires_grad_() for t in leaves]
    grad = torch.randn(B, H, U, C)
    kw = dict(truncation=truncation, temperature=0.5, seed=1)

    def eager():  # the seed: dense bias [B,U,V] with torch's RNG, matmul-softmax-matmul
        return ref_graph(*leaves, truncation=truncation, temperature=0.5, uniform=torch.rand(B, U, V))

    def sdpa():  # dense bias as the seed builds it, then SDPA with a float mask
        bias = graph_sampled_bias(*leaves[3:], truncation, 0.5, torch.rand(B, U, V), False)
        empty = torch.isneginf(bias).all(-1, keepdim=True)
        bias = bias.masked_fill(empty, 0.0)
        return F.scaled_dot_product_attention(*leaves[:3], attn_mask=bias[:, None])

    with torch.no_grad():
        density = torch.isfinite(graph_log_affinity(sig_r, sig_s, torch.tensor(1.0), truncation)).float().mean().item()
    forms = {
        "cpp (sparse C++)": lambda: ops.graph_attention(*leaves, **kw, backend="cpp"),
        "torch backend": lambda: ops.graph_attention(*leaves, **kw, backend="torch"),
        "SDPA with float bias": sdpa,
        "eager, dense bias (seed)": eager,
    }
    return forms, grad, f"B={B} U={U} V={V} H={H} C={C} S={S}, truncation {truncation}, density {density:.3f}, sampling t=0.5, all grads"


def readin_case():
    """Tiny-ImageNet read-in: B=8, U=64, V=64, Din=256, H=6, C=64."""
    from m2mkd_fast.reference.readin import readin_attention_materialised

    torch.manual_seed(0)
    B, U, V, Din, H, C = 8, 64, 64, 256, 6, 64
    leaves = [
        torch.randn(B, U, H, C),
        torch.randn(B, V, Din),
        torch.randn(H, C, Din) / 16,
        torch.randn(H, C, Din) / 16,
        1 + 0.1 * torch.randn(U, Din),
        1 + 0.1 * torch.randn(U, Din),
    ]
    leaves = [t.requires_grad_() for t in leaves]
    forms = {
        "cpp (C++)": lambda: ops.readin_attention(*leaves, backend="cpp"),
        "folded + SDPA (torch backend)": lambda: ops.readin_attention(*leaves, backend="torch"),
        "materialised (seed)": lambda: readin_attention_materialised(*leaves),
    }
    return forms, torch.randn(B, U, H, C), f"B={B} U={U} V={V} Din={Din} H={H} C={C}, all grads"


def moe_case():
    """V-MoE layer, tiny: T=3200, d=192, h=768, E=8, k=2, dropless, routing included."""
    from m2mkd_fast.reference import moe as ref_moe

    torch.manual_seed(0)
    T, d, h, E, k = 3200, 192, 768, 8, 2
    x = torch.randn(T, d).requires_grad_()
    gate = (torch.randn(d, E) * 0.02).requires_grad_()
    w1 = (torch.randn(E, d, h) / d**0.5).requires_grad_()
    b1 = torch.zeros(E, h).requires_grad_()
    w2 = (torch.randn(E, h, d) / h**0.5).requires_grad_()
    b2 = torch.zeros(E, d).requires_grad_()
    dense = [(torch.randn(d, h) / d**0.5).requires_grad_(), torch.zeros(h).requires_grad_(),
             (torch.randn(h, d) / h**0.5).requires_grad_(), torch.zeros(d).requires_grad_()]
    x2 = torch.randn(T * k, d).requires_grad_()
    grad = torch.randn(T, d)

    def layer(backend):
        return lambda: ops.moe_mlp(x, ops.route(x @ gate, k, backend=backend), w1, b1, w2, b2, backend=backend)

    def torch_route(logits, k, **kw):
        return ops.route(logits, k, **kw, backend="torch")

    def floor():  # the dense MLP of equal active FLOPs: T·k rows through one d→h→d MLP
        y = F.linear(F.gelu(F.linear(x2, dense[0].t(), dense[1])), dense[2].t(), dense[3])
        return y.view(T, k, d).sum(1)

    forms = {
        "cpp (C++ route + grouped MLP)": layer("cpp"),
        "torch backend": layer("torch"),
        "dense MLP, equal FLOPs (floor)": floor,
        "per-expert loop (seed)": lambda: ref_moe.moe_mlp_expert_loop(x, torch_route(x @ gate, k), w1, b1, w2, b2),
        "one-hot einsum, cf 1.05": lambda: ref_moe.moe_mlp_onehot_einsum(
            x, torch_route(x @ gate, k, capacity_factor=1.05), w1, b1, w2, b2
        ),
    }
    return forms, grad, f"T={T} d={d} h={h} E={E} k={k}, dropless, routing included, all grads"


def routing_case():
    """Routing alone (forward + weight backward): T=3200, E=8, k=2, cf 1.05, BPR, groups of 1600."""
    from m2mkd_fast.reference.routing import route as ref_route

    torch.manual_seed(0)
    logits = torch.randn(3200, 8).requires_grad_()
    kw = dict(capacity_factor=1.05, batch_priority=True, group_size=1600)
    forms = {
        "cpp (C++)": lambda: ops.route(logits, 2, **kw, backend="cpp").weight,
        "torch backend": lambda: ops.route(logits, 2, **kw, backend="torch").weight,
        "oracle (Python loops)": lambda: ref_route(logits, 2, **kw).weight,
    }
    return forms, torch.randn(3200, 2), "T=3200 E=8 k=2, cf 1.05, BPR, group 1600"


CASES = {
    "graph": ("graph attention (propagation, random signatures)", lambda: graph_case(False)),
    "graph_ba": ("graph attention (propagation, Barabási–Albert prior)", lambda: graph_case(True)),
    "readin": ("read-in attention", readin_case),
    "moe": ("MoE layer", moe_case),
    "routing": ("routing", routing_case),
}


# ------------------------------------------------------------------------------ measuring
def step_fn(fn, grad):
    def step():
        out = fn()
        out.backward(grad)

    return step


def time_case(forms, grad, rounds, min_run_time):
    steps = {name: step_fn(fn, grad) for name, fn in forms.items()}
    for step in steps.values():
        step()  # warm-up
    results = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timer = tb.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
            m = timer.blocked_autorange(min_run_time=min_run_time)
            results[name].append(m.median * 1e3)
    return {name: sorted(v)[len(v) // 2] for name, v in results.items()}


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_child(case, form):
    """Run in a subprocess: one warm-up step, reset the peak, one step; print the growth."""
    forms, grad, _ = CASES[case][1]()
    step = step_fn(forms[form], grad)
    step()
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    step()
    print(json.dumps({"growth_mib": (_rss_kib("VmHWM") - before) / 1024}))


def peak_rss(case, form):
    proc = subprocess.run(
        [sys.executable, "-m", "m2mkd_fast.bench.cpu_ops", "--rss-child", case, form], capture_output=True, text=True, timeout=900
    )
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["growth_mib"]
    return float("nan")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} ×{len(names)}" if names else cpu
    except OSError:
        pass
    from m2mkd_fast import _C

    isa = _C.active_isa()
    return (
        f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; C++ kernels: {isa}; "
        f"{datetime.date.today().isoformat()}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--ops", default="graph,graph_ba,readin,moe,routing")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the RSS subprocesses
    if args.rss_child:
        return peak_rss_child(*args.rss_child)
    lines = ["# CPU benchmark: C++ backend vs torch backend vs seed formulations", "", f"Machine: {machine()}", ""]
    lines += ["fp32, forward + backward, median over interleaved rounds of `torch.utils.benchmark` medians.", ""]
    for case in args.ops.split(","):
        title, build = CASES[case]
        forms, grad, shape = build()
        times = time_case(forms, grad, args.rounds, args.min_run_time)
        best_baseline = min(t for name, t in times.items() if not name.startswith("cpp"))
        cpp_time = next(t for name, t in times.items() if name.startswith("cpp"))
        lines += [f"## {title}", "", shape, "", "| formulation | ms | peak RSS growth MiB | time / cpp |", "|---|---|---|---|"]
        for name, t in times.items():
            rss = float("nan") if args.no_rss else peak_rss(case, name)
            lines.append(f"| {name} | {t:.2f} | {rss:.0f} | {t / cpp_time:.2f} |")
        lines += ["", f"cpp is {best_baseline / cpp_time:.2f}× faster than the best other formulation.", ""]
        print("\n".join(lines[-(len(times) + 8):]), flush=True)
    text = "\n".join(lines)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
