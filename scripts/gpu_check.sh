#!/usr/bin/env bash
# One-shot GPU check, about 8 minutes on one H100/H200; run it first on a machine with a GPU:
#   1. the CUDA tests (pytest -m gpu);
#   2. `m2mkd-fast bench step` at the GPU shapes (docs/design.md §3): the m2mKD pair steps under
#      bf16 autocast, V-MoE-B among them (target: <= 60 ms and <= 4.5 GiB on an H100), and the
#      host synchronisations per step;
#   3. `m2mkd-fast bench ops`: every op at the GPU shapes in bf16, with the bf16-autocast column.
# Writes benchmarks/results/gpu/ (pytest-gpu.txt, step/, ops/, SUMMARY.md). Each stage has a time
# limit so that the whole stays within budget; a stage that fails or times out is reported and
# the next one still runs; the exit status is nonzero if any stage failed.
# Without a CUDA device it prints "no CUDA device: nothing to check" and exits 0 at once.
# Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device: nothing to check"
  exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
status=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name (at most ${limit} s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name exited $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
  tail -n 3 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
stage pytest-gpu 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
stage bench-step 180 "$PY" -m m2mkd_fast bench step --out "$OUT/step" --device cuda
stage bench-ops 170 "$PY" -m m2mkd_fast bench ops --out "$OUT/ops" --device cuda
"$PY" - "$OUT" > "$OUT/SUMMARY.md" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("# GPU check\n")
step = out / "step" / "bench.json"
if not step.exists():
    print("bench step wrote no results (see bench-step.log)")
    sys.exit(0)
data = json.loads(step.read_text())
print(f"{data['environment']['device']} · torch {data['environment']['torch']} · triton {data['environment']['triton']}"
      f" · {data['environment']['date']}\n")
print("| section | student | formulation | ms / step | peak GiB | host syncs / step |\n|---|---|---|---:|---:|---:|")
for r in data["records"]:
    if r["status"] == "ok":
        print(f"| {r['section']} | {r['family']} | {r['formulation']} | {r['ms']:.1f} | {r['peak_mib'] / 1024:.2f} | {r.get('host_syncs')} |")
    else:
        print(f"| {r['section']} | {r['family']} | {r['formulation']} | failed: {r['reason']} | | |")
print("\nTarget for the V-MoE-B pair step (bf16 autocast, H100): <= 60 ms and <= 4.5 GiB.")
PYEOF
cat "$OUT/SUMMARY.md"
exit $status
