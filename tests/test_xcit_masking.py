"""XCiT with masking: hidden patches cannot leak into the encoder (conv stem, LPI), for MAE/SplitMask
on ViT (dropped tokens) and XCiT (zeroed pixels + mask tokens in place); DINOv2 trains on XCiT."""

from __future__ import annotations

import pytest
import torch
from mim_helpers import decreased, fmnist_images, train_steps

from dinoflow.methods.config import CropsConfig, DINOv2Config
from dinoflow.methods.dinov2 import DINOv2
from dinoflow.methods.mae import MAE
from dinoflow.methods.masking import random_masking
from dinoflow.methods.mim_config import DecoderConfig, MAEConfig
from dinoflow.models import create_backbone

torch.set_num_threads(2)


@pytest.mark.parametrize("backbone", ["vit_test_p4_28", "xcit_test_p8_28"])
def test_encoder_output_ignores_the_pixels_of_hidden_patches(backbone):
    torch.manual_seed(0)
    m = MAE(create_backbone(backbone), MAEConfig(decoder=DecoderConfig(dim=32, depth=1, heads=2))).eval()
    p, (gh, gw) = m.patch_px, m.grid
    x = torch.randn(4, 1, m.crop_px, m.crop_px)
    mask, _ = random_masking(4, gh * gw, 0.5, torch.Generator().manual_seed(0))
    pix = mask.view(4, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)
    y = torch.where(pix, torch.randn_like(x) * 3, x)  # new content in the hidden patches only
    with torch.no_grad():
        a, b = m.encode(x, mask), m.encode(y, mask)
        torch.testing.assert_close(a["tokens"], b["tokens"])
        torch.testing.assert_close(a["cls"], b["cls"])
        # ...while a change in a visible patch does reach the encoder.
        z = torch.where(~pix, torch.randn_like(x), x)
        assert not torch.allclose(m.encode(z, mask)["tokens"], a["tokens"])
    if backbone.startswith("xcit"):
        # Without zeroing, XCiT's 3x3 stride-2 conv stem would see hidden border pixels: the leak is real.
        with torch.no_grad():
            raw_a = m.backbone.encode(x, masks=mask)["patch"]
            raw_b = m.backbone.encode(y, masks=mask)["patch"]
        assert not torch.allclose(raw_a, raw_b)


def test_dinov2_trains_on_xcit():
    torch.manual_seed(0)
    cfg = DINOv2Config(
        head_prototypes=256,
        ibot_prototypes=256,
        head_hidden_dim=64,
        head_bottleneck_dim=32,
        teacher_temp_warmup_epochs=0,
    )
    crops = CropsConfig(global_crop_px=28, local_crop_px=12, local_crops_number=2)
    m = DINOv2(create_backbone("xcit_test_p8_28"), cfg, crops)
    losses = train_steps(m, fmnist_images(), steps=12, batch=32)
    assert decreased(losses, 0.95), losses
