"""The "torch" backend: the fastest plain-PyTorch formulation of every op (any device).

One module per op family: routing.route, moe.moe_mlp, readin.readin_attention,
graph.graph_attention.
"""
