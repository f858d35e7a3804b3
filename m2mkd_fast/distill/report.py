"""REPORT.md of a reproduction: the paper-style table (student from scratch vs after m2mKD; IID,
OOD, few-shot; mean ± std over seeds), the pairs, the timings, and the curves."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from .trainer import read_metrics

NAMES = {"nac": "NAC", "vmoe": "V-MoE"}
COMMAND_LINE = ""  # set by the CLI: the command that produced the report


def _mean_std(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s, len(xs)


def _fmt(m, s, pct=True):
    k = 100.0 if pct else 1.0
    if math.isnan(m):
        return "–"
    if math.isnan(s):
        return f"{k * m:.2f}"
    return f"{k * m:.2f} ± {k * s:.2f}"


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def collect(pipe) -> dict:
    """Every number the report shows, as one JSON-able dict (also written as results.json)."""
    cfg = pipe.cfg
    out = {"students": {}, "meta": _load(pipe.root / "meta" / "done.json"),
           "teacher": _load(pipe.root / "teacher" / "done.json")}
    for kind in cfg["reproduce"]["students"]:
        per_seed = {}
        for seed in cfg["reproduce"]["seeds"]:
            d = pipe.student_dir(kind, seed)
            rec = {"finetune": _load(d / "eval_finetune.json"), "scratch": _load(d / "eval_scratch.json"),
                   "finetune_run": _load(d / "finetune" / "done.json"), "scratch_run": _load(d / "scratch" / "done.json"),
                   "pairs": {}}
            for p in sorted((d / "distill").glob("module_*")):
                rec["pairs"][int(p.name.split("_")[1])] = _load(p / "done.json")
            per_seed[seed] = rec
        out["students"][kind] = per_seed
    return out


def _metric_rows(per_seed: dict, which: str, fewshot_keys):
    vals = {"iid": [], "ood": []}
    for k in fewshot_keys:
        vals[k] = []
    for rec in per_seed.values():
        r = rec.get(which)
        if not r:
            continue
        vals["iid"].append(r["iid"])
        vals["ood"].append(r["ood"])
        for k in fewshot_keys:
            vals[k].append(r["fewshot"].get(k, {}).get("mean"))
    return vals


def _curves(pipe, res, fig_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(res["students"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    colors = {"finetune": "tab:blue", "scratch": "tab:orange"}
    labels = {"finetune": "m2mKD + fine-tune", "scratch": "from scratch"}
    for ax, kind in zip(axes[0], kinds):
        for which in ("finetune", "scratch"):
            curves = []
            for seed in pipe.cfg["reproduce"]["seeds"]:
                recs = [r for r in read_metrics(pipe.student_dir(kind, seed) / which / "metrics.jsonl") if r.get("kind") == "epoch"]
                if recs:
                    curves.append([100 * r["test_acc"] for r in recs])
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = list(range(1, n + 1))
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            lo = [min(c[i] for c in curves) for i in range(n)]
            hi = [max(c[i] for c in curves) for i in range(n)]
            ax.plot(xs, mean, marker="o", color=colors[which], label=f"{labels[which]} (mean of {len(curves)})")
            ax.fill_between(xs, lo, hi, color=colors[which], alpha=0.2)
        ax.set_title(f"{NAMES.get(kind, kind)} student: test accuracy (IID)")
        ax.set_xlabel("end-to-end epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "curves.png", dpi=110)
    plt.close(fig)

    # training loss of every run, first seed
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.4), squeeze=False)
    seed0 = pipe.cfg["reproduce"]["seeds"][0]
    for ax, kind in zip(axes[0], kinds):
        for which in ("finetune", "scratch"):
            recs = [r for r in read_metrics(pipe.student_dir(kind, seed0) / which / "metrics.jsonl") if r.get("kind") == "train"]
            if recs:
                ax.plot([r["epoch_float"] for r in recs], [r["loss"] for r in recs], color=colors[which], label=labels[which])
        ax.set_title(f"{NAMES.get(kind, kind)}: training loss (seed {seed0})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "train_loss.png", dpi=110)
    plt.close(fig)

    # final comparison
    metrics = ["iid", "ood"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        per_seed = res["students"][kind]
        fsk = _fewshot_keys(per_seed)
        allm = metrics + fsk
        for j, which in enumerate(("scratch", "finetune")):
            vals = _metric_rows(per_seed, which, fsk)
            ms = [_mean_std(vals[m]) for m in allm]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(allm))]
            ax.bar(xs, [100 * m for m, _, _ in ms], width=0.38, color=colors[which], label=labels[which],
                   yerr=[100 * (0 if math.isnan(s) else s) for _, s, _ in ms], capsize=3)
        ax.set_xticks(range(len(allm)))
        ax.set_xticklabels([m.upper() if m in metrics else f"few-shot {m}" for m in allm], fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{NAMES.get(kind, kind)} student (mean ± std over seeds)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "comparison.png", dpi=110)
    plt.close(fig)


def _fewshot_keys(per_seed):
    for rec in per_seed.values():
        for which in ("finetune", "scratch"):
            if rec.get(which):
                return list(rec[which]["fewshot"])
    return []


def write_report(pipe, timings: dict, wall: float, report_dir=None, jobs: int = 1) -> Path:
    cfg = pipe.cfg
    res = collect(pipe)
    fig_dir = pipe.root / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    try:
        _curves(pipe, res, fig_dir)
    except Exception as err:  # noqa: BLE001 - the table matters more than the plots
        print(f"[report] plots failed: {err}", file=sys.stderr)
    seeds = cfg["reproduce"]["seeds"]
    L = []
    L.append("# m2mKD reproduction on the embedded dataset")
    L.append("")
    L.append(f"Generated by `{COMMAND_LINE or 'm2mkd-fast reproduce'}` on {time.strftime('%Y-%m-%d %H:%M')} — "
             "numbers as produced, untouched.")
    L.append("")
    L.append(f"- data: {pipe.data.source}; {len(pipe.data.train)} training / {len(pipe.data.test)} test images, "
             f"{pipe.data.num_classes} classes, {pipe.data.in_chans}×{pipe.data.img_size}×{pipe.data.img_size}")
    L.append(f"- OOD: the test split, each image corrupted once (gaussian noise, impulse noise, blur, contrast, "
             f"rotation, pixelation, elastic; severity {cfg['evaluate']['ood_severity']}, seed {cfg['evaluate']['ood_seed']})")
    fs = cfg["evaluate"]["fewshot"]
    L.append(f"- few-shot: scikit-learn digits resized to {pipe.data.img_size}×{pipe.data.img_size}, {fs['ways']}-way "
             f"{'/'.join(str(s) for s in fs['shots'])}-shot, {fs['queries']} queries per class, {fs['episodes']} episodes, "
             "a linear head on frozen L2-normalised pre-logit features (mean over episodes; ± is the 95% CI in the "
             "per-seed files, the std over seeds here)")
    L.append(f"- seeds: {seeds} (student init, stitch init, data order); the meta model and the teacher are shared by all seeds")
    L.append(f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, device {pipe.ctx.device}; "
             + (f"{jobs} worker processes of 1 thread each" if jobs > 1 else
                f"{pipe.ctx.world_size} process(es) of {torch.get_num_threads()} thread(s)"))
    L.append(f"- wall time of this `reproduce` call: {wall / 60:.1f} min (phases found done were skipped; see timings)")
    L.append("")
    L.append("## Result (mean ± std over seeds)")
    L.append("")
    any_fsk = []
    for kind in res["students"]:
        any_fsk = _fewshot_keys(res["students"][kind]) or any_fsk
    head = "| student | training | IID acc (%) | OOD acc (%) | " + " | ".join(f"few-shot {k} (%)" for k in any_fsk) + " |"
    L.append(head)
    L.append("|" + "---|" * (4 + len(any_fsk)))
    verdicts = []
    for kind, per_seed in res["students"].items():
        fsk = _fewshot_keys(per_seed)
        rows = {}
        for which, label in (("scratch", "from scratch"), ("finetune", "m2mKD + fine-tune")):
            vals = _metric_rows(per_seed, which, fsk)
            rows[which] = vals
            L.append(f"| {NAMES.get(kind, kind)} | {label} | {_fmt(*_mean_std(vals['iid'])[:2])} | "
                     f"{_fmt(*_mean_std(vals['ood'])[:2])} | " + " | ".join(_fmt(*_mean_std(vals[k])[:2]) for k in fsk) + " |")
        deltas = {}
        for m in ["iid", "ood"] + fsk:
            a, b = rows["finetune"][m], rows["scratch"][m]
            deltas[m] = [x - y for x, y in zip(a, b) if x is not None and y is not None]
        L.append(f"| {NAMES.get(kind, kind)} | **difference** | " + " | ".join(
            _signed(*_mean_std(deltas[m])[:2]) for m in ["iid", "ood"] + fsk) + " |")
        verdicts.append((kind, {m: _mean_std(v) for m, v in deltas.items()}))
    L.append("")
    L.append("Differences are m2mKD minus scratch, paired by seed. Both students get the same end-to-end "
             "recipe (epochs, learning rate, augmentation); the m2mKD student additionally went through the "
             "distillation pairs (compute listed below), initialised from them.")
    L.append("")
    L.append("### Verdict (computed from the table)")
    L.append("")
    for kind, d in verdicts:
        parts = []
        for m, (mean, std, n) in d.items():
            if n == 0 or math.isnan(mean):
                continue
            se = std / math.sqrt(n) if n > 1 and not math.isnan(std) else float("nan")
            if not math.isnan(se) and abs(mean) > 2 * se and se > 0:
                word = f"m2mKD {'helped' if mean > 0 else 'hurt'} (|mean| > 2 standard errors over {n} seeds)"
            elif not math.isnan(se):
                word = f"no clear difference (|mean| ≤ 2 standard errors over {n} seeds)"
            else:
                word = "one seed: no error bar"
            parts.append(f"{m.upper() if m in ('iid', 'ood') else 'few-shot ' + m}: {100 * mean:+.2f} points, {word}")
        L.append(f"- **{NAMES.get(kind, kind)}**: " + "; ".join(parts) + ".")
    L.append("")
    # OOD per corruption
    L.append("OOD accuracy per corruption (%, mean over seeds):")
    L.append("")
    names = None
    for per_seed in res["students"].values():
        for rec in per_seed.values():
            for which in ("finetune", "scratch"):
                if rec.get(which) and rec[which].get("ood_per_corruption"):
                    names = list(rec[which]["ood_per_corruption"])
                    break
    if names:
        L.append("| student | training | " + " | ".join(n.replace("_", " ") for n in names) + " |")
        L.append("|---|---|" + "---|" * len(names))
        for kind, per_seed in res["students"].items():
            for which, label in (("scratch", "from scratch"), ("finetune", "m2mKD + fine-tune")):
                vals = [_mean_std([(rec.get(which) or {}).get("ood_per_corruption", {}).get(n)
                                   for rec in per_seed.values()])[0] for n in names]
                L.append(f"| {NAMES.get(kind, kind)} | {label} | " + " | ".join(
                    "–" if math.isnan(v) else f"{100 * v:.1f}" for v in vals) + " |")
        L.append("")
    L.append("![test accuracy curves](figures/curves.png)")
    L.append("")
    L.append("![final comparison](figures/comparison.png)")
    L.append("")
    L.append("![training loss](figures/train_loss.png)")
    L.append("")
    L.append("## Teacher, meta model and module pairs")
    L.append("")
    mt, tt = res.get("meta") or {}, res.get("teacher") or {}
    L.append(f"- meta model `{cfg['meta']['model']}` {cfg['meta']['kwargs']}: test acc {_pct(mt.get('test_acc'))}, "
             f"{cfg['meta']['train']['epochs']} epochs")
    L.append(f"- teacher `{cfg['teacher']['model']}` {cfg['teacher']['kwargs']}: test acc {_pct(tt.get('test_acc'))}, "
             f"{cfg['teacher']['train']['epochs']} epochs")
    L.append("")
    lim = cfg["log"].get("eval_limit", 0)
    on = f"the first {lim} test images" if lim and lim < len(pipe.data.test) else "the test split"
    L.append(f"These accuracies (and the per-epoch curves) are measured on {on}; the result table uses the whole test split.")
    L.append("")
    L.append(f"Accuracy of each pair on {on}: the teacher module (resp. the distilled student module with "
             "its stitches) inserted into the frozen meta model; mean over seeds.")
    L.append("")
    for kind, per_seed in res["students"].items():
        idx = sorted({i for rec in per_seed.values() for i in rec["pairs"]})
        if not idx:
            continue
        L.append(f"| {NAMES.get(kind, kind)} pair | " + " | ".join(f"module {i}" for i in idx) + " |")
        L.append("|---|" + "---|" * len(idx))
        tvals = [_mean_std([(rec["pairs"].get(i) or {}).get("teacher_pair_acc") for rec in per_seed.values()])[0] for i in idx]
        svals = [_mean_std([(rec["pairs"].get(i) or {}).get("test_acc") for rec in per_seed.values()])[0] for i in idx]
        L.append("| teacher module in meta | " + " | ".join(_pct(v) for v in tvals) + " |")
        L.append("| student module in meta | " + " | ".join(_pct(v) for v in svals) + " |")
        L.append("")
    L.append("## Configuration")
    L.append("")
    st = cfg["students"]
    for kind in res["students"]:
        L.append(f"- {NAMES.get(kind, kind)} student `{st[kind]['model']}` {st[kind]['kwargs']}: each pair "
                 f"{st[kind]['distill']['epochs']} epoch(s), then {st[kind]['finetune']['epochs']} end-to-end epochs "
                 f"(lr {st[kind]['finetune']['lr']}, batch {st[kind]['finetune']['batch_size']}); scratch: the same "
                 f"{st[kind]['finetune']['epochs']} epochs from random init")
    d = cfg["distill"]
    a = cfg["augment"]
    L.append(f"- loss: {d['type']}, α = {d['alpha']}, τ = {d['tau']}; label smoothing {a['label_smoothing']}, "
             f"mixup {a['mixup']}, cutmix {a['cutmix']}, random crop (pad {a['padding']}), flip {a['flip']}")
    L.append(f"- full resolved config: `config.yaml` in the run directory")
    L.append("")
    L.append("## Where the time went")
    L.append("")
    L.append("Compute per phase, from each run's own record (training incl. its per-epoch test evaluation; "
             "identical whether this call ran the phase or found it done):")
    L.append("")
    L.append("| phase | runs | wall seconds | CPU seconds | training images/s (median) |")
    L.append("|---|---|---|---|---|")
    rows = [("pretrain-meta", [res.get("meta")]), ("train-teacher", [res.get("teacher")])]
    for kind, per_seed in res["students"].items():
        rows.append((f"{kind}: distill (all pairs)", [p for rec in per_seed.values() for p in rec["pairs"].values()]))
        rows.append((f"{kind}: fine-tune", [rec.get("finetune_run") for rec in per_seed.values()]))
        rows.append((f"{kind}: scratch", [rec.get("scratch_run") for rec in per_seed.values()]))
        rows.append((f"{kind}: evaluate", [rec.get(w) for rec in per_seed.values() for w in ("finetune", "scratch")]))
    total, total_cpu, cpu_known = 0.0, 0.0, True
    for name, recs in rows:
        recs = [r for r in recs if r]
        sec = sum(float(r.get("seconds", 0.0)) for r in recs)
        cpu_vals = [r.get("cpu_seconds") for r in recs]
        cpu = sum(float(v) for v in cpu_vals if v is not None) if recs and None not in cpu_vals else None
        total += sec
        if cpu is None:
            cpu_known = False
        else:
            total_cpu += cpu
        ips = sorted(float(r["img_per_s"]) for r in recs if r.get("img_per_s"))
        L.append(f"| {name} | {len(recs)} | {sec:.0f} | {'–' if cpu is None else f'{cpu:.0f}'} | "
                 f"{f'{ips[len(ips) // 2]:.0f}' if ips else '–'} |")
    L.append(f"| **all phases (sum)** | | **{total:.0f}** | **{f'{total_cpu:.0f}' if cpu_known else '–'}** | |")
    L.append("")
    L.append("CPU seconds are each process's own CPU time; with one thread per worker they are what the phase "
             "costs on an idle core, whatever else the machine was running.")
    L.append("")
    L.append(f"Wall time of this call: {wall:.0f} s ({wall / 60:.1f} min)" + (
        f", with {jobs} worker processes in parallel" if jobs > 1 else "") + ". Calls of `reproduce` on this run "
             "directory so far (wall seconds, phases run / found done):")
    L.append("")
    for rec in _history(pipe.root):
        L.append(f"- {rec.get('start')}: {rec.get('wall_s', 0):.0f} s, {rec.get('ran', '?')} run / {rec.get('skipped', '?')} done")
    L.append("")
    text = "\n".join(L) + "\n"
    path = pipe.root / "REPORT.md"
    path.write_text(text, encoding="utf-8")
    (pipe.root / "results.json").write_text(json.dumps({"results": res, "timings": timings, "wall_s": wall},
                                                       indent=2, sort_keys=True, default=str), encoding="utf-8")
    if report_dir is not None:
        rd = Path(report_dir)
        (rd / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, rd / "REPORT.md")
        shutil.copy2(pipe.root / "results.json", rd / "results.json")
        shutil.copy2(pipe.root / "config.yaml", rd / "config.yaml")
        for png in fig_dir.glob("*.png"):
            shutil.copy2(png, rd / "figures" / png.name)
    return path


def _history(root: Path) -> list:
    p = Path(root) / "reproduce_log.jsonl"
    out = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _pct(v):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _signed(m, s):
    if math.isnan(m):
        return "–"
    return f"{100 * m:+.2f}" + ("" if math.isnan(s) else f" ± {100 * s:.2f}")
