"""SplitMask (El-Nouby et al. 2021): split, inpaint, match.

Each image's patches are split at random into two disjoint halves A and B. The shared encoder sees
one half at a time; a shallow decoder inpaints the other half's patches from it (normalised pixels
with MSE, or the codes of a k-means patch tokenizer with cross-entropy); the decoder outputs of each
branch are average-pooled into a global descriptor, and the two descriptors of an image are tied by
InfoNCE with every other image of the global (all-gathered) batch as a negative.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dinoflow.errors import SpecError
from dinoflow.losses.infonce import info_nce
from dinoflow.losses.reconstruction import masked_cross_entropy, masked_mse, normalize_patches
from dinoflow.methods.base import BatchView, Logs, StepState, backbone_from_config
from dinoflow.methods.masking import split_masks
from dinoflow.methods.mim import MaskedImageModel
from dinoflow.methods.mim_config import SplitMaskConfig
from dinoflow.models.backbone import Backbone
from dinoflow.models.patches import patchify

if TYPE_CHECKING:
    from dinoflow.storage.client import ObjectStore
    from dinoflow.train.config import TrainConfig
from dinoflow.models.tokenizer import KMeansPatchTokenizer


class SplitMask(MaskedImageModel):
    name = "splitmask"

    def __init__(
        self,
        backbone: Backbone,
        cfg: SplitMaskConfig | None = None,
        tokenizer: KMeansPatchTokenizer | None = None,
    ):
        self.cfg = cfg = cfg or SplitMaskConfig()
        if cfg.target == "kmeans":
            if tokenizer is None:  # fitted later on the training images: fit_data(images)
                tokenizer = KMeansPatchTokenizer(cfg.n_codes, backbone.patch_size, backbone.in_chans)
            if tokenizer.patch_px != backbone.patch_size or tokenizer.in_chans != backbone.in_chans:
                raise SpecError(
                    f"tokenizer patches ({tokenizer.patch_px} px, {tokenizer.in_chans} ch) do not match "
                    f"{backbone.name} ({backbone.patch_size} px, {backbone.in_chans} ch)"
                )
            out_dim = tokenizer.n_codes
        else:
            out_dim = backbone.patch_size**2 * backbone.in_chans
        super().__init__(backbone, cfg.aug, cfg.encoder_masking, cfg.decoder, out_dim)
        self.tokenizer = tokenizer if cfg.target == "kmeans" else None

    @classmethod
    def from_config(cls, cfg: TrainConfig, store: ObjectStore | None = None) -> SplitMask:
        return cls(backbone_from_config(cfg, store), cfg.splitmask)

    def fit_data(self, images: torch.Tensor, seed: int = 0) -> None:
        """Fit the k-means tokenizer on the training images (uint8 [N, C, H, W]) before training;
        deterministic for a seed, so every rank fits the same codebook. No-op for pixel targets or
        when the tokenizer is already fitted (e.g. restored from a checkpoint)."""
        if self.tokenizer is None or bool(self.tokenizer.fitted):
            return
        fitted = fit_tokenizer(images.cpu(), self.backbone, self.cfg, seed)
        self.tokenizer.load_state_dict(fitted.state_dict())

    def prepare(self, images: torch.Tensor, view: BatchView) -> dict[str, Any]:
        if self.tokenizer is not None and not bool(self.tokenizer.fitted):
            raise SpecError(
                "SplitMask with target='kmeans': fit the tokenizer first (method.fit_data(images))"
            )
        x01 = self.augment(images, view)
        mask_a, mask_b = split_masks(view.global_batch, self.n_patches, view.generator)
        sl = slice(view.offset, view.offset + x01.shape[0])
        batch = {
            "x": self.normalize(x01),
            "mask_a": mask_a[sl].to(x01.device),
            "mask_b": mask_b[sl].to(x01.device),
        }
        if self.tokenizer is not None:
            batch["codes"] = self.tokenizer.encode(x01 * 255.0)  # tokenizer was fitted on 0-255 pixels
        return batch

    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, Logs]:
        cfg = self.cfg
        x = batch["x"]
        if self.tokenizer is not None:
            target = batch["codes"]
        else:
            target = patchify(x, self.patch_px)
            if cfg.norm_pix_loss:
                target = normalize_patches(target)
        mim, pooled = [], []
        for mask in (batch["mask_a"], batch["mask_b"]):  # mask = what this branch does not see
            hidden, pred = self.decode(self.encode(x, mask), mask)
            if self.tokenizer is not None:
                mim.append(masked_cross_entropy(pred, target, mask))
            else:
                mim.append(masked_mse(pred, target, mask))
            pooled.append(hidden.mean(dim=1))
        mim_loss = 0.5 * (mim[0] + mim[1])
        nce = info_nce(pooled[0], pooled[1], cfg.temperature)
        loss = cfg.mim_loss_weight * mim_loss + cfg.contrastive_loss_weight * nce
        return loss, {
            "loss": loss.detach(),
            "mim_loss": mim_loss.detach(),
            "infonce_loss": nce.detach(),
        }


def fit_tokenizer(
    images: torch.Tensor, backbone: Backbone, cfg: SplitMaskConfig | None = None, seed: int = 0
) -> KMeansPatchTokenizer:
    """Fit the k-means patch tokenizer on training images (uint8 [N, C, H, W]) at the method's input
    size (the backbone's size rounded up to its patch, as SplitMask's crops are)."""
    cfg = cfg or SplitMaskConfig()
    p = backbone.patch_size
    px = cfg.aug.crop_px or -(-backbone.img_size // p) * p
    x = images.float()
    if x.shape[-2:] != (px, px):
        x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False).clamp(0, 255)
    tok = KMeansPatchTokenizer(cfg.n_codes, p, backbone.in_chans)
    return tok.fit(x, seed=seed, iters=cfg.tokenizer_iters, max_patches=cfg.tokenizer_max_patches)
