"""safetensors checkpoints: atomic writes, round trips of model/optimizer/RNG state, clear errors."""

import os
import random

import numpy as np
import pytest
import torch

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


def test_config_differences():
    d = config_differences({"a": {"b": 1, "c": 2}, "run": 1}, {"a": {"b": 1, "c": 3}, "run": 2, "new": 0})
    assert len(d) == 2 and d[0].startswith("a.c") and d[1].startswith("new")
