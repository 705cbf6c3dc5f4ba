"""The uncurated demo pool: real offline images from several sources, plus planted near-duplicates
and planted copies of Fashion-MNIST *test* images (contamination), with ground truth on the side.

Sources (all reduced to 28x28 grayscale, light content on dark like Fashion-MNIST):

* ``fashion_mnist``: Fashion-MNIST train images (the "curated" target domain).
* ``glyphs``: characters rendered from the installed DejaVu fonts (every font x a set of Unicode
  blocks; glyphs a font lacks render as its .notdef box and are dropped).
* ``photo_crops``: crops at several scales of the photos bundled with scikit-learn.
* ``digits``: scikit-learn's 8x8 handwritten digits, upscaled.
* ``icons``: PNG/JPEG files shipped by Debian packages under /usr/share (Adwaita icons at their
  largest size, documentation figures), composited on black.

Pixel-identical images are removed from the base set before planting, so the only exact copies are
the planted ones. Planted transforms: crop, flip, rotate, blur, jpeg, brightness, text. The ground
truth (``ground_truth.parquet``: key, source, transform, copy_of, contamination_of) is written
beside the pool; stages never read it.

Layout under ``output_uri``: ``pool/`` (shards + manifest.parquet), ``eval/`` (Fashion-MNIST test,
the set to decontaminate against), ``seeds/`` (held-out Fashion-MNIST train images for retrieval),
``ground_truth.parquet``, ``pool.json`` (counts).
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PX = 28
SOURCES = ("fashion_mnist", "glyphs", "photo_crops", "digits", "icons")
TRANSFORMS = ("crop", "flip", "rotate", "blur", "jpeg", "brightness", "text")
FONT_DIRS = ("/usr/share/fonts",)
IMAGE_DIRS = ("/usr/share/icons", "/usr/share/doc", "/usr/share/pixmaps", "/usr/share/info")
# Unicode blocks with many distinct shapes: Latin, Greek, Cyrillic, arrows, maths, box drawing,
# geometric shapes, miscellaneous symbols, dingbats, Braille
_BLOCKS = [
    (0x21, 0x2FF),  # Latin, Latin extended, IPA
    (0x370, 0x52F),  # Greek, Cyrillic
    (0x531, 0x58F),  # Armenian
    (0x5D0, 0x5EA),  # Hebrew
    (0x10A0, 0x10FF),  # Georgian
    (0x1400, 0x167F),  # Canadian syllabics
    (0x16A0, 0x16FF),  # Runic
    (0x2190, 0x2BFF),  # arrows, maths, technical, box drawing, shapes, symbols, dingbats, Braille
    (0x2D30, 0x2D7F),  # Tifinagh
    (0xA640, 0xA69F),  # Cyrillic extended-B
    (0xE000, 0xE2FF),  # private use: the glyphicons font's icons
]


# -- base sources ---------------------------------------------------------------------------------
def _to_px(img, px: int = PX) -> np.ndarray:
    """28 px grayscale, light on dark. Transparent images are composited on black; one that is
    then nearly blank (a dark symbolic icon on transparency) becomes its alpha silhouette."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        flat = Image.alpha_composite(bg, img).convert("L").resize((px, px), Image.BILINEAR)
        a = np.asarray(flat, dtype=np.uint8)
        if a.std() < 10:  # the Adwaita symbolic icons are #2e3436-ish shapes: invisible on black
            a = np.asarray(img.getchannel("A").resize((px, px), Image.BILINEAR), dtype=np.uint8)
        return a
    return np.asarray(img.convert("L").resize((px, px), Image.BILINEAR), dtype=np.uint8)


