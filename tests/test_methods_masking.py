"""Masks for MAE and SplitMask, and the masked reconstruction losses."""

from __future__ import annotations

import pytest
import torch

from dinoflow.losses.reconstruction import masked_cross_entropy, masked_mse, normalize_patches
from dinoflow.methods.masking import random_masking, split_masks
from dinoflow.models.patches import patchify, unpatchify


@pytest.mark.parametrize("n", [2, 16, 49, 196])
def test_split_masks_are_disjoint_halves_covering_every_patch_once(n):
    g = torch.Generator().manual_seed(n)
    mask_a, mask_b = split_masks(64, n, generator=g)
    vis_a, vis_b = ~mask_a, ~mask_b
    assert not (vis_a & vis_b).any()  # disjoint
    assert ((vis_a.int() + vis_b.int()) == 1).all()  # every patch seen by exactly one view
    assert (vis_a.sum(1) == n // 2).all() and (vis_b.sum(1) == n - n // 2).all()
    # Random per image: not one fixed split for the whole batch.
    assert len({tuple(r.tolist()) for r in vis_a}) > 1
    with pytest.raises(ValueError):
        split_masks(2, 1)


def test_split_masks_deterministic_for_a_generator_seed():
    a1, _ = split_masks(4, 49, generator=torch.Generator().manual_seed(3))
    a2, _ = split_masks(4, 49, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2)


def test_random_masking_ratio_and_kept_ids():
    mask, keep = random_masking(8, 49, 0.75, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 37).all() and keep.shape == (8, 12)
    assert not mask.gather(1, keep).any()  # kept ids are exactly the unmasked patches
    assert (keep.diff(dim=1) > 0).all()  # in token order
    with pytest.raises(ValueError):
        random_masking(2, 49, 1.0)


def test_patchify_round_trip_and_norm_pix():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    torch.testing.assert_close(unpatchify(p, 4, 3, (2, 3)), x)
    torch.testing.assert_close(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    n = normalize_patches(p)
    torch.testing.assert_close(n.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.zeros(1, 1, 7, 8), 4)


def test_masked_losses_count_only_masked_patches():
    pred, target = torch.randn(2, 4, 3, requires_grad=True), torch.randn(2, 4, 3)
    mask = torch.tensor([[True, False, False, False], [False, False, True, False]])
    want = ((pred[0, 0] - target[0, 0]).pow(2).mean() + (pred[1, 2] - target[1, 2]).pow(2).mean()) / 2
    torch.testing.assert_close(masked_mse(pred, target, mask), want)
    # Changing a visible patch's prediction changes nothing; all-visible gives exactly zero, no gradient.
    pred2 = pred.detach().clone()
    pred2[0, 1] += 100
    torch.testing.assert_close(masked_mse(pred2, target, mask), want.detach())
    none = torch.zeros(2, 4, dtype=torch.bool)
    loss = masked_mse(pred, target, none)
    loss.backward()
    assert loss.item() == 0.0 and pred.grad.abs().sum() == 0
    logits, codes = torch.randn(2, 4, 5), torch.randint(5, (2, 4))
    ce = masked_cross_entropy(logits, codes, mask)
    want_ce = (
        torch.nn.functional.cross_entropy(logits[0, :1], codes[0, :1])
        + torch.nn.functional.cross_entropy(logits[1, 2:3], codes[1, 2:3])
    ) / 2
    torch.testing.assert_close(ce, want_ce)
