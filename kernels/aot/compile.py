"""Ahead-of-time compilation of the package's Triton kernels for GPU targets, on any machine.

Each family module of this package (``routing``, ``moe``, ``readin``, ``graph``) exports
``aot_specs()`` returning :class:`KernelSpec` items: one per kernel, autotune config and dtype,
typed by :func:`signature`. :func:`compile_spec` compiles one for a target with
``triton.compile(ASTSource(...), target=GPUTarget(...))`` and runs the wheel's own ``ptxas -v``
on the PTX to read registers and spills. Needs a real (not interpreted) ``@triton.jit``
function: run with TRITON_INTERPRET unset.
"""

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import triton

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGET_NAME = {80: "sm_80", 90: "sm_90a"}


@dataclass(frozen=True)
class KernelSpec:
    """One compilable instance of a kernel.

    signature maps every argument name to a Triton type ("*bf16", "*fp32", "i32", "fp32", ...)
    or "constexpr"; constexprs gives the constexpr values (autotune config included).
    uses_dot: the kernel has a tl.dot whose operands are ``dtype`` (tensor cores expected for bf16).
    capabilities: the GPU targets (80 = sm_80, 90 = sm_90a) this config is meant and checked for.
    """

    kernel: str
    fn: Any
    signature: dict
    constexprs: dict
    dtype: str
    num_warps: int = 4
    num_stages: int = 2
    config: str = ""
    uses_dot: bool = False
    divisible_args: tuple = field(default=())
    capabilities: tuple = (80, 90)


@dataclass
class CompileResult:
    spec: KernelSpec
    capability: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    has_mma: bool
    has_wgmma: bool
    seconds: float

    @property
    def target(self) -> str:
        return TARGET_NAME[self.capability]


def jit_function(kernel):
    """The JITFunction under an Autotuner / Heuristics wrapper."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{kernel!r} is not a Triton kernel (is TRITON_INTERPRET=1 set?)")
        kernel = kernel.fn
    return kernel


def autotune_configs(kernel) -> list:
    """The autotune configs of a kernel (one empty config when it is not autotuned)."""
    configs = getattr(kernel, "configs", None)
    return list(configs) if configs else [triton.Config({})]


def signature(fn, constexprs: dict, pointers: dict, scalars: Optional[dict] = None,
              divisible: Callable[[str], bool] = lambda name: False) -> tuple[dict, tuple]:
    """(Triton type of every argument of the JITFunction ``fn``, the integer arguments hinted as
    multiples of 16). An argument is "constexpr" when it is in ``constexprs``, else
    ``pointers[name]`` ("*bf16", "*i32", ...) or ``scalars[name]`` ("fp32", "i64", ...), else "i32",
    hinted divisible when ``divisible(name)`` holds."""
    types, hinted = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = pointers[name]
        elif scalars and name in scalars:
            types[name] = scalars[name]
        else:
            types[name] = "i32"
            if divisible(name):
                hinted.append(name)
    return types, tuple(hinted)


def specs_for_configs(kernel_name: str, kernel, signature: dict, constexprs: dict, dtype: str, uses_dot: bool, divisible_args: Iterable[str] = ()) -> list[KernelSpec]:
    """One KernelSpec per autotune config of ``kernel``."""
    fn = jit_function(kernel)
    specs = []
    for cfg in autotune_configs(kernel):
        values = {**constexprs, **cfg.kwargs}
        label = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items())) + f",w{cfg.num_warps},s{cfg.num_stages}"
        specs.append(
            KernelSpec(kernel_name, fn, signature, values, dtype, cfg.num_warps, cfg.num_stages, label.lstrip(","), uses_dot, tuple(divisible_args))
        )
    return specs


def _ptxas() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found in the Triton wheel at {path}")
    return path


def _ptxas_report(ptx: str, capability: int) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={TARGET_NAME[capability]}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = max((int(m) for m in re.findall(r"Used (\d+) registers", out)), default=0)
    stores = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", out))
    loads = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", out))
    return registers, stores, loads


def compile_spec(spec: KernelSpec, capability: int) -> CompileResult:
    """Compile ``spec`` for sm_80 (capability 80) or sm_90a (90) and read its resources."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if spec.signature.get(a, "").startswith("*") or a in spec.divisible_args}
    start = time.perf_counter()
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    registers, stores, loads = _ptxas_report(ptx, capability)
    return CompileResult(
        spec, capability, registers, stores, loads, compiled.metadata.shared,
        has_mma=bool(re.search(r"\bmma\.sync", ptx)), has_wgmma="wgmma" in ptx, seconds=seconds,
    )


def problems(result: CompileResult) -> list[str]:
    """What is wrong with a compiled kernel: spills, shared memory over the limit, no tensor cores."""
    found = []
    if result.spill_stores or result.spill_loads:
        found.append(f"spills {result.spill_stores} B stores / {result.spill_loads} B loads")
    if result.shared_bytes > SHARED_MEMORY_LIMIT[result.capability]:
        found.append(f"shared memory {result.shared_bytes} B > {SHARED_MEMORY_LIMIT[result.capability]} B")
    if result.spec.uses_dot and result.spec.dtype == "bf16":
        if result.capability == 80 and not result.has_mma:
            found.append("no mma instruction for a bf16 dot on sm_80")
        if result.capability == 90 and not result.has_wgmma:
            found.append("no wgmma instruction for a bf16 dot on sm_90a")
    return found
