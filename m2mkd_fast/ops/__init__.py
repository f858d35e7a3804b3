"""Functional ops: validated, autograd-enabled, dispatched to a backend (see m2mkd_fast.backend)."""

from .graph import graph_attention
from .moe import moe_mlp
from .readin import readin_attention
from .routing import route

__all__ = ["route", "moe_mlp", "readin_attention", "graph_attention"]
