"""The m2mKD pipeline phases (docs/design.md §2.5), each callable alone (the CLI's subcommands) or
chained by :meth:`Pipeline.reproduce`.

Run directory layout (``root`` = ``--run-dir``)::

    root/config.yaml                       the resolved config of the latest call
    root/meta/                             pretrain-meta   (model.safetensors, metrics.jsonl, curves.png, done.json)
    root/teacher_incubate/module_<i>/      train-teacher: Deep Incubation of teacher module i
    root/teacher/                          train-teacher: the end-to-end (fine-)tune
    root/teacher_modules/module_<i>.safetensors           split-teacher
    root/seed<s>/<student>/distill/module_<i>/            distill (one trainer run per pair)
    root/seed<s>/<student>/assembled.safetensors          assemble
    root/seed<s>/<student>/finetune/                      finetune
    root/seed<s>/<student>/nokd/...                       the same three, α = 0 (no-KD ablation)
    root/seed<s>/<student>/scratch/                       scratch (the baseline)
    root/seed<s>/<student>/scratch_equal/                 scratch for the m2mKD student's compute
    root/seed<s>/<student>/eval_<which>.json              evaluate
    root/REPORT.md, root/figures/, root/results.json      reproduce

Every trainer run directory gets ``done.json`` holding a fingerprint of the config that
produced it; a phase whose output is done with the same fingerprint is skipped (``force``
redoes it), and a phase killed midway is resumed from its ``last.safetensors``.

Faults (docs/design.md §2.8): the run directory is locked for the process's lifetime; every
artifact's size and sha256 sit in its phase's done record (``done.json``,
``teacher_modules/done.json``, ``assembled.json``) and are verified before the artifact is
reused or loaded; a mismatch stops with the file's name and the command that redoes the phase.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data import build_data, corrupted_copy, linear_probe_episodes, load_digits_dataset
from ..data.transforms import Normalize
from .checkpoint import CheckpointError, load_state_checked, load_weights, save_weights
from .config import dump_config, fingerprint
from .files import atomic_write_text, file_record, lock_run_dir, remove_leftovers, verify_file
from .dist import DistContext, init_distributed
from .progress import UnitProgress
from .students import assemble, build_model, module_state, pair_student, width
from .tasks import EndToEnd, IncubationTask, PairTask
from .trainer import evaluate_accuracy, iterate_batches, train

PHASES = ("pretrain-meta", "train-teacher", "split-teacher", "distill", "assemble", "finetune", "scratch", "evaluate")
VARIANTS = ("kd", "nokd")  # m2mKD pairs (the configured loss) | the no-KD ablation (α = 0: labels only)
RUN_OF = {"finetune": "finetune", "scratch": "scratch", "nokd": "nokd/finetune", "scratch_equal": "scratch_equal"}


def seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def log(msg: str, ctx: DistContext | None = None):
    if ctx is None or ctx.is_main:
        print(f"[m2mkd-fast {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _artifact_record(done_path: Path, name: str) -> dict | None:
    """The size + sha256 record of artifact ``name`` in a done record (None when absent)."""
    return ((_read_json(done_path) or {}).get("artifacts") or {}).get(name)


class Pipeline:
    """All phases over one run directory and one resolved config.

    ``lock``: "exclusive" (the default) locks the run directory for this object's lifetime
    (until :meth:`close` or the process ends) and removes the leftovers of killed writes;
    "shared" lets independent ``distill --module i`` processes share it (each trainer run
    directory is locked on its own); None for worker processes of a locked parent. Raises
    RunDirBusy when another process holds the lock."""

    def __init__(self, cfg: dict, root, ctx: DistContext | None = None, progress: bool = True,
                 force: bool = False, write_config: bool = True, lock: str | None = "exclusive",
                 expert_parallel: bool = False):
        if lock not in ("exclusive", "shared", None):
            raise ValueError(f"lock must be 'exclusive', 'shared' or None, got {lock!r}")
        self.cfg = cfg
        self.expert_parallel = expert_parallel  # shard the MoE experts over the torchrun processes
        self.root = Path(root)
        self.ctx = ctx or init_distributed(cfg["device"])
        self.progress = progress
        self.force = force
        self._data = None
        self.announce_data = True  # worker processes of a parallel reproduce load the data silently
        self._lock = None
        if self.ctx.is_main:
            if lock:
                self._lock = lock_run_dir(self.root, shared=lock == "shared")
            if lock == "exclusive":
                remove_leftovers(self.root, recursive=True)
            if write_config:
                dump_config(cfg, self.root / "config.yaml")

    def close(self):
        """Release the run directory and the process group."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.ctx.close()

    # ----------------------------------------------------------------------------- helpers
    @property
    def data(self):
        if self._data is None:
            self._data = build_data(self.cfg["data"])
            if self.announce_data:
                log(f"data: {self._data.source}: {len(self._data.train)} train / {len(self._data.test)} test, "
                    f"{self._data.num_classes} classes, {self._data.in_chans}x{self._data.img_size}x{self._data.img_size}",
                    self.ctx)
        return self._data

    def student_dir(self, kind: str, seed: int) -> Path:
        return self.root / f"seed{seed}" / kind

    def variant_dir(self, kind: str, seed: int, variant: str = "kd") -> Path:
        """Where a variant's pairs, assembly and fine-tune live (the no-KD ablation in nokd/)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        d = self.student_dir(kind, seed)
        return d if variant == "kd" else d / "nokd"

    def _data_key(self):
        """The data config minus what does not change the data (loader processes)."""
        return {k: v for k, v in self.cfg["data"].items() if k != "num_workers"}

    def _common(self):
        precision = self.cfg["precision"]  # only when not fp32: fp32 runs keep their fingerprints
        return {"data": self._data_key(), "augment": self.cfg["augment"], **({"precision": precision} if precision != "fp32" else {})}

    def phase_config(self, phase: str, kind: str | None = None, seed: int | None = None, module: int | None = None,
                     variant: str = "kd") -> dict:
        """The part of the config a phase's output depends on (checkpoints compare it; done.json
        fingerprints it)."""
        c = self.cfg
        base = self._common()
        if phase == "pretrain-meta":
            return {**base, "seed": c["seed"], "meta": c["meta"]}
        teacher = {k: v for k, v in c["teacher"].items() if k != "incubate"}
        if phase == "train-teacher":
            if c["teacher"]["incubate"]["epochs"] > 0:  # fine-tuned from modules incubated in the meta model
                return {**base, "seed": c["seed"], "teacher": c["teacher"],
                        "meta": fingerprint(self.phase_config("pretrain-meta"))}
            return {**base, "seed": c["seed"], "teacher": teacher}
        if phase == "incubate-teacher":
            return {**base, "seed": c["seed"], "teacher": {"model": teacher["model"], "kwargs": teacher["kwargs"]},
                    "incubate": c["teacher"]["incubate"], "module": module,
                    "meta": fingerprint(self.phase_config("pretrain-meta"))}
        st = c["students"][kind]
        model_part = {"model": st["model"], "kwargs": st["kwargs"]}
        if phase == "distill" and variant == "nokd":
            return {**base, "seed": seed, "module": module, "student": {**model_part, "distill": st["distill"]},
                    "variant": "nokd", "meta": fingerprint(self.phase_config("pretrain-meta"))}
        if phase == "distill":
            return {**base, "seed": seed, "module": module, "student": {**model_part, "distill": st["distill"]},
                    "distill": c["distill"], "meta": fingerprint(self.phase_config("pretrain-meta")),
                    "teacher": self._teacher_modules_fp()}
        if phase == "finetune":
            out = {**base, "seed": seed, "student": {**model_part, "finetune": st["finetune"]},
                   "assembled_from": [fingerprint(self.phase_config("distill", kind, seed, i, variant))
                                      for i in range(self._num_stages(kind))]}
            return out if variant == "kd" else {**out, "variant": variant}
        if phase == "scratch":
            return {**base, "seed": seed, "student": {**model_part, "finetune": st["finetune"]}}
        raise ValueError(phase)

    def _num_stages(self, kind: str) -> int:
        return int(self.cfg["meta"]["kwargs"].get("num_stages", 0) or self._meta_skeleton().num_stages)

    def _meta_skeleton(self):
        seed_all(self.cfg["seed"])
        return build_model(self.cfg["meta"]["model"], self.cfg["meta"]["kwargs"], self.data)

    def redo_command(self, phase: str, kind: str | None = None, seed: int | None = None, module=None,
                     variant: str = "kd") -> str:
        """The command line that redoes a phase of this run directory (the controls that only
        ``reproduce`` runs — the no-KD variant, the equal-compute scratch — are redone by it)."""
        if variant != "kd" or phase in ("scratch-equal", "nokd"):
            return f"`m2mkd-fast reproduce --run-dir {self.root} --force` (with this run's --config and --set options)"
        cmd = f"m2mkd-fast {phase} --run-dir {self.root}"
        if kind is not None:
            cmd += f" --student {kind} --seed {seed}"
        if module is not None:
            cmd += f" --module {module}"
        return f"`{cmd} --force` (with this run's --config and --set options)"

    def _done(self, run_dir: Path, pcfg: dict, redo: str):
        """done.json of a finished run with this config, its model verified, else None (a done
        record of an older version, without artifact records, is redone)."""
        d = _read_json(run_dir / "done.json")
        path = run_dir / "model.safetensors"
        if self.force or not d or d.get("fingerprint") != fingerprint(pcfg) or not path.exists() or "artifacts" not in d:
            return None
        verify_file(path, d["artifacts"].get(path.name), redo)
        return d

    def _load_artifact(self, model, path: Path, done_path: Path, redo: str, what: str):
        """Load weights into ``model`` after checking the file against its done record."""
        verify_file(path, _artifact_record(done_path, path.name), redo)
        sd, _ = load_weights(path)
        load_state_checked(model, sd, f"{what} {path}")
        return model

    def _train(self, task, run_dir: Path, phase: str, pcfg: dict, tcfg: dict, seed: int, resume: bool,
               dcfg=None, save_module=None, title="", redo=""):
        """Run the trainer unless done; resume a killed run when asked (or when resume='auto'
        and a checkpoint exists). ``redo``: the command that redoes this run (error messages)."""
        done = self._done(run_dir, pcfg, redo)
        if done is not None:
            log(f"{title}: done already ({run_dir}; test acc {100 * (done.get('test_acc') or 0):.2f}%), skipped", self.ctx)
            return done
        last = run_dir / "last.safetensors"
        do_resume = bool(resume) and (resume != "auto" or last.exists())
        if self.force and resume == "auto":
            do_resume = False

        def run(resume_now):
            return train(task, data=self.data, tcfg=tcfg, aug=self.cfg["augment"], dcfg=dcfg, run_dir=run_dir,
                         phase=phase, config=pcfg, seed=seed, ctx=self.ctx, resume=resume_now,
                         save_module=save_module, progress=self.progress, log_every=self.cfg["log"]["every"],
                         title=title, eval_limit=self.cfg["log"]["eval_limit"],
                         num_workers=self.cfg["data"]["num_workers"], expert_parallel=self.expert_parallel,
                         precision=self.cfg["precision"])

        lock = lock_run_dir(run_dir) if self.ctx.is_main else None
        try:
            if self.ctx.is_main:
                remove_leftovers(run_dir)
                (run_dir / "done.json").unlink(missing_ok=True)  # model.safetensors is about to change
            try:
                res = run(do_resume)
            except CheckpointError as err:
                if resume != "auto":
                    raise
                log(f"{title}: cannot resume ({err}); starting afresh", self.ctx)
                res = run(False)
            out = {"fingerprint": fingerprint(pcfg), "test_acc": res.final_test_acc, "seconds": res.seconds,
                   "cpu_seconds": res.cpu_seconds,
                   "img_per_s": res.images_per_s, "steps": res.steps, "phase": phase}
            if self.ctx.is_main:
                out["artifacts"] = {"model.safetensors": file_record(run_dir / "model.safetensors")}
                _write_json(run_dir / "done.json", out)
                if last.exists() and not self.cfg["log"]["keep_last"]:
                    last.unlink()
        finally:
            if lock is not None:
                lock.close()
        self.ctx.barrier()
        log(f"{title}: test acc {100 * (res.final_test_acc or 0):.2f}% in {res.seconds:.0f} s "
            f"({res.images_per_s:.0f} img/s)", self.ctx)
        return out

    # ------------------------------------------------------------------------- meta, teacher
    def pretrain_meta(self, resume=False):
        seed_all(self.cfg["seed"])
        model = build_model(self.cfg["meta"]["model"], self.cfg["meta"]["kwargs"], self.data)
        seed_all(self.cfg["seed"] + 7919 * self.ctx.rank)
        return self._train(EndToEnd(model), self.root / "meta", "pretrain-meta", self.phase_config("pretrain-meta"),
                           self.cfg["meta"]["train"], self.cfg["seed"], resume, save_module=model, title="meta",
                           redo=self.redo_command("pretrain-meta"))

    def _teacher_skeleton(self):
        seed_all(self.cfg["seed"] + 1)
        return build_model(self.cfg["teacher"]["model"], self.cfg["teacher"]["kwargs"], self.data)

    def train_teacher(self, resume=False):
        """The teacher as the reference prepares it (docs/design.md §2.5): with
        ``teacher.incubate.epochs`` > 0, Deep Incubation (each module trained on the labels inside
        the frozen meta model, :meth:`incubate_teacher_module`), the modules assembled, then the
        whole teacher fine-tuned end to end with ``teacher.train``; with 0, ``teacher.train``
        trains it end to end from scratch."""
        pcfg = self.phase_config("train-teacher")
        model = self._teacher_skeleton()
        incubate = self.cfg["teacher"]["incubate"]["epochs"] > 0
        if incubate and self._done(self.root / "teacher", pcfg, self.redo_command("train-teacher")) is None:
            for i in range(model.num_stages):
                path = self.incubate_teacher_module(i, resume)
                self._load_artifact(model.stages[i], path, path.parent / "done.json",
                                    self.redo_command("train-teacher"), f"incubated teacher module {i}")
        seed_all(self.cfg["seed"] + 1 + 7919 * self.ctx.rank)
        return self._train(EndToEnd(model), self.root / "teacher", "train-teacher", pcfg,
                           self.cfg["teacher"]["train"], self.cfg["seed"] + 1, resume, save_module=model,
                           title="teacher fine-tune" if incubate else "teacher", redo=self.redo_command("train-teacher"))

    def incubate_teacher_module(self, i: int, resume="auto") -> Path:
        """Deep Incubation (Ni et al. 2022) of teacher module i from its initial weights: trained
        on the labels inside the frozen meta model, so that it fits the meta model's interfaces.
        Returns the module's weights file."""
        meta = self.load_meta()
        teacher = self._teacher_skeleton()
        if teacher.num_stages != meta.num_stages:
            raise ValueError(f"the teacher has {teacher.num_stages} stages but the meta model {meta.num_stages}: "
                             "set teacher.kwargs.num_stages to the meta model's num_stages")
        task = IncubationTask(meta, teacher.stages[i], i)
        run_dir = self.root / "teacher_incubate" / f"module_{i}"
        seed = self.cfg["seed"] + 31 * (i + 1)
        seed_all(seed + 7919 * self.ctx.rank)
        self._train(task, run_dir, "incubate-teacher", self.phase_config("incubate-teacher", module=i),
                    self.cfg["teacher"]["incubate"], seed, resume, save_module=task.module,
                    title=f"incubate teacher module {i}", redo=self.redo_command("train-teacher"))
        return run_dir / "model.safetensors"

    def load_meta(self):
        model = build_model(self.cfg["meta"]["model"], self.cfg["meta"]["kwargs"], self.data)
        path = self.root / "meta" / "model.safetensors"
        if not path.exists():
            raise CheckpointError(f"no meta model at {path}: run `m2mkd-fast pretrain-meta` first")
        return self._load_artifact(model, path, path.parent / "done.json", self.redo_command("pretrain-meta"),
                                   "meta model").eval()

    def load_teacher(self, from_modules: bool = True):
        """The teacher, from its split modules (split-teacher's output) or its full weights."""
        model = build_model(self.cfg["teacher"]["model"], self.cfg["teacher"]["kwargs"], self.data)
        mdir = self.root / "teacher_modules"
        if from_modules and (mdir / "module_0.safetensors").exists():
            for i in range(model.num_stages):
                self._load_artifact(model.stages[i], mdir / f"module_{i}.safetensors", mdir / "done.json",
                                    self.redo_command("split-teacher"), f"teacher module {i}")
            return model.eval()
        path = self.root / "teacher" / "model.safetensors"
        if not path.exists():
            raise CheckpointError(f"no teacher at {path}: run `m2mkd-fast train-teacher` first")
        return self._load_artifact(model, path, path.parent / "done.json", self.redo_command("train-teacher"),
                                   "teacher").eval()

    def split_teacher(self):
        """Cut the trained teacher into its modules: teacher_modules/module_<i>.safetensors.

        A teacher trained end to end without incubation does not fit the meta model: its first
        and last modules score near chance inside it, which leaves those pairs without a useful
        teacher signal (docs/design.md §2.5); the incubated teacher's modules do."""
        teacher = self.load_teacher(from_modules=False)
        meta_n = self._num_stages("vmoe")
        if teacher.num_stages != meta_n:
            raise ValueError(f"the teacher has {teacher.num_stages} stages but the meta model {meta_n}: "
                             "set teacher.kwargs.num_stages to the meta model's num_stages")
        inc = self.cfg["teacher"]["incubate"]
        mdir = self.root / "teacher_modules"
        tfp = self._teacher_modules_fp()
        if self.ctx.is_main:
            (mdir / "done.json").unlink(missing_ok=True)
            artifacts = {}
            for i, stage in enumerate(teacher.stages):
                path = save_weights(stage, mdir / f"module_{i}.safetensors",
                                    {"module": i, "num_stages": teacher.num_stages, "model": self.cfg["teacher"]["model"],
                                     "teacher_fingerprint": tfp, "incubated": inc["epochs"] > 0})
                artifacts[path.name] = file_record(path)
            _write_json(mdir / "done.json", {"fingerprint": tfp, "artifacts": artifacts})
        self.ctx.barrier()
        log(f"split-teacher: {teacher.num_stages} modules written to {mdir}"
            + (" (incubated in the meta model)" if inc["epochs"] > 0 else ""), self.ctx)
        return mdir

    def _teacher_modules_fp(self) -> str:
        """What the teacher modules depend on: the teacher run (incubation included when on)."""
        return fingerprint(self.phase_config("train-teacher"))

    def _teacher_split_current(self) -> bool:
        """Whether teacher_modules/ holds the split of the current teacher (its files verified)."""
        mdir = self.root / "teacher_modules"
        done = _read_json(mdir / "done.json")
        if not done or done.get("fingerprint") != self._teacher_modules_fp():
            return False
        for name, record in done["artifacts"].items():
            verify_file(mdir / name, record, self.redo_command("split-teacher"))
        return True

    # ------------------------------------------------------------------------------- students
    def build_student(self, kind: str, seed: int):
        st = self.cfg["students"][kind]
        seed_all(seed)
        model = build_model(st["model"], st["kwargs"], self.data)
        return model

    def distill(self, kind: str, seed: int, module="all", resume=False, pairs_in_parallel: bool = False,
                variant: str = "kd"):
        """m2mKD pair(s): ``module`` an index or "all" (one after the other). ``variant`` "nokd":
        the same pairs trained on the labels only (α = 0, no teacher), the KD term's ablation.

        ``pairs_in_parallel`` (under torchrun): instead of training each pair with DDP over all
        processes, process r trains pairs r, r + world, ... on its own device — the pairs are
        independent (docs/design.md §2.5), so this needs no communication until the final barrier."""
        meta = self.load_meta()
        teacher = self.load_teacher() if variant == "kd" else None
        n = meta.num_stages
        indices = list(range(n)) if module == "all" else [int(module)]
        for i in indices:
            if not 0 <= i < n:
                raise ValueError(f"--module must be in [0, {n - 1}] or 'all', got {i}")
        outer = self.ctx
        if pairs_in_parallel and outer.distributed:
            indices = indices[outer.rank::outer.world_size]
            self.ctx = DistContext(0, 1, 0, outer.device)
            log(f"rank {outer.rank}: pairs {indices} of {kind} seed {seed}")
        try:
            return self._distill_pairs(kind, seed, indices, resume, meta, teacher, variant)
        finally:
            self.ctx = outer
            outer.barrier()

    def _distill_pairs(self, kind, seed, indices, resume, meta, teacher, variant="kd"):
        n = meta.num_stages
        out = {}
        for i in indices:
            full = self.build_student(kind, seed)
            if full.num_stages != n:
                raise ValueError(f"the {kind} student has {full.num_stages} modules but the meta model has {n} stages")
            seed_all(seed * 1000 + i)  # the stitch layers' init
            student = pair_student(kind, full, i, width(meta), seed)
            task = PairTask(meta, teacher, student, i)
            seed_all(seed * 1000 + i + 7919 * self.ctx.rank)
            run_dir = self.variant_dir(kind, seed, variant) / "distill" / f"module_{i}"
            kd = variant == "kd"
            res = self._train(task, run_dir, "distill", self.phase_config("distill", kind, seed, i, variant),
                              self.cfg["students"][kind]["distill"], seed * 1000 + i, resume,
                              dcfg=self.cfg["distill"] if kd else None, save_module=student,
                              title=f"{kind} s{seed} pair {i}" + ("" if kd else " (no KD)"),
                              redo=self.redo_command("distill", kind, seed, i, variant))
            if kd and "teacher_pair_acc" not in res:
                res["teacher_pair_acc"] = self._teacher_pair_acc(task, i)
                if self.ctx.is_main:
                    _write_json(run_dir / "done.json", res)
            out[i] = res
        return out

    def _teacher_pair_acc(self, task, i: int) -> float:
        """Test accuracy of teacher module i inside the frozen meta model (the same for every
        student and seed: cached in teacher_pairs.json)."""
        path = self.root / "teacher_pairs.json"
        key = fingerprint({"meta": self.phase_config("pretrain-meta"), "teacher": self._teacher_modules_fp(),
                           "module": i, "eval_limit": self.cfg["log"]["eval_limit"]})
        cache = _read_json(path) or {}
        if key in cache:
            return cache[key]
        task.to(self.ctx.device).eval()
        ds = self.data.test
        limit = int(self.cfg["log"]["eval_limit"] or 0)
        if limit and limit < len(ds):
            ds = torch.utils.data.Subset(ds, range(limit))
            ds.batch = self.data.test.batch
        acc = evaluate_accuracy(task.forward_teacher, ds, Normalize(self.data.mean, self.data.std), 256,
                                self.ctx.device, self.ctx)
        if self.ctx.is_main:
            cache = _read_json(path) or {}
            cache[key] = acc
            _write_json(path, cache)
        return acc

    def _distilled_states(self, kind: str, seed: int, n: int, variant: str = "kd"):
        states = []
        meta_dim = width(self.load_meta())
        for i in range(n):
            run_dir = self.variant_dir(kind, seed, variant) / "distill" / f"module_{i}"
            path = run_dir / "model.safetensors"
            if not path.exists():
                raise CheckpointError(f"distilled module {i} missing ({path}): run `m2mkd-fast distill --student {kind} "
                                      f"--seed {seed} --module {i}` first")
            full = self.build_student(kind, seed)
            seed_all(seed * 1000 + i)
            pair = pair_student(kind, full, i, meta_dim, seed)
            self._load_artifact(pair, path, run_dir / "done.json", self.redo_command("distill", kind, seed, i),
                                "distilled module")
            states.append(module_state(kind, pair))
        return states

    def assemble(self, kind: str, seed: int, variant: str = "kd"):
        model = self.build_student(kind, seed)
        states = self._distilled_states(kind, seed, model.num_stages, variant)
        report = assemble(kind, model, states)
        path = self.variant_dir(kind, seed, variant) / "assembled.safetensors"
        if self.ctx.is_main:
            (path.parent / "assembled.json").unlink(missing_ok=True)
            save_weights(model, path, {"phase": "assemble", "kind": kind, "seed": seed, "report": report,
                                       "variant": variant})
            _write_json(path.parent / "assembled.json", {"artifacts": {path.name: file_record(path)}})
        self.ctx.barrier()
        log(f"assemble {kind} s{seed}: {report.get('loaded_params', 0)}/{report.get('total_params', 0)} parameters "
            f"from distilled modules -> {path}", self.ctx)
        return path

    def finetune(self, kind: str, seed: int, resume=False, variant: str = "kd"):
        model = self.build_student(kind, seed)
        vdir = self.variant_dir(kind, seed, variant)
        path = vdir / "assembled.safetensors"
        if not path.exists():
            raise CheckpointError(f"no assembled student at {path}: run `m2mkd-fast assemble --student {kind} --seed {seed}`")
        self._load_artifact(model, path, path.parent / "assembled.json",
                            self.redo_command("assemble", kind, seed, variant=variant), "assembled student")
        seed_all(seed + 17 + 7919 * self.ctx.rank)
        return self._train(EndToEnd(model), vdir / "finetune", "finetune",
                           self.phase_config("finetune", kind, seed, variant=variant),
                           self.cfg["students"][kind]["finetune"], seed + 17, resume, save_module=model,
                           title=f"{kind} s{seed} finetune" + ("" if variant == "kd" else " (no KD)"),
                           redo=self.redo_command("finetune", kind, seed, variant=variant))

    def scratch(self, kind: str, seed: int, resume=False, epochs: int | None = None):
        """The baseline: the fine-tune recipe from random init; ``epochs`` given: the equal-compute
        baseline (scratch_equal/) with that many epochs."""
        model = self.build_student(kind, seed)
        tcfg = dict(self.cfg["students"][kind]["finetune"])
        pcfg = self.phase_config("scratch", kind, seed)
        name = "scratch"
        if epochs is not None:
            tcfg["epochs"] = int(epochs)
            pcfg = {**pcfg, "student": {**pcfg["student"], "finetune": tcfg}}
            name = "scratch_equal"
        seed_all(seed + 17 + 7919 * self.ctx.rank)
        return self._train(EndToEnd(model), self.student_dir(kind, seed) / name, name.replace("_", "-"), pcfg, tcfg,
                           seed + 17, resume, save_module=model, title=f"{kind} s{seed} {name.replace('_', ' ')}",
                           redo=self.redo_command(name.replace("_", "-"), kind, seed))

    def equal_compute(self, kind: str) -> dict:
        """Epochs of the equal-compute scratch baseline: E + D / c rounded, with E the fine-tune's
        epochs, D the m2mKD pairs' CPU seconds per seed (all pairs, mean over seeds) and c the
        scratch runs' CPU seconds per epoch (mean over seeds), from their done.json records.
        Written to equal_compute_<kind>.json; needs every seed's pairs and scratch run done."""
        seeds = self.cfg["reproduce"]["seeds"]
        epochs = int(self.cfg["students"][kind]["finetune"]["epochs"])
        pair_cpu, per_epoch = [], []
        for seed in seeds:
            d = self.student_dir(kind, seed)
            recs = [_read_json(d / "distill" / f"module_{i}" / "done.json") for i in range(self._num_stages(kind))]
            scratch = _read_json(d / "scratch" / "done.json")
            if scratch is None or any(r is None for r in recs):
                raise CheckpointError(f"equal compute of {kind}: seed {seed} lacks its m2mKD pairs or scratch run")
            pair_cpu.append(sum(float(r["cpu_seconds"]) for r in recs))
            per_epoch.append(float(scratch["cpu_seconds"]) / max(epochs, 1))
        d_cpu, c_cpu = sum(pair_cpu) / len(pair_cpu), sum(per_epoch) / len(per_epoch)
        out = {"finetune_epochs": epochs, "pairs_cpu_s": d_cpu, "scratch_cpu_s_per_epoch": c_cpu,
               "epochs": max(epochs, int(round(epochs + d_cpu / c_cpu)))}
        if self.ctx.is_main:
            _write_json(self.root / f"equal_compute_{kind}.json", out)
        return out

    def scratch_equal(self, kind: str, seed: int, resume=False):
        """The scratch baseline given the m2mKD student's compute (:meth:`equal_compute`)."""
        return self.scratch(kind, seed, resume, epochs=self.equal_compute(kind)["epochs"])

    # ------------------------------------------------------------------------------ evaluate
    def _trained_student_files(self, kind: str, seed: int, which: str) -> tuple[Path, Path, str]:
        """(weights, done record, redo command) of a trained student: "assembled", "finetune" or "scratch"."""
        if which == "assembled":
            path = self.student_dir(kind, seed) / "assembled.safetensors"
            return path, path.parent / "assembled.json", self.redo_command("assemble", kind, seed)
        path = self.student_dir(kind, seed) / RUN_OF.get(which, which) / "model.safetensors"
        return path, path.parent / "done.json", self.redo_command(which.replace("_", "-"), kind, seed)

    def load_trained_student(self, kind: str, seed: int, which: str):
        model = self.build_student(kind, seed)
        path, done_path, redo = self._trained_student_files(kind, seed, which)
        if not path.exists():
            raise CheckpointError(f"no {which} {kind} student at {path}")
        self._load_artifact(model, path, done_path, redo, f"{which} student")
        return model.to(self.ctx.device).eval()

    def evaluate(self, kind: str, seed: int, which: str = "finetune", model=None):
        """IID, OOD (corrupted test split) and few-shot (digits, linear probe) accuracy; cached in
        eval_<which>.json (redone when the weights' run or the evaluate config changed)."""
        out_path = self.student_dir(kind, seed) / f"eval_{which}.json"
        src = _read_json(self.student_dir(kind, seed) / RUN_OF[which] / "done.json") if which in RUN_OF else None
        fp = fingerprint({"evaluate": self.cfg["evaluate"], "data": self._data_key(),
                          "weights": (src or {}).get("fingerprint")}) if src else None
        old = _read_json(out_path)
        if model is None and fp and old and old.get("fingerprint") == fp and not self.force:
            path, done_path, redo = self._trained_student_files(kind, seed, which)
            verify_file(path, _artifact_record(done_path, path.name), redo)
            log(f"evaluate {kind} s{seed} {which}: done already, skipped", self.ctx)
            return old
        model = model if model is not None else self.load_trained_student(kind, seed, which)
        res = evaluate_model(model, self.data, self.cfg["evaluate"], self.ctx)
        res.update(kind=kind, seed=seed, which=which, fingerprint=fp)
        if self.ctx.is_main:
            _write_json(out_path, res)
        log(f"evaluate {kind} s{seed} {which}: IID {100 * res['iid']:.2f}%  OOD {100 * res['ood']:.2f}%  "
            + "  ".join(f"{k} {100 * v['mean']:.1f}±{100 * v['ci95']:.1f}%" for k, v in res["fewshot"].items()), self.ctx)
        return res

    # ----------------------------------------------------------------------------- reproduce
    def units(self) -> list:
        """The work units of a reproduction, ``(unit, [units it needs first])``, in priority order
        (the critical path first: meta → teacher modules → teacher → m2mKD → equal compute; the
        scratch and no-KD units fill the gaps). A unit is ("meta",), ("incubate", i),
        ("teacher",) or (what, kind, seed) with what in m2mkd | nokd | scratch | equal."""
        r = self.cfg["reproduce"]
        kinds = sorted(r["students"], key=lambda k: k != "vmoe")
        seeds = r["seeds"]
        inc = [("incubate", i) for i in range(self._num_stages("vmoe"))] if self.cfg["teacher"]["incubate"]["epochs"] > 0 else []
        out = [(("meta",), [])] + [(u, [("meta",)]) for u in inc] + [(("teacher",), inc)]
        out += [(("m2mkd", k, s), [("meta",), ("teacher",)]) for k in kinds for s in seeds]
        if r["equal_compute"]:
            out += [(("equal", k, s), [(w, k, t) for t in seeds for w in ("m2mkd", "scratch")]) for k in kinds for s in seeds]
        out += [(("scratch", k, s), []) for k in kinds for s in seeds]
        if r["no_kd"]:
            out += [(("nokd", k, s), [("meta",)]) for k in kinds for s in seeds]
        return out

    def run_unit(self, unit: tuple) -> dict:
        """Run one unit of :meth:`units` (its phases skip what is done); returns {name: wall s}."""
        t = time.time()
        what = unit[0]
        if what == "meta":
            self.pretrain_meta(resume="auto")
        elif what == "incubate":
            self.incubate_teacher_module(unit[1], resume="auto")
        elif what == "teacher":
            self.train_teacher(resume="auto")
            if self.force or not self._teacher_split_current():
                self.split_teacher()
        elif what in ("m2mkd", "nokd"):
            variant = "kd" if what == "m2mkd" else "nokd"
            self.distill(unit[1], unit[2], "all", resume="auto", variant=variant)
            self.assemble(unit[1], unit[2], variant)
            self.finetune(unit[1], unit[2], resume="auto", variant=variant)
            self.evaluate(unit[1], unit[2], "finetune" if variant == "kd" else "nokd")
        elif what == "scratch":
            self.scratch(unit[1], unit[2], resume="auto")
            self.evaluate(unit[1], unit[2], "scratch")
        elif what == "equal":
            self.scratch_equal(unit[1], unit[2], resume="auto")
            self.evaluate(unit[1], unit[2], "scratch_equal")
        else:
            raise ValueError(f"unknown unit {unit!r}")
        return {"/".join(str(x) for x in ((unit[1], what) if len(unit) == 3 else unit)): time.time() - t}

    def reproduce(self, report_dir=None, jobs: int | None = None):
        """Everything (:meth:`units`): meta, teacher (incubated modules, fine-tune, split), then per
        student and seed: m2mKD pairs + fine-tune, scratch, no-KD pairs + fine-tune, the
        equal-compute scratch, each evaluated; then REPORT.md.

        ``jobs`` > 1 (single-process runs only) runs the units in that many worker processes of
        one thread each, a unit starting as soon as a worker is free and the units it needs are
        done. On a small CPU this beats one process with several threads (small models scale
        badly across threads); results are identical either way, as every run's randomness
        depends on its own seeds only."""
        t0 = time.time()
        timings: dict = {}
        rcfg = self.cfg["reproduce"]
        jobs = int(rcfg["jobs"] if jobs is None else jobs)
        if self.ctx.distributed:
            jobs = 1
        self._schedule(self.units(), jobs, timings)
        wall = time.time() - t0
        if self.ctx.is_main:
            from .report import write_report

            ran = sum(1 for p in self.root.rglob("done.json") if p.stat().st_mtime >= t0)
            total = sum(1 for _ in self.root.rglob("done.json"))
            with open(self.root / "reproduce_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)), "wall_s": wall,
                                    "ran": ran, "skipped": total - ran, "jobs": jobs}) + "\n")
            path = write_report(self, timings, wall, report_dir, jobs=jobs)
            log(f"reproduce: done in {wall / 60:.1f} min; report {path}", self.ctx)
            return path
        return None

    def _schedule(self, units: list, jobs: int, timings: dict):
        """Run ``units`` (:meth:`units`) in order of priority as their needs are met: in this
        process (jobs 1) or in ``jobs`` worker processes of one thread each."""
        pending, done = list(units), set()
        progress = UnitProgress(len(units), lambda line: log(line, self.ctx), bar=self.progress and self.ctx.is_main)

        def ready():
            return next((p for p in pending if all(d in done for d in p[1])), None)

        def stuck():
            return RuntimeError(f"reproduce: units {[p[0] for p in pending]} wait for units that never run")

        def finish(unit, times):
            for k, v in times.items():
                timings[k] = timings.get(k, 0.0) + v
            done.add(unit)
            progress.done(unit)

        if jobs <= 1:
            while pending:
                item = ready()
                if item is None:
                    raise stuck()
                pending.remove(item)
                finish(item[0], self.run_unit(item[0]))
            progress.close()
            return
        import concurrent.futures as cf
        import multiprocessing as mp

        self.data  # noqa: B018 - loaded here to be described once: the workers load it silently
        log(f"running {len(units)} unit(s) in {jobs} worker process(es), 1 thread each", self.ctx)
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            running = {}
            while pending or running:
                while len(running) < jobs and (item := ready()) is not None:
                    pending.remove(item)
                    running[ex.submit(_worker, self.cfg, str(self.root), self.force, item[0])] = item[0]
                if not running:
                    raise stuck()
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    times = f.result()
                    finish(running.pop(f), times)
        progress.close()


