"""Linear-probe grid and logistic regression on real Fashion-MNIST pixels (small subsets)."""

from __future__ import annotations

import pytest
import torch

from dinoflow.data.idx import load_fashion_mnist
from dinoflow.errors import SpecError
from dinoflow.eval.features import FeatureSet
from dinoflow.eval.linear import (
    heldout_split,
    linear_protocol,
    probe_grid,
    select_linear_probe,
    select_logistic_regression,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pixels():
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    tr = FeatureSet.from_pixels(torch.from_numpy(xtr[:2000].copy()), torch.from_numpy(ytr[:2000].copy()))
    te = FeatureSet.from_pixels(torch.from_numpy(xte[:500].copy()), torch.from_numpy(yte[:500].copy()))
    return tr, te


def _multi_block(fs: FeatureSet) -> FeatureSet:
    """A 4-block feature set with patch means, built from pixels, to exercise the whole grid."""
    x = fs.cls[:, :196]
    blocks = torch.stack([x, x.roll(1, 1), x.roll(2, 1), fs.cls[:, 196:392]], 1)
    return FeatureSet(blocks, fs.cls[:, 392:588], fs.labels)


def test_grid_covers_cls_avgpool_and_block_counts(pixels):
    fs = _multi_block(pixels[0])
    names = {c.name for c in probe_grid(fs, [0.1, 1.0])}
    assert names == {
        f"blocks{b}_{p}_lr{lr}" for b in (1, 4) for p in ("cls", "cls+avgpool") for lr in ("0.1", "1")
    }
    assert fs.linear_input(4, True).shape == (2000, 4 * 196 + 196)
    assert len(probe_grid(pixels[0], [0.1])) == 1  # raw pixels: one block, no patches


def test_selection_never_reads_test_labels(pixels):
    train, test = pixels
    rep = linear_protocol(train, test, lrs=[0.01, 0.1, 1.0], epochs=4, seed=0)
    sel = rep.selection
    assert sel.heldout_indices.max() < len(train) and len(sel.heldout_indices) == 200  # held out of TRAIN
    assert rep.test_top1 > 0.70, rep.test_top1  # raw-pixel linear on FMNIST is ~84% at full size
    # Scrambled test labels change only the test score, never the choice or the validation scores.
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
    scrambled = FeatureSet(test.cls_blocks, test.patch_mean, test.labels[perm])
    rep2 = linear_protocol(train, scrambled, lrs=[0.01, 0.1, 1.0], epochs=4, seed=0)
    assert rep2.selection.best == sel.best and rep2.selection.val_top1 == sel.val_top1
    assert rep2.test_top1 < 0.3 < rep.test_top1
    # ... while the choice does follow the TRAIN labels it is given.
    shuffled = train.labels[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    sel3 = select_linear_probe(train, shuffled, lrs=[0.01, 0.1, 1.0], epochs=4, seed=0)
    assert max(sel3.val_top1.values()) < 0.3 < max(sel.val_top1.values())


def test_logistic_regression_selects_c_on_heldout_train(pixels):
    train, test = pixels
    sel = select_logistic_regression(train.cls[:1000], train.labels[:1000], cs=[0.01, 1.0], max_iter=60)
    assert set(sel.val_top1) == {"C=0.01", "C=1"}
    assert sel.best_c == max([0.01, 1.0], key=lambda c: sel.val_top1[f"C={c:g}"])
    acc = float((sel.predict(test.cls) == test.labels).float().mean())
    assert acc > 0.70, acc


def test_heldout_split_is_a_partition():
    fit, val = heldout_split(50, 0.2, seed=3)
    assert len(val) == 10 and sorted(fit.tolist() + val.tolist()) == list(range(50))
    with pytest.raises(SpecError, match="heldout_fraction"):
        heldout_split(50, 1.5, seed=0)
