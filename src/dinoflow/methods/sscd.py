"""SSCD (Pizzi et al. 2022, "A Self-Supervised Descriptor for Image Copy Detection"): a copy
descriptor trained contrastively on edited copies, the kind of network DINOv2 dedups with.

Each image of the batch becomes two copies, each a chain of random edits drawn from the families
seen in training (``dinoflow.data.edits``; the held-out families are never drawn). The descriptor
is the L2-normalised CLS token of the backbone, or CLS ++ mean-pooled patch tokens (``features``,
the embed stage's two feature kinds; pooling stands in for SSCD's GeM pooling), optionally through
a training-only linear projection. Loss: symmetric InfoNCE between the two copies, every other image
of the (all-gathered) global batch a negative (``dinoflow.losses.infonce``), plus SSCD's differential-entropy regulariser
``-mean log(distance to the nearest other image)``: KoLeo (``dinoflow.losses.koleo``) over each
copy's descriptors on its own, so an image's own copy is never its "nearest other image" (SSCD
excludes matching pairs the same way). It spreads the descriptors of distinct images over the
sphere, so one cosine threshold separates copies from distinct images.

The exported backbone is the descriptor model: embed the pool with it (the embed stage with the same
``features``) and dedup on those vectors (``DedupSpec.copy_descriptor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.data.edits import PRIMITIVE_TRAIN_FAMILIES, check_families, edit_batch
from dinoflow.data.stream import CropGroup
from dinoflow.errors import SpecError
from dinoflow.losses.infonce import info_nce
from dinoflow.losses.koleo import KoLeoLoss
from dinoflow.methods.base import (
    BatchView,
    Logs,
    Method,
    StepState,
    backbone_from_config,
    param_groups_for_backbone,
    param_groups_plain,
)
from dinoflow.methods.sscd_config import SSCDConfig
from dinoflow.models.backbone import Backbone

if TYPE_CHECKING:
    from dinoflow.storage.client import ObjectStore
    from dinoflow.train.config import TrainConfig


class SSCD(Method):
    name = "sscd"

    def __init__(self, backbone: Backbone, cfg: SSCDConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SSCDConfig()
        self.backbone = backbone
        p = backbone.patch_size
        self.image_px = cfg.image_px or -(-backbone.img_size // p) * p
        if backbone.family == "vit" and self.image_px % p:
            raise SpecError(f"sscd.image_px {self.image_px} is not a multiple of {backbone.name}'s patch {p}")
        try:
            self.families = check_families(cfg.families or PRIMITIVE_TRAIN_FAMILIES, allow_heldout=False)
        except ValueError as e:
            raise SpecError(f"sscd.families: {e}") from None
        d = backbone.embed_dim
        d *= 2 if cfg.features == "cls+patch" else 1
        self.projection = nn.Linear(d, cfg.projection_dim) if cfg.projection_dim else nn.Identity()
        self.koleo = KoLeoLoss()
        backbone.mask_token.requires_grad_(False)  # no masking here: keep it out of the optimizer

    @classmethod
    def from_config(cls, cfg: TrainConfig, store: ObjectStore | None = None) -> SSCD:
        return cls(backbone_from_config(cfg, store), cfg.sscd)

    # -- data ----------------------------------------------------------------------------------
    def crop_groups(self) -> list[CropGroup]:
        # the whole image at the working size; the edits (crops included) are drawn in prepare
        return [CropGroup(1, self.image_px, (1.0, 1.0), (1.0, 1.0), flip_p=0.0)]

    def prepare(self, images: torch.Tensor | list[torch.Tensor], view: BatchView) -> dict[str, Any]:
        """Two edited copies of each image, from per-sample seeds drawn for the global batch."""
        x = images[0][0] if isinstance(images, list) else images
        if x.ndim != 4 or x.shape[1] != self.backbone.in_chans or x.dtype != torch.uint8:
            raise SpecError(
                f"sscd on {self.backbone.name} wants uint8 images [B, {self.backbone.in_chans}, H, W], "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        seeds = torch.randint(0, 2**62, (2, view.global_batch), generator=view.generator)
        sl = slice(view.offset, view.offset + x.shape[0])
        a = edit_batch(x, seeds[0, sl], self.families, self.image_px, *self.cfg.edits_a)
        b = edit_batch(x, seeds[1, sl], self.families, self.image_px, *self.cfg.edits_b)
        return {"a": self.normalize(a), "b": self.normalize(b)}

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.backbone.mean) / self.backbone.std

    # -- step ----------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images -> the descriptor before L2 normalisation, as the embed stage
        computes it with ``features`` = ``cfg.features`` (``dinoflow.stages.embed.features_of``)."""
        out = self.backbone.encode(x)
        f = out["cls"]
        if self.cfg.features == "cls+patch":
            f = torch.cat([f, out["patch"].mean(1)], dim=1)
        return f

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images -> L2-normalised descriptors (what training optimises)."""
        return F.normalize(self.projection(self.features(x)).float(), dim=-1)

    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, Logs]:
        b = batch["a"].shape[0]
        z = self.descriptor(torch.cat([batch["a"], batch["b"]]))
        za, zb = z[:b], z[b:]
        nce = info_nce(za, zb, self.cfg.temperature)
        entropy = 0.5 * (self.koleo(za) + self.koleo(zb))
        loss = nce + self.cfg.entropy_weight * entropy
        with torch.no_grad():
            pos = (za * zb).sum(-1).mean()
            sim = za @ za.t()
            sim.fill_diagonal_(-2.0)
        return loss, {
            "loss": loss.detach(),
            "infonce_loss": nce.detach(),
            "entropy_loss": entropy.detach(),
            "positive_cos": pos,
            "nearest_negative_cos": sim.max(dim=1).values.mean(),
        }

    # -- optimizer / export --------------------------------------------------------------------
    def param_groups(
        self, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
    ) -> list[dict[str, Any]]:
        groups = param_groups_for_backbone(self.backbone, "backbone.", layer_decay, patch_embed_lr_mult)
        return groups + param_groups_plain(self.projection, "projection.")

    def export_backbone(self) -> Backbone:
        return self.backbone
