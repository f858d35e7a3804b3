"""safetensors checkpoints: atomic writes, round trips of model/optimizer/RNG state, clear errors; run-directory
files: failed writes, leftovers of killed writes, artifact records, the run-directory lock."""

import errno
import os
import random

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from m2mkd_fast.distill import checkpoint
from m2mkd_fast.distill.files import (ArtifactError, RunDirBusy, atomic_write_text, file_record, lock_run_dir,
                                      remove_leftovers, verify_file)
from m2mkd_fast.distill.checkpoint import (CheckpointError, atomic_save, config_differences, load_file_checked,
                                           load_state_checked, load_training_checkpoint, load_weights, rng_state,
                                           save_training_checkpoint, save_weights, set_rng_state)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def test_weights_round_trip_and_no_pickle(tmp_path):
    m = _model()
    p = save_weights(m, tmp_path / "w.safetensors", {"note": {"a": 1}})
    raw = p.read_bytes()
    assert b"\x80\x04" not in raw[:64]  # not a pickle protocol header
    sd, meta = load_weights(p)
    assert meta["note"] == {"a": 1} and meta["kind"] == "weights"
    m2 = _model()
    load_state_checked(m2, sd, "w")
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp file left behind


def test_shared_storage_tensors_are_saved(tmp_path):
    w = torch.randn(3, 3)
    atomic_save({"a": w, "b": w, "c": w[0]}, tmp_path / "s.safetensors")
    t, _ = load_file_checked(tmp_path / "s.safetensors")
    assert torch.equal(t["a"], w) and torch.equal(t["b"], w) and torch.equal(t["c"], w[0])


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_weights(tmp_path / "nothing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(bad)
    good = save_weights(_model(), tmp_path / "good.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(trunc)


def test_mismatched_state_lists_keys():
    m = _model()
    sd = dict(m.state_dict())
    sd["0.weight"] = torch.zeros(5, 4)
    sd.pop("2.bias")
    sd["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_state_checked(_model(), sd, "ckpt")
    msg = str(e.value)
    assert "0.weight" in msg and "2.bias" in msg and "extra" in msg and "shape" in msg


def test_rng_state_round_trip():
    t, m = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(t, m)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _opt_step(m, opt):
    loss = m(torch.randn(5, 4)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_training_checkpoint_round_trip_and_config_check(tmp_path):
    torch.manual_seed(0)
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _opt_step(m, opt)
    cfg = {"train": {"lr": 0.01, "epochs": 2}, "run": {"name": "a"}}
    p = save_training_checkpoint(tmp_path / "last.safetensors", model=m, optimizer=opt, scheduler_state={"step_count": 1},
                                 progress={"epoch": 0, "step_in_epoch": 1}, config=cfg, phase="finetune",
                                 rng_by_rank=[rng_state()])
    torch.manual_seed(0)
    ref_next = torch.rand(2)
    m2 = _model()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    torch.manual_seed(123)
    st = load_training_checkpoint(p, model=m2, optimizer=opt2, config={**cfg, "run": {"name": "b"}}, phase="finetune")
    assert st["progress"] == {"epoch": 0, "step_in_epoch": 1} and st["scheduler"] == {"step_count": 1}
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    # the restored optimizer continues exactly like the original
    torch.manual_seed(5)
    _opt_step(m, opt)
    torch.manual_seed(5)
    _opt_step(m2, opt2)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert ref_next.shape == (2,)
    with pytest.raises(CheckpointError, match="train.lr"):
        load_training_checkpoint(p, model=_model(), optimizer=torch.optim.AdamW(_model().parameters()),
                                 config={"train": {"lr": 0.02, "epochs": 2}}, phase="finetune")
    with pytest.raises(CheckpointError, match="phase"):
        load_training_checkpoint(p, model=m2, optimizer=opt2, config=cfg, phase="scratch")
    with pytest.raises(CheckpointError, match="not an m2mkd_fast training checkpoint"):
        load_training_checkpoint(save_weights(m, tmp_path / "w.safetensors"), model=m2, optimizer=opt2,
                                 config=cfg, phase="finetune")



def test_fp16_loss_scale_survives_a_checkpoint(tmp_path):
    """The GradScaler's scale and growth tracker travel in the checkpoint's extra tensors, so a
    resumed fp16 run skips and scales exactly the steps the uninterrupted run does."""
    from m2mkd_fast.distill.trainer import _load_scaler, _scaler_state

    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.scale(torch.ones(()))  # the scale exists once used
    scaler.update(new_scale=1024.0)
    m = _model()
    opt = torch.optim.AdamW(m.parameters())
    p = save_training_checkpoint(tmp_path / "last.safetensors", model=m, optimizer=opt, scheduler_state={},
                                 progress={"epoch": 0, "step_in_epoch": 1}, config={}, phase="meta",
                                 rng_by_rank=[rng_state()], extra=_scaler_state(scaler))
    st = load_training_checkpoint(p, model=m, optimizer=opt, config={}, phase="meta")
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    _load_scaler(fresh, st["extra"]["grad_scaler"])
    assert fresh.get_scale() == 1024.0 and fresh.state_dict() == scaler.state_dict()
    assert _scaler_state(torch.amp.GradScaler("cpu", enabled=False)) == {}

def test_config_differences():
    d = config_differences({"a": {"b": 1, "c": 2}, "run": 1}, {"a": {"b": 1, "c": 3}, "run": 2, "new": 0})
    assert len(d) == 2 and d[0].startswith("a.c") and d[1].startswith("new")


def test_non_finite_weights_are_refused():
    sd = dict(_model().state_dict())
    sd["2.bias"] = sd["2.bias"].clone()
    sd["2.bias"][1] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN or Inf .*2\.bias"):
        load_state_checked(_model(), sd, "ckpt")


@pytest.mark.parametrize("err, says", [
    (SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), "no space left"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
])
def test_failed_writes_name_the_file_and_leave_the_old_one(tmp_path, monkeypatch, err, says):
    path = save_weights(_model(), tmp_path / "w.safetensors")
    before = path.read_bytes()

    def fail(*a, **k):
        raise err

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError, match=says) as e:
        save_weights(_model(), path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]


def test_atomic_text_writes_and_leftovers(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.json", "{}")
    assert (tmp_path / "a" / "x.json").read_text() == "{}" and os.listdir(tmp_path / "a") == ["x.json"]
    with pytest.raises(OSError, match="cannot write .*x.json"):
        atomic_write_text(tmp_path / "a" / "x.json" / "x.json", "{}")  # its folder is a file
    for name in (".model.safetensors.tmp123", ".done.json.tmp9", "keep.tmp1", ".keep.tmp"):
        (tmp_path / "a" / name).write_text("")
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "a" / "b" / ".last.safetensors.tmp77").write_text("")
    assert len(remove_leftovers(tmp_path / "a")) == 2
    assert [p.name for p in remove_leftovers(tmp_path, recursive=True)] == [".last.safetensors.tmp77"]
    assert sorted(os.listdir(tmp_path / "a")) == [".keep.tmp", "b", "keep.tmp1", "x.json"]


def test_artifact_records_catch_changed_files(tmp_path):
    path = save_weights(_model(), tmp_path / "w.safetensors")
    rec = file_record(path)
    verify_file(path, rec, "redo")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="w.safetensors does not match the sha256.*redo it: REDO"):
        verify_file(path, rec, "REDO")
    path.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ArtifactError, match=f"has {len(raw) - 10} bytes, its done record says {len(raw)}"):
        verify_file(path, rec, "REDO")
    with pytest.raises(ArtifactError, match="no size/sha256 record"):
        verify_file(path, None, "REDO")


def test_run_dir_lock(tmp_path):
    held = lock_run_dir(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=f"{tmp_path / 'run'} is in use by process {os.getpid()}"):
        lock_run_dir(tmp_path / "run", shared=True)
    held.close()
    a, b = lock_run_dir(tmp_path / "run", shared=True), lock_run_dir(tmp_path / "run", shared=True)
    with pytest.raises(RunDirBusy):
        lock_run_dir(tmp_path / "run")
    a.close()
    b.close()
    lock_run_dir(tmp_path / "run").close()
