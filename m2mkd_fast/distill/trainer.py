"""The training loop every phase shares: AdamW, warm-up + cosine schedule per step, mixup /
cutmix / label smoothing (timm), the m2mKD loss, the MoE aux loss, DDP, tqdm progress,
JSON-lines metrics, PNG curves, and exactly-resumable safetensors checkpoints.

What is trained is a *task*: an ``nn.Module`` whose ``forward(images)`` returns
``(student_logits, teacher_logits_or_None, aux_loss_or_None)`` and whose trainable parameters
are the ones with ``requires_grad``. End-to-end training and module pairs are both tasks
(see tasks.py).

Exact resumption: the data order of epoch e is a permutation drawn from a generator seeded by
(seed, e) alone; a checkpoint saves model, optimizer, schedule position and every RNG the step
draws from (torch, numpy for mixup, Python for random erasing), per rank. A run killed after
step s of epoch e restarts at step s+1 of epoch e with the same state: its final weights equal
those of an uninterrupted run, bit for bit (same device, same thread count).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.transforms import Normalize, TrainTransform
from .checkpoint import CheckpointError, load_training_checkpoint, rng_state, save_training_checkpoint, save_weights
from .dist import DistContext
from .files import atomic_write_text, write_error
from .loss import DistillationLoss, one_hot_targets


@dataclass
class TrainResult:
    run_dir: Path
    final_test_acc: float | None
    epochs_done: int
    steps: int
    seconds: float
    images_per_s: float  # training throughput (optimizer steps only, no evaluation)
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads) for the whole run


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward_loss(model: nn.Module, criterion: DistillationLoss, x: torch.Tensor, target: torch.Tensor,
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, student logits) of one batch: the task's forward under autocast in ``precision``'s
    dtype ("fp32": none), the loss and the aux loss in float32 (docs/design.md §2.7)."""
    dtype = AUTOCAST_DTYPES[precision]
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        s_logits, t_logits, aux = model(x)
    loss = criterion(s_logits.float(), target, None if t_logits is None else t_logits.float())
    if aux is not None:
        loss = loss + aux.float()
    return loss, s_logits


class CosineSchedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at
    ``total_steps``; a per-step function, so its whole state is the step count."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup, self.total = int(warmup_steps), max(int(total_steps), 1)
        self.step_count = 0

    def value(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(self.total - self.warmup, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))

    def apply(self, opt: torch.optim.Optimizer) -> float:
        lr = self.value(self.step_count)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "min_lr": self.min_lr,
                "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, sd: dict):
        if (sd.get("warmup"), sd.get("total")) != (self.warmup, self.total):
            raise CheckpointError(f"schedule mismatch: checkpoint warm-up/total steps {sd.get('warmup')}/{sd.get('total')}, "
                                  f"this run {self.warmup}/{self.total} (batch size, epochs or data size changed?)")
        self.step_count = int(sd["step_count"])


