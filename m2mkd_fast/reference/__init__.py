"""Plain-PyTorch oracles of every op, written to be obviously right (docs/design.md §2), slow is fine.

Nothing here imports ops/, backend or kernels: an oracle that shares code with what it checks
proves nothing. The seed's own formulations (per-expert loop, one-hot einsum dispatch,
materialised read-in, dense graph bias) are here too, for tests and benchmarks.
"""

from .graph import graph_attention, graph_log_affinity
from .modfc import modfc
from .moe import moe_mlp, moe_mlp_expert_loop, moe_mlp_onehot_einsum
from .random import philox_uniform
from .readin import readin_attention, readin_attention_materialised
from .routing import route, vmoe_aux_loss

__all__ = [
    "route",
    "vmoe_aux_loss",
    "moe_mlp",
    "moe_mlp_expert_loop",
    "moe_mlp_onehot_einsum",
    "modfc",
    "readin_attention",
    "readin_attention_materialised",
    "graph_attention",
    "graph_log_affinity",
    "philox_uniform",
]
