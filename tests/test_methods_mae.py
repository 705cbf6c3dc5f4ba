"""MAE on ViT (tokens dropped) and XCiT (mask tokens in place), on real Fashion-MNIST images."""

from __future__ import annotations

import pytest
import torch
from mim_helpers import decreased, fmnist_images, train_steps

from dinoflow.errors import SpecError
from dinoflow.methods import method_class
from dinoflow.methods.base import BatchView, StepState
from dinoflow.methods.mae import MAE
from dinoflow.methods.mim_config import DecoderConfig, MAEConfig
from dinoflow.models import create_backbone

torch.set_num_threads(2)
DEC = DecoderConfig(dim=32, depth=1, heads=2)


def _mae(backbone: str, **kw) -> MAE:
    torch.manual_seed(0)
    return MAE(create_backbone(backbone), MAEConfig(decoder=DEC, **kw))


@pytest.mark.parametrize("backbone", ["vit_test_p4_28", "xcit_test_p8_28"])
def test_mae_trains_on_fashion_mnist(backbone):
    m = _mae(backbone)
    assert m.encoder_masking == ("drop" if backbone.startswith("vit") else "mask_token")
    losses = train_steps(m, fmnist_images(), steps=12)
    assert decreased(losses), losses
    assert m.export_backbone() is m.backbone


def test_mae_masks_three_quarters_and_is_registered():
    m = _mae("vit_test_p4_28")
    b = m.prepare(fmnist_images()[:8], BatchView(torch.Generator().manual_seed(0), 0, 8))
    assert b["x"].shape == (8, 1, 28, 28) and b["mask"].shape == (8, 49)
    assert (b["mask"].sum(1) == round(0.75 * 49)).all()  # MAE default ratio
    assert method_class("mae") is MAE


def test_all_visible_input_has_no_reconstruction_loss():
    m = _mae("vit_test_p4_28", mask_ratio=0.0)
    b = m.prepare(fmnist_images()[:8], BatchView(torch.Generator().manual_seed(0), 0, 8))
    assert not b["mask"].any()
    loss, _ = m(b, StepState(0, 1))
    loss.backward()
    assert loss.item() == 0.0
    assert m.decoder.pred.weight.grad is None or m.decoder.pred.weight.grad.abs().sum() == 0


def test_global_batch_split_over_ranks_draws_the_same_crops_and_masks():
    m = _mae("xcit_test_p8_28")
    imgs = fmnist_images()[:8]
    full = m.prepare(imgs, BatchView(torch.Generator().manual_seed(5), 0, 8))
    half = m.prepare(imgs[4:], BatchView(torch.Generator().manual_seed(5), 4, 8))
    assert torch.equal(full["mask"][4:], half["mask"])
    torch.testing.assert_close(full["x"][4:], half["x"])
    assert full["x"].shape[-1] == 32  # XCiT p8: 28 px rounded up to the patch grid


def test_xcit_drop_mode_is_refused():
    with pytest.raises(SpecError, match="mask_token"):
        _mae("xcit_test_p8_28", encoder_masking="drop")
