"""DINOv2 method: teacher gets no gradient and follows the EMA formula exactly; masks respect the
ratio range; multi-crop is independent of the batch split; ViT and XCiT train a few steps with masks."""

from __future__ import annotations

import pytest
import torch

from dinoflow.data.augment import MultiCrop, MultiCropConfig
from dinoflow.data.masks import ibot_masks
from dinoflow.methods.base import BatchView, StepState, merge_groups
from dinoflow.methods.config import CropsConfig, DINOv2Config
from dinoflow.methods.dinov2 import DINOv2
from dinoflow.models import create_backbone

torch.set_num_threads(2)
SMALL = DINOv2Config(
    head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, freeze_prototypes_epochs=0
)
CROPS = CropsConfig(global_crop_px=28, local_crops_number=2, local_crop_px=12)


def _images(n=8, seed=0):
    from dinoflow.data.idx import load_fashion_mnist

    x, _ = load_fashion_mnist("test")
    return torch.from_numpy(x[seed : seed + n].copy()).unsqueeze(1)


def _step(method, opt, x, step=0, total=10):
    st = StepState(step, total, steps_per_epoch=5)
    batch = method.prepare(x, BatchView(torch.Generator().manual_seed(step), 0, x.shape[0]))
    loss, logs = method(batch, st)
    opt.zero_grad()
    loss.backward()
    method.after_backward(st)
    opt.step()
    return st, batch, loss, logs


def test_teacher_no_grad_and_exact_ema():
    torch.manual_seed(0)
    m = DINOv2(create_backbone("vit_test_p4_28"), SMALL, CROPS)
    opt = torch.optim.AdamW(merge_groups(m.param_groups()), lr=1e-3)
    st, _, _, _ = _step(m, opt, _images())
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert any(p.grad is not None for p in m.student.parameters())
    t_old = [p.detach().clone() for p in m.teacher.parameters()]
    mom = m.momentum(st)
    assert 0.992 <= mom < 1.0
    m.after_step(st)
    for t0, t1, s in zip(t_old, m.teacher.parameters(), m.student.parameters(), strict=True):
        torch.testing.assert_close(t1, mom * t0 + (1 - mom) * s.detach(), rtol=0, atol=1e-7)


def test_masks_respect_ratio_range():
    g = torch.Generator().manual_seed(0)
    for grid in ((7, 7), (16, 16), (4, 4)):
        n = grid[0] * grid[1]
        m = ibot_masks(g, 40, grid, sample_p=0.5, ratio_min_max=(0.1, 0.5))
        counts = m.sum(dim=1)
        assert m.shape == (40, n) and int((counts > 0).sum()) <= 20 and int((counts == 0).sum()) >= 20
        ratios = counts[counts > 0].float() / n
        assert ratios.max() <= 0.5 and ratios.min() >= (int(0.1 * n) / n) - 1e-6
    big = ibot_masks(g, 200, (16, 16))
    r = big.sum(1)[big.sum(1) > 0].float() / 256
    assert r.min() < 0.15 and r.max() > 0.45  # the whole range is used


def test_multicrop_independent_of_batch_split():
    cfg = MultiCropConfig(global_crop_px=28, local_crops_number=3, local_crop_px=12)
    mc = MultiCrop(cfg, (0.5,), (0.5,))
    x = _images(8)
    g_all, l_all = mc(x, torch.Generator().manual_seed(3))
    g_half, l_half = mc(x[4:], torch.Generator().manual_seed(3), offset=4, global_batch=8)
    torch.testing.assert_close(g_all.view(2, 8, 1, 28, 28)[:, 4:].reshape(-1, 1, 28, 28), g_half)
    torch.testing.assert_close(l_all.view(3, 8, 1, 12, 12)[:, 4:].reshape(-1, 1, 12, 12), l_half)
    assert g_all.shape == (16, 1, 28, 28) and not torch.equal(g_all[:8], g_all[8:])


@pytest.mark.parametrize(
    ("name", "centering"),
    [("vit_test_p4_28", "sinkhorn_knopp"), ("vit_test_p4_28", "ema"), ("xcit_test_p8_28", "sinkhorn_knopp")],
)
def test_backbones_train_with_masks(name, centering):
    torch.manual_seed(0)
    cfg = SMALL.model_copy(update={"centering": centering})
    m = DINOv2(create_backbone(name, drop_path_rate=0.1), cfg, CROPS)
    opt = torch.optim.AdamW(merge_groups(m.param_groups(0.9, 0.2)), lr=1e-3)
    before = [p.detach().clone() for p in m.student.parameters()]
    x = _images(8)
    for step in range(2):
        _, batch, loss, logs = _step(m, opt, x, step)
        assert batch["masks"] is not None and batch["masks"].any()
        assert torch.isfinite(loss) and {"dino_loss", "ibot_loss", "koleo_loss"} <= set(logs)
        m.after_step(StepState(step, 10))
    moved = sum(not torch.equal(a, b) for a, b in zip(before, m.student.parameters(), strict=True))
    assert moved > 0.9 * len(before)
    assert m.student["backbone"].mask_token.abs().sum() > 0  # the mask token learns


def test_param_groups_layer_decay():
    m = DINOv2(create_backbone("vit_test_p4_28"), SMALL, CROPS)
    groups = {g["name"]: g for g in m.param_groups(layer_decay=0.5, patch_embed_lr_mult=0.2)}
    depth = 2  # top layer id = depth + 1
    assert groups["student.backbone.model.blocks.1.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.5)
    assert groups["student.backbone.model.blocks.0.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.25)
    assert groups["student.backbone.model.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(
        0.5 ** (depth + 1) * 0.2
    )
    assert groups["student.backbone.model.norm.weight"]["wd_mult"] == 0.0
    assert groups["student.dino_head.prototypes"]["lr_mult"] == 1.0


def test_crop_size_must_fit_patch_size():
    from dinoflow.errors import SpecError

    with pytest.raises(SpecError, match="local_crop_px"):
        DINOv2(create_backbone("vit_test_p4_28"), SMALL, CROPS.model_copy(update={"local_crop_px": 14}))
