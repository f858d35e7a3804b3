"""Expert parallelism: on 2 and 4 gloo processes, each rank's outputs and gradients equal the
unsharded layer's on the same tokens; expert weight gradients sum every rank's tokens."""

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import m2mkd_fast as mk
from m2mkd_fast.layers.moe import MoEMLP
from m2mkd_fast.models.vmoe import VMoEMLP
from m2mkd_fast.parallel import expert_parallel, expert_parameter_names, full_state_dict

CONFIGS = [
    dict(gate="naive"),
    dict(gate="vmoe"),
    dict(gate="vmoe", capacity_factor=0.25, group_size=12),
    dict(gate="vmoe", capacity_factor=0.5, batch_priority=True, k=1),
]
DIM, HIDDEN, EXPERTS, TOKENS = 8, 12, 4, 24
CLOSE = dict(rtol=1e-5, atol=1e-6)
REPO = Path(__file__).resolve().parents[1]


def _run(fn, world, tmp_path, *args):
    mp.spawn(fn, args=(world, f"file://{tmp_path / 'store'}") + args, nprocs=world, join=True)


def _init(rank, world, init_method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def _step(layer, x, grad_y, seed):
    """Forward in training mode with a seeded router noise; backward of <y, grad_y> + aux loss."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    ((y * grad_y).sum() + layer.aux_loss).backward()
    return y.detach(), x.grad, layer.aux_loss.detach(), {k: v.clone() for k, v in layer.stats.items()}


def _check_equivalence(rank, world, init_method, backend):
    _init(rank, world, init_method)
    for i, config in enumerate(CONFIGS):
        torch.manual_seed(100 + i)
        full = MoEMLP(DIM, HIDDEN, EXPERTS, backend=backend, **config)
        xs, grads = torch.randn(world, TOKENS, DIM), torch.randn(world, TOKENS, DIM)
        want = [_step(full, xs[s], grads[s], seed=s) for s in range(world)]  # grads accumulate over s
        summed = {name: getattr(full, name).grad.clone() for name in ("w1", "b1", "w2", "b2")}
        sharded = MoEMLP(DIM, HIDDEN, EXPERTS, backend=backend, **config)
        sharded.load_state_dict(full.state_dict())
        expert_parallel(sharded)
        got = _step(sharded, xs[rank], grads[rank], seed=rank)
        where = f"{config} backend={backend} rank={rank}/{world}"
        for name, a, b in zip(("y", "x.grad", "aux_loss"), got, want[rank]):
            torch.testing.assert_close(a, b, **CLOSE, msg=lambda m: f"{name} {where}: {m}")
        for key in ("load", "dropped"):
            assert torch.equal(got[3][key], want[rank][3][key]), f"stats[{key}] {where}"
        if config.get("capacity_factor") is not None:
            assert want[rank][3]["dropped"].sum() > 0, f"the capacity case must drop pairs ({where})"
        # router gradients: this rank's tokens only (the unsharded layer recomputed on them)
        full.zero_grad()
        _step(full, xs[rank], grads[rank], seed=rank)
        routers = [n for n in ("gate_weight", "gate_bias") if getattr(full, n) is not None]
        for name in routers:
            torch.testing.assert_close(getattr(sharded, name).grad, getattr(full, name).grad, **CLOSE, msg=lambda m: f"{name}.grad {where}: {m}")
        # expert gradients: every rank's tokens
        lo, n = sharded.expert_offset, sharded.num_local_experts
        for name, grad in summed.items():
            torch.testing.assert_close(getattr(sharded, name).grad, grad[lo:lo + n], **CLOSE, msg=lambda m: f"{name}.grad {where}: {m}")
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "world, backend",
    [(2, "torch"), (4, "torch"), (2, "cpp"), (4, "cpp"), (2, "triton"), pytest.param(4, "triton", marks=pytest.mark.slow)],
)
def test_sharded_layer_matches_unsharded(world, backend, tmp_path):
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend} not available")
    _run(_check_equivalence, world, tmp_path, backend)


class _Block(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.moe = MoEMLP(DIM, HIDDEN, experts, gate="naive")

    def forward(self, x):
        return self.moe(self.proj(x))


def _check_state_dict_and_errors(rank, world, init_method):
    _init(rank, world, init_method)
    torch.manual_seed(0)
    full = _Block(EXPERTS)
    sharded = _Block(EXPERTS)
    expert_parallel(sharded)
    n = EXPERTS // world
    assert sharded.moe.w1.shape == (n, DIM, HIDDEN) and sharded.moe.b2.shape == (n, DIM)
    assert expert_parameter_names(sharded) == ["moe.w1", "moe.b1", "moe.w2", "moe.b2"]
    sharded.load_state_dict(full.state_dict())  # full tensors: each rank keeps its slice
    assert torch.equal(sharded.moe.w1, full.moe.w1[rank * n:(rank + 1) * n])
    gathered = full_state_dict(sharded)
    assert gathered.keys() == full.state_dict().keys()
    for key, value in full.state_dict().items():
        assert torch.equal(gathered[key], value), key
    sharded.load_state_dict(sharded.state_dict())  # a shard loads too
    with pytest.raises(ValueError, match="already expert-parallel"):
        expert_parallel(sharded)
    vmoe_layer = expert_parallel(VMoEMLP(DIM, HIDDEN, EXPERTS, group_images=2))  # a subclass keeps its forward
    assert isinstance(vmoe_layer, VMoEMLP) and vmoe_layer.w1.shape[0] == n
    vmoe_layer(torch.randn(4, 3, DIM))
    assert vmoe_layer.group_size == 6 and vmoe_layer.last_aux_loss is vmoe_layer.aux_loss
    with pytest.raises(ValueError, match=f"num_experts=3 .* not divisible by the group size {world}"):
        expert_parallel(_Block(3))
    with pytest.raises(ValueError, match="contains no MoEMLP"):
        expert_parallel(nn.Linear(2, 2))
    dist.destroy_process_group()


def test_state_dict_round_trip_and_bad_groups(tmp_path):
    _run(_check_state_dict_and_errors, 2, tmp_path)


def test_one_process_changes_nothing(tmp_path):
    """W == 1: the layer stays a plain MoEMLP (no collective calls, unchanged speed)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = MoEMLP(DIM, HIDDEN, EXPERTS)
        assert expert_parallel(layer) is layer and type(layer) is MoEMLP and layer.w1.shape[0] == EXPERTS
        assert expert_parameter_names(layer) == []
    finally:
        dist.destroy_process_group()


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(MoEMLP(DIM, HIDDEN, EXPERTS))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        expert_parallel("model")


EP_SET = ["students.vmoe.finetune.train_limit=128", "students.vmoe.finetune.batch_size=32",
          "students.vmoe.finetune.grad_clip=1.0", "students.vmoe.finetune.ckpt_every=2", "data.test_limit=64", "augment.flip=false", "log.keep_last=true",
          # no randomness that differs between ranks: router noise and drop-path off
          "students.vmoe.kwargs={num_stages: 4, noise_std: 0, drop_path_rate: 0}"]


def _torchrun_ep(args, run_dir, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "m2mkd_fast"]
                          + args + ["--run-dir", str(run_dir), "--expert-parallel"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _assert_same_training(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("qkv.bias"):  # the key bias has a zero gradient: Adam steps on rounding noise
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        close = (x - y).abs() <= 1e-5 + 1e-4 * y.abs()
        # Adam turns an element's near-zero gradient into a ±lr step, so a rare element may differ
        assert close.float().mean() >= 0.995 and (x - y).abs().max() < 1e-3, key


@pytest.mark.slow
def test_training_two_processes_match_one(tmp_path):
    """scratch (the quick preset's V-MoE, 4 steps) under torchrun with --expert-parallel = one process; a
    checkpoint of the 2-process run resumes in one process (checkpoints do not depend on W)."""
    from m2mkd_fast.cli import main
    from m2mkd_fast.distill.checkpoint import load_file_checked, load_weights

    args = ["scratch", "--config", "quick", "--student", "vmoe", "--no-progress"] + [x for s in EP_SET for x in ("--set", s)]
    r = _torchrun_ep(args, tmp_path / "ep")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun_ep(args, tmp_path / "killed", M2MKD_DIE_AFTER_STEP="2")  # checkpoints after step 2, dies
    assert r.returncode != 0
    threads = torch.get_num_threads()
    try:
        assert main(args + ["--run-dir", str(tmp_path / "single"), "--threads", "1"]) == 0
        assert main(args + ["--run-dir", str(tmp_path / "killed"), "--threads", "1", "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    run = "seed0/vmoe/scratch"
    single, _ = load_weights(tmp_path / "single" / run / "model.safetensors")
    for name in ("ep", "killed"):
        weights, _ = load_weights(tmp_path / name / run / "model.safetensors")
        assert weights["blocks.1.mlp.w1"].shape[0] == 8  # full experts saved
        _assert_same_training(weights, single)
    ckpt, _ = load_file_checked(tmp_path / "ep" / run / "last.safetensors")  # independent of W: full tensors
    moments = [tuple(v.shape) for k, v in ckpt.items() if k.startswith("optim.") and k.endswith("exp_avg")]
    assert ckpt["model.model.blocks.1.mlp.w2"].shape[0] == 8
    w1 = [tuple(v.shape) for k, v in single.items() if k.endswith("mlp.w1")]  # every MoE layer's, all 8 experts
    half = (w1[0][0] // 2,) + w1[0][1:]
    assert w1 and moments.count(w1[0]) == len(w1) and half not in moments
