"""``m2mkd-fast`` (also ``python -m m2mkd_fast``): the m2mKD pipeline, one subcommand per phase.

    m2mkd-fast reproduce                      # everything, 5 seeds, NAC and V-MoE, then REPORT.md
    m2mkd-fast reproduce --quick              # a small version (minutes), what the tests run
    m2mkd-fast pretrain-meta --run-dir runs/x
    m2mkd-fast train-teacher --run-dir runs/x
    m2mkd-fast split-teacher --run-dir runs/x
    m2mkd-fast distill  --run-dir runs/x --student vmoe --seed 0 --module 2     # one pair
    m2mkd-fast distill  --run-dir runs/x --student vmoe --seed 0 --module all   # all pairs in turn
    m2mkd-fast assemble --run-dir runs/x --student vmoe --seed 0
    m2mkd-fast finetune --run-dir runs/x --student vmoe --seed 0
    m2mkd-fast scratch  --run-dir runs/x --student vmoe --seed 0
    m2mkd-fast evaluate --run-dir runs/x --student vmoe --seed 0 --which finetune

Every phase reads a YAML preset (``--config``; shipped: see ``m2mkd-fast presets``) with
``--set key=value`` overrides, writes into ``--run-dir`` and runs under ``torchrun`` too
(DistributedDataParallel; gloo on CPU, nccl on GPU), e.g.
``torchrun --nproc_per_node=2 -m m2mkd_fast finetune --run-dir runs/x --student nac``.
Pairs are independent: run ``distill --module i`` for different i as separate processes (or
machines) at once, then ``assemble``.
"""

from __future__ import annotations

import argparse
import sys

PHASE_HELP = {
    "pretrain-meta": "train the meta model (one block per stage) end to end; it is frozen afterwards",
    "train-teacher": "prepare the ViT/DeiT teacher: Deep Incubation of each module in the frozen meta model, "
                     "assembly, end-to-end fine-tune (teacher.incubate.epochs=0: end to end from scratch)",
    "split-teacher": "cut the trained teacher into its modules (teacher_modules/module_<i>.safetensors)",
    "distill": "m2mKD: train student module(s) against teacher module(s) inside the frozen meta model",
    "assemble": "load the distilled student modules into the full student (assembled.safetensors)",
    "finetune": "fine-tune the assembled student end to end",
    "scratch": "train the same student from random init with the fine-tuning recipe (the baseline)",
    "evaluate": "IID, OOD (corrupted test split) and few-shot (digits) accuracy of a trained student",
    "reproduce": "the whole pipeline for every student and seed of the preset, then REPORT.md",
}


def _common(p: argparse.ArgumentParser, default_run_dir: str | None = None):
    g = p.add_argument_group("configuration and output")
    g.add_argument("--config", "-c", default="default", metavar="PRESET|FILE",
                   help="a shipped preset name (default, quick, ...) or a YAML file (default: %(default)s)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set students.nac.finetune.epochs=10 "
                        "--set data.source=full (repeatable; values are YAML)")
    g.add_argument("--run-dir", default=default_run_dir, metavar="DIR",
                   help="the experiment directory every phase reads from and writes to "
                        "(default: runs/<preset name>)")
    g.add_argument("--device", default=None, metavar="DEV",
                   help="auto | cpu | cuda | cuda:N (default: the config's, 'auto')")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads per process (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (log lines only)")
    g.add_argument("--force", action="store_true",
                   help="redo the phase even if its output is done with the same config")


def _resume(p):
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last.safetensors in the run directory "
                        "(refused if the config changed)")


def _expert_parallel(p):
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: shard the V-MoE student's experts over the processes (all-to-all token "
                        "exchange); other parameters stay data parallel (DDP)")


