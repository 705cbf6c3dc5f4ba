"""Frozen features: extracted once per (backbone, manifest), cached in object storage.

A ``FeatureSet`` holds, per image, the CLS token of each of the last (up to 4) blocks and the mean
of the last block's patch tokens: everything the DINOv2 linear grid and k-NN need, and small
(a 60k-image Fashion-MNIST train split at width 192 is ~115 MB, stored as float16).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dinoflow.errors import SpecError

log = logging.getLogger(__name__)

N_LAST_BLOCKS = 4  # DINOv2 linear eval: CLS tokens of the last 1 or 4 blocks


@dataclass
class FeatureSet:
    cls_blocks: torch.Tensor  # float [N, B, D]: CLS token of each of the last B blocks, oldest first
    patch_mean: torch.Tensor | None  # float [N, D]: mean of the last block's patch tokens
    labels: torch.Tensor  # int64 [N] (-1 = unknown)

    def __len__(self) -> int:
        return int(self.cls_blocks.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.cls_blocks.shape[1])

    @property
    def cls(self) -> torch.Tensor:
        """The last block's CLS token: the k-NN feature (DINOv2)."""
        return self.cls_blocks[:, -1].float()

    def linear_input(self, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
        """DINOv2's linear input: concatenated CLS of the last n blocks [+ mean-pooled patch tokens]."""
        if n_last_blocks > self.n_blocks:
            raise SpecError(
                f"asked for the last {n_last_blocks} blocks but only {self.n_blocks} were extracted"
            )
        parts = [self.cls_blocks[:, -n_last_blocks:].reshape(len(self), -1)]
        if avgpool:
            if self.patch_mean is None:
                raise SpecError("these features carry no patch tokens to pool")
            parts.append(self.patch_mean)
        return torch.cat(parts, 1).float()

    @classmethod
    def from_pixels(cls, images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        """Raw pixels in [0, 1] as a one-block 'feature' (the baseline every backbone must beat)."""
        x = images.reshape(images.shape[0], -1).float() / 255.0
        return cls(x[:, None, :], None, labels.long())

    def subset(self, idx: torch.Tensor) -> FeatureSet:
        pm = self.patch_mean[idx] if self.patch_mean is not None else None
        return FeatureSet(self.cls_blocks[idx], pm, self.labels[idx])

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        t = {"cls_blocks": self.cls_blocks.half().contiguous(), "labels": self.labels.long().contiguous()}
        if self.patch_mean is not None:
            t["patch_mean"] = self.patch_mean.half().contiguous()
        return save(t)

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureSet:
        from safetensors.torch import load

        t = load(data)
        pm = t.get("patch_mean")
        return cls(t["cls_blocks"].float(), pm.float() if pm is not None else None, t["labels"].long())


def normalize_images(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float, scaled to [0, 1] and normalised per channel."""
    x = images.float() / 255.0
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if m.shape[1] != x.shape[1]:
        raise SpecError(f"images have {x.shape[1]} channels but the backbone's mean/std have {m.shape[1]}")
    return (x - m) / s


def fit_images(images: torch.Tensor, in_chans: int, img_size: int) -> torch.Tensor:
    """Bring uint8 images to the backbone's channel count and square size (bilinear resize)."""
    c = images.shape[1]
    if c != in_chans:
        if c == 1:
            images = images.expand(-1, in_chans, -1, -1)
        elif in_chans == 1 and c == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R BT.601 luma
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise SpecError(f"cannot feed {c}-channel images to a backbone with in_chans={in_chans}")
    if images.shape[-2:] != (img_size, img_size):
        images = F.interpolate(images.float(), size=(img_size, img_size), mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images


def available_blocks(backbone: torch.nn.Module) -> int:
    """How many last blocks can give a CLS token (XCiT: its class-attention layers only)."""
    if getattr(backbone, "family", "vit") == "xcit":
        return len(backbone.model.cls_attn_blocks)
    return int(backbone.depth)


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    meta: dict[str, Any],
    batch_size: int = 256,
    n_last_blocks: int = N_LAST_BLOCKS,
    progress: Callable[[int], None] | None = None,
) -> FeatureSet:
    """Run the frozen backbone over uint8 images [N, C, H, W] in batches, on the backbone's device;
    the features come back on the CPU."""
    backbone.eval()
    device = next(backbone.parameters()).device
    n_last_blocks = min(n_last_blocks, available_blocks(backbone))
    images = fit_images(images, int(meta["in_chans"]), int(meta["img_size"]))
    cls_blocks, patch_means = [], []
    for start in range(0, images.shape[0], batch_size):
        x = normalize_images(images[start : start + batch_size], meta["mean"], meta["std"]).to(device)
        out = backbone.encode(x, n_last_blocks=n_last_blocks)
        blocks = out.get("cls_blocks") or [out["cls"]]
        cls_blocks.append(torch.stack([b.float() for b in blocks], 1).cpu())
        patch_means.append(out["patch"].float().mean(1).cpu())
        if progress is not None:
            progress(x.shape[0])
    return FeatureSet(
        torch.cat(cls_blocks).half().float(), torch.cat(patch_means).half().float(), labels.long()
    )


@torch.no_grad()
def patch_tokens(backbone: torch.nn.Module, images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Last-block patch tokens [B, N, D] of a few uint8 images (for the PCA view)."""
    backbone.eval()
    x = normalize_images(
        fit_images(images, int(meta["in_chans"]), int(meta["img_size"])), meta["mean"], meta["std"]
    )
    return backbone.encode(x)["patch"].float()


def cache_key(**parts: Any) -> str:
    """A content key for a feature cache entry (backbone + data versions + extraction settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_features(store: Any, uri: str, compute: Callable[[], FeatureSet]) -> tuple[FeatureSet, bool]:
    """Load the FeatureSet at ``uri`` if present, else compute and store it. Returns (features, hit)."""
    if store.exists(uri):
        log.info("features: cache hit %s", uri)
        return FeatureSet.from_bytes(store.get_bytes(uri)), True
    fs = compute()
    store.put_bytes(uri, fs.to_bytes())
    return FeatureSet.from_bytes(fs.to_bytes()), False  # the same float16 rounding on hit and miss
