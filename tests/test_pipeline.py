"""The m2mKD pipeline end to end: the quick reproduction through the CLI, phase caching and
errors, bad configs, exact resumption after SIGKILLs, the run-directory lock, corrupted
artifacts, and DDP on 2 CPU processes."""

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2mkd_fast.cli import main
from m2mkd_fast.distill.checkpoint import load_weights
from m2mkd_fast.distill.config import load_config
from m2mkd_fast.distill.report import paired_stats, verdict
from m2mkd_fast.distill.files import lock_run_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`m2mkd-fast reproduce --quick` once for the whole module (about a minute)."""
    root = tmp_path_factory.mktemp("quick")
    threads = torch.get_num_threads()
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            rc = main(["reproduce", "--quick", "--run-dir", str(root), "--no-progress", "--threads", "1",
                       "--report-dir", str(root / "report")])
    finally:
        torch.set_num_threads(threads)
    (root / "reproduce.stderr").write_text(log.getvalue())  # for test_progress_lines
    assert rc == 0, log.getvalue()[-3000:]
    return root


def test_quick_reproduce_writes_report_and_every_phase_output(quick_run):
    root = quick_run
    report = (root / "REPORT.md").read_text()
    for needle in ("| NAC | from scratch (1 epochs) |", "| NAC | m2mKD + fine-tune |", "| V-MoE | from scratch",
                   "| V-MoE | m2mKD + fine-tune |", "| NAC | no KD (α = 0) + fine-tune |",
                   "| V-MoE | scratch, equal compute (", "**m2mKD − no KD**", "**m2mKD − equal compute**",
                   "figures/curves.png", "naive gate, experts in every block", "| teacher module in meta |"):
        assert needle in report, needle
    for name in ("teacher", "NAC student", "V-MoE student", "meta model"):
        assert re.search(rf"^- {name} .* … \d+\.\d\dM params$", report, re.M), name
    for name in ("REPORT.md", "results.json", "config.yaml", "figures/curves.png", "figures/comparison.png"):
        assert (root / "report" / name).is_file(), name
    for d in ("meta", "teacher", "seed0/nac/finetune", "seed0/vmoe/scratch", "seed0/nac/distill/module_3",
              "seed0/vmoe/nokd/distill/module_0", "seed0/vmoe/nokd/finetune", "seed0/nac/scratch_equal"):
        assert (root / d / "model.safetensors").is_file(), d
        recs = [json.loads(line) for line in (root / d / "metrics.jsonl").read_text().splitlines()]
        assert any(r["kind"] == "epoch" for r in recs) and any(r["kind"] == "train" for r in recs)
        assert not (root / d / "last.safetensors").exists()  # removed once done
    assert len(list((root / "teacher_modules").glob("module_*.safetensors"))) == 4
    # the teacher modules are incubated in the meta model, then the assembled teacher fine-tuned
    _, meta = load_weights(root / "teacher_modules" / "module_3.safetensors")
    assert meta["incubated"] is True and (root / "teacher_incubate/module_3/model.safetensors").is_file()
    inc, _ = load_weights(root / "teacher_incubate/module_3/model.safetensors")
    split, _ = load_weights(root / "teacher_modules/module_3.safetensors")
    assert inc.keys() == split.keys() and any(not torch.equal(inc[k], split[k]) for k in inc)
    # the no-KD pairs are trained on the labels only: no teacher accuracy recorded
    assert "teacher_pair_acc" not in json.loads((root / "seed0/nac/nokd/distill/module_1/done.json").read_text())
    for kind in ("nac", "vmoe"):
        eq = json.loads((root / f"equal_compute_{kind}.json").read_text())
        assert eq["epochs"] == max(1, round(1 + eq["pairs_cpu_s"] / eq["scratch_cpu_s_per_epoch"]))
        for which in ("finetune", "scratch", "nokd", "scratch_equal"):
            ev = json.loads((root / f"seed0/{kind}/eval_{which}.json").read_text())
            assert 0.0 <= ev["iid"] <= 1.0 and 0.0 <= ev["ood"] <= 1.0
            assert set(ev["fewshot"]) == {"5w1s", "5w5s"} and len(ev["ood_per_corruption"]) == 7
    res = json.loads((root / "results.json").read_text())
    assert res["results"]["students"]["nac"]["0"]["pairs"]["1"]["teacher_pair_acc"] > 0


def test_assembly_puts_the_distilled_weights_in_place(quick_run):
    root = quick_run
    asm, _ = load_weights(root / "seed0/nac/assembled.safetensors")
    med, _ = load_weights(root / "seed0/nac/distill/module_2/model.safetensors")
    rin, _ = load_weights(root / "seed0/nac/distill/module_0/model.safetensors")
    # mediator student 2 is NAC propagator 1; read-in student holds the tokenizer
    k = "propagator.attn.q.weight"
    assert torch.equal(asm["propagators.1.attn.q.weight"], med[k])
    assert torch.equal(asm["tokenizer.stem.0.weight"], rin["tokenizer.stem.0.weight"])
    assert not torch.equal(asm["propagators.0.attn.q.weight"], med[k])
    vasm, _ = load_weights(root / "seed0/vmoe/assembled.safetensors")
    v1, _ = load_weights(root / "seed0/vmoe/distill/module_1/model.safetensors")
    import timm

    st = load_config("quick")["students"]["vmoe"]
    m = timm.create_model(st["model"], num_classes=10, **st["kwargs"])
    m.load_state_dict(vasm)
    stage = m.stages[1].state_dict()  # stage-local names (blocks.0 = the model's blocks.1)
    assert any("mlp.w1" in k for k in stage)
    for k, v in stage.items():
        assert torch.equal(v, v1["module." + k]), k


def test_paired_stats_match_a_paired_t_test():
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.79, 0.80, 0.76, 0.81, 0.76]  # differences 1..5 points: mean 3, sd 1.581
    st = paired_stats(a, b)
    assert st["n"] == 5 and math.isclose(st["mean"], 0.03, abs_tol=1e-12)
    half = 2.7764451 * 0.0158113883 / math.sqrt(5)  # t_{0.975, 4} · sd / √n
    assert math.isclose(st["lo"], 0.03 - half, rel_tol=1e-6) and math.isclose(st["hi"], 0.03 + half, rel_tol=1e-6)
    assert math.isclose(st["p"], 0.013236, rel_tol=1e-3)  # t = 4.243 with 4 degrees of freedom
    assert verdict(st).startswith("helped") and verdict(paired_stats(b, a)).startswith("hurt")
    assert verdict(paired_stats([0.5, 0.6, 0.4], [0.45, 0.62, 0.41])).startswith("no clear difference")
    # pairs are by position: a missing seed drops that pair only
    assert paired_stats([0.5, None, 0.7], [0.4, 0.1, 0.5])["n"] == 2
    one = paired_stats([0.5], [0.4])
    assert math.isnan(one["p"]) and "no test" in verdict(one)


def test_done_phases_are_skipped_and_errors_are_clear(quick_run, tmp_path, capsys):
    root = str(quick_run)
    assert main(["finetune", "--config", "quick", "--run-dir", root, "--student", "nac", "--no-progress"]) == 0
    assert "done already" in capsys.readouterr().err
    assert main(["evaluate", "--config", "quick", "--run-dir", root, "--student", "vmoe", "--which", "assembled"]) == 0
    assert (quick_run / "seed0/vmoe/eval_assembled.json").is_file()
    empty = str(tmp_path / "empty")
    assert main(["finetune", "--config", "quick", "--run-dir", empty, "--student", "nac"]) == 2
    assert "no assembled student" in capsys.readouterr().err
    assert main(["distill", "--config", "quick", "--run-dir", empty, "--student", "nac"]) == 2
    assert "pretrain-meta" in capsys.readouterr().err
    assert main(["distill", "--config", "quick", "--run-dir", root, "--student", "nac", "--module", "7"]) == 2
    assert "--module must be in [0, 3]" in capsys.readouterr().err
    assert main(["pretrain-meta", "--config", "quick", "--run-dir", empty, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--set", "meta.train.lrr=1"], "did you mean 'meta.train.lr'"),
    (["--set", "distill.alpha=2"], "distill.alpha"),
    (["--set", "meta.train.batch_size=big"], "must be int"),
    (["--set", "reproduce.students=[nac,resnet]"], "reproduce.students"),
    (["--set", "meta.train.warmup_epochs=9"], "warmup_epochs"),
    (["--config", "no_such_preset"], "no config"),
    (["--set", "novalue"], "key=value"),
    (["--set", "log.every=0"], "'log.every': must be >= 1"),
    (["--set", "evaluate.batch_size=0"], "'evaluate.batch_size': must be >= 1"),
    (["--set", "data.test_limit=-5"], "'data.test_limit': must be >= 0"),
    (["--set", "meta.train.epochs=null"], "'meta.train.epochs' must be int (like 4), got null"),
    (["--set", "students.nac.finetune.ckpt_every=-1"], "students.nac.finetune.ckpt_every"),
    (["--set", "reproduce.seeds=[-1]"], "reproduce.seeds"),
])
def test_bad_configs_are_rejected(args, msg, capsys):
    assert main(["show-config"] + args) == 2
    assert msg in capsys.readouterr().err


def test_bad_yaml_file_and_help(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: default\nstudents:\n  nac:\n    finetune:\n      epoch: 3\n")
    assert main(["show-config", "--config", str(bad)]) == 2
    assert "students.nac.finetune.epoch" in capsys.readouterr().err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe\x10 not text")
    assert main(["show-config", "--config", str(binary)]) == 2
    assert "binary.yaml: not a text (UTF-8) file" in capsys.readouterr().err
    assert main(["show-config", "--set", "data.test_limit=null"]) == 0  # null = all, as 0
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "--module" in out and "--resume" in out and "--set" in out


def _cli(args, env=None, timeout=600):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "m2mkd_fast"] + args, cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout)


RESUME_SET = ["meta.train.epochs=2", "meta.train.train_limit=128", "meta.train.batch_size=32", "meta.train.ckpt_every=2",
              "augment.mixup=0.8", "augment.cutmix=1.0", "augment.erase_prob=0.25", "data.test_limit=64",
              "meta.kwargs={num_stages: 4, drop_path_rate: 0.1}", "log.every=3"]


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def test_resume_after_kills_reaches_the_same_weights(tmp_path, capsys):
    killed = tmp_path / "killed"
    meta = killed / "meta"
    args = ["pretrain-meta", "--config", "quick", "--no-progress", "--threads", "1"] + _sets(RESUME_SET)
    # 2 epochs x 4 steps, a checkpoint every 2 steps, a metrics line every 3; SIGKILL while writing
    # the checkpoint at the end of epoch 2: its temp file is left behind, the one of step 6 is
    # intact, and metrics.jsonl holds step 7 and epoch 2's record, which the resumed run redoes
    r = _cli(args + ["--run-dir", str(killed)], env={"M2MKD_DIE_WRITING": "last.safetensors:4"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert [p.name for p in meta.glob(".last.safetensors.tmp*")] and not (meta / "model.safetensors").exists()
    # a resume with another config is refused, naming the key
    threads = torch.get_num_threads()
    try:
        assert main(args + ["--run-dir", str(killed), "--resume", "--set", "meta.train.lr=0.1"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert "meta.train.lr" in capsys.readouterr().err
    # resumed, then SIGKILLed right after the last epoch's checkpoint, before the final weights
    r = _cli(args + ["--run-dir", str(killed), "--resume"], env={"M2MKD_DIE_AFTER_STEP": "8"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not list(meta.glob(".*.tmp*")) and not (meta / "model.safetensors").exists()
    # resumed again: nothing left to train; the final evaluation is redone from the checkpoint
    r = _cli(args + ["--run-dir", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads((meta / "done.json").read_text())
    assert done["test_acc"] is not None and done["artifacts"]["model.safetensors"]["size"] > 0
    # the same run uninterrupted, in this process
    try:
        assert main(args + ["--run-dir", str(tmp_path / "straight")]) == 0
    finally:
        torch.set_num_threads(threads)
    a, _ = load_weights(meta / "model.safetensors")
    b, _ = load_weights(tmp_path / "straight" / "meta" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    recs = [json.loads(x) for x in (meta / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step_in_epoch"]) for r in recs if r["kind"] == "resume"] == [(1, 2), (2, 0)]
    # every step and epoch logged once, as in the uninterrupted run
    steps = [r["global_step"] for r in recs if r["kind"] == "train"]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "meta" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["global_step"] for r in straight if r["kind"] == "train"]
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [0, 1]


def test_a_second_process_on_a_busy_run_dir_stops_at_once(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom m2mkd_fast.distill.files import lock_run_dir\n"
                               f"f = lock_run_dir({str(run)!r})\nprint('locked', flush=True)\ntime.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _cli(["pretrain-meta", "--config", "quick", "--run-dir", str(run), "--no-progress"], timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"run directory {run} is in use by process {holder.pid}" in r.stderr
        assert not (run / "config.yaml").exists()  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(run).close()  # the OS released the killed holder's lock


def _flip_byte(path, offset=-100):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x55
    path.write_bytes(bytes(raw))


def test_corrupted_artifacts_stop_with_the_file_and_the_redo_command(quick_run, tmp_path, capsys):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(quick_run, root, ignore=shutil.ignore_patterns("*.png", "report"))
    quick = ["--config", "quick", "--run-dir", str(root), "--no-progress", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        # bytes of the fine-tuned student overwritten: the cached evaluation, a forced one and a
        # reproduce that would reuse it all stop, naming the file and the command that redoes it
        model = root / "seed0/nac/finetune/model.safetensors"
        _flip_byte(model)
        redo = f"m2mkd-fast finetune --run-dir {root} --student nac --seed 0 --force"
        for cmd in (["evaluate", "--student", "nac"], ["evaluate", "--student", "nac", "--force"], ["reproduce"]):
            assert main(cmd + quick) != 0, cmd
            err = capsys.readouterr().err
            assert f"{model} does not match the sha256" in err and redo in err, (cmd, err[-2000:])
        # a changed teacher module: distill stops before using it
        module = root / "teacher_modules/module_2.safetensors"
        _flip_byte(module)
        assert main(["distill", "--student", "vmoe", "--module", "0", "--force"] + quick) != 0
        err = capsys.readouterr().err
        assert f"{module} does not match" in err and f"m2mkd-fast split-teacher --run-dir {root} --force" in err
        # a truncated meta model: pretrain-meta does not call it done
        meta = root / "meta/model.safetensors"
        meta.write_bytes(meta.read_bytes()[:-1000])
        assert main(["pretrain-meta"] + quick) != 0
        err = capsys.readouterr().err
        assert f"{meta} has" in err and f"m2mkd-fast pretrain-meta --run-dir {root} --force" in err
    finally:
        torch.set_num_threads(threads)


DDP_SET = ["meta.train.epochs=1", "meta.train.train_limit=128", "meta.train.batch_size=32", "augment.padding=0",
           "augment.flip=false", "data.test_limit=64"]


def _torchrun(args, timeout=600):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "-m", "m2mkd_fast"] + args, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def test_ddp_two_cpu_processes_match_one(tmp_path, quick_run):
    args = ["pretrain-meta", "--config", "quick", "--no-progress"] + _sets(DDP_SET)
    r = _torchrun(args + ["--run-dir", str(tmp_path / "ddp")])
    assert r.returncode == 0, r.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        assert main(args + ["--run-dir", str(tmp_path / "single"), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    a, _ = load_weights(tmp_path / "ddp" / "meta" / "model.safetensors")
    b, _ = load_weights(tmp_path / "single" / "meta" / "model.safetensors")
    for k in a:  # same global batch, gradients averaged over the 2 processes = one process
        x, y = a[k], b[k]
        if k.endswith("qkv.bias"):
            # the key bias has a zero gradient (softmax is shift-invariant): Adam turns its rounding
            # noise into ±lr steps, different in each run. Compare the query and value biases.
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)
    # a module pair (NAC mediator: frozen meta/teacher, no-kernel β) and V-MoE fine-tuning under DDP
    r = _torchrun(["distill", "--config", "quick", "--run-dir", str(quick_run), "--student", "nac", "--module", "1",
                   "--force", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((quick_run / "seed0/nac/distill/module_1/done.json").read_text())["test_acc"] is not None
    # pairs as independent processes: rank r trains pairs r, r+2 of the V-MoE student alone
    before = {i: (quick_run / f"seed0/vmoe/distill/module_{i}/done.json").stat().st_mtime for i in range(4)}
    r = _torchrun(["distill", "--config", "quick", "--run-dir", str(quick_run), "--student", "vmoe", "--module", "all",
                   "--pairs-in-parallel", "--force", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0: pairs [0, 2]" in r.stderr and "rank 1: pairs [1, 3]" in r.stderr
    for i in range(4):
        assert (quick_run / f"seed0/vmoe/distill/module_{i}/done.json").stat().st_mtime > before[i]


def test_imagefolder_data_through_a_phase(tmp_path):
    """A user's ImageFolder tree (RGB, another size), read by DataLoader workers, trains a meta model."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    threads = torch.get_num_threads()
    try:
        rc = main(["pretrain-meta", "--config", "quick", "--run-dir", str(tmp_path / "run"), "--no-progress",
                   "--threads", "1"] + _sets([
                       "data.name=imagefolder", f"data.root={tmp_path}", "data.img_size=16", "data.in_chans=3",
                       "data.num_workers=2", "data.test_limit=0", "meta.train.batch_size=4", "meta.train.train_limit=0",
                       "meta.kwargs={num_stages: 4, img_size: 16, in_chans: 3}"]))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    sd, _ = load_weights(tmp_path / "run" / "meta" / "model.safetensors")
    assert sd["patch_embed.proj.weight"].shape[1] == 3 and sd["head.weight"].shape[0] == 2


