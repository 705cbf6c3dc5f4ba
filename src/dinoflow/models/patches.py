"""The pixel layout of ViT patches: images to rows of patch pixels and back (the layout the
reconstruction targets of MAE and SplitMask and the dVAE tokenizer share)."""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], row-major patches, each patch (py, px, c)-ordered."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(p: torch.Tensor, patch: int, chans: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``patchify``: [B, gh*gw, p*p*C] -> [B, C, gh*p, gw*p]."""
    b = p.shape[0]
    gh, gw = grid
    x = p.reshape(b, gh, gw, patch, patch, chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, chans, gh * patch, gw * patch)
