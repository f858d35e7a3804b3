"""The "triton" backend: torch.library custom ops around the Triton kernels in m2mkd_fast.kernels.

One module per op family: routing.route, moe.moe_mlp, readin.readin_attention,
graph.graph_attention. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""
