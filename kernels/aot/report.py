"""Compile every Triton kernel of the package for sm_80 and sm_90a and print a resource report.

    python -m m2mkd_fast.kernels.aot.report [--quick] [--only TEXT ...] [--check] [--out FILE]

--quick compiles one config per kernel and dtype (the first autotune config); --only keeps the
specs whose "kernel config dtype" line contains every given TEXT; --check exits
with status 1 when a kernel spills, exceeds the shared-memory limit or misses the tensor cores
in a bf16 dot. The report ends with the roofline of every benchmark shape (m2mkd_fast.roofline).
"""

import argparse
import datetime
import importlib
import sys

from .. import interpreting
from . import FAMILIES


def collect_specs(quick: bool = False, only=()) -> list:
    """KernelSpecs of every op family's ``aot_specs()`` (m2mkd_fast.kernels.aot.<family>; those
    whose "kernel config dtype" contains every string of ``only``)."""
    if interpreting():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (kernels are interpreted functions)")
    specs = []
    for name in FAMILIES:
        module = importlib.import_module(f"m2mkd_fast.kernels.aot.{name}")
        module_specs = [s for s in module.aot_specs() if all(t in f"{s.kernel} {s.config} {s.dtype}" for t in only)]
        if quick:
            seen, first = set(), []
            for spec in module_specs:
                if (spec.kernel, spec.dtype) not in seen:
                    seen.add((spec.kernel, spec.dtype))
                    first.append(spec)
            module_specs = first
        specs.extend(module_specs)
    return specs


def run(quick: bool = False, only=()) -> tuple[str, list]:
    """Compile everything; return (markdown report, list of (result, problems))."""
    import triton

    from m2mkd_fast import roofline
    from .compile import compile_spec, problems

    rows, findings = [], []
    for spec in collect_specs(quick, only):
        for capability in spec.capabilities:
            try:
                result = compile_spec(spec, capability)
            except Exception as err:  # noqa: BLE001 - a failed compile is a finding, the report goes on
                findings.append((spec, capability, [f"compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"]))
                rows.append(f"| {spec.kernel} | {spec.config} | {spec.dtype} | sm_{capability} | FAILED | | | | | |")
                continue
            issues = problems(result)
            if issues:
                findings.append((spec, capability, issues))
            tensor_cores = "wgmma" if result.has_wgmma else ("mma" if result.has_mma else "-")
            rows.append(
                f"| {spec.kernel} | {spec.config} | {spec.dtype} | {result.target} | {result.registers} | "
                f"{result.spill_stores}/{result.spill_loads} | {result.shared_bytes} | {tensor_cores} | "
                f"{result.seconds:.2f} | {'; '.join(issues) or 'ok'} |"
            )
    header = [
        f"# Triton kernels compiled ahead of time (Triton {triton.__version__}, {datetime.date.today().isoformat()})",
        "",
        "Registers, spills and barriers from the wheel's `ptxas -v`; shared memory from the compiled metadata.",
        "",
        "| kernel | config | dtype | target | registers | spill st/ld (B) | shared (B) | tensor cores | compile s | verdict |",
        "|---|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    report = "\n".join(header + rows)
    report += "\n\n## Roofline at the benchmark shapes (H100: 777 TFLOP/s bf16, 3.0 TB/s)\n\n"
    report += roofline.markdown_table(roofline.benchmark_shapes()) + "\n"
    return report, findings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one autotune config per kernel and dtype")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="compile only the specs whose 'kernel config dtype' contains TEXT (repeatable)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel has a problem")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    report, findings = run(args.quick, args.only)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    for spec, capability, issues in findings:
        print(f"PROBLEM {spec.kernel} [{spec.config}] {spec.dtype} sm_{capability}: {'; '.join(issues)}", file=sys.stderr)
    return 1 if (args.check and findings) else 0


if __name__ == "__main__":
    sys.exit(main())