def _precision(p):
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype of the training steps (default: the config's precision, fp32)")


def _student(p, seed=True):
    p.add_argument("--student", required=True, choices=["nac", "vmoe"], help="which student")
    if seed:
        p.add_argument("--seed", type=int, default=None,
                       help="student seed (init, stitch init, data order); default: the config's first "
                            "reproduce seed")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="m2mkd-fast",
        description="Module-to-module knowledge distillation (m2mKD, arXiv 2402.16918): train a meta model and "
                    "a teacher, distill teacher modules into NAC / V-MoE student modules, assemble, fine-tune, "
                    "compare with training from scratch. Each phase is a subcommand; `reproduce` runs them all.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `m2mkd-fast <phase> --help` for a phase's options; `m2mkd-fast presets` lists the shipped "
               "presets; `m2mkd-fast show-config` prints a resolved config. Every config key is documented in "
               "the default preset, m2mkd_fast/configs/default.yaml (a key it lacks is rejected).")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    sub = ap.add_subparsers(dest="phase", metavar="<phase>")
    sub.required = True

    for name in ("pretrain-meta", "train-teacher"):
        p = sub.add_parser(name, help=PHASE_HELP[name], description=PHASE_HELP[name])
        _common(p)
        _resume(p)
        _precision(p)
    p = sub.add_parser("split-teacher", help=PHASE_HELP["split-teacher"], description=PHASE_HELP["split-teacher"])
    _common(p)
    p = sub.add_parser("distill", help=PHASE_HELP["distill"], description=PHASE_HELP["distill"])
    _common(p)
    _resume(p)
    _precision(p)
    _student(p)
    p.add_argument("--module", default="all", metavar="I|all",
                   help="which module pair to train (0 .. num_stages-1), or 'all' in turn (default: all)")
    p.add_argument("--pairs-in-parallel", action="store_true",
                   help="under torchrun: each process trains its own share of the pairs alone (no DDP); "
                        "without it every pair is trained by all processes together with DDP")
    _expert_parallel(p)
    for name in ("assemble", "finetune", "scratch"):
        p = sub.add_parser(name, help=PHASE_HELP[name], description=PHASE_HELP[name])
        _common(p)
        _student(p)
        if name != "assemble":
            _resume(p)
            _expert_parallel(p)
            _precision(p)
    p = sub.add_parser("evaluate", help=PHASE_HELP["evaluate"], description=PHASE_HELP["evaluate"])
    _common(p)
    _student(p)
    p.add_argument("--which", default="finetune", choices=["finetune", "scratch", "assembled", "nokd", "scratch_equal"],
                   help="which trained student of the run directory (default: finetune)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="evaluate these safetensors weights instead (a student of the config's architecture)")
    p = sub.add_parser("reproduce", help=PHASE_HELP["reproduce"], description=PHASE_HELP["reproduce"] + (
        ". Phases already done with the same config are reused (the meta model and teacher are shared by "
        "all seeds); a killed reproduce picks up where it stopped when run again with the same arguments."))
    _common(p)
    _precision(p)
    p.add_argument("--quick", action="store_true",
                   help="use the 'quick' preset (tiny budgets, 1 seed; minutes) unless --config is given")
    p.add_argument("--seeds", default=None, metavar="S,S,...", help="override reproduce.seeds, e.g. 0,1,2")
    p.add_argument("--students", default=None, metavar="K,K", help="override reproduce.students, e.g. nac,vmoe")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes (1 thread each) for independent units (meta, teacher modules, and per "
                        "student and seed: m2mKD, no-KD, scratch, equal-compute scratch), each started when "
                        "what it needs is done; 1 = everything in this process (default: reproduce.jobs)")
    p.add_argument("--report-dir", default=None, metavar="DIR",
                   help="also copy REPORT.md, results.json, config.yaml and figures/ here (e.g. results/)")
    p = sub.add_parser("bench", help="benchmark the ops and one m2mKD pair step, every formulation side by side",
                       description="Benchmark every op family (every available backend beside the seed's formulation "
                                   "and the peers of docs/design.md §3), sweeps, and one m2mKD pair training step; writes "
                                   "REPORT.md, bench.json and PNG plots into --out.")
    p.add_argument("what", nargs="?", default="all", choices=["ops", "step", "all", "ep"],
                   help="what to run (default: all); ep: one MoE layer with and without expert parallelism on "
                        "2 CPU processes (not part of all)")
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (a smoke test)")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="output directory (default: bench-results)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="print B's median times over A's for every case both ran, and run nothing")
    p = sub.add_parser("presets", help="list the shipped presets: what each runs and its wall time on 2 CPU cores",
                       description="list the shipped presets: what each runs and its wall time on 2 CPU cores")
    p = sub.add_parser("show-config", help="print the resolved config (preset + overrides) as YAML",
                       description="print the resolved config (preset + overrides) as YAML")
    p.add_argument("--config", "-c", default="default", metavar="PRESET|FILE", help="preset name or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    for p in sub.choices.values():  # also after the phase; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of a user error too")
    return ap


def main(argv=None) -> int:
    """Parse (before importing torch: ``--help`` answers at once), run; a user error (bad option
    value, config, checkpoint or file) prints one line and returns 2, ``--debug`` shows its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except (OSError, ValueError, RuntimeError) as err:
        if args.debug or not _user_error(err):
            raise
        print(f"m2mkd-fast: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _user_error(err: BaseException) -> bool:
    """A bad option value, config, checkpoint or file (ConfigError is a ValueError); any other
    error is a bug and keeps its traceback."""
    if isinstance(err, (OSError, ValueError)):
        return True
    checkpoint = sys.modules.get("m2mkd_fast.distill.checkpoint")  # not imported: none was raised
    return checkpoint is not None and isinstance(err, checkpoint.CheckpointError)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a file error names its path)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def _run(args, argv) -> int:
    from .distill.config import available_presets, load_config, preset_summary

    if args.phase == "bench":
        return _bench(args)
    if args.phase == "presets":
        for name in available_presets():
            description, wall_time = preset_summary(name)
            print(f"{name}: {description}; {wall_time}")
        return 0
    if args.phase == "reproduce" and args.quick and args.config == "default":
        args.config = "quick"
    overrides = list(args.overrides)
    if args.phase == "reproduce":
        if args.seeds:
            overrides.append(f"reproduce.seeds=[{args.seeds}]")
        if args.students:
            overrides.append(f"reproduce.students=[{args.students}]")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    if getattr(args, "precision", None):
        overrides.append(f"precision={args.precision}")
    cfg = load_config(args.config, overrides)
    if args.phase == "show-config":
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0

    import torch

    from .distill import report
    from .distill.pipeline import Pipeline

    report.COMMAND_LINE = " ".join(["m2mkd-fast"] + argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir or f"runs/{args.config if '/' not in args.config else 'custom'}"
    try:
        pipe = Pipeline(cfg, run_dir, progress=not args.no_progress, force=args.force,
                        lock="shared" if args.phase == "distill" and args.module != "all" else "exclusive",
                        expert_parallel=getattr(args, "expert_parallel", False))
    except RuntimeError as err:  # the device asked for is absent, or the run directory is busy
        raise ValueError(str(err)) from err
    try:
        _phase(pipe, cfg, args)
    finally:
        pipe.close()
    return 0


def _phase(pipe, cfg: dict, args):
    seed = getattr(args, "seed", None)
    if seed is None:
        seed = cfg["reproduce"]["seeds"][0]
    resume = getattr(args, "resume", False)
    ph = args.phase
    if ph == "pretrain-meta":
        pipe.pretrain_meta(resume)
    elif ph == "train-teacher":
        pipe.train_teacher(resume)
    elif ph == "split-teacher":
        pipe.split_teacher()
    elif ph == "distill":
        module = args.module if args.module == "all" else _int(args.module, "--module")
        pipe.distill(args.student, seed, module, resume, pairs_in_parallel=args.pairs_in_parallel)
    elif ph == "assemble":
        pipe.assemble(args.student, seed)
    elif ph == "finetune":
        pipe.finetune(args.student, seed, resume)
    elif ph == "scratch":
        pipe.scratch(args.student, seed, resume)
    elif ph == "evaluate":
        model = None
        if args.weights:
            from .distill.checkpoint import load_state_checked, load_weights

            model = pipe.build_student(args.student, seed)
            sd, _ = load_weights(args.weights)
            load_state_checked(model, sd, f"weights {args.weights}")
        pipe.evaluate(args.student, seed, args.which if not args.weights else "weights", model=model)
    elif ph == "reproduce":
        pipe.reproduce(report_dir=args.report_dir, jobs=args.jobs)


def _bench(args) -> int:
    from .bench import report, suite

    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if args.what == "ep":
        from .bench import expert_parallel

        print(expert_parallel.run(quick=args.quick, out=args.out), end="")
        return 0
    suite.run(args.what, quick=args.quick, out=args.out, device=args.device)
    print(f"m2mkd-fast bench: wrote {args.out}/REPORT.md, {args.out}/bench.json and the sweep plots")
    return 0


def _int(s, name):
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"{name} must be an integer or 'all', got {s!r}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
