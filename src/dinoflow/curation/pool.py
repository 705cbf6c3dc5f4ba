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
    (0x21, 0x24F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x2190, 0x22FF),
    (0x2500, 0x27BF),
    (0x2800, 0x28FF),
]


# -- base sources ---------------------------------------------------------------------------------
def _to_px(img, px: int = PX) -> np.ndarray:  # noqa: ANN001
    from PIL import Image

    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
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

        def render(ch: str, font=font) -> np.ndarray:  # noqa: ANN001
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
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        g = Image.fromarray(photo).convert("L")
        w, h = g.size
        for win in (28, 40, 56, 80, 112, 160):  # crop side in px, each resized to 28
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

    return default_cache_dir() / "curation" / "demo_sources_v1.npz"


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


def build_pool_arrays(
    size: int,
    *,
    fmnist_fraction: float = 0.35,
    dup_fraction: float = 0.08,
    contamination: int = 200,
    eval_size: int = 2000,
    seed_size: int = 500,
    seed: int = 0,
) -> PoolArrays:
    """All pixels of the demo pool in memory (no storage): vectorised where it matters."""
    from dinoflow.data.idx import load_fashion_mnist

    if size < 50:
        raise ValueError(f"pool size must be >= 50, got {size}")
    rng = np.random.default_rng(seed)
    n_copies = int(round(size * dup_fraction))
    n_contam = min(contamination, eval_size, size // 10)
    n_base = size - n_copies - n_contam
    tr_x, _ = load_fashion_mnist("train")
    te_x, te_y = load_fashion_mnist("test")
    tr_y = load_fashion_mnist("train")[1]
    perm = rng.permutation(len(tr_x))
    seed_rows, fm_rows = perm[:seed_size], perm[seed_size:]

    others = other_sources()
    n_fm = min(int(round(n_base * fmnist_fraction)), len(fm_rows))
    n_other = n_base - n_fm
    avail = {k: v[_unique_rows(v)] for k, v in others.items()}
    total_avail = sum(len(v) for v in avail.values())
    if n_other > total_avail:  # not enough non-Fashion-MNIST material: fill with Fashion-MNIST
        n_other, n_fm = total_avail, n_base - total_avail
    # share the other sources in proportion to what each offers
    want = {k: int(n_other * len(v) / total_avail) for k, v in avail.items()}
    short = n_other - sum(want.values())
    for k in sorted(avail, key=lambda k: -len(avail[k])):
        extra = min(short, len(avail[k]) - want[k])
        want[k] += extra
        short -= extra
    parts = [tr_x[fm_rows[:n_fm]]]
    src = ["fashion_mnist"] * n_fm
    for k, v in avail.items():
        take = rng.choice(len(v), want[k], replace=False)
        parts.append(v[take])
        src += [k] * want[k]
    base = np.concatenate(parts)
    base_src = np.array(src, dtype=object)
    keep = _unique_rows(base)  # a Fashion-MNIST image may equal another source's by chance
    base, base_src = base[keep], base_src[keep]
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
    ev = rng.choice(len(te_x), eval_size, replace=False)
    eval_x, eval_y = te_x[ev], te_y[ev]
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
    )


def _write_set(store, prefix: str, images: np.ndarray, sources, labels, split: str, samples_per_shard: int):  # noqa: ANN001, ANN202
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


def generate_pool(store, output_uri: str, size: int = 2000, *, samples_per_shard: int = 10_000, **kw) -> dict:  # noqa: ANN001
    """Write the demo pool, eval set, seed set and ground truth under ``output_uri``; returns counts+URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dinoflow.storage.client import join_uri

    p = build_pool_arrays(size, **kw)
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
    eval_uri, _ = _write_set(
        store,
        join_uri(output_uri, "eval"),
        p.eval_images,
        ["fashion_mnist"] * len(p.eval_images),
        p.eval_labels,
        "test",
        samples_per_shard,
    )
    seeds_uri, _ = _write_set(
        store,
        join_uri(output_uri, "seeds"),
        p.seed_images,
        ["fashion_mnist"] * len(p.seed_images),
        p.seed_labels,
        "seed",
        samples_per_shard,
    )
    keys = [r["key"] for r in rows]
    gt = pa.table(
        {
            "key": keys,
            "source": list(p.source),
            "transform": list(p.transform),
            "copy_of": [keys[c] if c >= 0 else "" for c in p.copy_of],
            "contamination_of": p.contamination_of,
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


def read_ground_truth(store, uri: str):  # noqa: ANN001, ANN201
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get_bytes(uri)))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    from dinoflow.storage import ObjectStore

    ap = argparse.ArgumentParser(description="Generate the uncurated demo pool into object storage.")
    ap.add_argument("--output", required=True, help="s3:// prefix")
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--contamination", type=int, default=200)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    info = generate_pool(
        ObjectStore.from_env(),
        a.output,
        a.size,
        contamination=a.contamination,
        eval_size=a.eval_size,
        seed=a.seed,
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
