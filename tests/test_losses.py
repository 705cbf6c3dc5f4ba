"""Each loss against a hand-computed tiny case; Sinkhorn-Knopp balance; KoLeo stability; schedules."""

from __future__ import annotations

import math

import pytest
import torch

from dinoflow.losses import (
    DINOHead,
    DINOLoss,
    EMACenter,
    IBOTPatchLoss,
    KoLeoLoss,
    cosine,
    sinkhorn_knopp,
    teacher_temperature,
)

L1E = math.log1p(math.e)  # log(1 + e)


def test_dino_loss_hand_case():
    # Student logits / 0.1 become [0, 1] and [1, 0]; log_softmax = [-log(1+e), 1-log(1+e)] and reverse.
    s0, s1 = torch.tensor([[0.0, 0.1]]), torch.tensor([[0.1, 0.0]])
    t0, t1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    loss = DINOLoss(student_temp=0.1)([s0, s1], [], [t0, t1])
    ce_s0_t1 = 0.5 * L1E + 0.5 * (L1E - 1)  # crossed: t1 supervises s0
    ce_s1_t0 = L1E - 1  # t0 supervises s1
    assert loss.item() == pytest.approx((ce_s0_t1 + ce_s1_t0) / 2, rel=1e-6)
    # A local crop is supervised by both teacher crops.
    loss2 = DINOLoss(0.1)([s0, s1], [s0], [t0, t1])
    ce_l = (L1E) + ce_s0_t1  # s0 vs t0: -log_softmax[0] = log(1+e)
    assert loss2.item() == pytest.approx((ce_s0_t1 + ce_s1_t0 + ce_l) / 4, rel=1e-6)


def test_ibot_loss_hand_case():
    masks = torch.tensor([[True, False], [True, True]])
    logits = torch.tensor([[0.0, 0.1], [0.1, 0.0], [0.0, 0.0]])  # the 3 masked patches
    targets = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    ce = [L1E - 1, L1E, math.log(2)]
    expected = (ce[0] * 1.0 + ce[1] * 0.5 + ce[2] * 0.5) / 2  # 1/n_masked per image, / batch
    assert IBOTPatchLoss(0.1)(logits, targets, masks).item() == pytest.approx(expected, rel=1e-6)


def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    logits = torch.randn(12, 4) * 0.5
    q = sinkhorn_knopp(logits, temp=0.1, n_iters=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # rows are distributions
    # Prototypes (columns) are pulled towards B/K = 3 each, more with every iteration.
    q1 = sinkhorn_knopp(logits, temp=0.1, n_iters=1)
    assert (q.sum(dim=0) - 3).abs().max() < (q1.sum(dim=0) - 3).abs().max()
    # Balance tightens with more iterations, and uniform logits give uniform targets.
    q50 = sinkhorn_knopp(logits, temp=0.1, n_iters=50)
    torch.testing.assert_close(q50.sum(dim=0), torch.full((4,), 3.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(2, 2), 0.1), torch.full((2, 2), 0.5))
    assert torch.isfinite(sinkhorn_knopp(torch.randn(4, 3) * 100, 0.04)).all()  # no overflow


def test_ema_center():
    c = EMACenter(2, momentum=0.9)
    t = c.targets(torch.tensor([[0.0, 0.1]]), 0.1)
    torch.testing.assert_close(t, torch.softmax(torch.tensor([[0.0, 1.0]]), dim=-1))
    c.update(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
    torch.testing.assert_close(c.center, torch.tensor([[0.2, 0.4]]))  # 0.9*0 + 0.1*mean


def test_koleo_hand_case_and_stability():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # unit vectors at 0, 90, 180 degrees
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)
    for bad in (torch.randn(1, 8), torch.ones(4, 8), torch.zeros(3, 8)):
        bad = bad.clone().requires_grad_(True)
        loss = KoLeoLoss()(bad)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(bad.grad).all()


def test_dino_head_is_cosine_to_prototypes():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(5, 16) * 100)
    assert out.shape == (5, 32) and out.abs().max() <= 1 + 1e-5  # L2-normed input, unit prototypes
    with torch.no_grad():
        head.prototypes.mul_(7.0)  # weight norm: the scale of V does not matter
    torch.testing.assert_close(head(torch.ones(2, 16)), DINOHead.forward(head, torch.ones(2, 16)))


def test_schedules():
    assert teacher_temperature(0, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 30) == pytest.approx(0.055)
    assert teacher_temperature(30, 30) == teacher_temperature(1000, 30) == pytest.approx(0.07)
    assert cosine(0, 100, 0.992, 1.0) == pytest.approx(0.992)
    assert cosine(50, 100, 0.992, 1.0) == pytest.approx(0.996)
    assert cosine(100, 100, 0.992, 1.0) == pytest.approx(1.0)
    assert cosine(5, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
