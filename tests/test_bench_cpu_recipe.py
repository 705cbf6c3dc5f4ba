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
