"""Image edits that make copies: named families for training and testing a copy descriptor.

A copy detector is judged on edits it was not trained on, so the families are split in two:
``TRAIN_FAMILIES`` (the only ones the copy descriptor's training augmentation may draw from) and
``HELDOUT_FAMILIES`` (used only to test it; nothing in training touches them). Every family is a
function ``(uint8 image, generator) -> uint8 image``: grayscale ``[H, W]`` / ``[1, H, W]`` or
RGB ``[3, H, W]``, any size; all its random choices come from the generator (a numpy ``Generator``;
the entry points also take a ``torch.Generator`` or an int seed), so an edit is a pure function of
``(image, seed)``. Sizes are relative to the image side, so a family means the same on
a 28 px thumbnail and on a photo. Some families change the image size (``resize``, ``border``).

Seen in training (SSCD's augmentations and the usual copy edits, Pizzi et al. 2022). Strengths are
set so that a copy stays recognisable at 28 px, the project's CPU scale:

    crop          keep 65-90 % of each side at a random place, resized back
    rotate        +-5..20 degrees about the centre, corners filled with one grey level or colour
    translate     shift by up to 15 % of each side, filled likewise
    mirror        left-right flip
    resize        each side scaled 0.6-1.6x on its own (the aspect and the size change)
    border        a solid frame of 3-20 % of the side on each edge (the size grows)
    blur          Gaussian, sigma 1.5-4 % of the shorter side
    noise         additive Gaussian noise, std 4-20 grey levels
    jpeg          JPEG at quality 10-50
    color         brightness x0.6-1.4, contrast x0.5-1.5 (RGB: saturation x0-1.6 too)
    text          2-8 characters, 15-35 % of the height, opacity 0.6-1, anywhere
    shapes        1-3 opaque rectangles, ellipses, triangles or thick lines, 8-25 % of the side
    erase         a rectangle of 4-15 % of the area filled with one grey level or noise
    downscale     shrunk to 35-65 % of the side and enlarged back (resolution loss)
    compose_seen  2-3 of the above in a chain

Held out from training (never drawn by the copy descriptor's training):

    perspective      a projective warp: each corner moved by up to 5-15 % of the side
    shear            horizontal or vertical shear of 8-20 degrees
    pixelate         nearest-neighbour blocks of 6-10 % of the side, at least 2 px (mosaic)
    gamma            gamma 0.45-0.75 or 1.4-2.2
    stripes          2-5 parallel lines at a random angle, opacity 0.5-1 (a held-out overlay)
    salt_pepper      1-5 % of the pixels set to black or white
    compose_heldout  2 distinct held-out families in a chain
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from dinoflow.data.augment import gaussian_blur

Rng = np.random.Generator
Edit = Callable[[torch.Tensor, Rng], torch.Tensor]


# -- random draws ---------------------------------------------------------------------------------
def rng(g: Rng | torch.Generator | int) -> Rng:
    """The numpy generator edits draw from: ``g`` itself, one seeded by an int, or one seeded by a
    draw from a ``torch.Generator`` (which advances it)."""
    if isinstance(g, np.random.Generator):
        return g
    if isinstance(g, torch.Generator):
        g = int(torch.randint(0, 2**62, (), generator=g))
    return np.random.default_rng(int(g) & 0x7FFF_FFFF_FFFF_FFFF)


def _u(g: Rng, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(g.random())


def _i(g: Rng, lo: int, hi: int) -> int:
    """An integer in [lo, hi], both ends included."""
    return int(g.integers(lo, hi + 1))


def _sign(g: Rng) -> float:
    return 1.0 if g.random() < 0.5 else -1.0


def _colour(g: Rng, c: int) -> tuple[int, ...]:
    """A fill colour: black or white half of the time, else a random grey (or RGB colour)."""
    r = g.random()
    if r < 0.25:
        return (0,) * c
    if r < 0.5:
        return (255,) * c
    return tuple(int(v) for v in g.integers(0, 256, c))


# -- tensor plumbing ------------------------------------------------------------------------------
def _check(img: torch.Tensor) -> torch.Tensor:
    """The image as uint8 ``[C, H, W]`` with C 1 or 3, or a one-line error naming what is wrong."""
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
        got = img.dtype if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"edits take uint8 image tensors, got {got}")
    x = img[None] if img.ndim == 2 else img
    if x.ndim != 3 or x.shape[0] not in (1, 3) or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(
            f"edits take images [H, W], [1, H, W] or [3, H, W] (H, W >= 2), got {tuple(img.shape)}"
        )
    return x


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float()[None] / 255.0  # [1, C, H, W] in [0, 1]


def _uint8(y: torch.Tensor) -> torch.Tensor:
    return (y[0] * 255.0).round().clamp(0, 255).to(torch.uint8)


def _resize(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Float ``[1, C, H, W]`` to ``h x w``, antialiased when shrinking."""
    if y.shape[-2:] == (h, w):
        return y
    return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def _to_pil(x: torch.Tensor):
    from PIL import Image

    a = x.permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, "L" if a.shape[2] == 1 else "RGB")


