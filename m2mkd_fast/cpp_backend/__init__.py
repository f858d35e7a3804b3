"""The "cpp" backend: autograd wrappers around the C++ extension m2mkd_fast._C (CPU tensors).

One module per op family: routing.route, moe.moe_mlp, readin.readin_attention,
graph.graph_attention.
"""
