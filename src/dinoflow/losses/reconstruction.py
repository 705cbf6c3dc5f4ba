"""Masked-patch reconstruction losses (MAE, SplitMask): only the masked patches count.

Targets are the image cut into non-overlapping patches ([B, N, p*p*C], ``dinoflow.models.patches.patchify``); with
``norm_pix`` each target patch is standardised by its own mean and variance (MAE's best setting,
He et al. 2021, Table 1d). Token targets (a k-means tokenizer) use cross-entropy over the codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation of pixel targets (MAE ``norm_pix_loss``; eps 1e-6 as in MAE)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    pred, target: [B, N, K]; mask: bool [B, N], True = masked (predicted). With no masked patch at all
    there is nothing to reconstruct: the loss is an exact zero that still carries a graph.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}"
        )
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def masked_cross_entropy(logits: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over token codes of the masked patches only. logits [B, N, K], codes int [B, N]."""
    if logits.shape[:2] != codes.shape or mask.shape != codes.shape:
        raise ValueError(
            f"shapes differ: logits {tuple(logits.shape)}, codes {tuple(codes.shape)}, mask {tuple(mask.shape)}"
        )
    per_patch = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten(), reduction="none").view_as(
        codes
    )
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)
