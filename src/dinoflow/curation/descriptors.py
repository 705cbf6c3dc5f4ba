"""Vector helpers of the curation science: unit-normalising embeddings, and a training-free pixel
descriptor (a copy-detection baseline for tests and benches that must not depend on a backbone)."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def pixel_descriptor(images: np.ndarray, side_px: int = 14) -> np.ndarray:
    """A copy-detection baseline with no training: the image reduced to ``side_px`` squared,
    standardised per image (cosine = pixel correlation), L2-normalised. For tests and benches that
    must not depend on a trained backbone; the embed stage uses a backbone."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images).copy()).float()
    if x.ndim == 3:
        x = x[:, None]
    x = F.interpolate(x.mean(1, keepdim=True), size=(side_px, side_px), mode="area").flatten(1)
    x = x - x.mean(1, keepdim=True)
    return l2_normalize(x.numpy())
