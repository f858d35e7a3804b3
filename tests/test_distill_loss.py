"""The m2mKD loss (docs/design.md §2.5) against hand computations."""

import math

import pytest
import torch

from m2mkd_fast.distill.loss import DistillationLoss, kd_kl, one_hot_targets, soft_target_cross_entropy


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def test_soft_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[0.5, 0.1, 2.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    eps, alpha, tau = 0.1, 0.3, 2.0
    B, K = 2, 3
    # hand: smoothed targets, soft-target CE (batch mean), KL summed / (B*K) times tau^2
    ce = 0.0
    for b in range(B):
        target = [eps / K] * K
        target[y[b]] = 1 - eps + eps / K
        logp = [math.log(p) for p in _softmax(s[b].tolist())]
        ce += -sum(ti * li for ti, li in zip(target, logp))
    ce /= B
    kl = 0.0
    for b in range(B):
        ps = _softmax([v / tau for v in s[b].tolist()])
        pt = _softmax([v / tau for v in t[b].tolist()])
        kl += sum(a * (math.log(a) - math.log(c)) for a, c in zip(pt, ps))
    kl = kl / (B * K) * tau * tau
    expected = (1 - alpha) * ce + alpha * kl
    got = DistillationLoss("soft", alpha=alpha, tau=tau)(s, one_hot_targets(y, K, eps, torch.float64), t)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert kd_kl(s, t, tau).item() == pytest.approx(kl, rel=1e-12)
    # the KL is divided by B*K, not B: it differs from the batch-mean KL by a factor K
    batchmean = torch.nn.functional.kl_div(torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1),
                                           reduction="batchmean", log_target=True) * tau * tau
    assert kd_kl(s, t, tau).item() == pytest.approx(batchmean.item() / K, rel=1e-12)


def test_hard_loss_is_ce_against_teacher_argmax():
    s = torch.randn(5, 7, dtype=torch.float64)
    t = torch.randn(5, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (5,))
    tgt = one_hot_targets(y, 7, 0.0, torch.float64)
    hand = -torch.log_softmax(s, -1)[torch.arange(5), t.argmax(-1)].mean()
    base = -torch.log_softmax(s, -1)[torch.arange(5), y].mean()
    got = DistillationLoss("hard", alpha=0.25, tau=3.0)(s, tgt, t)  # tau plays no part in hard
    assert got.item() == pytest.approx((0.75 * base + 0.25 * hand).item(), rel=1e-12)
    assert DistillationLoss("hard", alpha=1.0)(s, tgt, t).item() == pytest.approx(hand.item(), rel=1e-12)


def test_none_is_soft_target_ce_and_teacher_gets_no_grad():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    assert DistillationLoss("none")(s, y).item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    DistillationLoss("soft")(s, y, t).backward()
    assert s.grad is not None and t.grad is None


def test_label_smoothing_targets():
    y = torch.tensor([0, 3])
    tg = one_hot_targets(y, 4, 0.1)
    assert torch.allclose(tg.sum(-1), torch.ones(2))
    assert tg[0, 0].item() == pytest.approx(0.9 + 0.025)
    assert tg[0, 1].item() == pytest.approx(0.025)


def test_timm_mixup_targets_are_distributions():
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    _, tgt = mix(x, y)
    assert tgt.shape == (6, 10) and torch.allclose(tgt.sum(-1), torch.ones(6))
    loss = DistillationLoss("soft")(torch.randn(6, 10), tgt, torch.randn(6, 10))
    assert torch.isfinite(loss)
    assert soft_target_cross_entropy(torch.zeros(6, 10), tgt).item() == pytest.approx(math.log(10), rel=1e-6)


@pytest.mark.parametrize("kw, msg", [({"distill_type": "kl"}, "distill_type"), ({"alpha": 1.5}, "alpha"),
                                     ({"tau": 0.0}, "tau")])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DistillationLoss(**kw)


def test_bad_shapes_and_missing_teacher():
    with pytest.raises(ValueError, match="teacher logits"):
        DistillationLoss("soft")(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="do not match"):
        DistillationLoss("soft")(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4))
