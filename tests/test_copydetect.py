"""Pixel copy detection (dinoflow.curation.copydetect) on hand-built Fashion-MNIST cases."""

from __future__ import annotations

import numpy as np
import pytest

from dinoflow.curation import copydetect as cd


@pytest.fixture(scope="module")
def fm():
    from dinoflow.data.idx import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    return x[:600].copy(), y[:600].copy()


def _copies(img: np.ndarray) -> dict[str, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(img)
    crop = np.array(im.crop((3, 2, 24, 23)).resize((28, 28), Image.BILINEAR))
    rot = np.array(im.rotate(-11.3, resample=Image.BILINEAR))
    txt = im.copy()
    ImageDraw.Draw(txt).text((4, 17), "QX7", fill=255, font=ImageFont.load_default())
    return {"crop": crop, "rotate": rot, "text": np.array(txt), "flip": img[:, ::-1].copy()}


def test_grid_covers_the_planted_transforms():
    p = cd.CopyDetectParams()
    g = cd.alignment_grid(p)
    kinds = g.params[:, 0]
    assert set(np.unique(kinds)) == {cd.IDENTITY, cd.FLIP, cd.CROP, cd.ROTATE}
    sides = set(g.params[kinds == cd.CROP, 1].tolist())
    assert {20, 21, 22, 23, 24} <= sides  # the demo pool keeps 20-24 px of 28
    angles = set(np.abs(g.params[kinds == cd.ROTATE, 4]).tolist())
    assert set(range(5, 16)) <= angles
    nb = cd.neighbours(g, 1)
    assert (nb[:, 0] >= 0).all() and nb.shape[1] == 3  # a rotation and its +-1 degree neighbours


def test_robust_error_scores_copies_low_and_a_same_class_image_high(fm):
    import torch

    x, y = fm
    src, other = x[0], x[np.flatnonzero(y == y[0])[1]]
    p = cd.CopyDetectParams()
    grid = cd.alignment_grid(p)
    views = cd.warp(torch.from_numpy(src).float()[None], torch.from_numpy(grid.theta)[None])
    occ = cd.occluder_px(p)

    def best(img: np.ndarray) -> float:
        e = cd.robust_error(torch.from_numpy(img).float()[None], views, occ, p.min_contrast, p.min_kept_share)
        return float(e.min())

    for name, img in _copies(src).items():
        assert best(img) <= p.max_error, name
    assert best(other) > 2 * p.max_error  # a different image of the same class, best alignment
    assert best(np.zeros_like(src)) == float("inf")  # a blank image is never a copy


def test_detect_copies_finds_every_edit_and_no_distinct_image(fm):
    x, _ = fm
    evals = x[:300]
    rng = np.random.default_rng(0)
    srcs = rng.choice(300, 12, replace=False)
    planted = [
        (s, k, v)
        for s, kind in zip(srcs, ("crop", "rotate", "text", "flip") * 3, strict=True)
        for k, v in _copies(evals[s]).items()
        if k == kind
    ]
    pool = np.concatenate([np.stack([v for _, _, v in planted]), x[300:600]])  # 300 distinct test images
    m = cd.detect_copies(pool, evals)
    n = len(planted)
    assert m.is_copy[:n].all(), [(k, float(e)) for (_, k, _), e in zip(planted, m.error[:n], strict=True)]
    assert (m.eval_row[:n] == [s for s, _, _ in planted]).all()
    assert not m.is_copy[n:].any(), np.sort(m.error[n:])[:5]
    assert m.alignment_counts()["crop"] >= 3 and m.alignment_counts()["rotate"] >= 3


def test_detect_copies_rejects_wrong_sizes():
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        cd.detect_copies(np.zeros((3, 32, 32), np.uint8), np.zeros((3, 28, 28), np.uint8))


def test_thumbnail_operator_matches_rendered_views(fm):
    import torch

    x, _ = fm
    p = cd.CopyDetectParams()
    g = cd.alignment_grid(p)
    e = torch.from_numpy(x[:8]).float()
    op = cd.thumbnail_operator(g, p.px, p.desc_px)
    fast = (e.reshape(8, -1) @ op).view(-1, p.desc_px, p.desc_px)
    views = cd.warp(e, torch.from_numpy(g.theta)[None].expand(8, len(g), 2, 3)).reshape(-1, p.px, p.px)
    slow = cd.thumbnails(views, p.desc_px)
    assert torch.allclose(fast, slow, atol=1e-3), float((fast - slow).abs().max())


@pytest.mark.parametrize("exact_max_views", [200_000, 1], ids=["flat", "ivf"])
def test_chunked_index_equals_one_index(fm, exact_max_views):
    """Chunks of the expanded index, searched one at a time and merged, give exactly the candidates
    and matches of a single index (flat, or IVF under the one trained quantizer)."""
    x, _ = fm
    evals = x[:60]
    crop = np.array([_copies(evals[i])["crop"] for i in (3, 17, 41)])
    pool = np.concatenate([crop, evals[[5, 58]][:, :, ::-1], x[100:140]])
    v = len(cd.alignment_grid(cd.CopyDetectParams()))
    one = cd.CopyDetectParams(exact_max_views=exact_max_views, index_chunk_views=10**9)
    many = cd.CopyDetectParams(exact_max_views=exact_max_views, index_chunk_views=7 * v)  # 9 chunks
    assert cd.index_plan(60, v, many)[1] == 7 and cd.index_plan(60, v, one)[1] == 60
    a, b = cd.detect_copies(pool, evals, one), cd.detect_copies(pool, evals, many)
    assert a.index_reason.endswith("1 chunk(s) of <= 24720 views"), a.index_reason
    assert "9 chunk(s)" in b.index_reason and (exact_max_views == 1) == ("IVF" in b.index_reason)
    assert a.n_candidates == b.n_candidates > 0
    for f in ("error", "eval_row", "alignment", "is_copy"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.is_copy[:5].all() and (a.eval_row[:5] == [3, 17, 41, 5, 58]).all()


def test_coarse_index_grid_is_covered_by_verification_neighbourhoods():
    p = cd.CopyDetectParams(index_crop_step=2)
    fine, coarse = cd.alignment_grid(p), cd.index_grid(p)
    assert len(coarse) < len(fine) / 2
    nb, counts = cd.neighbour_lists(coarse, fine, p.refine_deg, p.index_crop_step - 1)
    assert set(nb.ravel().tolist()) == set(range(len(fine)))  # every 1 px crop is verified somewhere
    assert counts.max() == 27 and counts[:2].tolist() == [1, 1]  # 3 sides x 3 x 3 offsets; identity, flip


def _global_edits(img: np.ndarray) -> dict[str, np.ndarray]:
    import io

    from PIL import Image, ImageFilter

    im = Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=40)
    return {
        "blur": np.array(im.filter(ImageFilter.GaussianBlur(1.0))),
        "jpeg": np.array(Image.open(io.BytesIO(buf.getvalue())).convert("L")),
        "brightness": np.clip(img * 0.8 + 20, 0, 255).astype(np.uint8),
    }


def test_global_edits_are_copies_and_distinct_images_are_not(fm):
    from dataclasses import replace

    x, _ = fm
    evals = x[:300]
    srcs = np.random.default_rng(1).choice(300, 9, replace=False)
    edits = [
        (s, v)
        for s, kind in zip(srcs, ("blur", "jpeg", "brightness") * 3, strict=True)
        for v in [_global_edits(evals[s])[kind]]
    ]
    pool = np.concatenate([np.stack([v for _, v in edits]), x[300:600]])  # 300 distinct test images
    p = cd.CopyDetectParams()
    assert p.global_max_error == 0  # off unless set (the dedup stage's spec sets it)
    on = cd.detect_copies(pool, evals, replace(p, global_max_error=0.012))
    n = len(edits)
    assert on.is_copy[:n].all(), on.global_error[:n]
    assert (on.eval_row[:n] == srcs).all()
    assert not on.is_copy[n:].any() and np.sort(on.global_error[n:])[0] > 0.012
    assert on.alignment_counts()["global"] >= 3  # the blurred copies have no geometric alignment
    off = cd.detect_copies(pool, evals, p)
    assert off.alignment_counts()["global"] == 0 and not np.isfinite(off.global_error).any()
    assert not off.is_copy[:n].all()  # a 1 px blur is beyond the geometric verification