def glyph_images(limit: int | None = None) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted({p for d in FONT_DIRS for p in glob.glob(os.path.join(d, "**", "*.ttf"), recursive=True)})
    out: list[np.ndarray] = []
    for path in fonts:
        try:
            font = ImageFont.truetype(path, 20, layout_engine=ImageFont.Layout.BASIC)
        except OSError:
            continue

        def render(ch: str, font=font) -> np.ndarray:
            im = Image.new("L", (PX, PX), 0)
            ImageDraw.Draw(im).text((PX / 2, PX / 2), ch, fill=255, font=font, anchor="mm")
            return np.asarray(im)

        notdef = render("\U000f0000")  # a private-use code point no font here maps: the .notdef glyph
        for lo, hi in _BLOCKS:
            for cp in range(lo, hi + 1):
                a = render(chr(cp))
                if a.sum() < 255 * 6 or np.array_equal(a, notdef):
                    continue
                out.append(a)
                if limit and len(out) >= limit:
                    return np.stack(out)
    return np.stack(out) if out else np.zeros((0, PX, PX), np.uint8)


def photo_crops(limit: int | None = None) -> np.ndarray:
    """Crops of the photos bundled with scikit-learn. Windows double in side from one scale to the
    next and step by half a window, so no crop holds another at >= 70 % of its side: none is a
    "crop" near-duplicate of another in the sense of ``apply_transform``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        g = Image.fromarray(photo).convert("L")
        w, h = g.size
        for win in (24, 48, 96, 192, 384):  # crop side in px, each resized to 28
            step = win // 2
            for y in range(0, h - win + 1, step):
                for x in range(0, w - win + 1, step):
                    out.append(np.asarray(g.crop((x, y, x + win, y + win)).resize((PX, PX), Image.BILINEAR)))
                    if limit and len(out) >= limit:
                        return np.stack(out)
    return np.stack(out)


def digit_images() -> np.ndarray:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0 * 255.0)[:, None]
    up = F.interpolate(
        d, size=(PX - 4, PX - 4), mode="bilinear", align_corners=False
    )  # 2 px margin like MNIST
    return F.pad(up, (2, 2, 2, 2))[:, 0].clamp(0, 255).round().to(torch.uint8).numpy()


def icon_images(limit: int | None = None) -> np.ndarray:
    from PIL import Image

    best: dict[str, tuple[int, str]] = {}
    for d in IMAGE_DIRS:
        for p in glob.glob(os.path.join(d, "**", "*"), recursive=True):
            if not p.lower().endswith((".png", ".jpg", ".jpeg")) or "cursors" in p:
                continue
            size = os.path.getsize(p)
            name = Path(p).stem if "/icons/" in p else p  # one size per icon name
            if name not in best or size > best[name][0]:
                best[name] = (size, p)
    out = []
    for _, p in sorted(best.values(), key=lambda t: t[1]):
        try:
            with Image.open(p) as im:
                out.append(_to_px(im))
        except (OSError, ValueError):
            continue
        if limit and len(out) >= limit:
            break
    return np.stack(out) if out else np.zeros((0, PX, PX), np.uint8)


def _cache_path() -> Path:
    from dinoflow.storage.client import default_cache_dir

    return default_cache_dir() / "curation" / "demo_sources_v2.npz"


def other_sources() -> dict[str, np.ndarray]:
    """The non-Fashion-MNIST sources, rendered once and cached locally (a few seconds)."""
    path = _cache_path()
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    src = {
        "glyphs": glyph_images(),
        "photo_crops": photo_crops(),
        "digits": digit_images(),
        "icons": icon_images(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **src)
    os.replace(tmp, path)
    return src


def _unique_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of every pixel-identical image."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    _, first = np.unique(flat.view(np.dtype((np.void, flat.shape[1]))).ravel(), return_index=True)
    return np.sort(first)


# -- a base set without unrecorded near-duplicates ------------------------------------------------
# Two base images are near-duplicates when the Pearson correlation of their 28 px pixels (one of them
# mirrored, or not) exceeds this: JPEG, brightness and most blur copies score above it (measured on
# Fashion-MNIST and glyphs), and so do e.g. the same glyph in two DejaVu variants or two plain
# Fashion-MNIST t-shirts. The base set keeps none of these pairs, and no base image lies this close
# to an evaluation image, so every duplicate and contamination in the pool is a recorded one.
DISTINCT_CORR = 0.95
_CAND_PX, _CAND_CORR = 14, 0.93  # candidate search on 14 px (recall 1.0 of 28 px pairs > 0.95, measured)


def _range_pairs(
    index_desc: np.ndarray, query_desc: np.ndarray, min_sim: float
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(index_desc.shape[1])
    index.add(np.ascontiguousarray(index_desc, np.float32))
    lims, _, ids = index.range_search(np.ascontiguousarray(query_desc, np.float32), min_sim)
    q = np.repeat(np.arange(len(query_desc), dtype=np.int64), np.diff(lims).astype(np.int64))
    return q, ids.astype(np.int64)


def near_pairs(
    x: np.ndarray, threshold: float = DISTINCT_CORR, *, other: np.ndarray | None = None, chunk: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of uint8 [N, 28, 28] images whose 28 px correlation, either one mirrored or not,
    exceeds ``threshold``: within ``x`` (i < j), or between ``x`` (i) and ``other`` (j)."""
    from dinoflow.curation.descriptors import pixel_descriptor

    y = x if other is None else other
    ai, aj = [], []
    for mirror in (False, True):
        xq = np.ascontiguousarray(x[:, :, ::-1]) if mirror else x
        qi, qj = _range_pairs(pixel_descriptor(y, _CAND_PX), pixel_descriptor(xq, _CAND_PX), _CAND_CORR)
        if other is None:
            keep = qi != qj
            qi, qj = qi[keep], qj[keep]
        fq, fy = pixel_descriptor(xq, PX), pixel_descriptor(y, PX)
        for s in range(0, len(qi), chunk):
            i, j = qi[s : s + chunk], qj[s : s + chunk]
            hit = np.einsum("nd,nd->n", fq[i], fy[j]) > threshold
            ai.append(i[hit])
            aj.append(j[hit])
    i = np.concatenate(ai) if ai else np.zeros(0, np.int64)
    j = np.concatenate(aj) if aj else np.zeros(0, np.int64)
    if other is None:
        i, j = np.minimum(i, j), np.maximum(i, j)
    if not len(i):
        return i, j
    pair = np.unique(np.stack([i, j], 1), axis=0)
    return pair[:, 0], pair[:, 1]


