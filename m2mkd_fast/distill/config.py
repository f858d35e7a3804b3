"""Configs: YAML presets shipped in ``m2mkd_fast/configs/`` plus ``--set key=value`` overrides.

Every preset derives (``base: <preset>``) from ``default.yaml``, which is also the schema: a key
that default.yaml does not have is rejected (with the nearest known key suggested), and a value
must have the type of the default's value (ints are accepted for floats; ``null`` defaults accept
anything; ``null`` is accepted elsewhere only for the ``*_limit`` keys, where it means "all";
sections named ``kwargs`` are open — they are passed to the model constructor).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path

import yaml

from .files import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
STUDENTS = ("nac", "vmoe")
PRECISIONS = ("fp32", "bf16", "fp16")
OPEN_SECTIONS = ("kwargs",)


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_summary(name: str) -> tuple[str, str]:
    """A shipped preset's one-line ``description`` and its expected ``wall_time`` on 2 CPU cores."""
    cfg = _load_chain(name)
    return cfg["description"], cfg["wall_time"]


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text (UTF-8) file: {err.reason} at byte {err.start}") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    q = CONFIG_DIR / f"{name_or_path}.yaml"
    if q.is_file():
        return q
    raise ConfigError(
        f"no config {name_or_path!r}: not a YAML file, nor a shipped preset ({', '.join(available_presets())})"
    )


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_chain(name_or_path: str, seen=()) -> dict:
    path = _resolve_path(name_or_path)
    if str(path) in seen:
        raise ConfigError(f"config inheritance loop: {' -> '.join(seen)} -> {path}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(_load_chain(str(base), seen + (str(path),)), data)


def parse_override(item: str) -> tuple[list[str], object]:
    """``a.b.c=value`` → (["a","b","c"], value parsed as YAML: numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key or key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    if isinstance(value, str):  # YAML reads 1e-3 as a string; accept scientific notation
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.split("."), value


def _check_against(schema, value, path: str):
    if isinstance(schema, dict) and not (path.split(".")[-1] in OPEN_SECTIONS):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            if k not in schema:
                near = difflib.get_close_matches(k, list(schema), n=1)
                hint = f" (did you mean {(path + '.' if path else '') + near[0]!r}?)" if near else ""
                raise ConfigError(f"unknown config key {sub!r}{hint}")
            _check_against(schema[k], v, sub)
        return
    if schema is None or path.split(".")[-1] in OPEN_SECTIONS or (value is None and path.endswith("_limit")):
        return
    if value is None:
        raise ConfigError(f"config key {path!r} must be {type(schema).__name__} (like {schema!r}), got null")
    if isinstance(schema, bool):
        ok = isinstance(value, bool)
    elif isinstance(schema, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(schema, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(schema, str):
        ok = isinstance(value, str)
    elif isinstance(schema, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config key {path!r} must be {type(schema).__name__} (like {schema!r}), got {value!r}")


def _floats(cfg, schema):
    """Turn ints into floats where the schema holds a float (so lr: 1 is 1.0)."""
    if isinstance(cfg, dict) and isinstance(schema, dict):
        return {k: _floats(v, schema.get(k)) for k, v in cfg.items()}
    if isinstance(schema, float) and isinstance(cfg, int) and not isinstance(cfg, bool):
        return float(cfg)
    return cfg


def validate(cfg: dict) -> dict:
    """Semantic checks beyond types; raises ConfigError naming the key."""

    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"config key {key!r}: {msg}")

    for sect in ("meta", "teacher"):
        tr = cfg[sect]["train"]
        _check_train(tr, f"{sect}.train", need)
    _check_train(cfg["teacher"]["incubate"], "teacher.incubate", need)
    for name in STUDENTS:
        st = cfg["students"][name]
        for ph in ("distill", "finetune"):
            _check_train(st[ph], f"students.{name}.{ph}", need)
    d = cfg["distill"]
    need(d["type"] in ("soft", "hard"), "distill.type", f"must be 'soft' or 'hard', got {d['type']!r}")
    need(0.0 <= d["alpha"] <= 1.0, "distill.alpha", f"must be in [0, 1], got {d['alpha']}")
    need(d["tau"] > 0, "distill.tau", f"must be > 0, got {d['tau']}")
    a = cfg["augment"]
    need(0.0 <= a["label_smoothing"] < 1.0, "augment.label_smoothing", f"must be in [0, 1), got {a['label_smoothing']}")
    need(a["mixup"] >= 0 and a["cutmix"] >= 0, "augment.mixup", "mixup/cutmix alphas must be >= 0")
    need(0.0 <= a["erase_prob"] <= 1.0, "augment.erase_prob", f"must be in [0, 1], got {a['erase_prob']}")
    need(a["padding"] >= 0, "augment.padding", f"must be >= 0, got {a['padding']}")
    r = cfg["reproduce"]
    need(len(r["seeds"]) >= 1, "reproduce.seeds", "needs at least one seed")
    need(r["jobs"] >= 1, "reproduce.jobs", f"must be >= 1, got {r['jobs']}")
    need(all(isinstance(s, int) for s in r["seeds"]), "reproduce.seeds", f"must be integers, got {r['seeds']}")
    need(len(set(r["seeds"])) == len(r["seeds"]), "reproduce.seeds", f"has duplicates: {r['seeds']}")
    need(len(r["students"]) >= 1 and all(s in STUDENTS for s in r["students"]), "reproduce.students",
         f"must be a non-empty subset of {list(STUDENTS)}, got {r['students']}")
    e = cfg["evaluate"]
    need(1 <= e["ood_severity"] <= 5, "evaluate.ood_severity", f"must be in 1..5, got {e['ood_severity']}")
    fs = e["fewshot"]
    need(fs["ways"] >= 2, "evaluate.fewshot.ways", f"must be >= 2, got {fs['ways']}")
    need(all(s >= 1 for s in fs["shots"]), "evaluate.fewshot.shots", f"must be >= 1, got {fs['shots']}")
    need(fs["episodes"] >= 2, "evaluate.fewshot.episodes", f"must be >= 2, got {fs['episodes']}")
    need(cfg["data"]["name"] in ("fashion_mnist", "numpy", "imagefolder"), "data.name",
         f"must be fashion_mnist, numpy or imagefolder, got {cfg['data']['name']!r}")
    need(cfg["data"]["source"] in ("auto", "full", "subset"), "data.source",
         f"must be auto, full or subset, got {cfg['data']['source']!r}")
    for key, low in INT_MINIMA.items():
        value = _get(cfg, key)
        need(value is None or value >= low, key, f"must be >= {low}, got {value}")
    need(cfg["data"]["in_chans"] in (1, 3), "data.in_chans", f"must be 1 or 3, got {cfg['data']['in_chans']}")
    need(all(s >= 0 for s in r["seeds"]), "reproduce.seeds", f"must be >= 0, got {r['seeds']}")
    for key in ("augment.mixup_prob", "augment.switch_prob"):
        need(0.0 <= _get(cfg, key) <= 1.0, key, f"must be in [0, 1], got {_get(cfg, key)}")
    need(fs["lr"] > 0, "evaluate.fewshot.lr", f"must be > 0, got {fs['lr']}")
    need(cfg["precision"] in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {cfg['precision']!r}")
    need(cfg["device"] in ("auto", "cpu", "cuda") or str(cfg["device"]).startswith("cuda:"), "device",
         f"must be auto, cpu, cuda or cuda:N, got {cfg['device']!r}")
    return cfg


# integer keys and their smallest valid value (the *_limit keys also accept null = all)
INT_MINIMA = {
    "seed": 0, "data.img_size": 1, "data.train_limit": 0, "data.test_limit": 0, "data.subset_seed": 0,
    "data.num_workers": 0, "evaluate.batch_size": 1, "evaluate.ood_seed": 0, "evaluate.fewshot.queries": 1,
    "evaluate.fewshot.steps": 1, "evaluate.fewshot.seed": 0, "log.every": 1, "log.eval_limit": 0,
}


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _check_train(tr, key, need):
    need(tr["epochs"] >= 0, f"{key}.epochs", f"must be >= 0, got {tr['epochs']}")
    need(tr["batch_size"] >= 1, f"{key}.batch_size", f"must be >= 1, got {tr['batch_size']}")
    need(tr["lr"] > 0, f"{key}.lr", f"must be > 0, got {tr['lr']}")
    need(0 <= tr["min_lr"] <= tr["lr"], f"{key}.min_lr", f"must be in [0, lr], got {tr['min_lr']}")
    need(tr["weight_decay"] >= 0, f"{key}.weight_decay", f"must be >= 0, got {tr['weight_decay']}")
    need(tr["warmup_epochs"] >= 0 and (tr["epochs"] == 0 or tr["warmup_epochs"] <= tr["epochs"]), f"{key}.warmup_epochs",
         f"must be in [0, epochs={tr['epochs']}], got {tr['warmup_epochs']}")
    need(tr["grad_clip"] >= 0, f"{key}.grad_clip", f"must be >= 0 (0 = off), got {tr['grad_clip']}")
    need(tr["train_limit"] is None or tr["train_limit"] >= 0, f"{key}.train_limit",
         f"must be >= 0 (0 = all), got {tr['train_limit']}")
    need(tr["ckpt_every"] >= 0, f"{key}.ckpt_every", f"must be >= 0 (0 = at epoch ends only), got {tr['ckpt_every']}")


def load_config(name_or_path: str = "default", overrides=()) -> dict:
    """Load a preset (or YAML file), apply ``key=value`` overrides, check and return it."""
    schema = _load_chain("default")
    cfg = _load_chain(name_or_path)
    for item in overrides or ():
        keys, value = parse_override(item)
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    _check_against(schema, cfg, "")
    cfg = deep_merge(schema, cfg)
    cfg = _floats(cfg, schema)
    return validate(cfg)


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (what decides whether a cached phase output
    can be reused)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def dump_config(cfg: dict, path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
