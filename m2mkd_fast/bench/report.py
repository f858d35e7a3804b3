"""Markdown report, sweep plots and run-to-run comparison of benchmark results."""

import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def _autocast_cell(r: dict) -> str:
    """The op's time under bf16 autocast (its inputs unchanged), blank where not measured."""
    if "autocast_bf16_reason" in r:
        return f"failed: {r['autocast_bf16_reason']}"
    return _fmt(r.get("autocast_bf16_ms"), 3)


def ops_table(records: list[dict], section: str) -> str:
    """One table per (family, pass): every formulation, with its ratio to the fastest."""
    groups = defaultdict(list)
    for r in records:
        if r.get("section") == section:
            groups[(r["family"], r["shape"], r["pass"])].append(r)
    out = []
    for (family, shape, pass_name), rows in groups.items():
        ok = [r["ms"] for r in rows if r["status"] == "ok"]
        best = min(ok) if ok else None
        out += [f"### {family} — {pass_name} — {shape}", "",
                "| formulation | ms (median) | peak MiB | TFLOP/s | GB/s | of matmul peak | × fastest | autocast bf16 ms |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["status"] != "ok":
                out.append(f"| {r['formulation']} | failed: {r['reason']} | | | | | | |")
                continue
            out.append(
                f"| {r['formulation']} | {_fmt(r['ms'], 3)} | {_fmt(r['peak_mib'], 1)} | {_fmt(r['tflops'], 3)} | "
                f"{_fmt(r['gbytes_per_s'], 1)} | {r['flop_ratio']:.1%} | {r['ms'] / best:.2f} | {_autocast_cell(r)} |"
            )
        out.append("")
    return "\n".join(out)


def step_table(records: list[dict], section: str = "step") -> str:
    rows = [r for r in records if r.get("section") == section]
    if not rows:
        return ""
    out = ["| student | formulation | ms / step | peak MiB | images/s | host syncs / step |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['family']} | {r['formulation']} | failed: {r['reason']} | | | |")
            continue
        syncs = "" if r.get("host_syncs") is None else str(r["host_syncs"])
        out.append(f"| {r['family']} | {r['formulation']} | {_fmt(r['ms'], 1)} | {_fmt(r['peak_mib'], 1)} | {_fmt(r['images_per_s'], 1)} | {syncs} |")
    return "\n".join(out) + "\n"


def plot_sweeps(records: list[dict], out: str) -> list[str]:
    sweeps = defaultdict(lambda: defaultdict(list))
    for r in records:
        if "sweep" in r and r["status"] == "ok":
            sweeps[r["sweep"]][r["formulation"]].append((r["x"], r["peak_mib"] if r["sweep"] == "readin_batch" else r["ms"]))
    axes = {
        "moe_tokens": ("tokens T", "ms (fwd+bwd)"),
        "moe_experts": ("experts E", "ms (fwd+bwd)"),
        "readin_batch": ("batch B", "peak MiB (fwd+bwd)"),
        "graph_density": ("edge density", "ms (fwd+bwd)"),
    }
    files = []
    for sweep, series in sweeps.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        xlabel, ylabel = axes[sweep]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(sweep.replace("_", " "))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = os.path.join(out, f"{sweep}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def write(results: dict, out: str) -> str:
    env, ceil = results["environment"], results["ceilings"]
    lines = [
        "# m2mkd_fast benchmarks", "",
        f"Device: {env['device']} · threads {env['cpu_threads']} · torch {env['torch']} · triton {env['triton']} · {env['date']}"
        + (" · quick shapes" if results["quick"] else ""), "",
        f"Measured ceilings: matmul {ceil['matmul_flops'] / 1e12:.3f} TFLOP/s ({ceil['matmul_dtype']}), copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s.",
        "Medians; peak memory is the growth of the memory held by tensors during one call: the CUDA allocator's "
        "peak (GPU), the profiler's allocation events (CPU).", "",
        "## Ops", "", ops_table(results["records"], "ops"),
    ]
    step = step_table(results["records"])
    if step:
        lines += ["## One m2mKD pair training step", "", step]
    student_step = step_table(results["records"], "student step")
    if student_step:
        lines += ["## One training step of the whole student (fine-tune, scratch)", "", student_step]
    plots = plot_sweeps(results["records"], out)
    if plots:
        lines += ["## Sweeps", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
        lines += [ops_table(results["records"], "sweep")]
    text = "\n".join(lines)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def compare(path_a: str, path_b: str) -> str:
    """Markdown table of B's median time over A's for every case both ran."""
    def load(path):
        with open(path) as f:
            data = json.load(f)
        return data, {(r["section"], r["family"], r["formulation"], r["shape"], r["pass"], r.get("x")): r for r in data["records"]}

    env_a, a = load(path_a)
    env_b, b = load(path_b)
    lines = [f"A: {path_a} ({env_a['environment']['device']}, {env_a['environment']['date']})",
             f"B: {path_b} ({env_b['environment']['device']}, {env_b['environment']['date']})", "",
             "| family | formulation | shape | pass | A ms | B ms | B / A |", "|---|---|---|---|---:|---:|---:|"]
    for key in a.keys() & b.keys():
        ra, rb = a[key], b[key]
        if ra["status"] == "ok" and rb["status"] == "ok":
            lines.append(f"| {key[1]} | {key[2]} | {key[3]} | {key[4]} | {ra['ms']:.3f} | {rb['ms']:.3f} | {rb['ms'] / ra['ms']:.2f} |")
    return "\n".join(lines)
