"""A self-contained HTML evaluation report: one file, images inlined as base64 PNG.

Sections (each a ``<section id=...>``): ``metrics`` (this backbone vs the raw-pixel baseline, same
code), ``curves`` (training curves of the run that made the backbone), ``confusion`` (confusion matrix
of the chosen linear probe on test), ``retrieval`` (test queries and their nearest training images),
``pca`` (DINOv2-style PCA of patch features shown as RGB). Pictures are drawn with PIL + numpy, so
the report needs no plotting library and opens in a browser or the KFP UI's HTML viewer.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def line_chart(
    series: dict[str, tuple[list[float], list[float]]],
    title: str = "",
    xlabel: str = "step",
    size: tuple[int, int] = (640, 320),
) -> Image.Image:
    """A plain line chart (several series, shared axes, legend) drawn with PIL."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    d.text((left, 6), title, fill="black", font=font)
    pts = [
        (float(x), float(y))
        for xs, ys in series.values()
        for x, y in zip(xs, ys, strict=False)
        if math.isfinite(x) and math.isfinite(y)
    ]
    if not pts:
        d.text((left, h // 2), "no finite values", fill="gray", font=font)
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = w - left - right, h - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yp = px(x0, yv)
        d.line([left, yp, left + pw, yp], fill=(230, 230, 230))
        d.text((4, yp - 6), _fmt_tick(yv), fill="black", font=font)
        xv = x0 + (x1 - x0) * i / 4
        xp, _ = px(xv, y0)
        d.text((xp - 10, top + ph + 4), _fmt_tick(xv), fill="black", font=font)
    d.text((left + pw // 2 - 15, h - 16), xlabel, fill="black", font=font)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
        line = [
            px(float(x), float(y))
            for x, y in zip(xs, ys, strict=False)
            if math.isfinite(x) and math.isfinite(y)
        ]
        if len(line) >= 2:
            d.line(line, fill=color, width=2)
        elif line:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=color)
        d.text(
            (left + pw - 8 - 7 * len(name), top + 4 + 14 * i), name, fill=color, font=font
        )  # legend, top right
    return img


def gray_to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [N, C, H, W] (C = 1 or 3) -> uint8 [N, H, W, 3]."""
    x = np.asarray(images)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return x.transpose(0, 2, 3, 1).astype(np.uint8)


def retrieval_grid(
    queries: np.ndarray,
    neighbours: np.ndarray,
    query_labels: list[int],
    neighbour_labels: list[list[int]],
    scale: int = 3,
) -> Image.Image:
    """Each row: a test query, then its nearest training images (green frame = same class, red = not)."""
    q = gray_to_rgb(queries)
    rows, k = len(q), neighbours.shape[1]
    h, w = q.shape[1] * scale, q.shape[2] * scale
    pad, gap = 3, 12
    out = Image.new("RGB", (pad + (w + 2 * pad) * (k + 1) + gap, (h + 2 * pad) * rows + pad), "white")
    for r in range(rows):
        y = pad + r * (h + 2 * pad)
        tile = Image.fromarray(q[r]).resize((w, h), Image.NEAREST)
        out.paste(tile, (pad, y))
        nb = gray_to_rgb(neighbours[r])
        for j in range(k):
            x = pad + gap + (j + 1) * (w + 2 * pad)
            ok = neighbour_labels[r][j] == query_labels[r]
            ImageDraw.Draw(out).rectangle(
                [x - pad, y - pad, x + w + pad - 1, y + h + pad - 1],
                fill=(40, 160, 40) if ok else (200, 40, 40),
            )
            out.paste(Image.fromarray(nb[j]).resize((w, h), Image.NEAREST), (x, y))
    return out


def pca_rgb(patch_tokens: np.ndarray, grid: tuple[int, int], fg_threshold: float = 0.0) -> np.ndarray:
    """DINOv2's patch-PCA view: float [B, N, D] -> RGB in [0, 1], [B, rows, cols, 3].

    A first PCA over all patches of all images separates foreground from background (its first
    component, thresholded); a second PCA over the foreground patches gives 3 components, each scaled
    to [0, 1] and shown as R, G, B; background stays black. The first component's sign is chosen so
    that the four corner patches (background in most photos) fall below the threshold.
    """
    b, n, dim = patch_tokens.shape
    rows, cols = grid
    if rows * cols != n:
        raise ValueError(f"{n} patch tokens do not fill a {rows}x{cols} grid")
    x = patch_tokens.reshape(-1, dim).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    first = (x @ vt[0]).reshape(b, rows, cols)
    corners = first[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    if corners.mean() > 0:
        first = -first
    first = first / (np.abs(first).max() + 1e-12)
    fg = first > fg_threshold
    if fg.sum() < 3 or fg.all():  # nothing to separate: show the whole image
        fg = np.ones_like(fg)
    f = patch_tokens.reshape(b, rows, cols, dim)[fg].astype(np.float64)
    f = f - f.mean(0)
    _, _, vt2 = np.linalg.svd(f, full_matrices=False)
    comps = f @ vt2[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(0), comps.max(0)
    comps = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
    out = np.zeros((b, rows, cols, 3))
    out[fg] = comps
    return out


def pca_panel(images: np.ndarray, rgb: np.ndarray, scale: int = 4) -> Image.Image:
    """Pairs of (image, PCA colours upsampled to the image size), side by side, one pair per column."""
    imgs = gray_to_rgb(images)
    n, h, w = imgs.shape[:3]
    h, w = h * scale, w * scale
    pad = 4
    out = Image.new("RGB", (pad + n * (w + pad), pad + 2 * (h + pad)), "white")
    for i in range(n):
        x = pad + i * (w + pad)
        out.paste(Image.fromarray(imgs[i]).resize((w, h), Image.NEAREST), (x, pad))
        colours = Image.fromarray((rgb[i] * 255).round().astype(np.uint8)).resize((w, h), Image.NEAREST)
        out.paste(colours, (x, 2 * pad + h))
    return out


@dataclass
class ReportData:
    title: str
    backbone: dict[str, Any]  # backbone.json
    metrics: dict[str, float]  # protocol -> top-1 of this backbone
    baseline: dict[str, float]  # protocol -> top-1 on raw pixels (same code)
    class_names: list[str]
    confusion: list[list[int]]  # rows = true class, columns = predicted
    confusion_protocol: str
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    retrieval: Image.Image | None = None
    pca: Image.Image | None = None
    details: dict[str, Any] = field(default_factory=dict)  # selection outcomes, counts, budget


_CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .up{color:#17803d} .down{color:#b42318}
.cm td{min-width:2.6em} .note{color:#555;font-size:.9em} img{image-rendering:pixelated;max-width:100%}
"""


def _metrics_table(data: ReportData) -> str:
    rows = []
    for name in sorted(set(data.metrics) | set(data.baseline)):
        m, b = data.metrics.get(name), data.baseline.get(name)
        delta = ""
        if m is not None and b is not None:
            cls = "up" if m > b else "down"
            delta = f'<td class="{cls}">{100 * (m - b):+.1f}</td>'
        else:
            delta = "<td>–</td>"
        fm = "–" if m is None else f"{100 * m:.1f}"
        fb = "–" if b is None else f"{100 * b:.1f}"
        rows.append(f'<tr><td class="l">{html.escape(name)}</td><td>{fm}</td><td>{fb}</td>{delta}</tr>')
    return (
        '<table id="metrics-table"><tr><th class="l">protocol</th><th>this backbone (top-1 %)</th>'
        "<th>raw pixels (top-1 %)</th><th>Δ (points)</th></tr>" + "".join(rows) + "</table>"
    )


def _confusion_table(cm: list[list[int]], names: list[str]) -> str:
    arr = np.asarray(cm, dtype=np.float64)
    row_sum = arr.sum(1, keepdims=True)
    frac = np.divide(arr, row_sum, out=np.zeros_like(arr), where=row_sum > 0)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            a = frac[i, j]
            colour = f"rgba(31,119,180,{a:.2f})" if i == j else f"rgba(214,39,40,{min(1.0, 3 * a):.2f})"
            cells.append(
                f'<td style="background:{colour}" title="{100 * a:.1f}% of {html.escape(name)}">{int(arr[i, j])}</td>'
            )
        body.append(f'<tr><th class="l">{html.escape(name)}</th>{"".join(cells)}</tr>')
    return (
        '<table class="cm" id="confusion-table"><tr><th class="l">true \\ predicted</th>'
        + head
        + "</tr>"
        + "".join(body)
        + "</table>"
    )


def _img(img: Image.Image | None, alt: str) -> str:
    if img is None:
        return f'<p class="note">No {html.escape(alt)} available for this run.</p>'
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(img)}">'


def render_report(data: ReportData) -> str:
    """The whole report as one HTML string."""
    bb = data.backbone
    arch = (
        f"{html.escape(str(bb.get('dinoflow_backbone', '?')))} (timm <code>{html.escape(str(bb.get('timm_model', '?')))}"
        f"</code>, width {bb.get('embed_dim', '?')}, patch {bb.get('patch_size', '?')}, {bb.get('img_size', '?')} px)"
    )
    details = "".join(
        f'<tr><td class="l">{html.escape(str(k))}</td><td class="l">{html.escape(str(v))}</td></tr>'
        for k, v in data.details.items()
    )
    curves = (
        _img(line_chart(data.curves, "training curves"), "training curves")
        if data.curves
        else '<p class="note">No training curves were given (curves_uri / training_uri unset).</p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data.title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(data.title)}</h1>
<p>Backbone: {arch}</p>
<section id="metrics"><h2>Metrics</h2>
<p class="note">Top-1 accuracy on the test split. The raw-pixel baseline runs the same protocols on
flattened pixels: a self-supervised backbone that does not beat it has learned nothing useful.</p>
{_metrics_table(data)}
<table id="details">{details}</table></section>
<section id="curves"><h2>Training curves</h2>{curves}</section>
<section id="confusion"><h2>Confusion matrix</h2>
<p class="note">{html.escape(data.confusion_protocol)} on the test split; rows are true classes.</p>
{_confusion_table(data.confusion, data.class_names)}</section>
<section id="retrieval"><h2>Nearest-neighbour retrieval</h2>
<p class="note">Left: a test image. Right: its nearest training images by cosine similarity of the
CLS feature (green frame: same class, red: different).</p>
{_img(data.retrieval, "retrieval examples")}</section>
<section id="pca"><h2>PCA of patch features</h2>
<p class="note">Top: test images. Bottom: the first 3 principal components of the foreground patch
features as RGB (the DINOv2 visualisation; background, found by thresholding the first component,
is black).</p>
{_img(data.pca, "patch-feature PCA")}</section>
</body></html>
"""
