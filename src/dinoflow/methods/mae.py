"""MAE (He et al. 2021): hide 75 % of the patches at random, encode the visible ones, and let a light
decoder reconstruct the per-patch-normalised pixels of the hidden ones; only hidden patches count.

On ViT the encoder sees the visible tokens only; on XCiT the hidden patches are zeroed and replaced
by a mask token in place (see ``dinoflow.methods.mim``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dinoflow.losses.reconstruction import masked_mse, normalize_patches
from dinoflow.methods.base import BatchView, Logs, StepState, backbone_from_config
from dinoflow.methods.masking import random_masking
from dinoflow.methods.mim import MaskedImageModel
from dinoflow.methods.mim_config import MAEConfig
from dinoflow.models.backbone import Backbone
from dinoflow.models.patches import patchify

if TYPE_CHECKING:
    from dinoflow.storage.client import ObjectStore
    from dinoflow.train.config import TrainConfig


class MAE(MaskedImageModel):
    name = "mae"

    def __init__(self, backbone: Backbone, cfg: MAEConfig | None = None):
        self.cfg = cfg = cfg or MAEConfig()
        out_dim = backbone.patch_size**2 * backbone.in_chans
        super().__init__(backbone, cfg.aug, cfg.encoder_masking, cfg.decoder, out_dim)

    @classmethod
    def from_config(cls, cfg: TrainConfig, store: ObjectStore | None = None) -> MAE:
        return cls(backbone_from_config(cfg, store), cfg.mae)

    def prepare(self, images: torch.Tensor, view: BatchView) -> dict[str, Any]:
        x01 = self.augment(images, view)
        mask, _ = random_masking(view.global_batch, self.n_patches, self.cfg.mask_ratio, view.generator)
        b = x01.shape[0]
        return {"x": self.normalize(x01), "mask": mask[view.offset : view.offset + b].to(x01.device)}

    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, Logs]:
        x, mask = batch["x"], batch["mask"]
        target = patchify(x, self.patch_px)
        if self.cfg.norm_pix_loss:
            target = normalize_patches(target)
        _, pred = self.decode(self.encode(x, mask), mask)
        loss = masked_mse(pred, target, mask)
        return loss, {
            "loss": loss.detach(),
            "mae_loss": loss.detach(),
            "masked_ratio": mask.float().mean(),
        }
