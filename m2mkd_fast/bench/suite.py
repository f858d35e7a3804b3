"""`m2mkd-fast bench [ops|step|all] [--quick] [--out DIR] [--compare A.json B.json]`.

Runs every case side by side in one process, interleaving nothing else, and writes into --out a
markdown report (REPORT.md), PNG plots of the sweeps and a JSON file with every measurement.
A case that fails (out of memory, an unavailable backend) is recorded with its reason.
"""

import datetime
import json
import os
import platform
from typing import Callable, Optional

import torch
from tqdm import tqdm

from . import ops_cases
from .measure import measure, probe_ceilings


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": f"{device.type}: {name}",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _run(fn: Callable[[], object], device, min_run_time) -> dict:
    try:
        return {"status": "ok", **measure(fn, device, min_run_time)}
    except torch.OutOfMemoryError as err:
        return {"status": "failed", "reason": f"out of memory: {str(err).splitlines()[0]}"}
    except Exception as err:  # noqa: BLE001 - a failing case is reported, the run goes on
        return {"status": "failed", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _under_autocast(fn: Callable[[], object], device) -> Callable[[], object]:
    """fn run inside torch.autocast(device, bf16): the ops' mixed-precision policy (docs/design.md §2.7)."""
    def run():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return fn()
    return run


def _autocast_fields(fn, device, min_run_time) -> dict:
    result = _run(_under_autocast(fn, device), device, min_run_time)
    if result["status"] != "ok":
        return {"autocast_bf16_reason": result["reason"]}
    return {"autocast_bf16_ms": result["ms"], "autocast_bf16_peak_mib": result["peak_mib"]}


def run_cases(cases, device, quick: bool, ceilings: dict, passes=("fwd", "fwd+bwd"), section: str = "ops") -> list[dict]:
    """Time every (case, pass); cases marked ``autocast`` also under bf16 autocast (extra fields)."""
    records = []
    work = [(case, p) for case in cases for p in passes if p in case.flops]
    min_run_time = 0.01 if quick else 0.5
    for case, pass_name in tqdm(work, desc=f"bench {section}", leave=False):
        try:
            fn = case.build(pass_name)
            result = _run(fn, device, min_run_time)
            if case.autocast and section == "ops":
                result.update(_autocast_fields(fn, device, min_run_time))
        except Exception as err:  # noqa: BLE001
            result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
        record = {"section": section, "family": case.family, "formulation": case.formulation, "shape": case.shape, "pass": pass_name, **result}
        if result["status"] == "ok":
            rates = ops_cases.achieved(case.flops[pass_name], case.min_bytes[pass_name], result["ms"])
            record.update(rates)
            record["flop_ratio"] = rates["tflops"] * 1e12 / ceilings["matmul_flops"]
            record["byte_ratio"] = rates["gbytes_per_s"] * 1e9 / ceilings["copy_bytes_per_s"]
        records.append(record)
    return records


def sweeps(device, quick: bool, ceilings: dict) -> list[dict]:
    """MoE time vs tokens and vs experts; read-in memory vs batch; graph time vs density."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = ops_cases.shapes(device, quick)
    records = []
    moe_tokens = [base["moe"]["T"] // 2, base["moe"]["T"]] if quick else [base["moe"]["T"] // 4, base["moe"]["T"] // 2, base["moe"]["T"]]
    for T in moe_tokens:
        cases = [c for c in ops_cases.moe_cases(device, dtype, {**base["moe"], "T": T}, quick) if c.family == "moe_mlp"]
        records += [dict(r, sweep="moe_tokens", x=T) for r in run_cases(cases, device, quick, ceilings, ("fwd+bwd",), "sweep")]
    for E in (2, 8) if quick else (2, 4, 8, 16):
        cases = [c for c in ops_cases.moe_cases(device, dtype, {**base["moe"], "E": E}, quick) if c.family == "moe_mlp" and "einsum" not in c.formulation]
        records += [dict(r, sweep="moe_experts", x=E) for r in run_cases(cases, device, quick, ceilings, ("fwd+bwd",), "sweep")]
    batches = (1, 2) if quick else ((1, 2, 4, 8) if device.type == "cpu" else (4, 16, 64, 128))
    for B in batches:
        cases = ops_cases.readin_cases(device, dtype, {**base["readin"], "B": B}, quick)
        records += [dict(r, sweep="readin_batch", x=B) for r in run_cases(cases, device, quick, ceilings, ("fwd+bwd",), "sweep")]
    g = base["graph"]
    for truncation in (0.5, 0.9) if quick else (0.5, 0.7, 0.9, 1.1):
        cases = ops_cases.graph_cases(device, dtype, g, quick, truncation=truncation, label=f"random, τ={truncation}")
        records += [dict(r, sweep="graph_density", x=_density(r["shape"])) for r in run_cases(cases, device, quick, ceilings, ("fwd+bwd",), "sweep")]
    prior = _barabasi_albert_signatures(g, quick)
    if prior is not None:
        cases = ops_cases.graph_cases(device, dtype, g, quick, signatures=prior, label="Barabási–Albert prior")
        records += [dict(r, sweep="graph_density", x=_density(r["shape"])) for r in run_cases(cases, device, quick, ceilings, ("fwd+bwd",), "sweep")]
    return records


def _density(shape: str) -> float:
    return float(shape.split("density=")[1].split()[0])


def _barabasi_albert_signatures(g: dict, quick: bool) -> Optional[tuple]:
    """Receivers = mediators fitted to a BA graph; senders = random input latents + mediators."""
    from ..models.graph_priors import graph_prior_signatures

    U, V, S = g["U"], g["V"], g["S"]
    mediators = graph_prior_signatures("barabasi_albert", U, S, steps=50 if quick else 300, seed=0, m=2)
    inputs = torch.randn(V - U, S, generator=torch.Generator().manual_seed(1))
    return mediators, torch.cat([inputs, mediators]) if V > U else mediators[:V]


def run(what: str = "all", quick: bool = False, out: str = "bench-results", device: Optional[str] = None) -> dict:
    """Run the suite and write REPORT.md, bench.json and the sweep plots into ``out``."""
    from . import report

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out, exist_ok=True)
    ceilings = probe_ceilings(device, quick)
    results = {"environment": environment(device), "ceilings": ceilings, "quick": quick, "records": []}
    if what in ("ops", "all"):
        results["records"] += run_cases(ops_cases.all_cases(device, quick), device, quick, ceilings)
        results["records"] += sweeps(device, quick, ceilings)
    if what in ("step", "all"):
        from .step import step_records

        results["records"] += step_records(device, quick)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    report.write(results, out)
    return results
