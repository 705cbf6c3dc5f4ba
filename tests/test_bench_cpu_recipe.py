"""``dinoflow bench cpu-recipe --set``: preset overrides, validated like a spec."""

from __future__ import annotations

import pytest

from dinoflow.errors import SpecError
from dinoflow.train.presets import get_preset
from dinoflow_tools.bench.cpu_recipe import apply_overrides


def test_set_overrides_nested_and_top_level_fields():
    cfg = apply_overrides(
        get_preset("fashion-mnist-cpu"),
        [
            "batch_size=256",
            "dinov2.momentum_start=0.99",
            "crops.global_scale_min=0.35",
            "backbone=vit_tiny_p4_28",
        ],
    )
    assert cfg.batch_size == 256 and cfg.dinov2.momentum_start == 0.99
    assert cfg.crops.global_scale_min == 0.35 and cfg.backbone == "vit_tiny_p4_28"
    assert cfg.epochs == get_preset("fashion-mnist-cpu").epochs  # untouched fields keep the preset's
    steps = apply_overrides(get_preset("fashion-mnist-cpu"), ["steps=10"])
    assert steps.steps == 10 and steps.epochs is None and steps.total_steps(60000) == 10


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("batch_size", "KEY=VALUE"),
        ("dinov2.no_such_field=1", "no field 'no_such_field'"),
        ("batch_size.x=1", "not a section"),
    ],
)
def test_set_rejects_unknown_keys(item, match):
    with pytest.raises(SpecError, match=match):
        apply_overrides(get_preset("fashion-mnist-cpu"), [item])


@pytest.mark.parametrize("preset", ["fashion-mnist-cpu", "demo"])
def test_presets_hold_the_teacher_temperature_and_a_set_restores_dinov2s_rise(preset):
    """The CPU and demo presets keep DINOv2's warm-up start (0.04) for the whole run (chosen on
    validation images, presets.py); ``--set dinov2.teacher_temp_end=0.07`` gives DINOv2's linear rise."""
    from dinoflow.methods.base import StepState
    from dinoflow.train.trainer import build_method

    cfg = get_preset(preset)
    n, per_epoch = cfg.total_steps(60000), 60000 // cfg.batch_size
    held = build_method(cfg)
    temps = [
        held.teacher_temp(StepState(step=s, max_steps=n, steps_per_epoch=per_epoch))
        for s in (0, n // 2, n - 1)
    ]
    assert temps == pytest.approx([0.04, 0.04, 0.04])
    rise = build_method(apply_overrides(cfg, ["dinov2.teacher_temp_end=0.07"]))
    warm = round(cfg.dinov2.teacher_temp_warmup_epochs * per_epoch)
    at = lambda s: rise.teacher_temp(StepState(step=s, max_steps=n, steps_per_epoch=per_epoch))  # noqa: E731
    assert at(0) == pytest.approx(0.04) and at(warm // 2) == pytest.approx(0.055, abs=1e-3)
    assert at(warm) == pytest.approx(0.07) and at(n - 1) == pytest.approx(0.07)


def test_set_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        apply_overrides(get_preset("fashion-mnist-cpu"), ["batch_size=0"])


def test_linear_probe_on_frozen_features_separates_fashion_mnist_and_not_shuffled_labels():
    """The bench's linear figure is the evaluate stage's probe: well above chance on real images, at
    chance when the labels carry no information (so it is not scoring the labels' order)."""
    import torch

    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow.models.backbone import create_backbone
    from dinoflow_tools.bench.cpu_recipe import linear_top1

    torch.manual_seed(0)
    x, y = load_fashion_mnist("train")
    images = torch.from_numpy(x[:1200].copy()).unsqueeze(1)
    labels = torch.from_numpy(y[:1200].copy()).long()
    backbone = create_backbone("vit_test_p4_28")
    acc, cfg = linear_top1(backbone, images[:1000], labels[:1000], images[1000:], labels[1000:])
    assert acc > 0.25 and cfg  # a random 32-d ViT, 40 probe steps: ~0.33 (chance 0.1)
    shuffled = labels[:1000][torch.randperm(1000)]
    acc_shuffled, _ = linear_top1(backbone, images[:1000], shuffled, images[1000:], labels[1000:])
    assert acc_shuffled < 0.2
