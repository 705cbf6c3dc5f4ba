"""embed: a manifest + a backbone checkpoint -> L2-normalised float16 embeddings aligned with it.

Images stream through DataLoader workers (decode, resize, perceptual hash) so decoding overlaps
the model; the model runs on the GPU when one is present. Without a checkpoint the stage says so
and bootstraps one: a short pretrain-stage run on a random sample of the manifest,
never random weights.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from dinoflow.errors import SpecError
from dinoflow.stages.base import StageResult, StageSpec

log = logging.getLogger(__name__)


class EmbedSpec(StageSpec):
    """Output: ``{output_uri}/embeddings/`` (``emb-*.npy`` float16, ``phash.npy``, ``embeddings.json``)."""

    manifest_uri: str = Field(..., description="manifest to embed (s3://.../manifest.parquet)")
    backbone_uri: str | None = Field(
        None,
        description="exported backbone prefix (backbone.json + backbone.safetensors); when "
        "unset, a short bootstrap pretrain on a sample of the pool provides one",
    )
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding images")
    image_px: int | None = Field(None, ge=8, description="resize side; default: the backbone's size")
    features: Literal["cls", "cls+patch"] = Field(
        "cls", description="cls, or CLS ++ mean-pooled patch tokens (DINOv2 linear-probe features)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    rows_per_shard: int = Field(262_144, ge=1, description="embedding rows per .npy shard")
    bootstrap_backbone: str | None = Field(
        None, description="backbone the bootstrap pretrain trains (default: the DEMO preset's)"
    )
    bootstrap_sample: int = Field(5000, ge=16, description="pool images the bootstrap pretrain sees")
    bootstrap_steps: int = Field(200, ge=1, description="optimizer steps of the bootstrap pretrain")
    bootstrap_method: Literal["dinov2", "mae", "splitmask"] = "dinov2"


class EmbedResult(StageResult):
    embeddings_uri: str = Field(..., description="prefix of row-aligned float16 .npy shards")
    manifest_uri: str
    backbone_uri: str
    bootstrapped: bool = Field(False, description="the backbone came from the bootstrap pretrain")
    dim: int
    count: int
    images_per_second: float = 0.0
    device: str = "cpu"


class _Prep:
    """Picklable DataLoader transform: resize, uint8 tensor, perceptual hash of the decoded image."""

    def __init__(self, px: int, mode: str):
        self.px, self.mode = px, mode

    def __call__(self, img):
        import numpy as np
        import torch
        from PIL import Image

        from dinoflow.curation.hashing import phash_pil

        h = phash_pil(img).view(np.int64)
        img = img.convert(self.mode)
        if img.size != (self.px, self.px):
            img = img.resize((self.px, self.px), Image.BILINEAR)
        a = np.asarray(img, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(a.copy()), torch.from_numpy(h.copy())


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


def _bootstrap(spec: EmbedSpec, store, table) -> str:
    import numpy as np

    from dinoflow.data.manifest import write_manifest
    from dinoflow.stages import get_stage

    n = table.num_rows
    m = min(spec.bootstrap_sample, n)
    log.warning(
        "embed: no backbone_uri given; bootstrapping one: %s pretrain of %s for %d steps "
        "on %d of %d pool images",
        spec.bootstrap_method,
        spec.bootstrap_backbone or "the DEMO preset's backbone",
        spec.bootstrap_steps,
        m,
        n,
    )
    rows = np.sort(np.random.default_rng(0).choice(n, m, replace=False))
    sample_uri = spec.out("bootstrap", "sample.parquet")
    write_manifest(store, sample_uri, table.take(rows))
    from dinoflow.train.presets import DEMO

    stage = get_stage("pretrain")
    # the DEMO training preset (28 px crops, small head) with our step count instead of its epochs
    fields = {k: v for k, v in DEMO.items() if k in stage.spec_cls.model_fields and k != "epochs"}
    fields.update(
        output_uri=spec.out("bootstrap", "pretrain"),
        manifest_uri=sample_uri,
        method=spec.bootstrap_method,
        steps=spec.bootstrap_steps,
        batch_size=min(int(fields.get("batch_size", 64)), m),
    )
    # The exported backbone is the EMA teacher: keep its horizon 1/(1-m) within a tenth of the run,
    # or a short bootstrap exports a teacher that has barely left its (image-blind) initialisation.
    dinov2 = dict(fields.get("dinov2", {}))
    horizon_m = max(0.9, 1.0 - 10.0 / spec.bootstrap_steps)
    dinov2["momentum_start"] = min(float(dinov2.get("momentum_start", 0.992)), horizon_m)
    fields["dinov2"] = dinov2
    if spec.bootstrap_backbone:
        from dinoflow.models.registry import get_entry

        fields["backbone"] = spec.bootstrap_backbone
        # the preset's crops suit its own patch size; snap them to the chosen backbone's patch grid
        patch = get_entry(spec.bootstrap_backbone).patch_size
        crops = dict(fields.get("crops", {}))
        for key in ("global_crop_px", "local_crop_px"):
            if key in crops:
                crops[key] = max(patch, int(round(crops[key] / patch)) * patch)
        fields["crops"] = crops
    pspec = stage.parse_spec(fields)
    return stage.run(pspec, store).backbone_uri


def run(spec: EmbedSpec, store):
    import time

    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from dinoflow.data.dataset import ManifestDataset
    from dinoflow.data.embeddings import write_embeddings
    from dinoflow.data.manifest import read_manifest
    from dinoflow.metrics import IMAGES_PROCESSED
    from dinoflow.models import load_backbone

    table = read_manifest(store, spec.manifest_uri)
    n = table.num_rows
    if n == 0:
        raise SpecError(f"embed: manifest {spec.manifest_uri} is empty: nothing to embed")
    device = pick_device(spec.device)
    if spec.backbone_uri is not None and not store.exists(spec.backbone_uri.rstrip("/") + "/backbone.json"):
        raise SpecError(f"embed: no exported backbone at {spec.backbone_uri} (backbone.json missing)")
    bootstrapped = spec.backbone_uri is None
    backbone_uri = _bootstrap(spec, store, table) if bootstrapped else spec.backbone_uri
    backbone = load_backbone(store, backbone_uri, map_location=device).eval()
    px = spec.image_px or backbone.img_size
    if backbone.family == "vit" and px % backbone.patch_size:
        raise SpecError(
            f"embed: image_px={px} is not a multiple of the backbone's patch size {backbone.patch_size}"
        )
    mode = "L" if backbone.in_chans == 1 else "RGB"
    ds = ManifestDataset(store.settings, table, _Prep(px, mode))
    loader = DataLoader(
        ds,
        batch_size=spec.batch_size,
        num_workers=spec.num_workers,
        pin_memory=device == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if spec.num_workers else None,
    )
    dim = backbone.embed_dim * (2 if spec.features == "cls+patch" else 1)
    emb = np.zeros((n, dim), np.float16)
    ph = np.zeros((n, 2), np.int64)
    seen = np.zeros(n, bool)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for (x, h), _, rows in loader:
            x = x.to(device, non_blocking=True)
            f = features_of(backbone, x, spec.features)
            r = rows.numpy()
            emb[r] = f.half().cpu().numpy()
            ph[r] = h.numpy()
            seen[r] = True
            IMAGES_PROCESSED.labels("embed").inc(len(r))
    secs = time.perf_counter() - t0
    if not seen.all():
        raise SpecError(f"embed: {int((~seen).sum())} manifest rows were not embedded (data loader gap)")
    out = spec.out("embeddings")
    write_embeddings(
        store,
        out,
        emb,
        phash=ph.view(np.uint64),
        rows_per_shard=spec.rows_per_shard,
        meta={
            "manifest_uri": spec.manifest_uri,
            "backbone_uri": backbone_uri,
            "features": spec.features,
            "image_px": px,
        },
    )
    ips = n / max(secs, 1e-9)
    log.info("embed: %d images -> %d-d on %s at %.0f images/s", n, dim, device, ips)
    return EmbedResult(
        output_uri=spec.output_uri,
        embeddings_uri=out,
        manifest_uri=spec.manifest_uri,
        backbone_uri=backbone_uri,
        bootstrapped=bootstrapped,
        dim=dim,
        count=n,
        images_per_second=round(ips, 1),
        device=device,
    )
