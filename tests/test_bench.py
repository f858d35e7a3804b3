"""The benchmark suite runs end to end at quick shapes and its comparison reads two runs."""

import json
import os

import pytest

from m2mkd_fast.backend import select
from m2mkd_fast.bench import report, suite


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from m2mkd_fast.cli import main

    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "all", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_run_writes_report_plots_and_json(quick_run):
    out, results = quick_run
    text = (out / "REPORT.md").read_text()
    assert "## Ops" in text and "moe_mlp" in text and "graph_attention" in text and "readin_attention" in text
    assert {"moe_tokens.png", "moe_experts.png", "readin_batch.png", "graph_density.png"} <= set(os.listdir(out))
    data = json.loads((out / "bench.json").read_text())
    assert data["environment"]["torch"]
    ok = [r for r in data["records"] if r["status"] == "ok"]
    failed = [r for r in data["records"] if r["status"] != "ok"]
    assert not failed, failed[:3]
    families = {r["family"] for r in ok if r["section"] in ("ops", "sweep")}
    assert families == {"route", "moe_mlp", "readin_attention", "graph_attention"}
    steps = [r for r in ok if r["section"] == "step"]
    assert {r["formulation"] for r in steps} == {"m2mkd_fast layers", "seed formulation"}
    assert {r["family"].split()[0] for r in steps} == {"vmoe", "nac"}
    assert "## One m2mKD pair training step" in text
    students = [r for r in ok if r["section"] == "student step"]
    assert {r["family"].split()[0] for r in students} == {"vmoe", "nac"}
    assert {r["formulation"] for r in students} == {
        f"m2mkd_fast layers ({select('moe_mlp', 'cpu')[0]} backend)", "m2mkd_fast layers (torch backend)", "seed formulation"}
    assert "## One training step of the whole student" in text
    assert all(r["peak_mib"] > 0 for r in steps + students)
    assert all(r["ms"] > 0 for r in ok)


def test_failing_case_is_reported_and_run_goes_on():
    def broken(_pass):
        def run():
            raise RuntimeError("boom")
        return run

    case = suite.ops_cases.Case("moe_mlp", "broken", "T=1", broken, {"fwd": 1.0}, {"fwd": 1.0})
    records = suite.run_cases([case], "cpu", True, {"matmul_flops": 1e9, "copy_bytes_per_s": 1e9}, ("fwd",))
    assert records[0]["status"] == "failed" and "boom" in records[0]["reason"]


def test_every_op_backend_gets_an_autocast_bf16_column():
    """Every mk.ops case of every family, at quick shapes: also timed under bf16 autocast, shown in
    the report's last column (the seed's and the peers' formulations are not)."""
    import torch

    device = torch.device("cpu")
    cases = [c for c in suite.ops_cases.all_cases(device, True) if c.autocast]
    assert {c.family for c in cases} == {"route", "moe_mlp", "readin_attention", "graph_attention"}
    ceilings = {"matmul_flops": 1e9, "copy_bytes_per_s": 1e9}
    records = suite.run_cases(cases, device, True, ceilings, ("fwd+bwd", "fwd"))
    assert all(r["status"] == "ok" and r["autocast_bf16_ms"] > 0 for r in records), records
    table = report.ops_table(records, "ops")
    assert "autocast bf16 ms" in table and f"{records[0]['autocast_bf16_ms']:.3f}" in table


def test_compare_prints_ratios(quick_run, tmp_path):
    out, results = quick_run
    slower = json.loads((out / "bench.json").read_text())
    for r in slower["records"]:
        if r["status"] == "ok":
            r["ms"] *= 2
    b = tmp_path / "b.json"
    b.write_text(json.dumps(slower))
    table = report.compare(str(out / "bench.json"), str(b))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "B / A" not in line]
    assert rows and all(line.rstrip(" |").endswith("2.00") for line in rows)


def test_cli_compare(quick_run, capsys):
    from m2mkd_fast.cli import main

    out, _ = quick_run
    path = str(out / "bench.json")
    assert main(["bench", "--compare", path, path]) == 0
    printed = capsys.readouterr().out
    assert "| B / A |" in printed and "| 1.00 |" in printed


def test_cpu_peak_memory_counts_what_one_call_holds_at_once():
    import torch

    from m2mkd_fast.bench.measure import peak_allocated_bytes

    n = 257
    held_before = [torch.ones(3 * n, n)]

    def fn():
        a = torch.randn(n, n)
        b = a @ a
        del a
        c = b.relu()
        held_before.clear()  # frees memory allocated before the call: no peak
        return c.sum()

    tensor = n * n * 4
    assert 2 * tensor <= peak_allocated_bytes(fn) < 2 * tensor + 1024


def test_pytest_benchmark_suite_runs_at_quick_shapes():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "benchmarks"), "--benchmark-only",
         "--benchmark-max-time=0.001", "--benchmark-min-rounds=1", "--benchmark-warmup=off"],
        capture_output=True, text=True, cwd=root, env={**os.environ, "M2MKD_BENCH_QUICK": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_gpu_check_script_exits_at_once_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh on a machine without CUDA: says so, exits 0, writes nothing."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the whole check")
    repo = Path(__file__).resolve().parents[1]
    results = repo / "benchmarks" / "results" / "gpu"
    existed = results.exists()
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device: nothing to check" in proc.stdout
    assert results.exists() == existed