def param_groups(module: nn.Module, weight_decay: float):
    """AdamW groups: weight decay on matrices, none on biases, norms, tokens and scalars."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name or "token" in name.split(".")[-1]:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def epoch_indices(n: int, epoch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def _batch_from(dataset, index: torch.Tensor):
    if hasattr(dataset, "batch"):
        return dataset.batch(index)
    items = [dataset[int(i)] for i in index]
    return torch.stack([a for a, _ in items]), torch.stack([torch.as_tensor(b) for _, b in items])


def _epoch_loader(dataset, batches: list, num_workers: int, device):
    """The batches of one epoch, in the given order: gathered directly for in-memory data, else
    read by a DataLoader with ``num_workers`` worker processes (the order stays fixed, so a resumed
    run sees the same batches; augmentation happens afterwards, in the training process)."""
    if hasattr(dataset, "batch") or num_workers <= 0:
        return (_batch_from(dataset, idx) for idx in batches)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=[b.tolist() for b in batches],
                                            num_workers=num_workers, pin_memory=device.type == "cuda",
                                            persistent_workers=False))


def iterate_batches(dataset, batch_size: int, device, num_workers: int = 0):
    """Test-time batches in order (all samples, last batch partial)."""
    n = len(dataset)
    if hasattr(dataset, "batch") or num_workers == 0:
        for s in range(0, n, batch_size):
            x, y = _batch_from(dataset, torch.arange(s, min(n, s + batch_size)))
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for x, y in loader:
        yield x.to(device), y.to(device)


@torch.no_grad()
def evaluate_accuracy(fn, dataset, norm: Normalize, batch_size: int, device, ctx: DistContext | None = None) -> float:
    """Top-1 accuracy of ``fn(images) -> logits`` over a dataset (sharded over ranks under DDP)."""
    ctx = ctx or DistContext()
    correct = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    n = len(dataset)
    shard = torch.arange(ctx.rank, n, ctx.world_size)
    for s in range(0, shard.numel(), batch_size):
        idx = shard[s : s + batch_size]
        x, y = _batch_from(dataset, idx)
        x, y = norm(x.to(device)), y.to(device)
        logits = fn(x)
        correct += (logits.argmax(-1) == y).sum().double().cpu()
        total += y.numel()
    stats = ctx.all_reduce_sum(torch.stack([correct, total]))
    return float(stats[0] / stats[1].clamp_min(1))


class MetricsLog:
    """Append-only JSON-lines log (one object per line), written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record):
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_error(self.path, err) from err

    def cut_back(self, epoch: int, global_step: int):
        """Drop what a killed run logged after its checkpoint (at ``epoch``, ``global_step``): the
        resumed run logs those steps again."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for r in read_metrics(self.path):
            if r.get("global_step", -1) > global_step or (r.get("kind") == "epoch" and r["epoch"] >= epoch):
                break
            kept.append(json.dumps(r) + "\n")
        atomic_write_text(self.path, "".join(kept))


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: skip it
                continue
    return out


def plot_curves(metrics_path, png_path, title: str):
    """Training loss per logged step and test accuracy per epoch → one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    steps = [r for r in recs if r.get("kind") == "train"]
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    if steps:
        ax[0].plot([r["epoch_float"] for r in steps], [r["loss"] for r in steps], lw=1)
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("train loss")
    ax[0].grid(alpha=0.3)
    if epochs:
        ax[1].plot([r["epoch"] + 1 for r in epochs], [100 * r["test_acc"] for r in epochs], marker="o")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("test accuracy (%)")
    ax[1].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


