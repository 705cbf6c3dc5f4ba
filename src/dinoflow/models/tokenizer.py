"""A k-means patch tokenizer: the cheap discrete target of SplitMask (El-Nouby et al. 2021).

BEiT predicts the codes of a pretrained DALL-E dVAE, which cannot be downloaded here; the SplitMask
paper shows that a k-means codebook over image patches is a cheap alternative. This one:

* cuts images into non-overlapping ``patch_px`` patches (the backbone's patch grid),
* standardises every pixel value with the training set's per-channel mean/std (an affine map, so a
  centroid decoded back to pixels re-encodes to its own code: the round trip is exact),
* fits k-means (k-means++ seeding, Lloyd iterations, empty clusters re-seeded from the farthest
  points) on a random sample of the training patches; everything random comes from one seeded
  ``torch.Generator``, so the same seed and data give the same codebook.

It is an ``nn.Module`` with buffers only (no parameters), so it lives in a method's state dict and
travels with checkpoints; ``save``/``load`` put it in object storage as safetensors + JSON.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dinoflow.errors import SpecError
from dinoflow.models.patches import patchify, unpatchify

log = logging.getLogger(__name__)


def _patches(images: torch.Tensor, patch_px: int) -> torch.Tensor:
    """[B, C, H, W] float -> [B, N, p*p*C] (same layout as models.patches.patchify)."""
    return patchify(images, patch_px)


def _sq_dists(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.t() + c_sq).clamp_min(0.0)


class KMeansPatchTokenizer(nn.Module):
    def __init__(self, n_codes: int, patch_px: int, in_chans: int):
        super().__init__()
        if n_codes < 2:
            raise SpecError(f"n_codes must be >= 2, got {n_codes}")
        self.n_codes = n_codes
        self.patch_px = patch_px
        self.in_chans = in_chans
        dim = patch_px * patch_px * in_chans
        self.register_buffer("centroids", torch.zeros(n_codes, dim))
        self.register_buffer("pixel_mean", torch.zeros(in_chans))
        self.register_buffer("pixel_std", torch.ones(in_chans))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def dim(self) -> int:
        return self.patch_px * self.patch_px * self.in_chans

    # -- fitting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(
        self,
        images: torch.Tensor,
        seed: int = 0,
        iters: int = 20,
        max_patches: int = 200_000,
        chunk: int = 65_536,
    ) -> KMeansPatchTokenizer:
        """Fit the codebook on ``images`` (uint8 or float [B, C, H, W], pixel scale as given)."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise SpecError(f"tokenizer wants images [B, {self.in_chans}, H, W], got {tuple(images.shape)}")
        g = torch.Generator().manual_seed(seed)
        x = images.float().cpu()
        self.pixel_mean.copy_(x.mean(dim=(0, 2, 3)))
        self.pixel_std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-6))
        p = self._standardize_patches(x).reshape(-1, self.dim)
        if p.shape[0] < self.n_codes:
            raise SpecError(
                f"{p.shape[0]} patches cannot seed {self.n_codes} codes; use more images or fewer codes"
            )
        if p.shape[0] > max_patches:
            p = p[torch.randperm(p.shape[0], generator=g)[:max_patches]]
        c = self._kmeans_pp(p, g, chunk)
        for it in range(iters):
            codes, d2 = self._assign(p, c, chunk)
            sums = torch.zeros_like(c).index_add_(0, codes, p)
            counts = torch.bincount(codes, minlength=self.n_codes).float()
            empty = counts == 0
            new_c = sums / counts.clamp_min(1.0).unsqueeze(1)
            if empty.any():  # re-seed empty clusters at the points farthest from their centroid
                far = d2.topk(int(empty.sum())).indices
                new_c[empty] = p[far]
            shift = (new_c - c).pow(2).sum(1).max().item()
            c = new_c
            log.debug("k-means iter %d: max centroid shift %.3g, %d empty", it, shift, int(empty.sum()))
            if shift == 0.0:
                break
        self.centroids.copy_(c)
        self.fitted.fill_(True)
        return self

    def _kmeans_pp(self, p: torch.Tensor, g: torch.Generator, chunk: int) -> torch.Tensor:
        """k-means++ seeding (Arthur & Vassilvitskii 2007), sampled with the given generator."""
        n = p.shape[0]
        idx = [int(torch.randint(n, (1,), generator=g))]
        d2 = (p - p[idx[0]]).pow(2).sum(1)
        for _ in range(1, self.n_codes):
            total = d2.sum()
            if total <= 0:  # fewer distinct patches than codes: duplicates are unavoidable
                nxt = int(torch.randint(n, (1,), generator=g))
            else:
                nxt = int(torch.multinomial(d2 / total, 1, generator=g))
            idx.append(nxt)
            d2 = torch.minimum(d2, (p - p[nxt]).pow(2).sum(1))
        return p[torch.tensor(idx)].clone()

    @staticmethod
    def _assign(p: torch.Tensor, c: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        c_sq = c.pow(2).sum(1).unsqueeze(0)
        codes, dists = [], []
        for s in range(0, p.shape[0], chunk):
            d = _sq_dists(p[s : s + chunk], c, c_sq)
            v, i = d.min(dim=1)
            codes.append(i)
            dists.append(v)
        return torch.cat(codes), torch.cat(dists)

    # -- encode / decode -------------------------------------------------------------------------
    def _standardize_patches(self, images: torch.Tensor) -> torch.Tensor:
        m = self.pixel_mean.view(1, -1, 1, 1).to(images.device)
        s = self.pixel_std.view(1, -1, 1, 1).to(images.device)
        return _patches((images.float() - m) / s, self.patch_px)

    def _check(self, images: torch.Tensor) -> None:
        if not bool(self.fitted):
            raise SpecError("the k-means tokenizer is not fitted: call fit(images) or load() one first")
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise SpecError(f"tokenizer wants images [B, {self.in_chans}, H, W], got {tuple(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] (same pixel scale as at fit) -> codes long [B, N]."""
        self._check(images)
        p = self._standardize_patches(images)
        b, n, _ = p.shape
        codes, _ = self._assign(p.reshape(b * n, -1), self.centroids.to(p.device), 65_536)
        return codes.view(b, n)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Codes [B, gh*gw] -> images [B, C, gh*p, gw*p] made of the centroids, in pixel scale."""

        x = unpatchify(self.centroids[codes], self.patch_px, self.in_chans, grid)
        return x * self.pixel_std.view(1, -1, 1, 1) + self.pixel_mean.view(1, -1, 1, 1)

    # -- storage ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "kind": "kmeans_patch_tokenizer",
            "n_codes": self.n_codes,
            "patch_px": self.patch_px,
            "in_chans": self.in_chans,
        }

    def save(self, store: Any, prefix: str) -> None:
        """``{prefix}/tokenizer.safetensors`` + ``{prefix}/tokenizer.json``."""
        from safetensors.torch import save

        store.put_bytes(
            f"{prefix.rstrip('/')}/tokenizer.safetensors",
            save({k: v.contiguous() for k, v in self.state_dict().items()}),
        )
        store.put_json(f"{prefix.rstrip('/')}/tokenizer.json", self.metadata())

    @classmethod
    def load(cls, store: Any, prefix: str) -> KMeansPatchTokenizer:
        from safetensors.torch import load

        meta = store.get_json(f"{prefix.rstrip('/')}/tokenizer.json")
        if meta.get("kind") != "kmeans_patch_tokenizer":
            raise SpecError(f"{prefix}/tokenizer.json is not a k-means patch tokenizer")
        tok = cls(meta["n_codes"], meta["patch_px"], meta["in_chans"])
        tok.load_state_dict(load(store.get_bytes(f"{prefix.rstrip('/')}/tokenizer.safetensors")))
        return tok
