"""The m2mKD pipeline phases (DESIGN §2.5), each callable alone (the CLI's subcommands) or
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
"""

from __future__ import annotations

import json
import os
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
from .dist import DistContext, init_distributed
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # per process: pairs may run side by side
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


class Pipeline:
    """All phases over one run directory and one resolved config."""

    def __init__(self, cfg: dict, root, ctx: DistContext | None = None, progress: bool = True,
                 force: bool = False, write_config: bool = True):
        self.cfg = cfg
        self.root = Path(root)
        self.ctx = ctx or init_distributed(cfg["device"])
        self.progress = progress
        self.force = force
        self._data = None
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if write_config:
                dump_config(cfg, self.root / "config.yaml")

    # ----------------------------------------------------------------------------- helpers
    @property
    def data(self):
        if self._data is None:
            self._data = build_data(self.cfg["data"])
            log(f"data: {self._data.source}: {len(self._data.train)} train / {len(self._data.test)} test, "
                f"{self._data.num_classes} classes, {self._data.in_chans}x{self._data.img_size}x{self._data.img_size}", self.ctx)
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
        return {"data": self._data_key(), "augment": self.cfg["augment"]}

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

    def _done(self, run_dir: Path, pcfg: dict):
        """done.json of a finished run with this config, else None."""
        d = _read_json(run_dir / "done.json")
        if d and d.get("fingerprint") == fingerprint(pcfg) and (run_dir / "model.safetensors").exists() and not self.force:
            return d
        return None

    def _train(self, task, run_dir: Path, phase: str, pcfg: dict, tcfg: dict, seed: int, resume: bool,
               dcfg=None, save_module=None, title=""):
        """Run the trainer unless done; resume a killed run when asked (or when resume='auto'
        and a checkpoint exists)."""
        done = self._done(run_dir, pcfg)
        if done is not None:
            log(f"{title}: done already ({run_dir}; test acc {100 * (done.get('test_acc') or 0):.2f}%), skipped", self.ctx)
            return done
        last = run_dir / "last.safetensors"
        do_resume = bool(resume) and (resume != "auto" or last.exists())
        if self.force and resume == "auto":
            do_resume = False
        try:
            res = train(task, data=self.data, tcfg=tcfg, aug=self.cfg["augment"], dcfg=dcfg, run_dir=run_dir,
                        phase=phase, config=pcfg, seed=seed, ctx=self.ctx, resume=do_resume,
                        save_module=save_module, progress=self.progress, log_every=self.cfg["log"]["every"],
                        title=title, eval_limit=self.cfg["log"]["eval_limit"],
                        num_workers=self.cfg["data"]["num_workers"])
        except CheckpointError as err:
            if resume != "auto":
                raise
            log(f"{title}: cannot resume ({err}); starting afresh", self.ctx)
            res = train(task, data=self.data, tcfg=tcfg, aug=self.cfg["augment"], dcfg=dcfg, run_dir=run_dir,
                        phase=phase, config=pcfg, seed=seed, ctx=self.ctx, resume=False,
                        save_module=save_module, progress=self.progress, log_every=self.cfg["log"]["every"],
                        title=title, eval_limit=self.cfg["log"]["eval_limit"],
                        num_workers=self.cfg["data"]["num_workers"])
        out = {"fingerprint": fingerprint(pcfg), "test_acc": res.final_test_acc, "seconds": res.seconds,
               "cpu_seconds": res.cpu_seconds,
               "img_per_s": res.images_per_s, "steps": res.steps, "phase": phase}
        if self.ctx.is_main:
            _write_json(run_dir / "done.json", out)
            if last.exists() and not self.cfg["log"]["keep_last"]:
                last.unlink()
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
                           self.cfg["meta"]["train"], self.cfg["seed"], resume, save_module=model, title="meta")

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
        if incubate and self._done(self.root / "teacher", pcfg) is None:
            for i in range(model.num_stages):
                sd, _ = load_weights(self.incubate_teacher_module(i, resume))
                load_state_checked(model.stages[i], sd, f"incubated teacher module {i}")
        seed_all(self.cfg["seed"] + 1 + 7919 * self.ctx.rank)
        return self._train(EndToEnd(model), self.root / "teacher", "train-teacher", pcfg,
                           self.cfg["teacher"]["train"], self.cfg["seed"] + 1, resume, save_module=model,
                           title="teacher fine-tune" if incubate else "teacher")

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
                    title=f"incubate teacher module {i}")
        return run_dir / "model.safetensors"

    def load_meta(self):
        model = build_model(self.cfg["meta"]["model"], self.cfg["meta"]["kwargs"], self.data)
        path = self.root / "meta" / "model.safetensors"
        if not path.exists():
            raise CheckpointError(f"no meta model at {path}: run `m2mkd-fast pretrain-meta` first")
        sd, _ = load_weights(path)
        load_state_checked(model, sd, f"meta model {path}")
        return model.eval()

    def load_teacher(self, from_modules: bool = True):
        """The teacher, from its split modules (split-teacher's output) or its full weights."""
        model = build_model(self.cfg["teacher"]["model"], self.cfg["teacher"]["kwargs"], self.data)
        mdir = self.root / "teacher_modules"
        if from_modules and (mdir / "module_0.safetensors").exists():
            stages = model.stages
            for i in range(model.num_stages):
                sd, _ = load_weights(mdir / f"module_{i}.safetensors")
                load_state_checked(stages[i], sd, f"teacher module {i}")
            return model.eval()
        path = self.root / "teacher" / "model.safetensors"
        if not path.exists():
            raise CheckpointError(f"no teacher at {path}: run `m2mkd-fast train-teacher` first")
        sd, _ = load_weights(path)
        load_state_checked(model, sd, f"teacher {path}")
        return model.eval()

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
            for i, stage in enumerate(teacher.stages):
                save_weights(stage, mdir / f"module_{i}.safetensors",
                             {"module": i, "num_stages": teacher.num_stages, "model": self.cfg["teacher"]["model"],
                              "teacher_fingerprint": tfp, "incubated": inc["epochs"] > 0})
        self.ctx.barrier()
        log(f"split-teacher: {teacher.num_stages} modules written to {mdir}"
            + (" (incubated in the meta model)" if inc["epochs"] > 0 else ""), self.ctx)
        return mdir

    def _teacher_modules_fp(self) -> str:
        """What the teacher modules depend on: the teacher run (incubation included when on)."""
        return fingerprint(self.phase_config("train-teacher"))

    def _teacher_split_current(self) -> bool:
        p = self.root / "teacher_modules" / "module_0.safetensors"
        if not p.exists():
            return False
        _, meta = load_weights(p)
        return meta.get("teacher_fingerprint") == self._teacher_modules_fp()

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
        independent (DESIGN §2.5), so this needs no communication until the final barrier."""
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
                              title=f"{kind} s{seed} pair {i}" + ("" if kd else " (no KD)"))
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
            sd, _ = load_weights(path)
            load_state_checked(pair, sd, f"distilled module {path}")
            states.append(module_state(kind, pair))
        return states

    def assemble(self, kind: str, seed: int, variant: str = "kd"):
        model = self.build_student(kind, seed)
        states = self._distilled_states(kind, seed, model.num_stages, variant)
        report = assemble(kind, model, states)
        path = self.variant_dir(kind, seed, variant) / "assembled.safetensors"
        if self.ctx.is_main:
            save_weights(model, path, {"phase": "assemble", "kind": kind, "seed": seed, "report": report,
                                       "variant": variant})
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
        sd, _ = load_weights(path)
        load_state_checked(model, sd, f"assembled student {path}")
        seed_all(seed + 17 + 7919 * self.ctx.rank)
        return self._train(EndToEnd(model), vdir / "finetune", "finetune",
                           self.phase_config("finetune", kind, seed, variant=variant),
                           self.cfg["students"][kind]["finetune"], seed + 17, resume, save_module=model,
                           title=f"{kind} s{seed} finetune" + ("" if variant == "kd" else " (no KD)"))

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
                           seed + 17, resume, save_module=model, title=f"{kind} s{seed} {name.replace('_', ' ')}")

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
    def load_trained_student(self, kind: str, seed: int, which: str):
        model = self.build_student(kind, seed)
        if which == "assembled":
            path = self.student_dir(kind, seed) / "assembled.safetensors"
        else:
            path = self.student_dir(kind, seed) / RUN_OF.get(which, which) / "model.safetensors"
        if not path.exists():
            raise CheckpointError(f"no {which} {kind} student at {path}")
        sd, _ = load_weights(path)
        load_state_checked(model, sd, f"{which} student {path}")
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

        def ready():
            return next((p for p in pending if all(d in done for d in p[1])), None)

        def stuck():
            return RuntimeError(f"reproduce: units {[p[0] for p in pending]} wait for units that never run")

        def add(times):
            for k, v in times.items():
                timings[k] = timings.get(k, 0.0) + v

        if jobs <= 1:
            while pending:
                item = ready()
                if item is None:
                    raise stuck()
                pending.remove(item)
                add(self.run_unit(item[0]))
                done.add(item[0])
            return
        import concurrent.futures as cf
        import multiprocessing as mp

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
                    add(f.result())
                    done.add(running.pop(f))


def _worker(cfg: dict, root: str, force: bool, unit: tuple) -> dict:
    """One unit of a parallel reproduce, in its own process with one thread."""
    torch.set_num_threads(1)
    from .dist import pick_device

    pipe = Pipeline(cfg, root, ctx=DistContext(device=pick_device(cfg["device"])), progress=False, force=force,
                    write_config=False)
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
