"""Configuration of the SSCD copy descriptor (pydantic, no torch import: stage specs embed it).

Defaults are the official SSCD training script's (Pizzi et al. 2022, facebookresearch/sscd-copy-
detection ``sscd/train.py``) unless a comment says otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SSCDConfig(BaseModel):
    """A contrastive copy descriptor: two strongly edited copies of each image are positives, every
    other image of the global batch a negative; InfoNCE plus a differential-entropy (KoLeo) term."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature (SSCD: 0.05)")
    entropy_weight: float = Field(
        30.0, ge=0, description="weight of the differential-entropy regulariser (SSCD: 30)"
    )
    features: Literal["cls", "cls+patch"] = Field(
        "cls",
        description="the descriptor, as the embed stage's features computes it: the CLS token, or CLS ++ "
        "mean-pooled patch tokens (a pooled descriptor, as SSCD's GeM pooling)",
    )
    projection_dim: int = Field(
        0,
        ge=0,
        description="0: the loss acts on the descriptor itself, so the exported backbone (embedded with "
        "these features) is the descriptor model as it stands; > 0: on a training-only linear projection "
        "of it to this many dims (not exported)",
    )
    families: list[str] | None = Field(
        None,
        description="edit families the training copies are drawn from (dinoflow.data.edits); default: "
        "every primitive family seen in training. Held-out families are refused",
    )
    edits_a: tuple[int, int] = Field(
        (0, 1), description="(min, max) chained edits of the first copy (0: the image as it is)"
    )
    edits_b: tuple[int, int] = Field((1, 3), description="(min, max) chained edits of the second copy")
    image_px: int | None = Field(
        None, ge=4, description="input size; None = the backbone's size rounded up to its patch"
    )

    @field_validator("families")
    @classmethod
    def _families(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        from dinoflow.data.edits import check_families

        check_families(v, allow_heldout=False)
        return v

    @model_validator(mode="after")
    def _ranges(self) -> SSCDConfig:
        for name in ("edits_a", "edits_b"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(lo, hi)}")
        return self


# The copy descriptor's CPU recipe (pretrain-stage fields) for 28 px grayscale pools on 1-2 cores,
# chosen in 1,000-step runs on 20k Fashion-MNIST images (recall of held-out-family copies at 1 % of
# distinct images flagged, against 2k test images): the micro ViT with pooled patch tokens (0.27;
# CLS alone 0.17; CLS at entropy weight 1 and temperature 0.1: 0.08), a tenth of SSCD's batch and a
# third of its entropy weight, AdamW at 1e-3 (4e-3: 0.22; geometric families drawn twice as often:
# 0.20). Single runs on a shared machine: differences of a few points are within run-to-run noise.
# 800-step runs on the copy-detection bench's test pool (held-out recall against 2k test images at 1 %
# of 10k distinct train images flagged; this recipe's 1,000 steps: 0.12): AdamW at 3e-3 0.09; with
# entropy weight 2 and temperature 0.1 0.08; the original against a single edit (edits_a (0, 0),
# edits_b (1, 1)) 0.11, against 1-2 edits 0.11. None learns the geometric families (crop, rotate,
# translate, border, perspective, shear: recall 0-0.05); a larger backbone is untried (vit_mini_p7_28
# costs 5x the micro's forward/backward per step). Later, outside the bench (10k pool images, copies of
# 2k test images, 60 per family; held-out copies found at the cosine that flags 1 % of 10k Fashion-MNIST
# train images against the 10k test, and how often the nearest test image is the original): this
# recipe 0.06 / 0.58; a small ResNet with GeM pooling (timm resnet18 with one block per stage, 32-256
# channels, output stride 8) 0.06 / 0.56 at 2.4x the time; this recipe for 3,000 steps 0.05 / 0.63.
# The raw 14 px pixel descriptor places the original first more often (0.74): the thresholds, not the
# ranking, are what fails, hence DedupSpec.decontam_margin_rank.
SSCD_CPU: dict = {
    "method": "sscd",
    "backbone": "vit_micro_p7_28",
    "batch_size": 128,
    "steps": 1000,
    "sscd": {"temperature": 0.05, "entropy_weight": 10.0, "features": "cls+patch"},
    # peak LR = lr_per_1024 * sqrt(128 / 1024) = 1e-3; flat weight decay, no layer decay
    "optim": {
        "lr_per_1024": 0.00283,
        "warmup_steps": 50,
        "weight_decay_start": 0.05,
        "weight_decay_end": 0.05,
        "layer_decay": 1.0,
        "patch_embed_lr_mult": 1.0,
    },
    "checkpoint_every_steps": 500,
    "log_every_steps": 50,
}
