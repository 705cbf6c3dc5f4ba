"""Patch masks for the denoising-autoencoder methods. True = masked (hidden from the encoder).

``random_masking`` (MAE): each image hides a random ``ratio`` of its patches, the same count in
every image so visible tokens stack into one tensor. ``split_masks`` (SplitMask): each image's
patches are split at random into two disjoint halves that together cover every patch exactly once.
"""

from __future__ import annotations

import torch


def _perm(batch: int, n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    noise = torch.rand(batch, n, generator=generator, device="cpu")
    return noise.argsort(dim=1).to(device)


def random_masking(
    batch: int,
    n_patches: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask bool [B, N], ids_keep long [B, N_visible]) with ``round(ratio*N)`` masked per image."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_mask = int(round(ratio * n_patches))
    n_keep = n_patches - n_mask
    perm = _perm(batch, n_patches, generator, device)
    ids_keep = perm[:, :n_keep].sort(dim=1).values  # keep token order (position embedding is added before)
    mask = torch.ones(batch, n_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return mask, ids_keep


def split_masks(
    batch: int, n_patches: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves (mask_a, mask_b), bool [B, N]; mask_a True = hidden from view A.

    View A sees the patches where ``mask_a`` is False, i.e. exactly those hidden from view B:
    ``mask_a == ~mask_b``. With odd N, view A sees ``N // 2`` patches and view B the rest.
    """
    if n_patches < 2:
        raise ValueError(f"SplitMask needs at least 2 patches, got {n_patches}")
    perm = _perm(batch, n_patches, generator, device)
    a_visible = torch.zeros(batch, n_patches, dtype=torch.bool, device=device)
    a_visible.scatter_(1, perm[:, : n_patches // 2], True)
    return ~a_visible, a_visible
