"""Checkpoints as safetensors files: tensors only, never a pickle.

A training checkpoint holds, in one ``.safetensors`` file:

- ``model.<name>``           the trained module's state_dict
- ``optim.<i>.<key>``        optimizer per-parameter state tensors (Adam moments, step)
- ``rng.<rank>.torch`` / ``rng.<rank>.cuda<d>`` / ``rng.<rank>.numpy``  RNG states as tensors
- ``extra.<name>``           anything else a phase wants to keep (tensors)
- metadata (JSON strings):   format version, phase, config, progress (epoch, step), optimizer
  param groups and non-tensor state, scheduler state, Python/numpy RNG scalars.

Files are written atomically: a temporary file in the same directory, fsync, rename over the
target, fsync of the directory — a run killed at any moment leaves the previous checkpoint or
the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import CheckpointError, fsync_path, temp_path, write_error

FORMAT = "m2mkd_fast.checkpoint.v1"


# --------------------------------------------------------------------------------- files


def _cpu_tensors(tensors: dict) -> dict:
    """Detached, contiguous CPU tensors; storages shared between entries are copied (safetensors
    refuses aliasing)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint entry {k!r} is {type(v).__name__}, not a tensor")
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v
    return out


def atomic_save(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Write tensors (and string→JSON metadata) to ``path`` atomically. Raises OSError naming
    ``path`` when the disk is full or not writable."""
    path = Path(path)
    meta = {"format": FORMAT}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    tensors = _cpu_tensors(tensors)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        fsync_path(tmp)
        _die_while_writing(path)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except (OSError, SafetensorError) as err:
        raise write_error(path, err) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_WRITES: dict = {}


def _die_while_writing(path: Path):
    """Test hook: M2MKD_DIE_WRITING=<file name>:<n> kills this process (SIGKILL) during its n-th
    write of that file, after the temp file is written and before it replaces the file."""
    target = os.environ.get("M2MKD_DIE_WRITING")
    if target and target.rsplit(":", 1)[0] == path.name:
        _WRITES[path.name] = _WRITES.get(path.name, 0) + 1
        if _WRITES[path.name] == int(target.rsplit(":", 1)[1]):
            os.kill(os.getpid(), signal.SIGKILL)


def load_file_checked(path, device="cpu") -> tuple[dict, dict]:
    """Read a safetensors file → (tensors, metadata with JSON values decoded).

    Raises CheckpointError for a missing, truncated or non-safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {err}") from err
    meta = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def _sub(tensors: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------- weights


def save_weights(module_or_state, path, metadata: dict | None = None) -> Path:
    """Save a module's state_dict (or a dict of tensors) as plain safetensors (no prefix)."""
    sd = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    return atomic_save(dict(sd), path, {"kind": "weights", **(metadata or {})})


def load_weights(path, device="cpu") -> tuple[dict, dict]:
    """Read a weights file written by save_weights (or the ``model.`` part of a training
    checkpoint) → (state_dict, metadata)."""
    tensors, meta = load_file_checked(path, device)
    if meta.get("kind") == "train":
        tensors = _sub(tensors, "model.")
    return tensors, meta


def load_state_checked(module: torch.nn.Module, state: dict, what: str, strict: bool = True):
    """``module.load_state_dict`` with an error that lists missing / unexpected / mis-shaped keys,
    or names the tensors holding NaN / Inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{what} holds NaN or Inf values in {len(bad)} tensor(s): "
                              + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    own = module.state_dict()
    shape_bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shape_bad or (strict and (missing or unexpected)):
        lines = [f"{what} does not match the model:"]
        if shape_bad:
            lines.append("  shape mismatches: " + "; ".join(shape_bad[:8]) + (" ..." if len(shape_bad) > 8 else ""))
        if strict and missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if strict and unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        lines.append("  (was it written with a different model config or preset?)")
        raise CheckpointError("\n".join(lines))
    return module.load_state_dict(state, strict=strict)


# ------------------------------------------------------------------------ optimizer state


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict):
    state: dict = {}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = meta["param_groups"]
    own = opt.state_dict()["param_groups"]
    if len(groups) != len(own) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, own)):
        raise CheckpointError(
            "optimizer state does not match: checkpoint has param groups of sizes "
            f"{[len(g['params']) for g in groups]}, this run {[len(g['params']) for g in own]}"
        )
    opt.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------ RNG state


def rng_state() -> tuple[dict, dict]:
    """Every generator the training loop draws from: torch (CPU, each CUDA device), numpy's
    global RandomState (timm's mixup), Python's random (timm's random erasing)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{d}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, pystate, pygauss = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [version, list(pystate), pygauss]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict):
    torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, pystate, pygauss = meta["python"]
    random.setstate((version, tuple(pystate), pygauss))


# ---------------------------------------------------------------------- training checkpoint


def save_training_checkpoint(path, *, model: torch.nn.Module, optimizer, scheduler_state: dict,
                             progress: dict, config: dict, phase: str, rng_by_rank: list,
                             extra: dict | None = None) -> Path:
    """Write a resumable training checkpoint. ``rng_by_rank`` is a list of (tensors, meta) from
    :func:`rng_state`, one per process (index = rank)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    ot, om = optimizer_to_flat(optimizer)
    tensors.update({f"optim.{k}": v for k, v in ot.items()})
    rng_meta = []
    for r, (rt, rm) in enumerate(rng_by_rank):
        tensors.update({f"rng.{r}.{k}": v for k, v in rt.items()})
        rng_meta.append(rm)
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    meta = {
        "kind": "train", "phase": phase, "config": config, "progress": progress,
        "optimizer": om, "scheduler": scheduler_state, "rng": rng_meta,
    }
    return atomic_save(tensors, path, meta)


# keys that may change between a run and its resumption (where output goes, how it is logged)
RESUMABLE_CHANGES = ("run.", "log.", "resume", "device", "train.ckpt_every")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict, ignore=RESUMABLE_CHANGES) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if any(k == p.rstrip(".") or k.startswith(p) for p in ignore):
            continue
        if json.dumps(a.get(k, "<absent>"), sort_keys=True) != json.dumps(b.get(k, "<absent>"), sort_keys=True):
            diffs.append(f"{k}: checkpoint {a.get(k, '<absent>')!r} vs now {b.get(k, '<absent>')!r}")
    return diffs


def load_training_checkpoint(path, *, model: torch.nn.Module, optimizer, config: dict, phase: str,
                             rank: int = 0, world_size: int = 1) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns a dict with
    ``progress``, ``scheduler`` and ``extra`` (tensors). Raises CheckpointError when the file is
    missing/corrupt, was written by another phase, or by a run with a different config."""
    tensors, meta = load_file_checked(path, "cpu")
    if meta.get("format") != FORMAT or meta.get("kind") != "train":
        raise CheckpointError(f"{path} is not an m2mkd_fast training checkpoint (format {meta.get('format')!r}, kind {meta.get('kind')!r})")
    if meta.get("phase") != phase:
        raise CheckpointError(f"{path} was written by phase {meta.get('phase')!r}, not {phase!r}")
    diffs = config_differences(meta.get("config", {}), config)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the config differs from the one it was written with:\n  "
            + "\n  ".join(diffs[:20])
        )
    load_state_checked(model, _sub(tensors, "model."), f"checkpoint {path}")
    optimizer_from_flat(optimizer, _sub(tensors, "optim."), meta["optimizer"])
    rng_meta = meta.get("rng", [])
    saved_world = len(rng_meta)
    if saved_world == world_size:
        set_rng_state(_sub(tensors, f"rng.{rank}."), rng_meta[rank])
    else:
        import warnings

        warnings.warn(
            f"{path} was written by {saved_world} process(es), this run has {world_size}: weights, "
            "optimizer and data order resume exactly, random augmentations will differ", stacklevel=2
        )
    return {"progress": meta["progress"], "scheduler": meta.get("scheduler", {}), "extra": _sub(tensors, "extra.")}