def _progress_lines(text: str) -> list[tuple[int, int, str]]:
    return [(int(k), int(n), what) for k, n, what in re.findall(r"\[(\d+)/(\d+)\] (.+?) — elapsed .+, ETA .+", text)]


def test_progress_lines_one_per_unit_and_data_described_once(quick_run, tmp_path, capsys):
    """The parent process logs "[k/N] unit — elapsed, ETA" once per unit, in one process (the
    quick preset) and with worker processes (the same run again: every unit found done)."""
    quick = (quick_run / "reproduce.stderr").read_text()
    lines = _progress_lines(quick)
    cfg = load_config("quick")
    r = cfg["reproduce"]
    expected = {"pretrain-meta", "train-teacher + split"}
    expected |= {f"incubate teacher module {i}" for i in range(cfg["meta"]["kwargs"]["num_stages"])}
    expected |= {f"{w} {k} seed {s}" for w in ("m2mkd", "scratch", "nokd", "equal") for k in r["students"] for s in r["seeds"]}
    n = len(expected)
    assert [(k, total) for k, total, _ in lines] == [(k, n) for k in range(1, n + 1)], quick[-3000:]
    assert {what for _, _, what in lines} == expected and lines[0][2] == "pretrain-meta"
    assert quick.count("data: ") == 1
    again = tmp_path / "again"
    shutil.copytree(quick_run, again)
    threads = torch.get_num_threads()
    try:
        assert main(["reproduce", "--quick", "--run-dir", str(again), "--jobs", "2", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    parallel = capsys.readouterr().err
    lines = _progress_lines(parallel)
    assert [(k, total) for k, total, _ in lines] == [(k, n) for k in range(1, n + 1)], parallel[-3000:]
    assert {what for _, _, what in lines} == expected and parallel.count("data: ") == 1
