"""Graph priors for NAC mediator signatures (docs/design.md §2.4), without a networkx dependency.

A prior is a graph over the mediators; its signatures are fitted so that the kernel's truncation
reproduces the graph: edge (u, v) ⇔ 1 − cos(σ_u, σ_v) < truncation. As in the NAC seed, signatures
start orthogonal (``nn.init.orthogonal_``) and Adam (lr 1e-3) minimises the hinge loss

    mean over (u, v) of   max(τ, d_uv)   if (u, v) is an edge
                          max(−τ, −d_uv) otherwise          (τ = 0.8)

which moves each distance just past the threshold and no further. The graphs follow networkx's
generators (same definitions, own random streams):

* ``barabasi-albert`` (n, m): a star on m+1 nodes, then each new node links to m distinct
  nodes drawn proportionally to degree (n=256, m=2 Tiny-ImageNet; n=768, m=6 ImageNet);
* ``erdos-renyi`` (n, p): each pair independently with probability p (p=0.1);
* ``planted-partition`` (l, k, p_in, p_out): l groups of k nodes, pairs inside a group with p_in,
  across with p_out (8×32 / 12×64, 0.9 / 0.2);
* ``ring-of-cliques`` (num_cliques, clique_size): cliques, clique i joined to clique i+1 by the
  edge (i·k + 1, ((i+1)·k) mod n) (8×32 / 12×64).

Randomness: ``seed=None`` draws the seed from torch's global generator, so ``torch.manual_seed``
makes model construction reproducible.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GRAPH_KINDS", "barabasi_albert", "erdos_renyi", "planted_partition", "ring_of_cliques", "make_graph",
    "cosine_distance", "signature_hinge_loss", "signature_hinge_grad", "graph_agreement", "fit_signatures", "graph_prior_signatures",
]

GRAPH_KINDS = ("barabasi-albert", "erdos-renyi", "planted-partition", "ring-of-cliques")


def _rng(seed: Optional[int]) -> np.random.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item())
    return np.random.default_rng(int(seed))


def _symmetric(upper: np.ndarray) -> torch.Tensor:
    adj = np.triu(upper, 1)
    return torch.from_numpy(adj | adj.T)


def barabasi_albert(n: int, m: int, seed: Optional[int] = None) -> torch.Tensor:
    """Barabási–Albert preferential attachment graph as a symmetric bool adjacency ``[n, n]``."""
    if not 1 <= m < n:
        raise ValueError(f"barabasi_albert: need 1 <= m < n, got n={n}, m={m}")
    rng = _rng(seed)
    adj = np.zeros((n, n), dtype=bool)
    adj[0, 1:m + 1] = adj[1:m + 1, 0] = True  # star on m + 1 nodes, centre 0
    repeated = [0] * m + list(range(1, m + 1))  # each node repeated by its degree
    for source in range(m + 1, n):
        targets: set = set()
        while len(targets) < m:
            targets.add(repeated[int(rng.integers(len(repeated)))])
        for t in targets:
            adj[source, t] = adj[t, source] = True
        repeated.extend(targets)
        repeated.extend([source] * m)
    return torch.from_numpy(adj)


def erdos_renyi(n: int, p: float, seed: Optional[int] = None) -> torch.Tensor:
    """G(n, p) as a symmetric bool adjacency ``[n, n]``."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"erdos_renyi: need n >= 1 and 0 <= p <= 1, got n={n}, p={p}")
    return _symmetric(_rng(seed).random((n, n)) < p)


def planted_partition(l: int, k: int, p_in: float, p_out: float, seed: Optional[int] = None) -> torch.Tensor:
    """``l`` groups of ``k`` nodes (node u in group u // k); bool adjacency ``[l·k, l·k]``."""
    if l < 1 or k < 1 or not (0.0 <= p_in <= 1.0 and 0.0 <= p_out <= 1.0):
        raise ValueError(f"planted_partition: need l, k >= 1 and probabilities in [0, 1], got l={l}, k={k}, "
                         f"p_in={p_in}, p_out={p_out}")
    n = l * k
    group = np.arange(n) // k
    prob = np.where(group[:, None] == group[None, :], p_in, p_out)
    return _symmetric(_rng(seed).random((n, n)) < prob)


def ring_of_cliques(num_cliques: int, clique_size: int) -> torch.Tensor:
    """Cliques joined in a ring (networkx's definition); bool adjacency ``[n, n]``."""
    if num_cliques < 2 or clique_size < 2:
        raise ValueError(f"ring_of_cliques: need num_cliques >= 2 and clique_size >= 2, got {num_cliques}, {clique_size}")
    n = num_cliques * clique_size
    adj = np.zeros((n, n), dtype=bool)
    for i in range(num_cliques):
        lo = i * clique_size
        adj[lo:lo + clique_size, lo:lo + clique_size] = True
        a, b = lo + 1, ((i + 1) * clique_size) % n
        adj[a, b] = adj[b, a] = True
    np.fill_diagonal(adj, False)
    return torch.from_numpy(adj)