def _from_pil(im, c: int) -> torch.Tensor:
    a = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy())


def _warp(x: torch.Tensor, hom: np.ndarray, fill: tuple[int, ...]) -> torch.Tensor:
    """Resample uint8 ``[C, H, W]`` through the 3x3 homography ``hom`` that maps input pixel
    coordinates (x, y, 1) to output ones; outside the source is filled with ``fill``."""
    c, h, w = x.shape
    inv = torch.from_numpy(np.linalg.inv(hom).T.astype(np.float32))
    pts = _pixel_centres(h, w) @ inv
    # input pixel coordinates -> grid_sample's [-1, 1] (align_corners=False)
    grid = (pts[..., :2] / pts[..., 2:]) * torch.tensor([2.0 / w, 2.0 / h]) - 1.0
    y = torch.cat([_float(x), torch.ones(1, 1, h, w)], dim=1)
    out = F.grid_sample(y, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = out[:, c:]
    bg = torch.tensor(fill, dtype=torch.float32).view(1, c, 1, 1) / 255.0
    return _uint8(out[:, :c] + bg * (1 - inside))


@lru_cache(maxsize=16)
def _pixel_centres(h: int, w: int) -> torch.Tensor:
    """Homogeneous pixel-centre coordinates ``[h, w, 3]`` (x + 0.5, y + 0.5, 1)."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).float()


def _about_centre(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """The 2x2 linear map ``a`` applied about the image centre, as a 3x3 homography."""
    m = np.eye(3)
    m[:2, :2] = a
    centre = np.array([w / 2, h / 2])
    m[:2, 2] = centre - a @ centre
    return m


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography taking the four points ``src`` [4, 2] to ``dst`` [4, 2]."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist(), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.append(np.linalg.solve(np.array(rows), np.array(rhs)), 1.0).reshape(3, 3)


@lru_cache(maxsize=64)
def _font(px: int):
    from PIL import ImageFont

    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ):
        try:
            return ImageFont.truetype(path, px)
        except OSError:
            continue
    return ImageFont.load_default(size=px)


def _overlay(x: torch.Tensor, draw_fn, opacity: float) -> torch.Tensor:
    """Draw on a transparent layer (``draw_fn(ImageDraw, colour_of)``) and blend it in."""
    from PIL import Image, ImageDraw

    c, h, w = x.shape
    base = _to_pil(x).convert("RGBA")
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    a = int(round(255 * opacity))
    draw_fn(ImageDraw.Draw(layer), lambda col: (*(col * 3 if len(col) == 1 else col), a))
    return _from_pil(Image.alpha_composite(base, layer), c)


# -- families seen in training --------------------------------------------------------------------
def crop(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    ch, cw = max(1, round(h * _u(g, 0.65, 0.9))), max(1, round(w * _u(g, 0.65, 0.9)))
    y0, x0 = _i(g, 0, h - ch), _i(g, 0, w - cw)
    return _uint8(_resize(_float(x[:, y0 : y0 + ch, x0 : x0 + cw]), h, w))


def rotate(x: torch.Tensor, g: Rng) -> torch.Tensor:
    _, h, w = x.shape
    t = math.radians(_u(g, 5, 20) * _sign(g))
    a = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return _warp(x, _about_centre(a, h, w), _colour(g, x.shape[0]))


def translate(x: torch.Tensor, g: Rng) -> torch.Tensor:
    _, h, w = x.shape
    m = np.eye(3)
    m[0, 2], m[1, 2] = _u(g, -0.15, 0.15) * w, _u(g, -0.15, 0.15) * h
    return _warp(x, m, _colour(g, x.shape[0]))


def mirror(x: torch.Tensor, g: Rng) -> torch.Tensor:
    return x.flip(-1).contiguous()


def resize(x: torch.Tensor, g: Rng) -> torch.Tensor:
    _, h, w = x.shape
    sh, sw = math.exp(_u(g, math.log(0.6), math.log(1.6))), math.exp(_u(g, math.log(0.6), math.log(1.6)))
    return _uint8(_resize(_float(x), max(2, round(h * sh)), max(2, round(w * sw))))


def border(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    s = min(h, w)
    top, bottom, left, right = (round(s * _u(g, 0.03, 0.2)) for _ in range(4))
    col = torch.tensor(_colour(g, c), dtype=torch.uint8).view(c, 1, 1)
    out = col.expand(c, h + top + bottom, w + left + right).clone()
    out[:, top : top + h, left : left + w] = x
    return out


def blur(x: torch.Tensor, g: Rng) -> torch.Tensor:
    sigma = _u(g, 0.015, 0.04) * min(x.shape[1:])
    y = gaussian_blur(_float(x), torch.tensor([sigma]), torch.tensor([True]))
    return _uint8(y)


def noise(x: torch.Tensor, g: Rng) -> torch.Tensor:
    std = _u(g, 4, 20)
    n = torch.from_numpy(g.standard_normal(tuple(x.shape), dtype=np.float32))
    return (x.float() + std * n).round().clamp(0, 255).to(torch.uint8)


def jpeg(x: torch.Tensor, g: Rng) -> torch.Tensor:
    from PIL import Image

    buf = io.BytesIO()
    _to_pil(x).save(buf, format="JPEG", quality=_i(g, 10, 50))
    return _from_pil(Image.open(io.BytesIO(buf.getvalue())), x.shape[0])


def color(x: torch.Tensor, g: Rng) -> torch.Tensor:
    y = _float(x)
    y = (y * _u(g, 0.6, 1.4)).clamp(0, 1)
    mean = y.mean()
    y = ((y - mean) * _u(g, 0.5, 1.5) + mean).clamp(0, 1)
    if x.shape[0] == 3:
        gray = (y * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        y = ((y - gray) * _u(g, 0.0, 1.6) + gray).clamp(0, 1)
    return _uint8(y)


_TEXT_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789@#&%!?"


def text(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    word = "".join(_TEXT_CHARS[_i(g, 0, len(_TEXT_CHARS) - 1)] for _ in range(_i(g, 2, 8)))
    font = _font(max(4, round(h * _u(g, 0.15, 0.35))))
    pos = (round(_u(g, -0.2, 0.8) * w), round(_u(g, -0.1, 0.8) * h))
    col = _colour(g, c)
    return _overlay(x, lambda d, rgba: d.text(pos, word, fill=rgba(col), font=font), _u(g, 0.6, 1.0))


def _shape(d, g: Rng, h: int, w: int, fill) -> None:
    s = min(h, w) * _u(g, 0.08, 0.25)
    cx, cy = _u(g, 0, w), _u(g, 0, h)
    kind = _i(g, 0, 3)
    box = [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
    if kind == 0:
        d.rectangle(box, fill=fill)
    elif kind == 1:
        d.ellipse(box, fill=fill)
    elif kind == 2:
        d.polygon([(cx, cy - s / 2), (cx - s / 2, cy + s / 2), (cx + s / 2, cy + s / 2)], fill=fill)
    else:
        t = _u(g, 0, math.pi)
        dx, dy = math.cos(t) * s, math.sin(t) * s
        d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=max(1, round(s / 4)))


def shapes(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    n = _i(g, 1, 3)
    cols = [_colour(g, c) for _ in range(n)]

    def draw(d, rgba):
        for col in cols:
            _shape(d, g, h, w, rgba(col))

    return _overlay(x, draw, 1.0)


def erase(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    area, ratio = _u(g, 0.04, 0.15) * h * w, math.exp(_u(g, math.log(0.3), math.log(3.3)))
    eh, ew = min(h, max(1, round(math.sqrt(area / ratio)))), min(w, max(1, round(math.sqrt(area * ratio))))
    y0, x0 = _i(g, 0, h - eh), _i(g, 0, w - ew)
    out = x.clone()
    if g.random() < 0.5:
        out[:, y0 : y0 + eh, x0 : x0 + ew] = torch.tensor(_colour(g, c), dtype=torch.uint8).view(c, 1, 1)
    else:
        out[:, y0 : y0 + eh, x0 : x0 + ew] = torch.from_numpy(g.integers(0, 256, (c, eh, ew), dtype=np.uint8))
    return out


def downscale(x: torch.Tensor, g: Rng) -> torch.Tensor:
    _, h, w = x.shape
    f = _u(g, 0.35, 0.65)
    small = _resize(_float(x), max(2, round(h * f)), max(2, round(w * f)))
    return _uint8(_resize(small, h, w))


# -- families held out from training --------------------------------------------------------------
def perspective(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    d = _u(g, 0.05, 0.15)
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    jitter = np.array([[_u(g, -d, d) * w, _u(g, -d, d) * h] for _ in range(4)])
    return _warp(x, homography(src, src + jitter), _colour(g, c))


def shear(x: torch.Tensor, g: Rng) -> torch.Tensor:
    _, h, w = x.shape
    k = math.tan(math.radians(_u(g, 8, 20))) * _sign(g)
    a = np.array([[1.0, k], [0.0, 1.0]] if _i(g, 0, 1) else [[1.0, 0.0], [k, 1.0]])
    return _warp(x, _about_centre(a, h, w), _colour(g, x.shape[0]))


def pixelate(x: torch.Tensor, g: Rng) -> torch.Tensor:
    _, h, w = x.shape
    block = max(2.0, _u(g, 0.06, 0.1) * min(h, w))
    small = F.interpolate(_float(x), size=(max(1, round(h / block)), max(1, round(w / block))), mode="area")
    return _uint8(F.interpolate(small, size=(h, w), mode="nearest"))


def gamma(x: torch.Tensor, g: Rng) -> torch.Tensor:
    gm = _u(g, 0.45, 0.75) if _i(g, 0, 1) else _u(g, 1.4, 2.2)
    return _uint8(_float(x).pow(gm))


def stripes(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    n, t = _i(g, 2, 5), _u(g, 0, math.pi)
    gap = max(h, w) / (n + 1)
    width = max(1, round(min(h, w) * _u(g, 0.03, 0.08)))
    dx, dy = math.cos(t), math.sin(t)
    nx, ny = -dy, dx
    offset = _u(g, -0.5, 0.5) * gap
    col = _colour(g, c)
    reach = 2 * max(h, w)

    def draw(d, rgba):
        for k in range(n):
            o = (k - (n - 1) / 2) * gap + offset
            px, py = w / 2 + nx * o, h / 2 + ny * o
            d.line(
                [(px - dx * reach, py - dy * reach), (px + dx * reach, py + dy * reach)],
                fill=rgba(col),
                width=width,
            )

    return _overlay(x, draw, _u(g, 0.5, 1.0))


def salt_pepper(x: torch.Tensor, g: Rng) -> torch.Tensor:
    c, h, w = x.shape
    p = _u(g, 0.01, 0.05)
    r = torch.from_numpy(g.random((h, w)))
    out = x.clone()
    out[:, r < p / 2] = 0
    out[:, (r >= p / 2) & (r < p)] = 255
    return out


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditFamily:
    name: str
    kind: str  # geometric | photometric | overlay | composition
    heldout: bool
    fn: Edit


def _chain(names: Sequence[str], lo: int, hi: int) -> Edit:
    def fn(x: torch.Tensor, g: Rng) -> torch.Tensor:
        for name in _pick(names, _i(g, lo, hi), g):
            x = FAMILIES[name].fn(x, g)
        return x

    return fn


def _pick(names: Sequence[str], n: int, g: Rng) -> list[str]:
    """``n`` distinct names drawn in a random order."""
    order = g.permutation(len(names))[:n].tolist()
    return [names[i] for i in order]


_SEEN = {
    "crop": ("geometric", crop),
    "rotate": ("geometric", rotate),
    "translate": ("geometric", translate),
    "mirror": ("geometric", mirror),
    "resize": ("geometric", resize),
    "border": ("geometric", border),
    "blur": ("photometric", blur),
    "noise": ("photometric", noise),
    "jpeg": ("photometric", jpeg),
    "color": ("photometric", color),
    "text": ("overlay", text),
    "shapes": ("overlay", shapes),
    "erase": ("overlay", erase),
    "downscale": ("photometric", downscale),
}
_HELDOUT = {
    "perspective": ("geometric", perspective),
    "shear": ("geometric", shear),
    "pixelate": ("photometric", pixelate),
    "gamma": ("photometric", gamma),
    "stripes": ("overlay", stripes),
    "salt_pepper": ("photometric", salt_pepper),
}
FAMILIES: dict[str, EditFamily] = {
    **{k: EditFamily(k, kind, False, fn) for k, (kind, fn) in _SEEN.items()},
    "compose_seen": EditFamily("compose_seen", "composition", False, _chain(tuple(_SEEN), 2, 3)),
    **{k: EditFamily(k, kind, True, fn) for k, (kind, fn) in _HELDOUT.items()},
    "compose_heldout": EditFamily("compose_heldout", "composition", True, _chain(tuple(_HELDOUT), 2, 2)),
}
PRIMITIVE_TRAIN_FAMILIES: tuple[str, ...] = tuple(_SEEN)  # what training chains draw from
TRAIN_FAMILIES: tuple[str, ...] = tuple(k for k, f in FAMILIES.items() if not f.heldout)
HELDOUT_FAMILIES: tuple[str, ...] = tuple(k for k, f in FAMILIES.items() if f.heldout)


def check_families(names: Sequence[str], allow_heldout: bool = True) -> tuple[str, ...]:
    """The names, validated: each a known family; with ``allow_heldout`` False, none held out."""
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown edit families {unknown}; known: {', '.join(FAMILIES)}")
    if not allow_heldout:
        held = [n for n in names if FAMILIES[n].heldout]
        if held:
            raise ValueError(f"edit families {held} are held out from training (dinoflow.data.edits)")
    if not names:
        raise ValueError("no edit families given")
    return tuple(names)


def apply_edit(img: torch.Tensor, family: str, g: Rng | torch.Generator | int) -> torch.Tensor:
    """One edit of family ``family`` on uint8 ``img`` ([H, W] or [C, H, W]); the output keeps the
    input's number of dimensions (its size may change: ``resize``, ``border``)."""
    check_families([family])
    out = FAMILIES[family].fn(_check(img), rng(g))
    return out[0] if img.ndim == 2 else out


def random_copy(
    img: torch.Tensor,
    families: Sequence[str],
    g: Rng | torch.Generator | int,
    min_edits: int = 1,
    max_edits: int = 3,
) -> tuple[torch.Tensor, list[str]]:
    """A chain of ``min_edits..max_edits`` distinct families drawn from ``families`` (0 edits: the
    image itself); returns the copy and the families applied, in order."""
    x, g = _check(img), rng(g)
    names = _pick(families, min(len(families), _i(g, min_edits, max_edits)), g)
    for name in names:
        x = FAMILIES[name].fn(x, g)
    return (x[0] if img.ndim == 2 else x), names


def seed_generator(seed: int) -> Rng:
    """The generator of one copy: a pure function of ``seed``."""
    return rng(int(seed))


def edit_batch(
    images: torch.Tensor,
    seeds: torch.Tensor,
    families: Sequence[str],
    out_px: int,
    min_edits: int = 1,
    max_edits: int = 3,
) -> torch.Tensor:
    """A random copy of each uint8 ``[B, C, H, W]`` image, one generator per image seeded by
    ``seeds[i]`` (so a sample's copy does not depend on the batch it sits in), resized to
    ``out_px`` square: float ``[B, C, out_px, out_px]`` in [0, 1]."""
    if images.ndim != 4 or len(seeds) != images.shape[0]:
        raise ValueError(
            f"edit_batch wants uint8 [B, C, H, W] and B seeds, got {tuple(images.shape)}, {len(seeds)}"
        )
    out = []
    for img, s in zip(images.cpu(), seeds.tolist(), strict=True):
        y, _ = random_copy(img, families, seed_generator(s), min_edits, max_edits)
        out.append(_resize(_float(y), out_px, out_px)[0])
    return torch.stack(out).to(images.device)
