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
