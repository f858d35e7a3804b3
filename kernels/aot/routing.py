"""KernelSpecs of the routing and dispatch kernels (m2mkd_fast.kernels.routing) at a V-MoE shape."""

from .. import routing as _k
from .compile import KernelSpec, jit_function, signature


def _spec(name: str, kernel, dtype: str, pointers: dict, constexprs: dict, block_name: str) -> KernelSpec:
    fn = jit_function(kernel)
    types, _ = signature(fn, constexprs, pointers)
    return KernelSpec(name, fn, types, constexprs, dtype, num_warps=4, config=f"{block_name}={constexprs[block_name]}")


def aot_specs() -> list:
    """KernelSpecs of the routing and dispatch kernels at a V-MoE shape (E = 8, k = 2), every
    kernel, both float dtypes (the integer-only kernels once, under their index dtype)."""
    e_p2, k = 8, 2
    block = _k._row_block(e_p2)
    rows = _k._SCAN_ROWS
    specs = []
    for dtype in ("fp32", "bf16"):
        ptr = f"*{dtype}"
        specs.append(_spec(
            "moe_route_gate", _k._route_gate_kernel, dtype,
            {"LOGITS": ptr, "EXPERT": "*i64", "WEIGHT": ptr, "HIST": "*i32"},
            {"stride_le": 1, "K": k, "K_P2": 2, "GATE_VMOE": True, "WRITE_HIST": True, "BLOCK_T": block,
             "E_P2": e_p2, "BF16_RTNE": False}, "BLOCK_T",
        ))
        specs.append(_spec(
            "moe_route_backward", _k._route_bwd_kernel, dtype,
            {"LOGITS": ptr, "EXPERT": "*i64", "GRAD_W": ptr, "GRAD_L": ptr},
            {"stride_le": 1, "stride_gk": 1, "K": k, "GATE_VMOE": True, "BLOCK_T": block, "E_P2": e_p2,
             "BF16_RTNE": False}, "BLOCK_T",
        ))
    specs.append(_spec("moe_route_hist", _k._route_hist_kernel, "i64",
                       {"EXPERT": "*i64", "PERM": "*i64", "HIST": "*i32"},
                       {"K": k, "BLOCK_T": block, "E_P2": e_p2}, "BLOCK_T"))
    specs.append(_spec("moe_route_scan", _k._route_scan_kernel, "i32",
                       {"HIST": "*i32", "START": "*i32", "COUNTS": "*i64"},
                       {"HAS_CAPACITY": True, "BLOCK_R": rows, "E_P2": e_p2}, "BLOCK_R"))
    specs.append(_spec("moe_route_slot", _k._route_slot_kernel, "i64",
                       {"EXPERT": "*i64", "PERM": "*i64", "START": "*i32", "SLOT": "*i64"},
                       {"K": k, "HAS_PERM": True, "HAS_CAPACITY": True, "BLOCK_T": block, "E_P2": e_p2}, "BLOCK_T"))
    specs.append(_spec("moe_dispatch_hist", _k._dispatch_hist_kernel, "i64",
                       {"EXPERT": "*i64", "SLOT": "*i64", "HIST": "*i32"},
                       {"BLOCK_P": block, "E_P2": e_p2}, "BLOCK_P"))
    specs.append(_spec("moe_dispatch_scan", _k._dispatch_scan_kernel, "i32",
                       {"HIST": "*i32", "START": "*i32", "OFFSETS": "*i32"},
                       {"BLOCK_R": rows, "E_P2": e_p2}, "BLOCK_R"))
    specs.append(_spec("moe_dispatch_scatter", _k._dispatch_scatter_kernel, "i64",
                       {"EXPERT": "*i64", "SLOT": "*i64", "START": "*i32", "ROW_OF_PAIR": "*i32", "PAIR_OF_ROW": "*i32"},
                       {"BLOCK_P": block, "E_P2": e_p2}, "BLOCK_P"))
    return specs
