"""Copy detection for decontamination: which pool images are edited copies of an evaluation image.

DINOv2 decontaminates with a copy-detection embedding (an SSCD-style network trained to map edited
copies together) and a cosine threshold of 0.45. We have no such network: the embed stage gives
either a training-free pixel descriptor or a briefly bootstrapped SSL backbone, and neither maps a
crop, a rotation or a caption overlay near its source (measured on the demo pool: crop recall ~0,
rotation <= 0.15, text <= 0.57). This module closes that gap on pixels, in two steps:

1. **Candidates: an expanded evaluation index.** Every evaluation image is rendered under a grid
   of canonical views (identity, mirror, crops keeping 68-90 % of the side at every side and 1 px
   offset, rotations of +-1..15 degrees: 412 views at 28 px) and each view is described by a
   standardised ``desc_px`` thumbnail (cosine = pixel correlation) that maps back to its
   evaluation row. Every pool image queries the index with three regions of itself: the whole
   image and its top and bottom two thirds, so a caption in the top or bottom third leaves one
   query untouched. The best ``k`` distinct evaluation rows per region above ``candidate_cos``,
   with the view that matched, are the candidates. The thumbnails of all views come from one
   matrix product per evaluation image (warping and pooling are linear: ``thumbnail_operator``).
   The index is built and searched in chunks of at most ``index_chunk_views`` views and the
   per-query results merged, so memory is bounded whatever the evaluation set's size; above
   ``exact_max_views`` views in all, each chunk is an IVF index under one coarse quantizer per
   region, so chunked and unchunked searches return the same candidates (``index_plan``).
2. **Verification: a robust error at the matched alignment.** Each candidate is warped at ``px``
   resolution by its view (rotations also +-``refine_deg``). The pool image is fitted as
   ``a * view + b`` (brightness and contrast changes, ``a >= 0``) and the error is the mean
   squared residual **outside the worst-matching window** of ``occluder_frac`` of the image (an
   overlaid caption, logo or watermark), refitted once without that window, over the pool image's
   variance there (or the plain residual, whichever is lower). The window may not hide most of the
   source view, and flat images are never copies. A pair is a copy when its error is at most
   ``max_error``.

Why the window and not a pixel quantile: two plain Fashion-MNIST dresses agree on ~90 % of their
pixels (black background, saturated body) and differ along their whole outline; dropping the
worst 10 % of pixels makes them "identical", while a caption's pixels sit in one compact box.
Measured on 600 planted copies and the 1,000 hardest (pool, eval) pairs by 14 px correlation:
crop, rotation and caption copies score <= 0.005, the hardest distinct pairs >= 0.014.

Global edits that change every pixel (blur, JPEG, brightness with clipping) score 0.07-0.25 here.
With ``global_max_error`` > 0 a second check verifies them (``global_error``): the candidate
evaluation image, or its mirror, blurred by a few sigmas, and the pool image, both low-passed, must
correlate so well that at most ``global_max_error`` of the pool image's variance is left. Measured
on a 20k demo pool (seed 1, 500 planted test copies, 11k clean Fashion-MNIST train images against
the 10k test images): planted blur copies <= 0.0024, JPEG 95 % <= 0.010, brightness 95 % <= 0.0073;
clean Fashion-MNIST pairs >= 0.0215. An embedding threshold on a pixel descriptor cannot separate
them: the clean pairs reach 14 px correlations of 0.985, above JPEG copies' 0.984.

Cost. The index holds ``n_eval * 412`` thumbnails per region (100-d at ``desc_px`` 10, ~400 bytes
each; with the descriptors and the index copy ~1.2 kB per view), so it is built and searched in
chunks of ``index_chunk_views`` views (500k: ~0.6 GB) whatever the evaluation set's size.
Verification is ``n_candidates * (1..3)`` warps of ``px`` squared, in chunks of ``chunk``
candidates. Measured on 1 thread of a shared 2-core machine (load ~5), Fashion-MNIST train (60k
pool) against test (10k evaluation images, 4.12M views per region, 9 chunks): 491 s for the
candidates, 73 s to verify 297k pairs, peak RSS 1.7 GB (see the README for the unchunked figure).
A coarser candidate grid (``index_crop_step`` 2: 172 views, 3.6x less candidate time, each crop
verified over +-1 px of side and offset) missed 28 % of 40 planted crop copies (1 px grid: none),
so the 1 px grid stays the default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

log = logging.getLogger(__name__)

# alignment kinds
IDENTITY, FLIP, CROP, ROTATE = 0, 1, 2, 3
KIND_NAMES = ("identity", "flip", "crop", "rotate")
REGIONS = ("full", "top", "bottom")


@dataclass(frozen=True)
class CopyDetectParams:
    """Parameters of ``detect_copies`` (the dedup stage's ``copy_detection`` spec, as plain data)."""

    px: int = 28  # working resolution (grayscale px x px)
    crop_min_frac: float = 0.68  # smallest crop side kept, as a share of the image side
    crop_max_frac: float = 0.9
    max_angle_deg: int = 15
    desc_px: int = 10  # thumbnail side of the candidate descriptor
    refine_deg: int = 1  # verification also tries rotations this many degrees from the view's
    min_kept_share: float = 0.3  # the window may hide at most 70 % of the source view's variance
    exact_max_views: int = 200_000  # larger expanded indexes are searched with IVF (dinoflow.curation.knn)
    index_chunk_views: int = 500_000  # views per index chunk (bounds memory; see index_plan)
    index_crop_step: int = 1  # crop offsets of the candidate index (verification: every 1 px)
    k: int = 2  # distinct evaluation rows per pool image and region
    candidate_cos: float = 0.85  # a candidate's thumbnail correlation must exceed this
    occluder_frac: tuple[float, float] = (0.33, 0.8)  # (height, width) of the ignored window
    max_error: float = 0.008
    min_contrast: float = 8.0  # pool images flatter than this (grey-level std) are never copies
    chunk: int = 2048  # candidates verified per batch
    # global edits (blur, JPEG, brightness): 0 = off; see global_error
    global_max_error: float = 0.0
    blur_sigmas: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    lowpass_sigma: float = 0.7


@dataclass
class Alignments:
    """Alignments as (kind, side, x, y, angle) rows and their ``affine_grid`` matrices."""

    params: np.ndarray  # int64 [A, 5]
    theta: np.ndarray  # float32 [A, 2, 3]

    def __len__(self) -> int:
        return len(self.params)

    def name(self, i: int) -> str:
        kind, side, x, y, angle = (int(v) for v in self.params[i])
        if kind == CROP:
            return f"crop {side}px at ({x}, {y})"
        if kind == ROTATE:
            return f"rotate {angle} deg"
        return KIND_NAMES[kind]


def _theta(kind: int, side: int, x: int, y: int, angle: int, px: int) -> list[list[float]]:
    """``affine_grid`` matrix (output -> input, normalised coordinates, align_corners=False)."""
    if kind == FLIP:
        return [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    if kind == CROP:  # output pixel centre u maps to input x + (u + 1) / 2 * side
        s = side / px
        return [[s, 0.0, (2 * x + side) / px - 1], [0.0, s, (2 * y + side) / px - 1]]
    if kind == ROTATE:
        r = np.deg2rad(angle)
        return [[np.cos(r), -np.sin(r), 0.0], [np.sin(r), np.cos(r), 0.0]]
    return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def _alignments(rows: list[tuple[int, int, int, int, int]], px: int) -> Alignments:
    params = np.array(rows, np.int64).reshape(-1, 5)
    theta = np.array([_theta(*r, px) for r in rows], np.float32).reshape(-1, 2, 3)
    return Alignments(params, theta)


def crop_sides(p: CopyDetectParams) -> range:
    return range(int(np.floor(p.crop_min_frac * p.px)), int(np.ceil(p.crop_max_frac * p.px)) + 1)


def _lattice(hi: int, step: int) -> list[int]:
    return sorted(set(range(0, hi + 1, step)) | {hi})


def alignment_grid(p: CopyDetectParams, crop_step: int = 1) -> Alignments:
    """The canonical views: identity, mirror, crops at every side and ``crop_step`` px offset (each
    side's last offset included), every degree. Verification uses the 1 px grid."""
    rows = [(IDENTITY, p.px, 0, 0, 0), (FLIP, p.px, 0, 0, 0)]
    for s in crop_sides(p):
        offsets = _lattice(p.px - s, crop_step)
        rows += [(CROP, s, x, y, 0) for x in offsets for y in offsets]
    rows += [(ROTATE, p.px, 0, 0, a) for a in range(-p.max_angle_deg, p.max_angle_deg + 1) if a]
    return _alignments(rows, p.px)


def index_grid(p: CopyDetectParams) -> Alignments:
    """The views of the candidate index: crops at every ``index_crop_step`` px offset."""
    return alignment_grid(p, p.index_crop_step)


def neighbour_lists(
    coarse: Alignments, fine: Alignments, radius_deg: int = 1, radius_px: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """int64 [A, M] (padded by repeating) and int64 [A] counts: for each ``coarse`` alignment, the
    ``fine`` ones of its kind within ``radius_px`` of its side and offset and ``radius_deg`` of its
    angle (the index picks a view to about a degree and ``index_crop_step`` px; verification refines)."""
    c, f = coarse.params[:, None], fine.params[None]
    near = (
        (c[..., 0] == f[..., 0])
        & (np.abs(c[..., 1:4] - f[..., 1:4]) <= radius_px).all(-1)
        & (np.abs(c[..., 4] - f[..., 4]) <= radius_deg)
    )
    counts = near.sum(1)
    out = np.empty((len(coarse), int(counts.max())), np.int64)
    for i, row in enumerate(near):
        out[i] = np.resize(np.flatnonzero(row), out.shape[1])
    return out, counts


def neighbours(grid: Alignments, radius_deg: int = 1) -> np.ndarray:
    """int64 [A, M]: each alignment and the rotations within ``radius_deg`` of it, padded."""
    return neighbour_lists(grid, grid, radius_deg)[0]


def warp(images, theta):
    """float [B, px, px] images, float [B, M, 2, 3] alignments -> [B, M, px, px] (bilinear, zero fill)."""
    import torch.nn.functional as F

    b, m = theta.shape[:2]
    px = images.shape[-1]
    grid = F.affine_grid(theta.reshape(b * m, 2, 3), [b * m, 1, px, px], align_corners=False)
    src = images[:, None].expand(b, m, px, px).reshape(b * m, 1, px, px)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(b, m, px, px)


def thumbnails(images, desc_px: int):
    """float [N, px, px] -> float [N, desc_px, desc_px] area-averaged thumbnails."""
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(images[:, None].float(), desc_px)[:, 0]


def region_descriptors(thumbs, region: str) -> np.ndarray:
    """[N, desc_px, desc_px] thumbnails -> L2-normalised, standardised descriptors of one region
    (``top`` and ``bottom`` drop the other third of the rows)."""
    desc_px = thumbs.shape[-1]
    third = desc_px // 3
    x = thumbs
    if region == "top":
        x = x[:, : desc_px - third]
    elif region == "bottom":
        x = x[:, third:]
    x = x.flatten(1)
    x = x - x.mean(1, keepdim=True)
    return np.ascontiguousarray((x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)).numpy())


def descriptors(images, desc_px: int, region: str):
    """float [N, px, px] -> L2-normalised, standardised ``desc_px`` thumbnails of one region."""
    return region_descriptors(thumbnails(images, desc_px), region)


def thumbnail_operator(grid: Alignments, px: int, desc_px: int, *, batch: int = 64):
    """float [px * px, A * desc_px**2]: image -> the thumbnails of all its views, as one matrix.

    Warping (bilinear, zero fill) and area pooling are linear in the image, so
    ``image.flatten() @ op`` equals ``thumbnails(warp(image, theta))`` for every view at once (up to
    float rounding): one matrix product per chunk of evaluation images instead of rendering
    ``A`` full-size views of each."""
    import torch
    import torch.nn.functional as F

    n = px * px
    # pool[o]: the thumbnail cells that output pixel o of a view contributes to
    pool = F.adaptive_avg_pool2d(torch.eye(n).view(n, 1, px, px), desc_px).reshape(n, desc_px * desc_px)
    theta = torch.from_numpy(grid.theta)
    a = len(grid)
    out = torch.empty(a, n, desc_px * desc_px)
    for s in range(0, a, batch):
        th = theta[s : s + batch]
        m = len(th)
        g = F.affine_grid(th, [m, 1, px, px], align_corners=False).reshape(m, n, 2)
        ix = ((g[..., 0] + 1) * px - 1) / 2  # input coordinates (grid_sample, align_corners=False)
        iy = ((g[..., 1] + 1) * px - 1) / 2
        x0, y0 = ix.floor(), iy.floor()
        acc = torch.zeros(m * n, desc_px * desc_px)
        view = torch.arange(m).view(m, 1) * n
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - (ix - xi).abs()) * (1 - (iy - yi).abs())
            inside = (xi >= 0) & (xi < px) & (yi >= 0) & (yi < px)
            src = (view + (yi.clamp(0, px - 1) * px + xi.clamp(0, px - 1)).long()).flatten()
            acc.index_add_(0, src, pool.repeat(m, 1) * (w * inside).flatten()[:, None])
        out[s : s + m] = acc.view(m, n, -1)
    return out.permute(1, 0, 2).reshape(n, a * desc_px * desc_px).contiguous()


def robust_error(pool, views, occluder: tuple[int, int], min_contrast: float, min_kept_share: float = 0.5):
    """Residual error of each aligned view: float [B, px, px] pool images, [B, M, px, px] views ->
    [B, M]. The pool image is fitted as a * view + b (a >= 0); the mean squared residual outside the
    worst (h, w) window, after one refit without it, over the pool image's variance there. Pool
    images with a grey-level std under ``min_contrast`` score inf."""
    import torch

    h, w = occluder
    b, m, px, _ = views.shape
    p = pool[:, None].expand_as(views)
    keep = torch.ones_like(views)
    yy = torch.arange(px).view(1, 1, px, 1)
    xx = torch.arange(px).view(1, 1, 1, px)
    ncol = px - w + 1
    full = None
    for _ in range(2):
        n = keep.sum((-2, -1), keepdim=True)
        vm = (views * keep).sum((-2, -1), keepdim=True) / n
        pm = (p * keep).sum((-2, -1), keepdim=True) / n
        dv, dp = views - vm, p - pm
        a = (
            (dv * dp * keep).sum((-2, -1), keepdim=True)
            / ((dv * dv * keep).sum((-2, -1), keepdim=True) + 1e-6)
        ).clamp_min(0)
        r2 = (dp - a * dv) ** 2
        if full is None:  # no window: plain normalised residual
            full = r2.mean((-2, -1)) / (dp * dp).mean((-2, -1)).clamp_min(1e-6)
        # window sums of r2 through an integral image
        ii = torch.nn.functional.pad(r2.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        win = ii[..., h:, w:] - ii[..., :-h, w:] - ii[..., h:, :-w] + ii[..., :-h, :-w]
        worst = win.flatten(2).argmax(-1)
        y0, x0 = (worst // ncol)[..., None, None], (worst % ncol)[..., None, None]
        keep = (~((yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w))).float()
    n = keep.sum((-2, -1))
    sse = (r2 * keep).sum((-2, -1))
    pmk = (p * keep).sum((-2, -1), keepdim=True) / n[..., None, None]
    var = (((p - pmk) ** 2) * keep).sum((-2, -1)) / n
    err = sse / n / var.clamp_min(1e-6)
    # the window must not hide the source itself: most of the view's variance lies outside it
    vmk = (views * keep).sum((-2, -1), keepdim=True) / n[..., None, None]
    kept_var = (((views - vmk) ** 2) * keep).sum((-2, -1))
    hidden = kept_var < min_kept_share * views.flatten(2).var(-1, unbiased=False) * px * px
    total = pool.flatten(1).var(1, unbiased=False)
    # ... and both images keep some contrast there (a glyph inside the window against a black view)
    hidden |= var < min_contrast**2
    err = torch.where(hidden, torch.full_like(err, float("inf")), err).minimum(full)
    flat = (total.sqrt() < min_contrast)[:, None] | (views.flatten(2).std(-1) < min_contrast)
    return torch.where(flat, torch.full_like(err, float("inf")), err)


def gaussian_blur(images, sigma: float):
    """float [B, H, W] images blurred by a separable Gaussian of ``sigma`` px (edges replicated)."""
    import torch

    if sigma <= 0:
        return images
    r = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=images.dtype)
    k = torch.exp(-(t**2) / (2 * sigma * sigma))
    k = k / k.sum()
    x = torch.nn.functional.pad(images[:, None], (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


def _unit_lowpass(images, sigma: float):
    """float [B, H, W] -> [B, H*W]: blurred by ``sigma``, centred and scaled to unit norm (so a dot
    product is a pixel correlation). Flat images stay ~0."""
    x = gaussian_blur(images, sigma).flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def global_views(evals, p: CopyDetectParams):
    """float [E, 2 * len(blur_sigmas), px*px]: each evaluation image and its mirror blurred by each of
    ``blur_sigmas`` and then by ``lowpass_sigma`` (one Gaussian of the summed variances), unit-norm."""
    import torch

    out = []
    for sigma in p.blur_sigmas:
        v = _unit_lowpass(evals, float(np.hypot(sigma, p.lowpass_sigma)))
        out += [v, v.view(evals.shape).flip(-1).flatten(1)]
    return torch.stack(out, 1)


def global_error(pool, evals, p: CopyDetectParams, views=None):
    """Error of the best global edit: float [B, px, px] pool images and their candidate evaluation
    images -> [B]. The evaluation image (or its mirror) is blurred by each of ``blur_sigmas``, both
    images are low-passed by ``lowpass_sigma`` (which flattens JPEG blocking and resampling noise,
    not shapes), and the pool image is fitted as ``a * view + b`` (``a >= 0``): the smallest mean
    squared residual over the pool image's variance, i.e. ``1 - max(0, correlation)**2`` of the best
    view. Blurred, recompressed and re-exposed copies score low; two distinct garments of one class
    differ along their outline and score high. Flat images score inf. ``views``: the candidates'
    ``global_views``, when already computed."""
    import torch

    views = global_views(evals, p) if views is None else views
    corr = torch.einsum("bd,bvd->bv", _unit_lowpass(pool, p.lowpass_sigma), views).amax(1)
    err = 1 - corr.clamp(0, 1) ** 2
    flat = (pool.flatten(1).std(1) < p.min_contrast) | (evals.flatten(1).std(1) < p.min_contrast)
    return torch.where(flat, torch.full_like(err, float("inf")), err)


def verify_global(pool, evals, cand: Candidates, p: CopyDetectParams) -> np.ndarray:
    """``global_error`` of every candidate pair (float32 [C]; inf when ``global_max_error`` is 0).
    Evaluation images are rendered once per chunk of ``chunk`` distinct rows."""
    import torch

    err = np.full(len(cand.pool_row), np.inf, np.float32)
    if p.global_max_error <= 0 or not len(err):
        return err
    pairs, inv = np.unique(np.stack([cand.eval_row, cand.pool_row], 1), axis=0, return_inverse=True)
    got = np.empty(len(pairs), np.float32)
    rows = np.unique(pairs[:, 0])
    for s in range(0, len(rows), p.chunk):
        chunk = rows[s : s + p.chunk]
        views = global_views(evals[torch.from_numpy(chunk)], p)
        lo, hi = np.searchsorted(pairs[:, 0], [chunk[0], chunk[-1] + 1])
        for b in range(lo, hi, p.chunk):
            sl = pairs[b : min(hi, b + p.chunk)]
            at = torch.from_numpy(np.searchsorted(chunk, sl[:, 0]))
            got[b : b + len(sl)] = global_error(
                pool[torch.from_numpy(sl[:, 1])], evals[torch.from_numpy(sl[:, 0])], p, views[at]
            ).numpy()
    return got[inv.ravel()]


@dataclass
class Candidates:
    pool_row: np.ndarray  # int64 [C]
    eval_row: np.ndarray  # int64 [C]
    view: np.ndarray  # int64 [C]: the alignment of the eval image that matched
    cos: np.ndarray  # float32 [C]: thumbnail correlation of that match
    index_reason: str = ""


def _first_distinct(rows: np.ndarray, k: int) -> np.ndarray:
    """bool [n, K]: the first occurrence of each of the first ``k`` distinct values per row."""
    n, kk = rows.shape
    seen_before = np.zeros((n, kk), bool)
    for j in range(1, kk):
        seen_before[:, j] = (rows[:, :j] == rows[:, j : j + 1]).any(1)
    first = ~seen_before
    return first & (np.cumsum(first, 1) <= k)


def _merge_top(best, new, k: int):
    """Per query, the ``k`` highest of two (sims, ids) result sets (ids -1: no result). Stable:
    among equal similarities the earlier set and column win."""
    if best is None:
        return new
    sims = np.concatenate([best[0], new[0]], 1)
    ids = np.concatenate([best[1], new[1]], 1)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def index_plan(n_eval: int, n_views: int, p: CopyDetectParams):
    """(index choice, evaluation images per chunk) for ``n_eval`` images of ``n_views`` views.

    The expanded index is built and searched in chunks of at most ``index_chunk_views`` views (of
    whole evaluation images), and the per-query results merged, so memory does not grow with the
    evaluation set. Above ``exact_max_views`` views in all, the chunks are IVF lists under one
    coarse quantizer trained per region on a sample of views (~sqrt(n) lists, ``nprobe`` 16): a
    query probes the same lists in every chunk, so the merged result equals one unchunked IVF
    search with that quantizer."""
    from dinoflow.curation import knn

    total = n_eval * n_views
    nlist = max(1, int(np.sqrt(total)))
    choice = knn.choose_index(total, p.desc_px**2, exact_max_pool=p.exact_max_views, nlist=nlist)
    if choice.kind == "ivf":  # fewer lists than knn's 4*sqrt(n): one quantizer trained per region
        choice = replace(choice, reason=choice.reason.replace("~4*sqrt(n)", "~sqrt(n)"))
    per_chunk = max(1, min(n_eval, p.index_chunk_views // n_views))
    return choice, per_chunk


def _train_ivf(sample: np.ndarray, choice, seed: int = 0):
    import faiss

    d = sample.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, choice.nlist, faiss.METRIC_INNER_PRODUCT)
    m = min(len(sample), 64 * choice.nlist)
    rng = np.random.default_rng(seed)
    index.train(sample if m >= len(sample) else sample[np.sort(rng.choice(len(sample), m, replace=False))])
    index.nprobe = choice.nprobe
    return index


def candidates(pool, evals, p: CopyDetectParams, grid: Alignments) -> Candidates:
    """Step 1: per pool image and region, the best ``k`` distinct evaluation rows of the expanded
    index (with the matching view), above ``candidate_cos``; chunked as ``index_plan`` says."""
    import faiss
    import torch

    v = len(grid)
    n_eval = len(evals)
    dp = p.desc_px
    op = thumbnail_operator(grid, p.px, dp)
    choice, per_chunk = index_plan(n_eval, v, p)
    n_chunks = -(-n_eval // per_chunk)
    search_k = min(n_eval * v, max(16, 4 * p.k))
    pool_thumbs = thumbnails(pool, dp)
    queries = {r: region_descriptors(pool_thumbs, r) for r in REGIONS}
    del pool_thumbs
    log.info(
        "copy detection: %d eval images x %d views x %d regions in %d chunk(s) of <= %d images "
        "(%d views; index_chunk_views=%d); %s",
        n_eval,
        v,
        len(REGIONS),
        n_chunks,
        per_chunk,
        per_chunk * v,
        p.index_chunk_views,
        choice.reason,
    )

    def view_thumbs(e) -> torch.Tensor:
        return (e.reshape(len(e), -1).float() @ op).view(len(e) * v, dp, dp)

    trained = {}
    if choice.kind == "ivf":  # one coarse quantizer per region, from the views of sampled images
        rng = np.random.default_rng(0)
        n_img = min(n_eval, 2 * -(-64 * choice.nlist // v))  # 2x the points, subsampled
        sample = view_thumbs(evals[torch.from_numpy(np.sort(rng.choice(n_eval, n_img, replace=False)))])
        trained = {r: _train_ivf(region_descriptors(sample, r), choice) for r in REGIONS}
        del sample
    best: dict[str, tuple[np.ndarray, np.ndarray] | None] = dict.fromkeys(REGIONS)
    for c, s in enumerate(range(0, n_eval, per_chunk)):
        thumbs = view_thumbs(evals[s : s + per_chunk])
        for region in REGIONS:
            desc = region_descriptors(thumbs, region)
            if choice.kind == "ivf":
                index = faiss.clone_index(trained[region])
            else:
                index = faiss.IndexFlatIP(desc.shape[1])
            index.add(desc)
            del desc
            q = queries[region]
            kk = min(search_k, index.ntotal)
            sims = np.empty((len(q), kk), np.float32)
            ids = np.empty((len(q), kk), np.int64)
            for b in range(0, len(q), 16_384):
                sims[b : b + 16_384], ids[b : b + 16_384] = index.search(q[b : b + 16_384], kk)
            del index
            ids = np.where(ids >= 0, ids + s * v, -1)
            best[region] = _merge_top(best[region], (sims, ids), search_k)
        del thumbs
        if n_chunks > 1:
            log.info("copy detection: index chunk %d/%d searched", c + 1, n_chunks)
    parts: list[tuple[np.ndarray, ...]] = []
    for region in REGIONS:
        sims, ids = best[region]
        rows = np.where(ids >= 0, ids // v, -1)
        take = _first_distinct(rows, p.k) & (sims > p.candidate_cos) & (ids >= 0)
        qi, j = np.nonzero(take)
        parts.append((qi, rows[qi, j], ids[qi, j] % v, sims[qi, j]))
    qi, er, vw, cs = (np.concatenate(c) for c in zip(*parts, strict=True))
    # one candidate per (pool, eval, view), the highest correlation kept
    order = np.lexsort((-cs, vw, er, qi))
    qi, er, vw, cs = qi[order], er[order], vw[order], cs[order]
    first = (
        np.r_[True, (qi[1:] != qi[:-1]) | (er[1:] != er[:-1]) | (vw[1:] != vw[:-1])]
        if len(qi)
        else qi.astype(bool)
    )
    reason = f"{choice.reason}; {n_chunks} chunk(s) of <= {per_chunk * v} views"
    return Candidates(
        qi[first].astype(np.int64), er[first].astype(np.int64), vw[first].astype(np.int64), cs[first], reason
    )


def occluder_px(p: CopyDetectParams) -> tuple[int, int]:
    return max(1, int(p.occluder_frac[0] * p.px)), max(1, int(p.occluder_frac[1] * p.px))


def verify(
    pool, evals, cand: Candidates, p: CopyDetectParams, grid: Alignments, index: Alignments | None = None
):
    """Step 2: the best alignment of ``grid`` near each candidate's view (of ``index``, the
    candidate grid; default ``grid``) and its robust error.
    Returns (error float32 [C], alignment index int64 [C] into ``grid``)."""
    import torch

    index = grid if index is None else index
    nb, counts = neighbour_lists(index, grid, p.refine_deg, p.index_crop_step - 1)
    theta = torch.from_numpy(grid.theta)
    occ = occluder_px(p)
    err = np.empty(len(cand.pool_row), np.float32)
    arg = np.empty(len(cand.pool_row), np.int64)
    width = counts[cand.view]
    for w in np.unique(width):  # candidates with as many neighbours together: no padded warps
        rows = np.flatnonzero(width == w)
        for s in range(0, len(rows), p.chunk):
            sl = rows[s : s + p.chunk]
            al = torch.from_numpy(nb[cand.view[sl], :w])
            views = warp(evals[torch.from_numpy(cand.eval_row[sl])], theta[al])
            e = robust_error(
                pool[torch.from_numpy(cand.pool_row[sl])], views, occ, p.min_contrast, p.min_kept_share
            )
            best, j = e.min(1)
            err[sl] = best.numpy()
            arg[sl] = al.gather(1, j[:, None])[:, 0].numpy()
    return err, arg


@dataclass
class CopyMatches:
    """Per pool row: the best verified evaluation match."""

    error: np.ndarray  # float32 [n_pool]: robust error of the best candidate (inf: none)
    eval_row: (
        np.ndarray
    )  # int64 [n_pool]: the evaluation row matched (-1: none); for a copy, the one verified
    alignment: np.ndarray  # int64 [n_pool]: its alignment (-1: none or a global edit)
    is_copy: np.ndarray  # bool [n_pool]: error <= max_error or global_error <= global_max_error
    n_candidates: int
    seconds: dict[str, float]
    grid: Alignments
    index_reason: str = ""
    global_error: np.ndarray | None = None  # float32 [n_pool]: best global-edit error (inf: none/off)

    def alignment_counts(self) -> dict[str, int]:
        """Copies per alignment kind (identity, flip, crop, rotate; "global": a global edit only)."""
        geo = self.is_copy & (self.alignment >= 0)
        kinds = self.grid.params[self.alignment[geo], 0]
        out = {KIND_NAMES[k]: int((kinds == k).sum()) for k in range(len(KIND_NAMES))}
        return {**out, "global": int((self.is_copy & ~geo).sum())}


def detect_copies(pool: np.ndarray, evals: np.ndarray, p: CopyDetectParams | None = None) -> CopyMatches:
    """Which of the uint8/float [N, px, px] ``pool`` images are edited copies of an image of
    ``evals`` [E, px, px] (see the module docstring)."""
    import torch

    p = p or CopyDetectParams()
    for name, x in (("pool", pool), ("evaluation", evals)):
        if x.ndim != 3 or x.shape[1:] != (p.px, p.px):
            raise ValueError(f"copy detection: {name} images must be [N, {p.px}, {p.px}], got {x.shape}")
    pool_t = torch.from_numpy(np.ascontiguousarray(pool)).float()
    eval_t = torch.from_numpy(np.ascontiguousarray(evals)).float()
    grid = alignment_grid(p)
    igrid = index_grid(p)
    t0 = time.perf_counter()
    cand = candidates(pool_t, eval_t, p, igrid)
    t1 = time.perf_counter()
    log.info(
        "copy detection: %d eval images x %d views x %d regions indexed (%s); %d candidate pairs for "
        "%d pool images in %.1fs",
        len(evals),
        len(igrid),
        len(REGIONS),
        cand.index_reason,
        len(cand.pool_row),
        len(pool),
        t1 - t0,
    )
    err, arg = verify(pool_t, eval_t, cand, p, grid, igrid)
    g_err = verify_global(pool_t, eval_t, cand, p)
    t2 = time.perf_counter()
    n = len(pool)

    def best_of(e):  # per pool row: the smallest error over its candidates and that candidate
        out_e, out_c = np.full(n, np.inf, np.float32), np.full(n, -1, np.int64)
        if len(e):
            order = np.lexsort((e, cand.pool_row))
            pick = order[np.r_[True, cand.pool_row[order][1:] != cand.pool_row[order][:-1]]]
            out_e[cand.pool_row[pick]], out_c[cand.pool_row[pick]] = e[pick], pick
        return out_e, out_c

    best_err, c_geo = best_of(err)
    best_g, c_glob = best_of(g_err)
    geometric = best_err <= p.max_error
    glob = ~geometric & (best_g <= p.global_max_error)
    c = np.where(glob, c_glob, c_geo)
    best_row = np.where(c >= 0, cand.eval_row[np.maximum(c, 0)] if len(err) else -1, -1).astype(np.int64)
    best_al = np.where((c >= 0) & ~glob, arg[np.maximum(c, 0)] if len(err) else -1, -1).astype(np.int64)
    is_copy = geometric | glob
    log.info(
        "copy detection: verified %d pairs in %.1fs: %d pool images are copies (error <= %g)",
        len(err),
        t2 - t1,
        int(is_copy.sum()),
        p.max_error,
    )
    secs = {"candidates": round(t1 - t0, 3), "verify": round(t2 - t1, 3)}
    return CopyMatches(best_err, best_row, best_al, is_copy, len(err), secs, grid, cand.index_reason, best_g)
