"""KernelSpecs of the MoE MLP kernels (m2mkd_fast.kernels.moe) at the V-MoE-B shape."""

from .. import moe as _k
from .compile import KernelSpec, jit_function, signature


def _spec(name, kernel, dtype, pointers, constexprs, cfg=None, uses_dot=True) -> KernelSpec:
    """One kernel at one autotune config; every integer argument hinted a multiple of 16."""
    fn = jit_function(kernel)
    values = dict(constexprs)
    warps, stages, label = 4, 2, ""
    if cfg is not None:
        values.update(cfg.kwargs)
        warps, stages = cfg.num_warps, cfg.num_stages
        label = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items())) + f",w{warps},s{stages}"
    types, divisible = signature(fn, values, pointers, divisible=lambda name: True)
    return KernelSpec(name, fn, types, values, dtype, warps, stages, label, uses_dot, divisible)


def aot_specs() -> list:
    """KernelSpecs of every kernel, autotune config and dtype at the V-MoE-B shape (d = 768,
    h = 3072, E = 8, k = 2, contiguous tensors: unit strides are specialised as the JIT does)."""
    specs = []
    for dtype in ("bf16", "fp32"):
        p = f"*{dtype}"
        elem = 2 if dtype == "bf16" else 4
        dot = {"DOT_FP32": False, "PRECISION": "ieee", "BF16_RTNE": False}
        common = {"E_P2": 8, **dot}
        for cfg in _k.configs("gemm", elem):
            specs.append(_spec("moe_fc1", _k._moe_fc1_kernel, dtype,
                               {"X": p, "W": p, "BIAS": p, "Z": p, "A": p, "PAIR_OF_ROW": "*i32", "OFFSETS": "*i32"},
                               {"stride_xk": 1, "stride_wn": 1, "stride_bn": 1, "TOPK": 2, "HAS_BIAS": True,
                                "SAVE_Z": True, "ACT": 0, **common}, cfg))
            ptrs = {"SRC": p, "W": p, "BIAS": p, "WEIGHT": p, "OUT": p, "PAIR_OF_ROW": "*i32", "OFFSETS": "*i32"}
            specs.append(_spec("moe_fc2", _k._moe_scatter_kernel, dtype, ptrs,
                               {"stride_wn": 1, "stride_bn": 1, "HAS_BIAS": True, "HAS_SCALE": True, **common}, cfg))
            specs.append(_spec("moe_bwd_dx", _k._moe_scatter_kernel, dtype, ptrs,
                               {"stride_wk": 1, "stride_bn": 1, "HAS_BIAS": False, "HAS_SCALE": False, **common}, cfg))
        for cfg in _k.configs("dz", elem):
            specs.append(_spec("moe_bwd_dz", _k._moe_dz_kernel, dtype,
                               {"DY": p, "W": p, "WEIGHT": p, "Z": p, "A": p, "DZ": p, "PART": "*fp32",
                                "PAIR_OF_ROW": "*i32", "OFFSETS": "*i32"},
                               {"stride_dyk": 1, "stride_wk": 1, "TOPK": 2, "ACT": 0, "NEED_PART": True, **common}, cfg))
        for cfg in _k.configs("wgrad", elem):
            ptrs = {"L": p, "R": p, "W": p, "PAIR_OF_ROW": "*i32", "OFFSETS": "*i32"}
            base = {"stride_l1": 1, "stride_wn": 1, "TOPK": 2, **dot}
            specs.append(_spec("moe_bwd_dw1", _k._moe_wgrad_kernel, dtype, ptrs, {**base, "L_GATHER": True}, cfg))
            specs.append(_spec("moe_bwd_dw2", _k._moe_wgrad_kernel, dtype, ptrs, {**base, "L_GATHER": False}, cfg))
        specs.append(_spec("moe_fill_tail", _k._moe_fill_tail_kernel, dtype,
                           {"Z": p, "A": p, "PAIR_OF_ROW": "*i32", "OFFSETS": "*i32"},
                           {"SAVE_Z": True, "BLOCK_T": 64, "BLOCK_N": 128}, uses_dot=False))
        specs.append(_spec("moe_combine", _k._moe_combine_kernel, dtype,
                           {"SRC": p, "ROW_OF_PAIR": "*i32", "OUT": p},
                           {"stride_on": 1, "TOPK": 2, "BF16_RTNE": False, "BLOCK_T": 16, "BLOCK_N": 256}, uses_dot=False))
        specs.append(_spec("moe_bwd_pair_grad", _k._moe_pair_grad_kernel, dtype,
                           {"PART": "*fp32", "ROW_OF_PAIR": "*i32", "EXPERT": "*i64", "WEIGHT": p, "DY": p, "BIAS": p,
                            "DWEIGHT": p, "DYW": p},
                           {"stride_dyd": 1, "stride_bd": 1, "TOPK": 2, "HAS_BIAS": True, "NEED_DWEIGHT": True,
                            "NEED_DYW": True, "BF16_RTNE": False, "BLOCK_P": 64, "BLOCK_C": 64}, uses_dot=False))
        specs.append(_spec("moe_bwd_bias", _k._moe_bias_grad_kernel, dtype,
                           {"R": p, "DB": p, "OFFSETS": "*i32"},
                           {"stride_bn": 1, "BF16_RTNE": False, "BLOCK_K": 32, "BLOCK_N": 128}, uses_dot=False))
    return specs