def greedy_distinct(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """bool [n]: walking rows in order, keep a row unless it is paired with an earlier kept row."""
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    alive = np.ones(n, bool)
    cuts = np.flatnonzero(np.r_[True, lo[1:] != lo[:-1], True]) if len(lo) else np.zeros(1, np.int64)
    for s, e in zip(cuts[:-1], cuts[1:], strict=True):
        if alive[lo[s]]:
            alive[hi[s:e]] = False
    return alive


# -- planted transforms ---------------------------------------------------------------------------
def apply_transform(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate of one uint8 [28, 28] image."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    im = Image.fromarray(img)
    if kind == "crop":
        side = int(rng.integers(20, 25))  # keep 70-90% of each side, resize back
        x, y = rng.integers(0, PX - side + 1, size=2)
        return np.asarray(
            im.crop((int(x), int(y), int(x) + side, int(y) + side)).resize((PX, PX), Image.BILINEAR)
        )
    if kind == "flip":
        return np.ascontiguousarray(img[:, ::-1])
    if kind == "rotate":
        deg = float(rng.uniform(5, 15)) * (1 if rng.random() < 0.5 else -1)
        return np.asarray(im.rotate(deg, resample=Image.BILINEAR))
    if kind == "blur":
        return np.asarray(im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.2)))))
    if kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(30, 71)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    if kind == "brightness":
        a, b = rng.uniform(0.7, 1.3), rng.uniform(-25, 25)
        return np.clip(img.astype(np.float32) * a + b, 0, 255).astype(np.uint8)
    if kind == "text":
        font = ImageFont.load_default()
        word = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789©"), size=int(rng.integers(2, 4))))
        ImageDraw.Draw(im).text(
            (int(rng.integers(0, 10)), int(rng.integers(16, 20))), word, fill=255, font=font
        )
        return np.asarray(im)
    raise ValueError(f"unknown transform {kind!r}; known: {TRANSFORMS}")


