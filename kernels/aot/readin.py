"""KernelSpecs of the read-in kernels (m2mkd_fast.kernels.readin), and the generator of their
verified config table.

    python -m m2mkd_fast.kernels.aot.readin --verify [--workers N]

compiles every candidate config (``CANDIDATES``) of every kernel, Din variant and target with
ptxas and prints the ``VERIFIED`` table that m2mkd_fast.kernels.readin's autotuner reads.
"""

from .. import interpreting
from .. import readin as _k
from .compile import KernelSpec, compile_spec, jit_function, problems, signature

_KERNELS = {"fwd": ("readin_fwd", "_readin_fwd"), "dq": ("readin_bwd_dq", "_readin_bwd_dq"),
            "dx": ("readin_bwd_dx", "_readin_bwd_dx")}
_FP32_POINTERS = {"STATS", "DELTA"}
_INTEGERS = ("R", "N", "D", "ROWS_PER_SPLIT")
AOT_DINS = {"bf16": (64, 256, 320), "fp32": (64,)}  # the report's default: NAC's Din and a small one


def _spec(kind: str, dtype: str, da: int, db: int, config: tuple, capabilities=_k.TARGETS, dx_partial: bool = False):
    """A KernelSpec of one kernel, dtype, Din variant and config, typed as the JIT sees
    contiguous tensors: every stride and D multiples of 16, R and N not."""
    name, attr = _KERNELS[kind]
    fn = jit_function(getattr(_k, attr))
    bm, bn, warps, stages = config
    constexprs = dict(DA=da, DB=max(db, 16), HAS_B=db > 0, BLOCK_M=bm, BLOCK_N=bn, DOT_FP32=False,
                      PRECISION="ieee" if dtype == "fp32" else "tf32")
    pointers = {a: "*fp32" if a in _FP32_POINTERS or (a == "DX" and dx_partial) else f"*{dtype}"
                for a in fn.arg_names if a.isupper() and a not in _INTEGERS}
    scalars = {a: "fp32" for a in fn.arg_names if "scale" in a}
    types, divisible = signature(fn, constexprs, pointers, scalars,
                                 divisible=lambda a: a.startswith("stride_") or a in ("D", "ROWS_PER_SPLIT"))
    label = f"Din={da}+{db}" if db else f"Din={da}"
    label += f",BM={bm},BN={bn},w{warps},s{stages}" + (",fp32 partials" if dx_partial else "")
    return KernelSpec(name, fn, types, constexprs, dtype, warps, stages, label, True, divisible, tuple(capabilities))


def aot_specs(all_variants: bool = False) -> list:
    """KernelSpecs of every verified (kernel, dtype, config) at the Din of AOT_DINS (every Din
    variant with ``all_variants``), each with the targets it is verified for
    (``.capabilities``); those verified for both sm_80 and sm_90a come first per kernel and
    dtype. Plus the dX kernel writing fp32 split partials at Din 320."""
    wanted = {dtype: {_k.din_pieces(d) for d in dins} for dtype, dins in AOT_DINS.items()}
    grouped = {}
    for (kind, target, dtype, da, db), entries in _k.VERIFIED.items():
        if not all_variants and (da, db) not in wanted[dtype]:
            continue
        for e in entries:
            grouped.setdefault((kind, dtype, da, db, e[:4]), []).append(target)
    both, single = [], []
    for (kind, dtype, da, db, config), targets in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        spec = _spec(kind, dtype, da, db, config, tuple(sorted(targets)))
        (both if len(targets) == len(_k.TARGETS) else single).append(spec)
    extra = []
    for target in _k.TARGETS:
        for e in _k.VERIFIED.get(("dx", target, "bf16", 256, 64), ())[:1]:
            extra.append(_spec("dx", "bf16", 256, 64, e[:4], (target,), dx_partial=True))
    return both + single + extra


def _verify_one(job):
    """(job, shared bytes or None, problems found, info) for one (kind, dtype, variant, config, target)."""
    kind, dtype, (da, db), config, target = job
    spec = _spec(kind, dtype, da, db, config, (target,))
    try:
        result = compile_spec(spec, target)
    except Exception as err:  # noqa: BLE001 - a failed compile just is not verified
        return job, None, [f"compile failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"], ""
    issues = problems(result)
    if result.shared_bytes > _k.SHARED_LIMIT[target] and not any("shared" in i for i in issues):
        issues.append(f"shared memory {result.shared_bytes} B")
    return job, result.shared_bytes, issues, f"regs {result.registers}, {result.seconds:.1f}s"


def verify_table(workers: int = 1, log=print) -> dict:
    """Compile every candidate for every variant and target; return the VERIFIED table."""
    jobs = [(kind, dtype, variant, config, target)
            for dtype in ("bf16", "fp32") for variant in _k.VARIANTS[dtype] for kind in ("fwd", "dq", "dx")
            for config in _k.CANDIDATES[(kind, dtype)] for target in _k.TARGETS]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap_unordered(_verify_one, jobs))
    else:
        results = [_verify_one(job) for job in jobs]
    table = {}
    for job, shared, issues, info in results:
        log(f"{job}: shared={shared} {'; '.join(issues) or 'ok'} ({info})")
        if shared is not None and not issues:
            kind, dtype, (da, db), config, target = job
            table.setdefault((kind, target, dtype, da, db), []).append((*config, shared))
    return {key: tuple(sorted(v, key=lambda e: _k.CANDIDATES[(key[0], key[2])].index(e[:4])))
            for key, v in sorted(table.items())}


def format_table(table: dict) -> str:
    """The VERIFIED table as the Python source pasted into m2mkd_fast.kernels.readin."""
    lines = ["VERIFIED = {"]
    for key, entries in table.items():
        lines.append(f"    {key!r}: {tuple(entries)!r},")
    lines.append("}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Verify the read-in kernels' autotune configs with ptxas (sm_80, sm_90a)")
    parser.add_argument("--verify", action="store_true", help="compile every candidate; print the VERIFIED table")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.verify:
        if interpreting():
            sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real kernels")
        print(format_table(verify_table(args.workers, log=lambda m: print(m, file=sys.stderr, flush=True))))
