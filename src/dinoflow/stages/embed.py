"""embed: a manifest + a backbone checkpoint -> L2-normalised float16 embeddings aligned with it.

Images stream through DataLoader workers (decode, resize, perceptual hash) so decoding overlaps
the model; the model runs on the GPU when one is present. Without a checkpoint the stage says so
and bootstraps one: a short pretrain-stage run on a random sample of the manifest, on a backbone
shape that suits the data (its channels and resolution), never random weights.

Fan-out (``parts`` > 1; ``dinoflow.stages._fanout``): ``plan`` checks the inputs and bootstraps the
backbone once; ``part`` i embeds its contiguous share of the rows (whole batches, so every row is
embedded in the same batch whatever ``parts`` is: the output does not depend on it) into its own
shards beside the others'; the stage run then lists all shards in ``embeddings.json``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_validator

from dinoflow.errors import SpecError
from dinoflow.stages import _fanout
from dinoflow.stages.base import StageResult, StageSpec

log = logging.getLogger(__name__)

# Backbones a bootstrap may train when the spec names none: the one with the data's channels and the
# largest input size not above the images' (median) short side.
BOOTSTRAP_BACKBONES = ("vit_mini_p7_28", "vit_mini_p8_64", "vit_small_p14")
LOCAL_CROP_SHARE = 98 / 224  # DINOv2: 98 px local crops for 224 px global ones (patch 14)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
PIXELS = "pixels"  # EmbedResult.backbone_uri of the training-free pixel embedder


class EmbedSpec(StageSpec):
    """Output: ``{output_uri}/embeddings/`` (``emb*.npy`` float16 shards, ``phash*.npy``,
    ``embeddings.json``)."""

    manifest_uri: str = Field(..., description="manifest to embed (s3://.../manifest.parquet)")
    backbone_uri: str | None = Field(
        None,
        description="exported backbone prefix (backbone.json + backbone.safetensors); when "
        "unset, a short bootstrap pretrain on a sample of the pool provides one",
    )
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes decoding images (default: loader_workers: on a GPU, or "
        "for the pixels embedder, min(4, cpus - 1); a CPU model gets the cores its torch threads leave "
        "free, none when they take every core: then decoding inline is faster than a worker competing "
        "with the model)",
    )
    image_px: int | None = Field(None, ge=8, description="resize side; default: the backbone's size")
    features: Literal["cls", "cls+patch"] = Field(
        "cls", description="cls, or CLS ++ mean-pooled patch tokens (DINOv2 linear-probe features)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    rows_per_shard: int = Field(262_144, ge=1, description="embedding rows per .npy shard")
    parts: int = Field(
        1, ge=1, description="parallel tasks the rows are split into (contiguous ranges of whole batches)"
    )
    bootstrap_backbone: str | None = Field(
        None,
        description="backbone the bootstrap pretrain trains (default: by the pool's channels and image "
        f"size, one of {', '.join(BOOTSTRAP_BACKBONES)})",
    )
    bootstrap_sample: int = Field(5000, ge=16, description="pool images the bootstrap pretrain sees")
    bootstrap_steps: int = Field(200, ge=1, description="optimizer steps of the bootstrap pretrain")
    bootstrap_method: Literal["dinov2", "mae", "splitmask"] = "dinov2"
    embedder: Literal["backbone", "pixels"] = Field(
        "backbone",
        description="backbone: a trained (or bootstrapped) backbone's features; pixels: no model, the "
        "image reduced to pixels_px squared in gray, standardised and L2-normalised (cosine = pixel "
        "correlation): a training-free first-generation embedder for a pool no model has seen yet",
    )
    pixels_px: int = Field(14, ge=2, le=64, description="embedder pixels: side of the reduced image")

    @model_validator(mode="before")
    @classmethod
    def _pixels_need_no_backbone(cls, data: Any) -> Any:
        # backbone_uri "pixels" is what a pixel-embedded set's result offers the sets embedded with
        # the same embedder (the full pipeline's share_embedder)
        if isinstance(data, dict) and data.get("backbone_uri") == PIXELS:
            data = {**data, "backbone_uri": None, "embedder": "pixels"}
        if isinstance(data, dict) and data.get("embedder") == "pixels" and data.get("backbone_uri"):
            raise ValueError("embedder 'pixels' uses no backbone: leave backbone_uri unset")
        return data


class EmbedResult(StageResult):
    embeddings_uri: str = Field(..., description="prefix of row-aligned float16 .npy shards")
    manifest_uri: str
    backbone_uri: str
    bootstrapped: bool = Field(False, description="the backbone came from the bootstrap pretrain")
    dim: int
    count: int
    parts: int = 1
    images_per_second: float = 0.0
    device: str = "cpu"


class _Prep:
    """Picklable transform: the image at ``px`` in ``mode`` as uint8 ``[px, px, C]``, and its 32 px
    grayscale reduction the perceptual hash is computed from (:func:`_hash_batch` makes a batch of
    them into model input and hashes). Pixels leave PIL as bytes (``tobytes``), a third cheaper per
    28 px image than ``np.asarray`` of the image, whose array interface copies them twice."""

    def __init__(self, px: int, mode: str):
        from dinoflow.curation.hashing import HASH_PX

        self.px, self.mode, self.hash_px = px, mode, HASH_PX

    def __call__(self, img):
        import numpy as np
        from PIL import Image

        gray = img if img.mode == "L" else img.convert("L")
        hp = self.hash_px
        g = np.frombuffer(gray.resize((hp, hp), Image.BILINEAR).tobytes(), np.uint8).reshape(hp, hp)
        if img.mode != self.mode:
            img = img.convert(self.mode)
        if img.size != (self.px, self.px):
            img = img.resize((self.px, self.px), Image.BILINEAR)
        return np.frombuffer(img.tobytes(), np.uint8).reshape(self.px, self.px, -1), g


def _hash_batch(x, gray):
    """uint8 ``[B, px, px, C]`` images and ``[B, 32, 32]`` reductions (numpy) -> (uint8 tensor
    ``[B, C, px, px]``, the batch's perceptual hashes as int64 ``[B, 2]``): one DCT for the whole batch,
    ~15x cheaper per image than one call per image (``curation.hashing.phash64``; the same bits as
    ``phash_pil`` of each image)."""
    import numpy as np
    import torch

    from dinoflow.curation.hashing import phash64

    images = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(phash64(np.asarray(gray, np.float32)).view(np.int64))


def loader_workers(requested: int | None, device: str, pixels: bool = False) -> int:
    """DataLoader workers for the embed loop: ``requested``, or by default min(4, cpus - 1) when the
    model runs on a GPU (or is the cheap pixels embedder), else the cores torch's threads leave free.
    On 2 CPU cores with a 2-thread ViT the stage embedded 699 images/s with one worker and 760
    decoding inline (``dinoflow bench embed --reps 5``): a worker's bursts stall the model's threads
    (a prefetch thread did no better: its decode takes the same cores)."""
    import os

    import torch

    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device == "cuda" or pixels:
        return max(0, min(4, cpus - 1))
    return max(0, min(4, cpus - torch.get_num_threads()))


def pick_device(want: str) -> str:
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise SpecError("embed spec asks for device 'cuda' but no CUDA device is visible")
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def features_of(backbone, x, features: str):
    """L2-normalised float features of a batch of uint8 images."""
    import torch
    import torch.nn.functional as F

    out = backbone.encode(backbone.normalize(x))
    f = out["cls"]
    if features == "cls+patch":
        f = torch.cat([f, out["patch"].mean(1)], dim=1)
    return F.normalize(f.float(), dim=1)


# -- bootstrap -----------------------------------------------------------------------------------
def pool_shape(store, table, rows, probe: int = 64) -> tuple[int, int]:
    """(channels, median short side in px) of the sampled ``rows``: 3 when any of the first ``probe``
    decodes in colour, else 1."""
    import numpy as np

    from dinoflow.data.images import decode_image
    from dinoflow.data.shards import ShardIndex

    w = table.column("width").to_numpy(zero_copy_only=False)[rows]
    h = table.column("height").to_numpy(zero_copy_only=False)[rows]
    side = int(np.median(np.minimum(w, h)))
    index = ShardIndex(store)
    shard, member = table.column("shard"), table.column("member")
    modes = {
        decode_image(index.read(shard[int(r)].as_py(), member[int(r)].as_py())).mode for r in rows[:probe]
    }
    return (1 if modes <= set(_GRAY_MODES) else 3), side


def bootstrap_backbone_for(channels: int, side_px: int) -> str:
    """The bootstrap shape for images of ``channels`` and short side ``side_px``."""
    from dinoflow.models.registry import get_entry

    fits = [b for b in BOOTSTRAP_BACKBONES if get_entry(b).in_chans == channels]
    if not fits:
        raise SpecError(f"no bootstrap backbone takes {channels}-channel images; set bootstrap_backbone")
    below = [b for b in fits if get_entry(b).img_size <= side_px]
    pool = below or fits
    return (
        max(pool, key=lambda b: get_entry(b).img_size)
        if below
        else min(pool, key=lambda b: get_entry(b).img_size)
    )


def bootstrap_fields(spec: EmbedSpec, channels: int, side_px: int, sample_uri: str, m: int) -> dict[str, Any]:
    """Pretrain-stage fields of the bootstrap run: the BOOTSTRAP preset's short-run optimisation and head,
    a backbone for the pool's channels and size, crops at that backbone's size."""
    from dinoflow.models.registry import get_entry
    from dinoflow.stages import get_stage
    from dinoflow.train.presets import BOOTSTRAP

    name = spec.bootstrap_backbone or bootstrap_backbone_for(channels, side_px)
    entry = get_entry(name)
    if entry.in_chans != channels:
        raise SpecError(
            f"embed: bootstrap_backbone {name} takes {entry.in_chans}-channel images but the pool's are "
            f"{'RGB' if channels == 3 else 'grayscale'}; choose one with in_chans={channels}"
        )
    stage = get_stage("pretrain")
    fields = {k: v for k, v in BOOTSTRAP.items() if k in stage.spec_cls.model_fields and k != "epochs"}
    p = entry.patch_size
    crops = dict(fields.get("crops", {}))
    crops["global_crop_px"] = max(p, int(round(entry.img_size / p)) * p)
    crops["local_crop_px"] = max(p, int(round(entry.img_size * LOCAL_CROP_SHARE / p)) * p)
    # The exported backbone is the EMA teacher: keep its horizon 1/(1-m) within a tenth of the run,
    # or a short bootstrap exports a teacher that has barely left its (image-blind) initialisation.
    dinov2 = dict(fields.get("dinov2", {}))
    horizon_m = max(0.9, 1.0 - 10.0 / spec.bootstrap_steps)
    dinov2["momentum_start"] = min(float(dinov2.get("momentum_start", 0.992)), horizon_m)
    fields.update(
        output_uri=spec.out("bootstrap", "pretrain"),
        manifest_uri=sample_uri,
        method=spec.bootstrap_method,
        steps=spec.bootstrap_steps,
        backbone=name,
        crops=crops,
        dinov2=dinov2,
        batch_size=min(int(fields.get("batch_size", 64)), m),
    )
    return fields


def _bootstrap(spec: EmbedSpec, store, table) -> str:
    import numpy as np

    from dinoflow.data.manifest import write_manifest
    from dinoflow.stages import get_stage

    n = table.num_rows
    m = min(spec.bootstrap_sample, n)
    rows = np.sort(np.random.default_rng(0).choice(n, m, replace=False))
    channels, side = pool_shape(store, table, rows)
    sample_uri = spec.out("bootstrap", "sample.parquet")
    fields = bootstrap_fields(spec, channels, side, sample_uri, m)
    log.warning(
        "embed: no backbone_uri given; bootstrapping one: %s pretrain of %s (%s, %d px crops) for %d steps "
        "on %d of %d pool images (%s, median short side %d px)",
        spec.bootstrap_method,
        fields["backbone"],
        "picked for the pool" if spec.bootstrap_backbone is None else "from the spec",
        fields["crops"]["global_crop_px"],
        spec.bootstrap_steps,
        m,
        n,
        "RGB" if channels == 3 else "grayscale",
        side,
    )
    write_manifest(store, sample_uri, table.take(rows))
    stage = get_stage("pretrain")
    return stage.run(stage.parse_spec(fields), store).backbone_uri


# -- phases --------------------------------------------------------------------------------------
def _manifest(spec: EmbedSpec, store):
    from dinoflow.data.manifest import read_manifest

    table = read_manifest(store, spec.manifest_uri)
    if table.num_rows == 0:
        raise SpecError(f"embed: manifest {spec.manifest_uri} is empty: nothing to embed")
    return table


def _median_side(table) -> int:
    import numpy as np

    w = table.column("width").to_numpy(zero_copy_only=False)
    h = table.column("height").to_numpy(zero_copy_only=False)
    return max(8, int(np.median(np.minimum(w, h))))


class _Pixels:
    """The ``pixels`` embedder, called as a backbone's features are: gray, area-reduced to
    ``side`` squared, standardised per image, L2-normalised (``curation.descriptors.pixel_descriptor``)."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self, x):
        import torch

        from dinoflow.curation.descriptors import pixel_descriptor

        return torch.from_numpy(pixel_descriptor(x.float().numpy(), self.side))


def plan(spec: EmbedSpec, store) -> dict[str, Any]:
    """Check the inputs, bootstrap the backbone when none is given; what every part needs (read from
    the backbone's ``backbone.json``: the plan task loads no model unless it bootstraps one)."""
    table = _manifest(spec, store)
    pick_device(spec.device)
    if spec.embedder == "pixels":
        px = spec.image_px or _median_side(table)
        return {
            "backbone_uri": PIXELS,
            "bootstrapped": False,
            "image_px": px,
            "in_chans": 1,
            "dim": spec.pixels_px**2,
            "count": table.num_rows,
        }
    if spec.backbone_uri is not None and not store.exists(spec.backbone_uri.rstrip("/") + "/backbone.json"):
        raise SpecError(f"embed: no exported backbone at {spec.backbone_uri} (backbone.json missing)")
    bootstrapped = spec.backbone_uri is None
    backbone_uri = _bootstrap(spec, store, table) if bootstrapped else spec.backbone_uri
    bb = store.get_json(backbone_uri.rstrip("/") + "/backbone.json")
    px = spec.image_px or int(bb["img_size"])
    if bb.get("family", "vit") == "vit" and px % int(bb["patch_size"]):
        raise SpecError(
            f"embed: image_px={px} is not a multiple of the backbone's patch size {bb['patch_size']}"
        )
    return {
        "backbone_uri": backbone_uri,
        "bootstrapped": bootstrapped,
        "image_px": px,
        "in_chans": int(bb["in_chans"]),
        "dim": int(bb["embed_dim"]) * (2 if spec.features == "cls+patch" else 1),
        "count": table.num_rows,
    }


def embed_part(spec: EmbedSpec, store, part: int, planned: dict[str, Any]) -> dict[str, Any]:
    """Embed part ``part``'s rows into its own shards under ``{output_uri}/embeddings/``."""
    import time

    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from dinoflow.curation.partition import part_range
    from dinoflow.data.dataset import RowBatches
    from dinoflow.data.embeddings import EmbeddingWriter
    from dinoflow.metrics import IMAGES_PROCESSED
    from dinoflow.models import load_backbone

    table = _manifest(spec, store)
    n = table.num_rows
    if n != planned["count"]:
        raise SpecError(
            f"embed: manifest {spec.manifest_uri} changed since the plan ({n} != {planned['count']})"
        )
    lo, hi = part_range(n, spec.parts, part, align=spec.batch_size)
    device = pick_device(spec.device)
    if planned["backbone_uri"] == PIXELS:
        pixels, device = _Pixels(spec.pixels_px), "cpu"
    else:
        backbone = load_backbone(store, planned["backbone_uri"], map_location=device).eval()
    mode = "L" if planned["in_chans"] == 1 else "RGB"
    rows = table.slice(lo, hi - lo)
    prep = _Prep(planned["image_px"], mode)
    ds = RowBatches(store.settings, rows, spec.batch_size, prep, first_row=lo, batch_transform=_hash_batch)
    workers = loader_workers(spec.num_workers, device, planned["backbone_uri"] == PIXELS)
    workers = min(workers, max(1, -(-(hi - lo) // spec.batch_size)))
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        pin_memory=device == "cuda",
        prefetch_factor=4 if workers else None,
    )
    writer = EmbeddingWriter(
        store,
        spec.out("embeddings"),
        planned["dim"],
        hashes=True,
        name=f"-p{part:05d}" if spec.parts > 1 else "",
        rows_per_shard=spec.rows_per_shard,
    )
    done = 0  # the loader hands batches back in row order: each is appended as it comes
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, h, r in loader:
            if int(r[0]) != lo + done:
                raise SpecError(f"embed: rows arrived out of order ({int(r[0])} after {lo + done})")
            if planned["backbone_uri"] == PIXELS:
                f = pixels(x)
            else:
                f = features_of(backbone, x.to(device, non_blocking=True), spec.features)
            writer.add(f.half().cpu().numpy(), h.numpy().view(np.uint64))
            done += len(r)
            IMAGES_PROCESSED.labels("embed").inc(len(r))
    secs = time.perf_counter() - t0
    if done != hi - lo:
        raise SpecError(f"embed: {hi - lo - done} manifest rows were not embedded (data loader gap)")
    listing = writer.close()
    log.info(
        "embed: part %d of %d, rows %d..%d, %.0f images/s on %s",
        part,
        spec.parts,
        lo,
        hi,
        (hi - lo) / max(secs, 1e-9),
        device,
    )
    return {"listing": listing, "rows": [lo, hi], "embed_seconds": round(secs, 4), "device": device}


def run_phase(spec: EmbedSpec, store, phase: str, part: int = 0) -> dict:
    """One fan-out phase (``plan`` or ``part``), recorded under ``output_uri``."""
    return _fanout.run_phase("embed", spec, store, phase, part, plan, embed_part)


def run(spec: EmbedSpec, store):
    from dinoflow.data.embeddings import write_index

    planned = run_phase(spec, store, "plan")
    parts = [run_phase(spec, store, "part", i) for i in range(spec.parts)]
    out = spec.out("embeddings")
    write_index(
        store,
        out,
        [p["listing"] for p in parts],
        planned["dim"],
        meta={
            "manifest_uri": spec.manifest_uri,
            "backbone_uri": planned["backbone_uri"],
            "features": spec.features,
            "image_px": planned["image_px"],
        },
    )
    n = planned["count"]
    ips = n / max(sum(p["embed_seconds"] for p in parts), 1e-9)
    log.info("embed: %d images -> %d-d in %d part(s) at %.0f images/s", n, planned["dim"], spec.parts, ips)
    return EmbedResult(
        output_uri=spec.output_uri,
        embeddings_uri=out,
        manifest_uri=spec.manifest_uri,
        backbone_uri=planned["backbone_uri"],
        bootstrapped=planned["bootstrapped"],
        dim=planned["dim"],
        count=n,
        parts=spec.parts,
        images_per_second=round(ips, 1),
        device=parts[0]["device"],
    )