# -- the pool ------------------------------------------------------------------------------------
@dataclass
class PoolArrays:
    images: np.ndarray  # uint8 [N, 28, 28], shuffled
    source: np.ndarray  # object [N]
    transform: np.ndarray  # object [N], "" for originals
    copy_of: np.ndarray  # int64 [N], pool row of the original, -1 for originals
    contamination_of: np.ndarray  # int64 [N], eval row copied, -1 otherwise
    eval_images: np.ndarray
    eval_labels: np.ndarray
    seed_images: np.ndarray
    seed_labels: np.ndarray
    eval_rows: np.ndarray | None = None  # Fashion-MNIST test row of each eval image


def _shares(
    sizes: dict[str, int], n_base: int, fmnist_fraction: float, offer: dict[str, float]
) -> dict[str, int]:
    """Images wanted per source: ``fmnist_fraction`` Fashion-MNIST, the rest shared by the other
    sources in proportion to what each ``offer``s; at most ``sizes``, shortfalls move to sources
    with spare images."""
    n_fm = int(round(n_base * fmnist_fraction))
    rest = {k: v for k, v in offer.items() if k != "fashion_mnist"}
    total = max(1.0, sum(rest.values()))
    want = {"fashion_mnist": n_fm, **{k: int((n_base - n_fm) * v / total) for k, v in rest.items()}}
    want = {k: min(w, sizes[k]) for k, w in want.items()}
    short = n_base - sum(want.values())
    for k in sorted(sizes, key=lambda k: -(sizes[k] - want[k])):
        extra = min(short, sizes[k] - want[k])
        want[k] += extra
        short -= extra
    return want


def _distinct_base(avail, n_base, fmnist_fraction, eval_x, corr, rng) -> dict[str, np.ndarray]:
    """Rows per source of a base set with no near-duplicate pair and no near-copy of ``eval_x``.

    Candidates are drawn at random (twice what is wanted, plus a margin; all of a source when that
    is not enough) and walked in a random order across sources; the first of a near-duplicate pair
    stays. Counts per source follow ``_shares`` over what survives."""
    order = {k: rng.permutation(len(v)) for k, v in avail.items()}
    factor = 2.0
    while True:
        draw = {k: order[k][: min(len(v), int(factor * n_base) + 64)] for k, v in avail.items()}
        tag = np.concatenate([np.full(len(r), k, dtype=object) for k, r in draw.items()])
        row = np.concatenate(list(draw.values()))
        imgs = np.concatenate([avail[k][r] for k, r in draw.items()])
        mix = rng.permutation(len(imgs))
        tag, row, imgs = tag[mix], row[mix], imgs[mix]
        alive = np.zeros(len(imgs), bool)
        alive[_unique_rows(imgs)] = True
        alive &= greedy_distinct(len(imgs), *near_pairs(imgs, corr))
        bad, _ = near_pairs(imgs, corr, other=eval_x)
        alive[bad] = False
        sizes = {k: int((alive & (tag == k)).sum()) for k in avail}
        complete = all(len(draw[k]) == len(avail[k]) for k in avail)
        if sum(sizes.values()) >= n_base or complete:
            break
        factor *= 2
    if sum(sizes.values()) < n_base:
        raise ValueError(
            f"the sources hold only {sum(sizes.values())} distinct base images (no two with 28 px "
            f"correlation > {corr}), {n_base} are needed: lower the pool size or raise dup_fraction"
        )
    # distinct images each source would offer in full (survival rate of its draw x its size)
    offer = {k: sizes[k] * len(avail[k]) / max(1, len(draw[k])) for k in avail}
    want = _shares(sizes, n_base, fmnist_fraction, offer)
    return {k: row[alive & (tag == k)][: want[k]] for k in avail}