class ExpertShards:
    """Expert parallelism in the trainer (docs/design.md §4): every MoEMLP of the task keeps its
    rank's share of the experts, over a process group of its own (DDP keeps WORLD).

    Expert gradients arrive summed over the ranks' tokens; :meth:`average_grads` divides them by
    W, so that one step equals a single process's step on the global batch, as DDP's averaged
    replicated gradients do. Checkpoints see full state dicts (gathered on save, sliced on load).
    """

    def __init__(self, task: nn.Module):
        from ..parallel import expert_parallel, expert_parameters

        self.group = dist.new_group()
        self.world_size = dist.get_world_size(self.group)
        expert_parallel(task, self.group)
        self.task, self.experts = task, expert_parameters(task)

    @staticmethod
    def applies(task: nn.Module, ctx: DistContext) -> bool:
        from ..layers.moe import MoEMLP

        return ctx.distributed and any(isinstance(m, MoEMLP) for m in task.modules())

    def ignore_in_ddp(self):
        names = [name for name, _, _ in self.experts]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.task, names)

    def average_grads(self):
        for _, p, _ in self.experts:
            if p.grad is not None:
                p.grad.div_(self.world_size)

    def clip_grad_norm(self, params: list, max_norm: float):
        """clip_grad_norm_ over the whole model: replicated gradients once, expert shards summed over ranks."""
        ids = {id(p) for _, p, _ in self.experts}
        with_grad = [p for p in params if p.grad is not None]
        zero = torch.zeros((), dtype=torch.float64, device=params[0].device)

        def squares(expert: bool) -> torch.Tensor:
            return sum((p.grad.double().square().sum() for p in with_grad if (id(p) in ids) == expert), zero)

        expert_sq = squares(True)
        dist.all_reduce(expert_sq, group=self.group)
        total = (squares(False) + expert_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in with_grad:
            p.grad.mul_(coef.to(p.grad.dtype))

    def model_view(self):
        from ..parallel import full_state_dict

        return _StateView(lambda: full_state_dict(self.task), self.task.load_state_dict)

    def optimizer_view(self, opt: torch.optim.Optimizer):
        from ..parallel import gather_experts, local_experts

        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        owners = {index[id(p)]: (p, layer) for _, p, layer in self.experts if id(p) in index}

        def convert(sd, fn):
            state = dict(sd["state"])
            for pid, (p, layer) in owners.items():
                if pid in state:
                    state[pid] = {k: fn(v, layer) if torch.is_tensor(v) and v.dim() else v for k, v in state[pid].items()}
            return {**sd, "state": state}

        return _StateView(lambda: convert(opt.state_dict(), gather_experts),
                          lambda sd: opt.load_state_dict(convert(sd, local_experts)))

    def snapshot(self, opt: torch.optim.Optimizer):
        """Full model and optimizer state dicts (a collective), as a checkpoint reads them."""
        model_sd, opt_sd = self.model_view().state_dict(), self.optimizer_view(opt).state_dict()
        return _StateView(lambda: model_sd, None), _StateView(lambda: opt_sd, None)


class _StateView:
    """What a checkpoint sees of a module or optimizer: ``state_dict()`` and ``load_state_dict()``."""

    def __init__(self, get, put):
        self.state_dict, self.load_state_dict = get, put


def _die_after(step: int):
    """Test hook: M2MKD_DIE_AFTER_STEP=n kills this process (SIGKILL, no cleanup) right after
    the n-th optimizer step's checkpoint, to prove resumption."""
    target = os.environ.get("M2MKD_DIE_AFTER_STEP")
    if target is not None and step == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def _scaler_state(scaler: torch.amp.GradScaler) -> dict:
    """The fp16 loss scaler's state as checkpoint tensors ({} when it is off)."""
    if not scaler.is_enabled():
        return {}
    sd = scaler.state_dict()
    return {"grad_scaler": torch.tensor([sd["scale"], sd["_growth_tracker"]], dtype=torch.float64)}


def _load_scaler(scaler: torch.amp.GradScaler, state) -> None:
    """Restore what :func:`_scaler_state` saved (nothing when the scaler is off or was not saved)."""
    if scaler.is_enabled() and state is not None:
        sd = scaler.state_dict()
        sd.update(scale=float(state[0]), _growth_tracker=int(state[1]))
        scaler.load_state_dict(sd)


def train(task: nn.Module, *, data, tcfg: dict, aug: dict, dcfg: dict | None, run_dir, phase: str,
          config: dict, seed: int, ctx: DistContext, resume: bool = False, eval_fn=None,
          save_module: nn.Module | None = None, progress: bool = True, log_every: int = 20,
          title: str = "", eval_limit: int = 0, num_workers: int = 0,
          expert_parallel: bool = False, precision: str = "fp32") -> TrainResult:
    """Train ``task`` on ``data.train``; return when ``tcfg['epochs']`` are done.

    Args:
        task: module whose forward gives (student logits, teacher logits | None, aux | None).
        data: a :class:`~m2mkd_fast.data.DataBundle`.
        tcfg: the phase's ``train`` section (epochs, batch_size (global), lr, min_lr,
            weight_decay, warmup_epochs, grad_clip, train_limit, ckpt_every).
        aug: the ``augment`` section (padding, flip, erase_prob, mixup, cutmix, mixup_prob,
            switch_prob, label_smoothing).
        dcfg: the ``distill`` section (type, alpha, tau) when teacher logits are used, else None.
        run_dir: where last.safetensors, model.safetensors, metrics.jsonl and curves.png go.
        phase, config: stored in checkpoints; a resume with another config is refused.
        seed: data order and mixup draws.
        ctx: process group (DDP when ctx.world_size > 1).
        resume: continue from run_dir/last.safetensors (an error if it is missing).
        eval_fn: ``fn(images) -> logits`` for the per-epoch test accuracy (default: the task's
            student logits).
        save_module: what model.safetensors holds at the end (default: the task).
        eval_limit: the per-epoch test accuracy uses the first ``eval_limit`` test images (0 = all).
        num_workers: DataLoader worker processes for datasets read from disk (ImageFolder).
        expert_parallel: under torchrun, shard the experts of the task's MoEMLPs over the
            processes (:class:`ExpertShards`); every process then evaluates the whole test set.
        precision: "fp32" | "bf16" | "fp16": the autocast dtype of the training forward passes
            (see :func:`forward_loss`); fp16 scales the loss with torch.amp.GradScaler, whose
            scale is checkpointed with the rest.
    """
    run_dir = Path(run_dir)
    device = ctx.device
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    last_ckpt, final = run_dir / "last.safetensors", run_dir / "model.safetensors"
    metrics = MetricsLog(run_dir / "metrics.jsonl", ctx.is_main)

    train_set = data.train
    n = len(train_set)
    limit = int(tcfg.get("train_limit", 0) or 0)
    if limit and limit < n:
        n = limit  # the first `limit` of each epoch's permutation of the whole set
    gbs = int(tcfg["batch_size"])
    if gbs % ctx.world_size:
        raise ValueError(f"batch_size {gbs} is not divisible by the {ctx.world_size} processes")
    bs = gbs // ctx.world_size
    steps_per_epoch = n // gbs
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {gbs} exceeds the {n} training images: no full batch per epoch")
    epochs = int(tcfg["epochs"])
    total = steps_per_epoch * epochs
    warmup = int(round(float(tcfg["warmup_epochs"]) * steps_per_epoch))

    task.to(device)
    shards = ExpertShards(task) if expert_parallel and ExpertShards.applies(task, ctx) else None
    trainable = [p for p in task.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"phase {phase}: nothing to train (no parameter requires grad)")
    opt = torch.optim.AdamW(param_groups(task, float(tcfg["weight_decay"])), lr=float(tcfg["lr"]),
                            betas=(0.9, 0.999), foreach=device.type == "cuda")
    sched = CosineSchedule(float(tcfg["lr"]), float(tcfg["min_lr"]), warmup, total)
    model = task
    if shards is not None:
        shards.ignore_in_ddp()
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(tcfg.get("find_unused_parameters", False)))

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_epoch, start_step = 0, 0
    if resume:
        if not last_ckpt.exists():
            if final.exists():
                raise CheckpointError(f"{run_dir} already holds a finished run (model.safetensors); nothing to resume")
            raise CheckpointError(f"--resume: no checkpoint at {last_ckpt}")
        st = load_training_checkpoint(last_ckpt, model=task if shards is None else shards.model_view(),
                                      optimizer=opt if shards is None else shards.optimizer_view(opt),
                                      config=config, phase=phase, rank=ctx.rank, world_size=ctx.world_size)
        sched.load_state_dict(st["scheduler"])
        _load_scaler(scaler, st["extra"].get("grad_scaler"))
        metrics.cut_back(int(st["progress"]["epoch"]), sched.step_count)
        start_epoch, start_step = int(st["progress"]["epoch"]), int(st["progress"]["step_in_epoch"])
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        metrics.write(kind="resume", epoch=start_epoch, step_in_epoch=start_step, global_step=sched.step_count)
    elif ctx.is_main and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    tf = TrainTransform(data.mean, data.std, int(aug["padding"]), bool(aug["flip"]), float(aug["erase_prob"]))
    norm = Normalize(data.mean, data.std)
    mixup_fn = None
    if aug["mixup"] > 0 or aug["cutmix"] > 0:
        if bs % 2:
            raise ValueError(f"mixup/cutmix need an even per-process batch, got {bs}")
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=float(aug["mixup"]), cutmix_alpha=float(aug["cutmix"]),
                         prob=float(aug["mixup_prob"]), switch_prob=float(aug["switch_prob"]),
                         label_smoothing=float(aug["label_smoothing"]), num_classes=data.num_classes)
    criterion = DistillationLoss(dcfg["type"], dcfg["alpha"], dcfg["tau"]) if dcfg else DistillationLoss("none")
    grad_clip = float(tcfg["grad_clip"])
    ckpt_every = int(tcfg.get("ckpt_every", 0) or 0)

    def student_logits(x):
        out = model.module(x) if isinstance(model, nn.parallel.DistributedDataParallel) else model(x)
        return out[0]

    eval_fn = eval_fn or student_logits
    eval_set = data.test
    if eval_limit and eval_limit < len(eval_set):
        eval_set = torch.utils.data.Subset(eval_set, range(int(eval_limit)))
        if hasattr(data.test, "batch"):
            full_test = data.test
            eval_set.batch = lambda index: full_test.batch(index)  # the first eval_limit, in order

    eval_ctx = ctx if shards is None else DistContext(device=device)  # every rank runs the same batches

    def checkpoint(epoch, step_in_epoch):
        states = ctx.all_gather_object(rng_state())
        model_state, opt_state = (task, opt) if shards is None else shards.snapshot(opt)
        if ctx.is_main:
            save_training_checkpoint(
                last_ckpt, model=model_state, optimizer=opt_state, scheduler_state=sched.state_dict(),
                progress={"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": sched.step_count,
                          "steps_per_epoch": steps_per_epoch, "epochs": epochs},
                config=config, phase=phase, rng_by_rank=states, extra=_scaler_state(scaler))
        ctx.barrier()

    t_start, images_seen, test_acc, train_seconds = time.time(), 0, None, 0.0
    cpu_start = time.process_time()
    for epoch in range(start_epoch, epochs):
        task.train()
        perm = epoch_indices(len(train_set), epoch, seed)[:n]
        first = start_step if epoch == start_epoch else 0
        bar = None
        if progress and ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"{title or phase} {epoch + 1}/{epochs}",
                       leave=False, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        run_loss, run_correct, run_n, t_epoch = 0.0, 0, 0, time.time()
        batches = [perm[st * gbs + ctx.rank * bs : st * gbs + (ctx.rank + 1) * bs] for st in range(first, steps_per_epoch)]
        loader = _epoch_loader(train_set, batches, num_workers, device)
        for step, (x, y) in zip(range(first, steps_per_epoch), loader):
            x, y = tf(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, target = mixup_fn(x, y)
            else:
                target = one_hot_targets(y, data.num_classes, float(aug["label_smoothing"]))
            lr = sched.apply(opt)
            loss, s_logits = forward_loss(model, criterion, x, target, precision)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{phase}: loss became {loss.item()} at epoch {epoch}, step {step} (lower the lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if shards is not None:
                shards.average_grads()
            if grad_clip > 0:
                scaler.unscale_(opt)
            if grad_clip > 0 and shards is not None:
                shards.clip_grad_norm(trainable, grad_clip)
            elif grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step_count += 1
            images_seen += gbs
            run_loss += loss.item() * y.numel()
            run_correct += int((s_logits.argmax(-1) == target.argmax(-1)).sum())
            run_n += y.numel()
            done = step + 1
            if done % log_every == 0 or done == steps_per_epoch:
                stats = ctx.all_reduce_sum(torch.tensor([run_loss, run_correct, run_n], dtype=torch.float64))
                ips = (done - first) * gbs / max(time.time() - t_epoch, 1e-9)
                rec = dict(kind="train", epoch=epoch, step=done, global_step=sched.step_count,
                           epoch_float=epoch + done / steps_per_epoch, loss=float(stats[0] / stats[2]),
                           train_acc=float(stats[1] / stats[2]), lr=lr, img_per_s=ips)
                metrics.write(**rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{100 * rec['train_acc']:.1f}", img_s=f"{ips:.0f}")
                run_loss, run_correct, run_n = 0.0, 0, 0
            if ckpt_every and done % ckpt_every == 0 and done < steps_per_epoch:
                checkpoint(epoch, done)
                _die_after(sched.step_count)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        train_seconds += time.time() - t_epoch
        task.eval()
        test_acc = evaluate_accuracy(eval_fn, eval_set, norm, max(bs, 256), device, eval_ctx)
        epoch_s = time.time() - t_epoch
        metrics.write(kind="epoch", epoch=epoch, test_acc=test_acc, seconds=epoch_s,
                      img_per_s=(steps_per_epoch - first) * gbs / max(epoch_s, 1e-9))
        if ctx.is_main and progress:
            print(f"[{title or phase}] epoch {epoch + 1}/{epochs}: test acc {100 * test_acc:.2f}%  "
                  f"({epoch_s:.1f} s)", file=sys.stderr, flush=True)
        checkpoint(epoch + 1, 0)
        _die_after(sched.step_count)
    task.eval()
    if test_acc is None and epochs > 0:  # resumed from the last epoch's checkpoint: evaluate it again
        test_acc = evaluate_accuracy(eval_fn, eval_set, norm, max(bs, 256), device, eval_ctx)
    seconds = time.time() - t_start
    final_state = save_module if save_module is not None else task
    if shards is not None:
        from ..parallel import full_state_dict

        final_state = full_state_dict(final_state)
    if ctx.is_main:
        save_weights(final_state, final,
                     {"phase": phase, "config": config, "test_acc": test_acc, "epochs": epochs})
        try:
            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title or phase)
        except Exception as err:  # noqa: BLE001 - a plot must never fail a finished run
            print(f"[{phase}] could not plot curves: {err}", file=sys.stderr)
    ctx.barrier()
    return TrainResult(run_dir, test_acc, epochs, sched.step_count, seconds,
                       images_seen / max(train_seconds, 1e-9), time.process_time() - cpu_start)
