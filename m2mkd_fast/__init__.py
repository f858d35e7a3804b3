"""m2mkd_fast: fast module-to-module knowledge distillation for modular vision models.

Subpackages load on first use, so `import m2mkd_fast` stays cheap:
``mk.ops`` (validated, autograd-enabled functional ops), ``mk.reference`` (plain-PyTorch
oracles), ``mk.layers`` (drop-in nn.Modules), ``mk.models`` (timm-registered models),
``mk.distill`` (the m2mKD trainer), ``mk.data`` (offline datasets) and ``mk.parallel``
(expert parallelism on torch.distributed).
With ``M2MKD_CPP_JIT=1`` the C++ extension is built just in time from csrc/ (``cpp_jit``).
Nothing imports torch until one of these is used, so the command line answers ``--help`` at once.
"""

import importlib
import os

__version__ = "0.1.0"
__all__ = ["__version__", "available_backends", "use_backend", "set_checks", "ops", "reference", "layers", "models",
           "distill", "data", "parallel"]

_SUBPACKAGES = {"ops", "reference", "layers", "models", "distill", "data", "parallel"}
_LAZY_FUNCTIONS = {"available_backends": "backend", "use_backend": "backend", "set_checks": "checks"}


def __getattr__(name):
    if name in _LAZY_FUNCTIONS:
        module = importlib.import_module(f".{_LAZY_FUNCTIONS[name]}", __name__)
        globals()[name] = getattr(module, name)
        return globals()[name]
    if name in _SUBPACKAGES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'm2mkd_fast' has no attribute {name!r}")


if os.environ.get("M2MKD_CPP_JIT") == "1":
    from . import cpp_jit

    cpp_jit.load()
