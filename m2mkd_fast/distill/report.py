"""REPORT.md of a reproduction: the paper-style table (per student: from scratch, scratch with
equal compute, no KD, m2mKD; IID, OOD, few-shot; mean ± std over seeds), paired differences with
95% confidence intervals and t-test p-values, the teacher and pairs, the timings, and the curves."""

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
# the trained students of a (student, seed), as table rows; "finetune" is the m2mKD student
ROWS = (("scratch", "from scratch"), ("scratch_equal", "scratch, equal compute"),
        ("nokd", "no KD (α = 0) + fine-tune"), ("finetune", "m2mKD + fine-tune"))
# m2mKD minus each control, paired by seed
CONTROLS = (("scratch", "m2mKD − scratch"), ("scratch_equal", "m2mKD − equal compute"), ("nokd", "m2mKD − no KD"))
COLORS = {"finetune": "tab:blue", "scratch": "tab:orange", "scratch_equal": "tab:red", "nokd": "tab:green"}
ALPHA = 0.05  # the verdict's significance level (two-sided paired t-test)


def paired_stats(a, b) -> dict:
    """Paired differences a − b (lists over seeds, None entries dropped pairwise): n, mean, the 95%
    confidence interval mean ± t_{0.975, n−1}·sd/√n and the two-sided paired t-test p-value
    (NaN with fewer than 2 pairs; p = 0 for a constant non-zero difference, 1 for all zeros)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    n = len(d)
    out = {"n": n, "mean": sum(d) / n if n else float("nan"), "lo": float("nan"), "hi": float("nan"),
           "p": float("nan")}
    if n < 2:
        return out
    m = out["mean"]
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    out.update(lo=m - half, hi=m + half, sd=sd)
    out["p"] = float(stats.ttest_1samp(d, 0.0).pvalue) if sd > 0 else (0.0 if m != 0 else 1.0)
    return out


def verdict(st: dict) -> str:
    """helped / hurt when the paired t-test rejects no difference at ALPHA, else no clear difference."""
    if st["n"] < 2 or math.isnan(st["p"]):
        return f"{st['n']} seed(s): no test"
    if st["p"] < ALPHA:
        return f"{'helped' if st['mean'] > 0 else 'hurt'} (p = {st['p']:.3f})"
    return f"no clear difference (p = {st['p']:.3f})"


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
    from .pipeline import RUN_OF

    incubated = cfg["teacher"]["incubate"]["epochs"] > 0
    out["incubate"] = [_load(pipe.root / "teacher_incubate" / f"module_{i}" / "done.json")
                       for i in range(pipe._num_stages("vmoe") if incubated else 0)]
    out["equal_compute"] = {kind: _load(pipe.root / f"equal_compute_{kind}.json") for kind in cfg["reproduce"]["students"]}
    out["params"] = _param_counts(pipe)
    for kind in cfg["reproduce"]["students"]:
        per_seed = {}
        for seed in cfg["reproduce"]["seeds"]:
            d = pipe.student_dir(kind, seed)
            rec = {"pairs": {}, "nokd_pairs": {}}
            for which, run in RUN_OF.items():
                rec[which] = _load(d / f"eval_{which}.json")
                rec[f"{which}_run"] = _load(d / run / "done.json")
            for key, sub in (("pairs", d / "distill"), ("nokd_pairs", d / "nokd" / "distill")):
                for p in sorted(sub.glob("module_*")):
                    rec[key][int(p.name.split("_")[1])] = _load(p / "done.json")
            per_seed[seed] = rec
        out["students"][kind] = per_seed
    return out


def _param_counts(pipe) -> dict:
    """Parameters (in units) of the meta model, the teacher and each student of the config."""
    from .students import build_model, count_params

    cfg = pipe.cfg
    specs = {"meta": cfg["meta"], "teacher": cfg["teacher"]}
    specs.update({kind: cfg["students"][kind] for kind in cfg["reproduce"]["students"]})
    return {name: count_params(build_model(s["model"], s["kwargs"], pipe.data)) for name, s in specs.items()}


def _vmoe_description(pipe) -> str:
    """The V-MoE student's routing in words, read off the built model."""
    from ..layers import MoEMLP
    from .students import build_model

    st = pipe.cfg["students"]["vmoe"]
    model = build_model(st["model"], st["kwargs"], pipe.data)
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    if not moes:
        return "no MoE layers"
    blocks = len(getattr(model, "blocks", [])) or len(moes)
    gate = moes[0].gate
    where = "experts in every block" if len(moes) == blocks else f"experts in {len(moes)} of {blocks} blocks"
    cap = "dropless" if moes[0].capacity_factor is None else f"capacity factor {moes[0].capacity_factor}"
    aux = "no aux loss" if gate == "naive" else "load-balancing aux loss"
    return (f"{gate} gate, {where}, E = {moes[0].num_experts}, k = {moes[0].k}, expert hidden "
            f"{moes[0].hidden_dim}, {cap}, {aux}")


