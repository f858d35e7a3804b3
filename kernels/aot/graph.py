"""KernelSpecs of the graph-attention kernels (m2mkd_fast.kernels.graph) for the GPU builds."""

import torch

from .. import graph as _k
from .compile import KernelSpec, jit_function, signature, specs_for_configs

_POINTER_ARGS = {
    "Q": "io", "K": "io", "Vt": "io", "O": "io", "DO": "io", "DQ": "io", "DK": "io", "DV": "io",
    "LSE": "*fp32", "DELTA": "*fp32", "ELL": "*fp32", "SS": "*fp32", "SR": "*fp32", "RR": "*fp32",
    "RS": "*fp32", "DB": "*fp32", "CNT": "*i32", "LST": "*i32", "LB": "*fp32", "JAC": "*fp32",
}
_SCALARS = {"inv_t": "fp32", "qk_scale": "fp32", "sm_scale": "fp32", "seed": "i64"}
_KERNELS = {
    "fwd": ("graph_attention_fwd", "_fwd_kernel"),
    "dq": ("graph_attention_bwd_dq", "_bwd_dq_kernel"),
    "dkdv": ("graph_attention_bwd_dkdv", "_bwd_dkdv_kernel"),
}


def _signature(fn, io_type: str, constexprs: dict) -> tuple[dict, tuple]:
    """Triton types of every argument as the JIT sees them at the benchmark shapes: contiguous
    tensors (innermost stride 1, specialised to a constexpr), other strides multiples of 16
    (head/batch/row strides: multiples of C = 64)."""
    pointers = {name: f"*{io_type}" if kind == "io" else kind for name, kind in _POINTER_ARGS.items()}
    return signature(fn, constexprs, pointers, _SCALARS,
                     divisible=lambda name: name.startswith("s") and not name.endswith("c"))


def aot_spec_list(kind: str, dtype: torch.dtype, C: int, sample, arch: int = 90, blocks=None, configs=None) -> list:
    """KernelSpecs of kernel ``kind`` for one (dtype, head dim, mode, GPU generation): the
    launcher's tiles and every autotune config it may pick there (or the given ``blocks`` /
    ``configs``: (warps, stages) pairs). sample: 0/False deterministic, 1/True sampled in the
    kernel, 2 sampled from the per-pass cache."""
    sample = int(sample)
    name, attr = _KERNELS[kind]
    io_type = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    dot_f32, prec, sig_prec = _k._dot_flags(dtype, interpret=False)
    bu, bv = blocks or _k.default_blocks(kind, C, dtype, 1 << 20, 1 << 20, sample, interpret=False, arch=arch)
    constexprs = dict(HEAD_DIM=C, C_PAD=C, SIG_DIM=64, BLOCK_U=bu, BLOCK_V=bv, SAMPLE=sample,
                      DOT_F32=dot_f32, DOT_PREC=prec, EPS=_k._FP32_EPS)
    if kind != "fwd":
        constexprs.update(S_PAD=64, SIG_GRAD=True, SIG_PREC=sig_prec)
    fn = jit_function(getattr(_k, attr))
    constexprs.update({a: 1 for a in fn.arg_names if a.startswith("s") and a.endswith("c")})
    types, divisible = _signature(fn, io_type, constexprs)
    if configs is None:
        _, _, warps, stages = _k._tile_entry(kind, dtype != torch.float32, C, sample, arch)
        configs = [(w, st) for w in warps for st in stages]
    variant = f"C={C},{('deterministic', 'sampled', 'cached sample')[sample]},BU={bu},BV={bv}"
    return [
        KernelSpec(name, fn, types, dict(constexprs), io_type, w, st, f"{variant},w{w},s{st}", True, divisible, (arch,))
        for w, st in configs
    ]


def aot_specs() -> list:
    """KernelSpecs of every graph-attention kernel, for the GPU builds (bf16 and fp32; C = 64
    and 128; sampled and deterministic; signature gradients on), sampled C=64 first per kernel
    and dtype."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        for C in (64, 128):
            for sample in (2, 1, 0):
                for kind in _KERNELS:
                    for arch in _k.ARCHS:
                        specs.extend(aot_spec_list(kind, dtype, C, sample, arch))
        io_type = "bf16" if dtype == torch.bfloat16 else "fp32"
        delta_const = dict(HEAD_DIM=64, C_PAD=64, BLOCK_U=64, soc=1, sdc=1)
        types, divisible = _signature(jit_function(_k._bwd_delta_kernel), io_type, delta_const)
        specs.extend(specs_for_configs("graph_attention_bwd_delta", _k._bwd_delta_kernel, types, delta_const, io_type,
                                       False, divisible))
    fn = jit_function(_k._sample_kernel)
    for need_jac in (True, False):
        constexprs = dict(BLOCK_U=32, BLOCK_V=64, NEED_JAC=need_jac, EPS=_k._FP32_EPS)
        types, _ = _signature(fn, "fp32", constexprs)
        specs.append(KernelSpec("graph_attention_sample", fn, types, constexprs, "fp32", 8, 3,
                                f"BU=32,BV=64,{'with' if need_jac else 'without'} derivative,w8,s3", False, ()))
    return specs
