"""SplitMask: disjoint halves, pixel and k-means targets, on ViT and XCiT, on real Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch
from mim_helpers import decreased, fmnist_images, train_steps

from dinoflow.errors import SpecError
from dinoflow.methods import method_class
from dinoflow.methods.base import BatchView, StepState
from dinoflow.methods.mim_config import DecoderConfig, SplitMaskConfig
from dinoflow.methods.splitmask import SplitMask, fit_tokenizer
from dinoflow.models import create_backbone

torch.set_num_threads(2)
DEC = DecoderConfig(dim=32, depth=1, heads=2)


def _sm(backbone: str, target: str = "pixels", **kw) -> SplitMask:
    torch.manual_seed(0)
    bb = create_backbone(backbone)
    cfg = SplitMaskConfig(decoder=DEC, target=target, n_codes=32, tokenizer_iters=5, **kw)
    tok = fit_tokenizer(fmnist_images(), bb, cfg, seed=0) if target == "kmeans" else None
    return SplitMask(bb, cfg, tok)


@pytest.mark.parametrize(
    "backbone,target",
    [
        ("vit_test_p4_28", "pixels"),
        ("vit_test_p4_28", "kmeans"),
        ("xcit_test_p8_28", "pixels"),
        ("xcit_test_p8_28", "kmeans"),
    ],
)
def test_splitmask_trains_on_fashion_mnist(backbone, target):
    m = _sm(backbone, target)
    losses = train_steps(m, fmnist_images(), steps=12)
    assert decreased(losses), losses


def test_prepare_gives_disjoint_halves_covering_every_patch_once():
    for backbone, n in (("vit_test_p4_28", 49), ("xcit_test_p8_28", 16)):
        m = _sm(backbone)
        b = m.prepare(fmnist_images()[:16], BatchView(torch.Generator().manual_seed(0), 0, 16))
        seen_a, seen_b = ~b["mask_a"], ~b["mask_b"]
        assert seen_a.shape == (16, n)
        assert ((seen_a.int() + seen_b.int()) == 1).all()
    assert method_class("splitmask") is SplitMask


def test_kmeans_codes_are_the_tokenizer_codes_of_the_crop_and_loss_terms_are_weighted():
    m = _sm("vit_test_p4_28", "kmeans", contrastive_loss_weight=0.0)
    b = m.prepare(fmnist_images()[:8], BatchView(torch.Generator().manual_seed(0), 0, 8))
    assert b["codes"].shape == (8, 49) and int(b["codes"].max()) < 32
    loss, logs = m(b, StepState(0, 1))
    assert logs["infonce_loss"] > 0 and loss.item() == pytest.approx(logs["mim_loss"].item(), rel=1e-6)


def test_kmeans_target_needs_a_matching_tokenizer():
    bb = create_backbone("vit_test_p4_28")
    lazy = SplitMask(bb, SplitMaskConfig(decoder=DEC, target="kmeans", n_codes=16, tokenizer_iters=2))
    view = BatchView(torch.Generator().manual_seed(0), 0, 4)
    with pytest.raises(SpecError, match="fit_data"):
        lazy.prepare(fmnist_images()[:4], view)
    lazy.fit_data(fmnist_images())
    assert lazy.prepare(fmnist_images()[:4], view)["codes"].shape == (4, 49)
    other = fit_tokenizer(
        fmnist_images(), create_backbone("xcit_test_p8_28"), SplitMaskConfig(n_codes=8, tokenizer_iters=1)
    )
    with pytest.raises(SpecError, match="do not match"):
        SplitMask(bb, SplitMaskConfig(decoder=DEC, target="kmeans"), other)
