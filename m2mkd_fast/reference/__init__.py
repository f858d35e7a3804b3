"""Plain-PyTorch oracles of every op, written to be obviously right (DESIGN §2), slow is fine.

Nothing here imports ops/, backend or kernels: an oracle that shares code with what it checks
proves nothing.
"""

from .graph import graph_attention, graph_log_affinity
from .modfc import modfc
from .moe import moe_mlp
from .readin import readin_attention, readin_attention_materialised
from .routing import route, vmoe_aux_loss

__all__ = [
    "route",
    "vmoe_aux_loss",
    "moe_mlp",
    "modfc",
    "readin_attention",
    "readin_attention_materialised",
    "graph_attention",
    "graph_log_affinity",
]