def _worker(cfg: dict, root: str, force: bool, unit: tuple) -> dict:
    """One unit of a parallel reproduce, in its own process with one thread."""
    torch.set_num_threads(1)
    from .dist import pick_device

    pipe = Pipeline(cfg, root, ctx=DistContext(device=pick_device(cfg["device"])), progress=False, force=force,
                    write_config=False, lock=None)  # the parent holds the run directory's lock
    pipe.announce_data = False
    return pipe.run_unit(unit)


@torch.no_grad()
def features_of(model, x):
    """Pre-logit features (what the few-shot head is trained on)."""
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        try:
            return model.forward_head(model.forward_features(x), pre_logits=True)
        except TypeError:
            pass
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None:
        raise ValueError(f"{type(model).__name__}: no forward_head(pre_logits=True) nor get_classifier()")
    box = {}
    handle = head.register_forward_hook(lambda m, inp, out: box.__setitem__("f", inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return box["f"]


@torch.no_grad()
def evaluate_model(model, data, ecfg: dict, ctx: DistContext | None = None) -> dict:
    ctx = ctx or DistContext()
    device = ctx.device
    model = model.to(device).eval()
    norm = Normalize(data.mean, data.std)
    bs = int(ecfg["batch_size"])
    t, c = time.time(), time.process_time()
    iid = evaluate_accuracy(model, data.test, norm, bs, device, ctx)
    out = {"iid": iid}
    try:
        ood_set = corrupted_copy(data.test, int(ecfg["ood_severity"]), int(ecfg["ood_seed"]))
    except TypeError:
        ood_set = None
    if ood_set is not None:
        preds = []
        for x, _ in iterate_batches(ood_set, bs, device):
            preds.append(model(norm(x)).argmax(-1).cpu())
        correct = (torch.cat(preds) == ood_set.labels)
        out["ood"] = float(correct.float().mean())
        out["ood_per_corruption"] = {name: float(correct[ood_set.corruption_of == ci].float().mean())
                                     for ci, name in enumerate(ood_set.corruption_names)}
    else:
        out["ood"] = float("nan")
    fs = ecfg["fewshot"]
    digits = load_digits_dataset(data.img_size, data.in_chans)
    feats = []
    for x, _ in iterate_batches(digits, bs, device):
        feats.append(features_of(model, norm(x)).float().cpu())
    feats = torch.cat(feats)
    out["fewshot"] = {}
    for shots in fs["shots"]:
        mean, ci, _ = linear_probe_episodes(feats, digits.labels, ways=int(fs["ways"]), shots=int(shots),
                                            queries=int(fs["queries"]), episodes=int(fs["episodes"]),
                                            seed=int(fs["seed"]), steps=int(fs["steps"]), lr=float(fs["lr"]))
        out["fewshot"][f"{fs['ways']}w{shots}s"] = {"mean": mean, "ci95": ci}
    out["seconds"] = time.time() - t
    out["cpu_seconds"] = time.process_time() - c
    return out
