"""Drop-in nn.Modules built on m2mkd_fast.ops (docs/design.md §4)."""

from .moe import MoEMLP
from .modfc import ModFC, ModFFN, code_noise
from .readin import ReadInAttention
from .graph_attention import KernelModulatedAttention
from .stitch import Stitch

__all__ = ["MoEMLP", "ModFC", "ModFFN", "code_noise", "ReadInAttention", "KernelModulatedAttention", "Stitch"]
