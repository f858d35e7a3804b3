"""Training steps, our layers vs the seed's formulation (docs/design.md §2.5).

* **pair step** (section "step"): one m2mKD pair — a frozen meta model (head and tail stages), a
  frozen teacher stage, and the student module with its stitch layers, trained by AdamW on the
  m2mKD loss (autocast bf16 on a GPU, fp32 on CPU). The NAC pair is module 0, the read-in: the
  mediator and read-out students attend densely without the kernel (nac_students), so their step
  runs the same ops in both formulations.
* **student step** (section "student step"): one end-to-end training step of the whole student
  (the fine-tune and scratch phases): cross-entropy (+ the MoE aux loss), AdamW; the NAC samples
  its graph kernel. Formulations: our layers on the default backend, the same layers on the
  "torch" backend, and the seed's formulation.

"Seed formulation" runs the same modules with the seed's ops swapped in (per-expert loop for the
MoE, materialised read-in, dense graph bias): ``seed_formulation()``.
"""

import contextlib
from unittest import mock

import torch

from .. import reference
from ..backend import select, use_backend
from ..distill.loss import DistillationLoss
from ..distill.students import pair_student
from ..distill.tasks import EndToEnd, PairTask
from .measure import measure

# (student kind, student model, teacher, meta model, module index, image size, channels, classes, batch)
CPU_PAIRS = [
    ("vmoe", "vmoe_micro", "staged_vit_micro", "meta_vit_micro", 1, 28, 1, 10, 64),
    ("nac", "nac_micro", "staged_vit_micro", "meta_vit_micro", 0, 28, 1, 10, 64),
]
GPU_PAIRS = [
    ("vmoe", "vmoe_base_patch16_224", "staged_deit3_large_patch16_224", "meta_deit3_large_patch16_224", 1, 224, 3, 1000, 128),
    ("nac", "nac_tinyimagenet", "staged_vit_huge_patch14_224", "meta_vit_huge_patch14_224", 0, 224, 3, 200, 64),
]
# (student kind, model, image size, channels, classes, batch)
CPU_STUDENTS = [("vmoe", "vmoe_micro", 28, 1, 10, 64), ("nac", "nac_micro", 28, 1, 10, 64)]
GPU_STUDENTS = [("vmoe", "vmoe_base_patch16_224", 224, 3, 1000, 128), ("nac", "nac_tinyimagenet", 64, 3, 200, 64)]


def _drop_backend(fn):
    def call(*args, backend=None, **kwargs):
        return fn(*args, **kwargs)
    return call


@contextlib.contextmanager
def seed_formulation():
    """Run the layers on the seed's formulations of the ops."""
    from .. import ops
    from ..layers import moe as moe_layer

    with mock.patch.object(moe_layer, "moe_mlp", _drop_backend(reference.moe_mlp_expert_loop)), \
         mock.patch.object(ops, "readin_attention", _drop_backend(reference.readin_attention_materialised)), \
         mock.patch.object(ops, "graph_attention", _drop_backend(reference.graph_attention)):
        yield


def build_pair(kind, student_name, teacher_name, meta_name, index, img, chans, classes, num_stages=4):
    import timm

    import m2mkd_fast.models  # noqa: F401 - registers the models

    common = dict(pretrained=False, num_classes=classes)
    size = dict(img_size=img, in_chans=chans) if img != 224 else {}
    meta = timm.create_model(meta_name, num_stages=num_stages, **common, **size)
    teacher = timm.create_model(teacher_name, num_stages=num_stages, **common, **size)
    student_kwargs = {"num_stages": num_stages} if kind == "vmoe" else {}
    student_model = timm.create_model(student_name, **common, **size, **student_kwargs)
    student = pair_student(kind, student_model, index, meta.embed_dim)
    return PairTask(meta, teacher, student, index)


def step_records(device: torch.device, quick: bool = False) -> list[dict]:
    """Pair steps and whole-student steps, each formulation side by side."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    records = []
    for kind, student_name, teacher_name, meta_name, index, img, chans, classes, batch in (GPU_PAIRS if gpu else CPU_PAIRS):
        batch = 8 if quick else batch
        for formulation in ("m2mkd_fast layers", "seed formulation"):
            record = {"section": "step", "family": f"{kind} ({student_name}, module {index})", "formulation": formulation,
                      "shape": f"batch {batch}", "pass": "train step"}

            def build():
                task = build_pair(kind, student_name, teacher_name, meta_name, index, img, chans, classes)
                return task, DistillationLoss("soft", 0.5, 1.0)

            record.update(_measure_step(build, img, chans, classes, batch, device, formulation, quick))
            records.append(record)
    ours = f"m2mkd_fast layers ({select('moe_mlp', device)[0]} backend)"
    for kind, name, img, chans, classes, batch in (GPU_STUDENTS if gpu else CPU_STUDENTS):
        batch = 8 if quick else batch
        for formulation in (ours, "m2mkd_fast layers (torch backend)", "seed formulation"):
            record = {"section": "student step", "family": f"{kind} ({name})", "formulation": formulation,
                      "shape": f"batch {batch}", "pass": "train step"}

            def build():
                import timm

                import m2mkd_fast.models  # noqa: F401 - registers the models

                size = dict(img_size=img, in_chans=chans) if img != 224 else {}
                return EndToEnd(timm.create_model(name, pretrained=False, num_classes=classes, **size)), None

            record.update(_measure_step(build, img, chans, classes, batch, device, formulation, quick))
            records.append(record)
    return records


def _formulation(name: str):
    if name == "seed formulation":
        return seed_formulation()
    if name == "m2mkd_fast layers (torch backend)":
        return use_backend("torch")
    return contextlib.nullcontext()


def _measure_step(build, img, chans, classes, batch, device, formulation, quick) -> dict:
    """Median time and peak memory of one AdamW step of the task ``build()`` returns."""
    try:
        torch.manual_seed(0)
        task, distill_loss = build()
        task = task.to(device).train()
        params = [p for p in task.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        x = torch.randn(batch, chans, img, img, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

        def step():
            with autocast:
                s_logits, t_logits, aux = task(x)
                if distill_loss is None:
                    loss = torch.nn.functional.cross_entropy(s_logits.float(), y)
                else:
                    loss = distill_loss(s_logits.float(), y, t_logits.float())
                if aux is not None:
                    loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with _formulation(formulation):
            result = measure(step, device, 0.1 if quick else 1.0)
            syncs = _count_host_syncs(step) if device.type == "cuda" else None
        return {"status": "ok", **result, "images_per_s": batch / (result["ms"] * 1e-3), "host_syncs": syncs}
    except Exception as err:  # noqa: BLE001 - reported in the table
        return {"status": "failed", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _count_host_syncs(step) -> int:
    """Synchronising CUDA calls in one step (torch.cuda.set_sync_debug_mode warnings)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)