def make_graph(kind: str, num_nodes: Optional[int] = None, seed: Optional[int] = None, **kwargs) -> torch.Tensor:
    """A prior graph by name (``GRAPH_KINDS``, '-' or '_'); checks it has ``num_nodes`` nodes.

    kwargs: barabasi-albert ``m`` (and optionally ``n``); erdos-renyi ``p`` (``n``);
    planted-partition ``l, k, p_in, p_out``; ring-of-cliques ``num_cliques, clique_size``.
    """
    key = kind.replace("_", "-").lower()
    n = kwargs.pop("n", num_nodes)
    if key == "barabasi-albert":
        adj = barabasi_albert(int(n), int(kwargs.pop("m")), seed)
    elif key == "erdos-renyi":
        adj = erdos_renyi(int(n), float(kwargs.pop("p")), seed)
    elif key == "planted-partition":
        adj = planted_partition(int(kwargs.pop("l")), int(kwargs.pop("k")), float(kwargs.pop("p_in")),
                                float(kwargs.pop("p_out")), seed)
    elif key == "ring-of-cliques":
        adj = ring_of_cliques(int(kwargs.pop("num_cliques")), int(kwargs.pop("clique_size")))
    else:
        raise ValueError(f"make_graph: unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")
    if kwargs:
        raise TypeError(f"make_graph({kind!r}): unexpected arguments {sorted(kwargs)}")
    if num_nodes is not None and adj.shape[0] != num_nodes:
        raise ValueError(f"make_graph({kind!r}): the graph has {adj.shape[0]} nodes, expected {num_nodes}")
    return adj


def cosine_distance(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 − cos`` between the rows of ``a [U, S]`` and ``b [V, S]`` (default ``a``) → ``[U, V]``."""
    a = F.normalize(a, p=2, dim=-1)
    b = a if b is None else F.normalize(b, p=2, dim=-1)
    return 1.0 - a @ b.transpose(-1, -2)


def signature_hinge_loss(signatures: torch.Tensor, adjacency: torch.Tensor, truncation: float = 0.8) -> torch.Tensor:
    """The seed's hinge loss (mean over all pairs, the diagonal included as a non-edge)."""
    d = cosine_distance(signatures)
    tau = torch.full_like(d, truncation)
    return torch.where(adjacency, torch.maximum(tau, d), torch.maximum(-tau, -d)).mean()


@torch.no_grad()
def graph_agreement(signatures: torch.Tensor, adjacency: torch.Tensor, truncation: float = 0.8) -> float:
    """Fraction of off-diagonal pairs where ``distance < truncation`` equals the adjacency."""
    d = cosine_distance(signatures.float())
    n = d.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=d.device)
    same = (d < truncation) == adjacency.to(d.device)
    return float(same[off].float().mean()) if n > 1 else 1.0


def signature_hinge_grad(signatures: torch.Tensor, adjacency: torch.Tensor, truncation: float = 0.8) -> torch.Tensor:
    """Gradient of :func:`signature_hinge_loss` w.r.t. ``signatures``, in closed form.

    With ŝ = s/|s|, d = 1 − ŝŝᵀ and g = ∂loss/∂d = ([edge ∧ d > τ] − [¬edge ∧ d < τ]) / n²:
    ∂loss/∂ŝ = −(g + gᵀ)ŝ, and through the normalisation ∂loss/∂s = (ĝ − ŝ(ŝ·ĝ)) / |s|.
    Two n×n×S products a step instead of autograd's graph over several n×n temporaries.
    """
    n = signatures.shape[0]
    norm = signatures.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit = signatures / norm
    d = 1.0 - unit @ unit.T
    g = (adjacency & (d > truncation)).to(d.dtype) - ((~adjacency) & (d < truncation)).to(d.dtype)
    g_unit = -((g + g.T) @ unit) / float(n * n)
    return (g_unit - unit * (unit * g_unit).sum(-1, keepdim=True)) / norm


def fit_signatures(adjacency: torch.Tensor, signature_dim: int, truncation: float = 0.8, steps: int = 1000,
                   lr: float = 1e-3, device: Optional[torch.device] = None) -> torch.Tensor:
    """Fit ``[n, signature_dim]`` signatures to ``adjacency`` (orthogonal init, Adam on the hinge).

    Runs in float32 on ``device`` (default CPU) with the closed-form gradient
    (:func:`signature_hinge_grad`); draws the orthogonal initialisation from torch's global
    generator.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    adjacency = adjacency.to(device=device, dtype=torch.bool)
    n = adjacency.shape[0]
    if adjacency.shape != (n, n):
        raise ValueError(f"fit_signatures: adjacency must be square, got {tuple(adjacency.shape)}")
    init = torch.empty(n, signature_dim, dtype=torch.float32)
    nn.init.orthogonal_(init)
    sig = init.to(device)
    if steps > 0:
        sig = sig.clone().requires_grad_(True)
        opt = torch.optim.Adam([sig], lr=lr)
        with torch.no_grad():
            for _ in range(int(steps)):
                sig.grad = signature_hinge_grad(sig, adjacency, truncation)
                opt.step()
    return sig.detach()


def graph_prior_signatures(kind: str, num_latents: int, signature_dim: int, steps: int = 1000,
                           truncation: float = 0.8, lr: float = 1e-3, seed: Optional[int] = None,
                           **graph_kwargs) -> torch.Tensor:
    """Signatures ``[num_latents, signature_dim]`` fitted to a prior graph (CPU, float32)."""
    adjacency = make_graph(kind, num_latents, seed=seed, **graph_kwargs)
    return fit_signatures(adjacency, signature_dim, truncation=truncation, steps=steps, lr=lr)
