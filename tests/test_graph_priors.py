"""Graph priors of NAC mediator signatures: generators, hinge loss and its closed-form gradient, fit."""

import itertools

import pytest
import torch

from m2mkd_fast.models import graph_priors as gp


pytestmark = pytest.mark.usefixtures("one_thread")


def _is_simple_graph(adj: torch.Tensor) -> bool:
    return adj.dtype == torch.bool and torch.equal(adj, adj.T) and not adj.diagonal().any()


@pytest.mark.parametrize("n,m", [(256, 2), (40, 6), (3, 2), (2, 1)])
def test_barabasi_albert_structure(n, m):
    adj = gp.barabasi_albert(n, m, seed=3)
    assert adj.shape == (n, n) and _is_simple_graph(adj)
    # a star on m + 1 nodes, then m new edges per node
    assert int(adj.sum()) // 2 == m + (n - m - 1) * m
    # every node added after the star has at least m neighbours; the graph is connected
    assert (adj[m + 1:].sum(1) >= m).all()
    reach = adj[0].clone()
    for _ in range(n):
        reach = reach | (adj[reach].any(0))
    assert reach.all()
    assert torch.equal(adj, gp.barabasi_albert(n, m, seed=3))
    assert not torch.equal(gp.barabasi_albert(64, 2, seed=1), gp.barabasi_albert(64, 2, seed=2))


def test_barabasi_albert_is_preferential():
    # old nodes collect edges: the first 10 nodes hold far more than 10/200 of the degree
    adj = gp.barabasi_albert(200, 2, seed=0)
    deg = adj.sum(1).float()
    assert deg[:10].sum() / deg.sum() > 0.15


def test_erdos_renyi_density():
    adj = gp.erdos_renyi(256, 0.1, seed=5)
    assert _is_simple_graph(adj)
    pairs = 256 * 255 / 2
    density = int(adj.sum()) / 2 / pairs
    assert abs(density - 0.1) < 4 * (0.1 * 0.9 / pairs) ** 0.5  # within 4 binomial s.d.
    assert int(gp.erdos_renyi(30, 0.0, seed=1).sum()) == 0
    assert int(gp.erdos_renyi(30, 1.0, seed=1).sum()) == 30 * 29


def test_planted_partition_blocks():
    l, k = 8, 32
    adj = gp.planted_partition(l, k, 0.9, 0.2, seed=7)
    assert adj.shape == (l * k, l * k) and _is_simple_graph(adj)
    group = torch.arange(l * k) // k
    same = group[:, None] == group[None, :]
    off = ~torch.eye(l * k, dtype=torch.bool)
    p_in = adj[same & off].float().mean().item()
    p_out = adj[~same].float().mean().item()
    assert abs(p_in - 0.9) < 0.03 and abs(p_out - 0.2) < 0.02


def test_ring_of_cliques_matches_networkx_definition():
    c, k = 4, 5
    adj = gp.ring_of_cliques(c, k)
    n = c * k
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(c):
        for a, b in itertools.combinations(range(i * k, i * k + k), 2):
            expected[a, b] = expected[b, a] = True
        a, b = i * k + 1, ((i + 1) * k) % n
        expected[a, b] = expected[b, a] = True
    assert torch.equal(adj, expected)
    assert int(adj.sum()) // 2 == c * k * (k - 1) // 2 + c


def test_make_graph_names_and_errors():
    assert gp.make_graph("barabasi_albert", 20, seed=1, m=2).shape == (20, 20)
    assert torch.equal(gp.make_graph("ring-of-cliques", 12, num_cliques=3, clique_size=4), gp.ring_of_cliques(3, 4))
    with pytest.raises(ValueError, match="unknown graph kind"):
        gp.make_graph("small-world", 10)
    with pytest.raises(ValueError, match="nodes, expected 256"):
        gp.make_graph("planted-partition", 256, l=8, k=30, p_in=0.9, p_out=0.2)
    with pytest.raises(TypeError, match="unexpected arguments"):
        gp.make_graph("erdos-renyi", 10, p=0.1, q=3)
    with pytest.raises(ValueError, match="1 <= m < n"):
        gp.barabasi_albert(5, 5)


def test_seed_none_follows_torch_generator():
    torch.manual_seed(11)
    a = gp.erdos_renyi(40, 0.3)
    torch.manual_seed(11)
    b = gp.erdos_renyi(40, 0.3)
    assert torch.equal(a, b)


def test_hinge_loss_by_hand():
    # two signatures at distance 1 - cos(90°) = 1, linked: loss = mean(max(.8, d) or max(-.8, -d))
    sig = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    edge = torch.tensor([[False, True], [True, False]])
    # pairs: (0,0) non-edge d=0 → max(-.8, 0) = 0; (0,1) edge d=1 → 1; same for (1,0), (1,1)
    assert gp.signature_hinge_loss(sig, edge).item() == pytest.approx(0.5)
    assert gp.signature_hinge_loss(sig, ~edge & ~torch.eye(2, dtype=torch.bool)).item() == pytest.approx(-0.4)


@pytest.mark.parametrize("n,s", [(7, 3), (33, 8)])
def test_hinge_grad_matches_autograd(n, s):
    adj = gp.erdos_renyi(n, 0.3, seed=n)
    sig = torch.randn(n, s, dtype=torch.float64, requires_grad=True)
    gp.signature_hinge_loss(sig, adj).backward()
    torch.testing.assert_close(gp.signature_hinge_grad(sig.detach(), adj), sig.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind,kwargs", [
    ("barabasi-albert", dict(m=2)),
    ("erdos-renyi", dict(p=0.1)),
    ("planted-partition", dict(l=4, k=16, p_in=0.9, p_out=0.2)),
    ("ring-of-cliques", dict(num_cliques=4, clique_size=16)),
])
def test_fit_reproduces_the_graph(kind, kwargs):
    adj = gp.make_graph(kind, 64, seed=2, **kwargs)
    start = gp.graph_agreement(gp.fit_signatures(adj, 32, steps=0), adj)
    torch.manual_seed(0)
    sig = gp.fit_signatures(adj, 32, steps=300, lr=1e-2)
    fitted = gp.graph_agreement(sig, adj)
    assert sig.shape == (64, 32) and sig.dtype == torch.float32
    assert fitted > 0.99 and fitted > start
    # the fit is deterministic given torch's generator
    torch.manual_seed(0)
    assert torch.equal(sig, gp.fit_signatures(adj, 32, steps=300, lr=1e-2))


def test_graph_prior_signatures_shape():
    sig = gp.graph_prior_signatures("ring-of-cliques", 12, 8, steps=5, num_cliques=3, clique_size=4)
    assert sig.shape == (12, 8) and torch.isfinite(sig).all()
