"""Edit families for copies (dinoflow.data.edits): deterministic per seed, any size, gray or RGB, and a
held-out split that the copy descriptor's training never touches."""

from __future__ import annotations

import pytest
import torch

from dinoflow.data.edits import (
    FAMILIES,
    HELDOUT_FAMILIES,
    PRIMITIVE_TRAIN_FAMILIES,
    TRAIN_FAMILIES,
    apply_edit,
    edit_batch,
    random_copy,
    seed_generator,
)

SIZE_CHANGING = {"resize", "border", "compose_seen", "compose_heldout"}


@pytest.fixture(scope="module")
def fmnist():
    from dinoflow.data.idx import load_fashion_mnist

    x, _ = load_fashion_mnist("test")
    return torch.from_numpy(x[:6].copy())


def _rgb(h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(h * 1000 + w)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deterministic_and_shape_safe(family, fmnist):
    inputs = [
        fmnist[0],
        fmnist[1][None],
        _rgb(40, 64),
        _rgb(37, 23),
        torch.full((9, 12), 128, dtype=torch.uint8),
    ]
    for img in inputs:
        a = apply_edit(img, family, seed_generator(7))
        b = apply_edit(img, family, seed_generator(7))
        assert torch.equal(a, b), f"{family} is not a function of (image, seed) on {tuple(img.shape)}"
        assert a.dtype == torch.uint8 and a.ndim == img.ndim
        if img.ndim == 3:
            assert a.shape[0] == img.shape[0], f"{family} changed the channels"
        if family not in SIZE_CHANGING:
            assert a.shape == img.shape, f"{family} changed the size {tuple(img.shape)} -> {tuple(a.shape)}"
        assert min(a.shape[-2:]) >= 2


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mirror"])
def test_random_families_depend_on_the_seed_and_change_the_image(family, fmnist):
    img = fmnist[2]
    outs = [apply_edit(img, family, seed_generator(s)) for s in range(4)]
    assert any(o.shape != outs[0].shape or not torch.equal(o, outs[0]) for o in outs[1:]), family
    assert any(o.shape != img.shape or not torch.equal(o, img) for o in outs), (
        f"{family} left the image as it was"
    )


def test_mirror_is_a_left_right_flip(fmnist):
    assert torch.equal(apply_edit(fmnist[0], "mirror", seed_generator(0)), fmnist[0].flip(-1))


def test_split_seen_and_heldout():
    assert len(HELDOUT_FAMILIES) >= 3
    assert not set(TRAIN_FAMILIES) & set(HELDOUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES) == set(FAMILIES)
    assert set(PRIMITIVE_TRAIN_FAMILIES) <= set(TRAIN_FAMILIES)
    assert all(not FAMILIES[f].heldout for f in PRIMITIVE_TRAIN_FAMILIES)


def test_bad_input_is_one_clear_line(fmnist):
    with pytest.raises(ValueError, match="uint8"):
        apply_edit(fmnist[0].float(), "blur", seed_generator(0))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        apply_edit(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "blur", seed_generator(0))
    with pytest.raises(ValueError, match="unknown edit famil"):
        apply_edit(fmnist[0], "sepia", seed_generator(0))


def test_batch_copies_depend_on_each_sample_seed_only(fmnist):
    x = fmnist[:, None]
    seeds = torch.arange(6) * 101
    whole = edit_batch(x, seeds, PRIMITIVE_TRAIN_FAMILIES, 28)
    halves = torch.cat(
        [
            edit_batch(x[:3], seeds[:3], PRIMITIVE_TRAIN_FAMILIES, 28),
            edit_batch(x[3:], seeds[3:], PRIMITIVE_TRAIN_FAMILIES, 28),
        ]
    )
    assert whole.shape == (6, 1, 28, 28) and whole.dtype == torch.float32
    assert torch.equal(whole, halves)
    assert 0.0 <= float(whole.min()) and float(whole.max()) <= 1.0


def test_random_copy_chains_distinct_families(fmnist):
    y, names = random_copy(fmnist[0], PRIMITIVE_TRAIN_FAMILIES, seed_generator(3), 2, 3)
    assert 2 <= len(names) <= 3 and len(set(names)) == len(names)
    assert set(names) <= set(PRIMITIVE_TRAIN_FAMILIES)
    y0, none = random_copy(fmnist[0], PRIMITIVE_TRAIN_FAMILIES, seed_generator(3), 0, 0)
    assert none == [] and torch.equal(y0, fmnist[0])