def build_pool_arrays(
    size: int,
    *,
    fmnist_fraction: float = 0.35,
    dup_fraction: float = 0.08,
    contamination: int = 200,
    eval_size: int = 2000,
    seed_size: int = 500,
    seed: int = 0,
    distinct_corr: float = DISTINCT_CORR,
) -> PoolArrays:
    """All pixels of the demo pool in memory (no storage): vectorised where it matters.

    The base images are drawn at random per source, then thinned to a set without near-duplicate
    pairs (``near_pairs`` above ``distinct_corr``, first drawn wins) and without images that near-
    duplicate an evaluation image; raises ValueError when the sources cannot fill ``size``."""
    from dinoflow.data.idx import load_fashion_mnist

    if size < 50:
        raise ValueError(f"pool size must be >= 50, got {size}")
    rng = np.random.default_rng(seed)
    n_copies = int(round(size * dup_fraction))
    n_contam = min(contamination, eval_size, size // 10)
    n_base = size - n_copies - n_contam
    tr_x, tr_y = load_fashion_mnist("train")
    te_x, te_y = load_fashion_mnist("test")
    perm = rng.permutation(len(tr_x))
    seed_rows, fm_rows = perm[:seed_size], perm[seed_size:]
    ev = rng.choice(len(te_x), eval_size, replace=False)
    eval_x, eval_y = te_x[ev], te_y[ev]

    others = other_sources()
    avail = {"fashion_mnist": tr_x[fm_rows]}
    for k, v in others.items():
        v = v[_unique_rows(v)]
        if k == "photo_crops":  # flat sky/wall crops carry no content and all look alike
            v = v[v.reshape(len(v), -1).std(1) >= 10]
        avail[k] = v
    kept = _distinct_base(avail, n_base, fmnist_fraction, eval_x, distinct_corr, rng)
    base = np.concatenate([avail[k][rows] for k, rows in kept.items()])
    base_src = np.concatenate([np.full(len(rows), k, dtype=object) for k, rows in kept.items()])
    order0 = rng.permutation(len(base))
    base, base_src = base[order0], base_src[order0]
    n_base = len(base)

    # planted near-duplicates of pool images, transforms spread evenly
    originals = rng.choice(n_base, n_copies, replace=n_copies > n_base)
    kinds = np.array(TRANSFORMS, dtype=object)[np.arange(n_copies) % len(TRANSFORMS)]
    copies = (
        np.stack([apply_transform(base[o], k, rng) for o, k in zip(originals, kinds, strict=True)])
        if n_copies
        else np.zeros((0, PX, PX), np.uint8)
    )
    # contamination: near-copies of eval (Fashion-MNIST test) images, identity copies included
    c_rows = rng.choice(eval_size, n_contam, replace=False)
    c_kinds = np.array(("exact",) + TRANSFORMS, dtype=object)[np.arange(n_contam) % (len(TRANSFORMS) + 1)]
    contam = (
        np.stack(
            [
                eval_x[r] if k == "exact" else apply_transform(eval_x[r], k, rng)
                for r, k in zip(c_rows, c_kinds, strict=True)
            ]
        )
        if n_contam
        else np.zeros((0, PX, PX), np.uint8)
    )

    images = np.concatenate([base, copies, contam])
    source = np.concatenate(
        [base_src, base_src[originals], np.array(["fashion_mnist"] * n_contam, dtype=object)]
    )
    transform = np.concatenate([np.array([""] * n_base, dtype=object), kinds, c_kinds])
    copy_of = np.concatenate([np.full(n_base, -1), originals, np.full(n_contam, -1)]).astype(np.int64)
    contamination_of = np.concatenate([np.full(n_base + n_copies, -1), c_rows]).astype(np.int64)
    # shuffle so that copies sit anywhere in the pool; re-point copy_of at shuffled rows
    order = rng.permutation(len(images))
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    copy_of = copy_of[order]
    copy_of = np.where(copy_of >= 0, where[np.maximum(copy_of, 0)], -1)
    return PoolArrays(
        images[order],
        source[order],
        transform[order],
        copy_of,
        contamination_of[order],
        eval_x,
        eval_y,
        tr_x[seed_rows],
        tr_y[seed_rows],
        ev,
    )


def _write_set(store, prefix: str, images: np.ndarray, sources, labels, split: str, samples_per_shard: int):
    from dinoflow.data.images import encode_png
    from dinoflow.data.manifest import from_rows, write_manifest
    from dinoflow.data.shards import ShardWriter

    rows = []
    with ShardWriter(store, prefix, samples_per_shard) as w:
        for i, img in enumerate(images):
            key = f"{split}{i:07d}"
            data = encode_png(img)
            shard, member = w.add(key, data, "png", {"source": sources[i], "label": int(labels[i])})
            rows.append(
                {
                    "key": key,
                    "shard": shard,
                    "member": member,
                    "source": sources[i],
                    "label": int(labels[i]),
                    "width": PX,
                    "height": PX,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "split": split,
                }
            )
    manifest_uri = f"{prefix}/manifest.parquet"
    write_manifest(store, manifest_uri, from_rows(rows))
    return manifest_uri, rows


def cached_pool_arrays(size: int, **kw) -> PoolArrays:
    """``build_pool_arrays`` kept in the local cache, keyed by its arguments and this file's bytes
    (the code that builds it): the 60k demo pool takes minutes to thin to distinct images, loading
    it a second. Arrays only (``allow_pickle=False``): nothing loaded can run code."""
    import dataclasses
    import json

    key = hashlib.sha256(
        json.dumps({"size": size, **kw}, sort_keys=True).encode() + Path(__file__).read_bytes()
    ).hexdigest()[:16]
    path = _cache_path().parent / f"pool-{size}-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        for k in ("source", "transform"):
            arrays[k] = arrays[k].astype(object)
        return PoolArrays(**arrays)
    p = build_pool_arrays(size, **kw)
    fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    for k in ("source", "transform"):
        fields[k] = fields[k].astype(str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **fields)
    os.replace(tmp, path)
    return p


def generate_pool(
    store, output_uri: str, size: int = 2000, *, samples_per_shard: int = 10_000, cache: bool = False, **kw
) -> dict:
    """Write the demo pool, eval set, seed set and ground truth under ``output_uri``; returns counts+URIs.
    ``cache``: reuse the arrays of an earlier call with the same arguments (``cached_pool_arrays``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dinoflow.storage.client import join_uri

    p = cached_pool_arrays(size, **kw) if cache else build_pool_arrays(size, **kw)
    n = len(p.images)
    pool_uri, rows = _write_set(
        store,
        join_uri(output_uri, "pool"),
        p.images,
        list(p.source),
        np.full(n, -1),
        "pool",
        samples_per_shard,
    )
    # the labelled Fashion-MNIST sets: evaluation (decontaminated against) and curation seeds
    eval_uri, seeds_uri = (
        _write_set(
            store,
            join_uri(output_uri, name),
            images,
            ["fashion_mnist"] * len(images),
            labels,
            split,
            samples_per_shard,
        )[0]
        for name, images, labels, split in (
            ("eval", p.eval_images, p.eval_labels, "test"),
            ("seeds", p.seed_images, p.seed_labels, "seed"),
        )
    )
    keys = [r["key"] for r in rows]
    gt = pa.table(
        {
            "key": keys,
            "source": list(p.source),
            "transform": list(p.transform),
            "copy_of": [keys[c] if c >= 0 else "" for c in p.copy_of],
            "contamination_of": p.contamination_of,
            # the Fashion-MNIST test row each contamination copies (-1: none)
            "contamination_of_test_row": np.where(
                p.contamination_of >= 0, p.eval_rows[np.maximum(p.contamination_of, 0)], -1
            ),
        }
    )
    buf = io.BytesIO()
    pq.write_table(gt, buf)
    gt_uri = join_uri(output_uri, "ground_truth.parquet")
    store.put_bytes(gt_uri, buf.getvalue())
    counts = {s: int((p.source == s).sum()) for s in SOURCES}
    info = {
        "pool_manifest_uri": pool_uri,
        "eval_manifest_uri": eval_uri,
        "seed_manifest_uri": seeds_uri,
        "ground_truth_uri": gt_uri,
        "size": n,
        "per_source": counts,
        "planted_copies": int((p.copy_of >= 0).sum()),
        "contamination": int((p.contamination_of >= 0).sum()),
    }
    store.put_json(join_uri(output_uri, "pool.json"), info)
    return info


def read_ground_truth(store, uri: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get_bytes(uri)))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    from dinoflow.storage import open_store

    ap = argparse.ArgumentParser(description="Generate the uncurated demo pool into object storage.")
    ap.add_argument("--output", required=True, help="s3:// prefix")
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--contamination", type=int, default=200)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    info = generate_pool(
        open_store(),
        a.output,
        a.size,
        contamination=a.contamination,
        eval_size=a.eval_size,
        seed=a.seed,
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