def _metric_rows(per_seed: dict, which: str, fewshot_keys):
    vals = {"iid": [], "ood": []}
    for k in fewshot_keys:
        vals[k] = []
    for rec in per_seed.values():  # one entry per seed (None where missing): lists pair up by seed
        r = rec.get(which) or {}
        vals["iid"].append(r.get("iid"))
        vals["ood"].append(r.get("ood"))
        for k in fewshot_keys:
            vals[k].append(r.get("fewshot", {}).get(k, {}).get("mean"))
    return vals


def _curves(pipe, res, fig_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pipeline import RUN_OF

    kinds = list(res["students"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    colors, labels = COLORS, dict(ROWS)
    for ax, kind in zip(axes[0], kinds):
        for which in labels:
            curves = []
            for seed in pipe.cfg["reproduce"]["seeds"]:
                recs = [r for r in read_metrics(pipe.student_dir(kind, seed) / RUN_OF[which] / "metrics.jsonl")
                        if r.get("kind") == "epoch"]
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
        for which in labels:
            recs = [r for r in read_metrics(pipe.student_dir(kind, seed0) / RUN_OF[which] / "metrics.jsonl")
                    if r.get("kind") == "train"]
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
        for j, which in enumerate(labels):
            vals = _metric_rows(per_seed, which, fsk)
            ms = [_mean_std(vals[m]) for m in allm]
            xs = [i + (j - 1.5) * 0.2 for i in range(len(allm))]
            ax.bar(xs, [100 * m for m, _, _ in ms], width=0.2, color=colors[which], label=labels[which],
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
        for which, _ in ROWS:
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
    L.append(f"- seeds: {seeds} (student init, stitch init, data order, NAC pair receivers); the meta model and "
             "the teacher are trained once and shared by all seeds")
    L.append(f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, device {pipe.ctx.device}; "
             + (f"{jobs} worker processes of 1 thread each" if jobs > 1 else
                f"{pipe.ctx.world_size} process(es) of {torch.get_num_threads()} thread(s)"))
    L.append(f"- wall time of this `reproduce` call: {wall / 60:.1f} min (phases found done were skipped; see timings)")
    L.append("")
    L.append("## Models")
    L.append("")
    params = res["params"]
    mt, tt = cfg["meta"], cfg["teacher"]
    inc = tt["incubate"]["epochs"] > 0
    L.append(f"- teacher `{tt['model']}` {tt['kwargs']} (" + ("Deep Incubation in the meta model, assembled, "
             "fine-tuned end to end, split" if inc else "trained end to end, split") + f") … {params['teacher'] / 1e6:.2f}M params")
    for kind in res["students"]:
        st = cfg["students"][kind]
        what = _vmoe_description(pipe) if kind == "vmoe" else "read-in, propagators, read-out"
        L.append(f"- {NAMES.get(kind, kind)} student `{st['model']}` {st['kwargs']} ({what}) … "
                 f"{params[kind] / 1e6:.2f}M params")
    L.append(f"- meta model `{mt['model']}` {mt['kwargs']} (one block per stage; pretrained, then frozen) … "
             f"{params['meta'] / 1e6:.2f}M params")
    L.append("")
    L.append("NAC pair students (docs/design.md §2.5): the read-in and read-out receivers are drawn as the reference "
             "draws them, one fresh `randn(B, 1, D)` latent per image and call; mediators attend densely over the meta "
             "tokens; all latents share one fixed random code.")
    L.append("")
    L.append("## Result (mean ± std over seeds)")
    L.append("")
    any_fsk = []
    for kind in res["students"]:
        any_fsk = _fewshot_keys(res["students"][kind]) or any_fsk
    metrics = ["iid", "ood"] + any_fsk
    L.append("| student | training | IID acc (%) | OOD acc (%) | " + " | ".join(f"few-shot {k} (%)" for k in any_fsk) + " |")
    L.append("|" + "---|" * (2 + len(metrics)))
    stats_all = {}
    for kind, per_seed in res["students"].items():
        rows = {which: _metric_rows(per_seed, which, any_fsk) for which, _ in ROWS}
        for which, label in ROWS:
            if not any(rows[which]["iid"]):
                continue
            L.append(f"| {NAMES.get(kind, kind)} | {_row_label(res, cfg, kind, which, label)} | "
                     + " | ".join(_fmt(*_mean_std(rows[which][m])[:2]) for m in metrics) + " |")
        stats_all[kind] = {ctl: {m: paired_stats(rows["finetune"][m], rows[ctl][m]) for m in metrics}
                           for ctl, _ in CONTROLS if any(rows[ctl]["iid"])}
    L.append("")
    L.append("## m2mKD against each control (paired by seed)")
    L.append("")
    L.append("Each cell: mean difference in points, its 95% confidence interval (t distribution, n − 1 degrees of "
             "freedom) and the two-sided paired t-test p-value. Verdict: helped / hurt when p < "
             f"{ALPHA}, otherwise no clear difference.")
    L.append("")
    L.append("| student | comparison | " + " | ".join(m.upper() if m in ("iid", "ood") else f"few-shot {m}" for m in metrics) + " |")
    L.append("|" + "---|" * (2 + len(metrics)))
    for kind, comps in stats_all.items():
        for ctl, label in CONTROLS:
            if ctl in comps:
                L.append(f"| {NAMES.get(kind, kind)} | **{label}** | " + " | ".join(_cell(comps[ctl][m]) for m in metrics) + " |")
    L.append("")
    L.append("### Verdict (computed from the table)")
    L.append("")
    for kind, comps in stats_all.items():
        for ctl, label in CONTROLS:
            if ctl in comps:
                parts = [f"{m.upper() if m in ('iid', 'ood') else 'few-shot ' + m} {_signed1(st['mean'])}: {verdict(st)}"
                         for m, st in comps[ctl].items()]
                L.append(f"- **{NAMES.get(kind, kind)}, {label}**: " + "; ".join(parts) + ".")
    L.append("")
    L.append(f"The intervals and p-values sample the student side only ({len(seeds)} seeds: student init, stitch "
             "init, data order, NAC pair receivers). The meta model and the teacher are trained once (seed "
             f"{cfg['seed']}) and shared by every seed, so the variance that another meta model or teacher would "
             "bring — it moves every m2mKD and no-KD student of a run together — is not sampled; nor are the "
             "test split and the few-shot episodes. No correction for the number of comparisons is applied.")
    L.append("")
    _equal_compute_lines(L, res, cfg)
    names = None
    for per_seed in res["students"].values():
        for rec in per_seed.values():
            for which, _ in ROWS:
                if rec.get(which) and rec[which].get("ood_per_corruption"):
                    names = list(rec[which]["ood_per_corruption"])
                    break
    if names:
        L.append("OOD accuracy per corruption (%, mean over seeds):")
        L.append("")
        L.append("| student | training | " + " | ".join(n.replace("_", " ") for n in names) + " |")
        L.append("|---|---|" + "---|" * len(names))
        for kind, per_seed in res["students"].items():
            for which, label in ROWS:
                vals = [_mean_std([(rec.get(which) or {}).get("ood_per_corruption", {}).get(n)
                                   for rec in per_seed.values()])[0] for n in names]
                if not all(math.isnan(v) for v in vals):
                    L.append(f"| {NAMES.get(kind, kind)} | {label} | " + " | ".join(
                        "–" if math.isnan(v) else f"{100 * v:.1f}" for v in vals) + " |")
        L.append("")
    L.append("![test accuracy curves](figures/curves.png)")
    L.append("")
    L.append("![final comparison](figures/comparison.png)")
    L.append("")
    L.append("![training loss](figures/train_loss.png)")
    L.append("")
    _teacher_lines(L, pipe, res, cfg)
    L.append("## Configuration")
    L.append("")
    st = cfg["students"]
    for kind in res["students"]:
        L.append(f"- {NAMES.get(kind, kind)} student: each pair {st[kind]['distill']['epochs']} epoch(s) of "
                 f"{_images(st[kind]['distill'], pipe)} images, then {st[kind]['finetune']['epochs']} end-to-end epochs of "
                 f"{_images(st[kind]['finetune'], pipe)} images (lr {st[kind]['finetune']['lr']}, batch "
                 f"{st[kind]['finetune']['batch_size']}); scratch: the same epochs from random init; no KD: the same "
                 "pairs with α = 0, then the same fine-tune")
    d = cfg["distill"]
    a = cfg["augment"]
    L.append(f"- loss: {d['type']}, α = {d['alpha']}, τ = {d['tau']}; label smoothing {a['label_smoothing']}, "
             f"mixup {a['mixup']}, cutmix {a['cutmix']}, random crop (pad {a['padding']}), flip {a['flip']}")
    L.append("- full resolved config: `config.yaml` in the run directory")
    L.append("")
    _time_lines(L, pipe, res, wall, jobs)
    text = "\n".join(L) + "\n"
    path = pipe.root / "REPORT.md"
    path.write_text(text, encoding="utf-8")
    (pipe.root / "results.json").write_text(json.dumps({"results": res, "paired": stats_all, "timings": timings,
                                                        "wall_s": wall}, indent=2, sort_keys=True, default=str),
                                            encoding="utf-8")
    if report_dir is not None:
        rd = Path(report_dir)
        (rd / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, rd / "REPORT.md")
        shutil.copy2(pipe.root / "results.json", rd / "results.json")
        shutil.copy2(pipe.root / "config.yaml", rd / "config.yaml")
        for png in fig_dir.glob("*.png"):
            shutil.copy2(png, rd / "figures" / png.name)
    return path


def _images(tcfg: dict, pipe) -> int:
    n = len(pipe.data.train)
    return min(int(tcfg["train_limit"]), n) if tcfg["train_limit"] else n


def _row_label(res, cfg, kind, which, label) -> str:
    eq = (res.get("equal_compute") or {}).get(kind)
    if which == "scratch_equal" and eq:
        return f"{label} ({eq['epochs']} epochs)"
    if which == "scratch":
        return f"{label} ({cfg['students'][kind]['finetune']['epochs']} epochs)"
    return label


def _cell(st: dict) -> str:
    if st["n"] == 0 or math.isnan(st["mean"]):
        return "–"
    if st["n"] < 2:
        return _signed1(st["mean"])
    return f"{_signed1(st['mean'])} [{_signed1(st['lo'])}, {_signed1(st['hi'])}] p={st['p']:.3f}"


def _signed1(v) -> str:
    return "–" if math.isnan(v) else f"{100 * v:+.2f}"


def _cpu(recs) -> float:
    return sum(float((r or {}).get("cpu_seconds") or 0.0) for r in recs)


def _equal_compute_lines(L, res, cfg):
    eqs = {k: v for k, v in (res.get("equal_compute") or {}).items() if v}
    if not eqs:
        return
    L.append("**Equal compute.** The scratch baseline with equal compute gets the fine-tune's epochs plus the "
             "m2mKD pairs' cost converted to scratch epochs (computed by this command from the runs' own CPU-time "
             "records, mean over seeds): " + "; ".join(
                 f"{NAMES.get(k, k)}: pairs {v['pairs_cpu_s']:.0f} CPU s per seed ÷ {v['scratch_cpu_s_per_epoch']:.1f} "
                 f"CPU s per scratch epoch → {v['finetune_epochs']} + {v['epochs'] - v['finetune_epochs']} = "
                 f"{v['epochs']} epochs" for k, v in eqs.items()) + ".")
    shared = _cpu([res.get("meta"), res.get("teacher")] + list(res.get("incubate") or []))
    units = max(1, len(cfg["reproduce"]["seeds"]) * len(res["students"]))
    L.append("")
    L.append(f"Not counted there: the shared meta model and teacher ({shared:.0f} CPU s in all: meta pretraining, "
             f"teacher incubation and fine-tune), which every m2mKD (and no-KD) student uses — "
             f"{shared / units:.0f} CPU s per (student, seed) if spread over the {units} of this run; in the paper's "
             "setting the teacher is a pretrained model that already exists.")
    L.append("")


def _teacher_lines(L, pipe, res, cfg):
    L.append("## Teacher, meta model and module pairs")
    L.append("")
    mt, tt = res.get("meta") or {}, res.get("teacher") or {}
    inc = cfg["teacher"]["incubate"]
    L.append(f"- meta model: test acc {_pct(mt.get('test_acc'))}, {cfg['meta']['train']['epochs']} epochs")
    if inc["epochs"] > 0:
        L.append(f"- teacher modules incubated in the frozen meta model ({inc['epochs']} epoch(s) each): test acc "
                 + ", ".join(f"module {i} {_pct((r or {}).get('test_acc'))}" for i, r in enumerate(res.get("incubate") or [])))
        L.append(f"- teacher, assembled from them and fine-tuned end to end for {cfg['teacher']['train']['epochs']} "
                 f"epochs: test acc {_pct(tt.get('test_acc'))}")
    else:
        L.append(f"- teacher, trained end to end (not incubated): test acc {_pct(tt.get('test_acc'))}, "
                 f"{cfg['teacher']['train']['epochs']} epochs")
    L.append("")
    lim = cfg["log"].get("eval_limit", 0)
    on = f"the first {lim} test images" if lim and lim < len(pipe.data.test) else "the test split"
    L.append(f"These accuracies (and the per-epoch curves) are measured on {on}; the result table uses the whole test split.")
    L.append("")
    L.append(f"Accuracy of each pair on {on}: the final teacher's module (resp. the trained student module with "
             "its stitches) inserted into the frozen meta model; mean over seeds.")
    L.append("")
    for kind, per_seed in res["students"].items():
        idx = sorted({i for rec in per_seed.values() for i in rec["pairs"]})
        if not idx:
            continue
        L.append(f"| {NAMES.get(kind, kind)} pair | " + " | ".join(f"module {i}" for i in idx) + " |")
        L.append("|---|" + "---|" * len(idx))
        for key, label, field in (("pairs", "teacher module in meta", "teacher_pair_acc"),
                                  ("pairs", "m2mKD student module in meta", "test_acc"),
                                  ("nokd_pairs", "no-KD student module in meta", "test_acc")):
            vals = [_mean_std([(rec[key].get(i) or {}).get(field) for rec in per_seed.values()])[0] for i in idx]
            if not all(math.isnan(v) for v in vals):
                L.append(f"| {label} | " + " | ".join(_pct(v) for v in vals) + " |")
        L.append("")


def _time_lines(L, pipe, res, wall, jobs):
    L.append("## Where the time went")
    L.append("")
    L.append("Compute per phase, from each run's own record (training incl. its per-epoch test evaluation; "
             "identical whether this call ran the phase or found it done):")
    L.append("")
    L.append("| phase | runs | wall seconds | CPU seconds | training images/s (median) |")
    L.append("|---|---|---|---|---|")
    rows = [("pretrain-meta", [res.get("meta")]), ("incubate teacher modules", list(res.get("incubate") or [])),
            ("train-teacher", [res.get("teacher")])]
    for kind, per_seed in res["students"].items():
        recs = list(per_seed.values())
        rows.append((f"{kind}: m2mKD pairs", [p for rec in recs for p in rec["pairs"].values()]))
        rows.append((f"{kind}: m2mKD fine-tune", [rec.get("finetune_run") for rec in recs]))
        rows.append((f"{kind}: no-KD pairs", [p for rec in recs for p in rec["nokd_pairs"].values()]))
        rows.append((f"{kind}: no-KD fine-tune", [rec.get("nokd_run") for rec in recs]))
        rows.append((f"{kind}: scratch", [rec.get("scratch_run") for rec in recs]))
        rows.append((f"{kind}: scratch, equal compute", [rec.get("scratch_equal_run") for rec in recs]))
        rows.append((f"{kind}: evaluate", [rec.get(w) for rec in recs for w, _ in ROWS]))
    total, total_cpu, cpu_known = 0.0, 0.0, True
    for name, recs in rows:
        recs = [r for r in recs if r]
        if not recs:
            continue
        sec = sum(float(r.get("seconds", 0.0)) for r in recs)
        cpu_vals = [r.get("cpu_seconds") for r in recs]
        cpu = sum(float(v) for v in cpu_vals) if None not in cpu_vals else None
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
