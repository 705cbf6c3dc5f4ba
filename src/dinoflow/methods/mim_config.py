"""Configuration of the denoising-autoencoder methods, MAE and SplitMask (pydantic, no torch import:
stage specs embed these). Defaults are the papers' where known; each says where it comes from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MIMAugConfig(_Cfg):
    """The light augmentation of MAE / BEiT-style pretraining: random resized crop + flip only."""

    crop_scale_min: float = Field(0.2, gt=0, le=1, description="MAE: RandomResizedCrop scale (0.2, 1.0)")
    crop_scale_max: float = Field(1.0, gt=0, le=1)
    flip_p: float = Field(0.5, ge=0, le=1)
    crop_px: int | None = Field(
        None, ge=4, description="training input size; None = the backbone's size rounded up to its patch"
    )

    @model_validator(mode="after")
    def _range(self) -> MIMAugConfig:
        if self.crop_scale_min > self.crop_scale_max:
            raise ValueError("crop_scale_min must be <= crop_scale_max")
        return self


class DecoderConfig(_Cfg):
    """The light transformer decoder that predicts masked patches (fixed 2-D sin-cos positions)."""

    dim: int = Field(512, ge=8, description="MAE: 512")
    depth: int = Field(8, ge=1, description="MAE: 8 blocks; SplitMask: a shallow 2-block decoder")
    heads: int = Field(16, ge=1, description="MAE: 16")
    mlp_ratio: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _heads(self) -> DecoderConfig:
        if self.dim % self.heads:
            raise ValueError(f"decoder dim {self.dim} is not divisible by heads {self.heads}")
        return self


class MAEConfig(_Cfg):
    """MAE (He et al. 2021)."""

    mask_ratio: float = Field(0.75, ge=0, lt=1, description="MAE: 0.75")
    norm_pix_loss: bool = Field(
        True, description="MAE: per-patch normalised pixel targets (its best setting)"
    )
    encoder_masking: Literal["auto", "drop", "mask_token"] = Field(
        "auto",
        description="drop = encoder sees visible tokens only (ViT, as in MAE); mask_token = masked "
        "patches zeroed and replaced by a mask token in place (the only honest option for XCiT, whose "
        "conv patch embedding and LPI mix neighbouring tokens); auto = drop for ViT, mask_token for XCiT",
    )
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    aug: MIMAugConfig = Field(default_factory=MIMAugConfig)


class SplitMaskConfig(_Cfg):
    """SplitMask (El-Nouby et al. 2021, "Are large-scale datasets necessary for self-supervised
    pre-training?"): split, inpaint, match."""

    target: Literal["pixels", "kmeans"] = Field(
        "pixels", description="normalised pixels (MSE) or k-means patch tokens (cross-entropy)"
    )
    norm_pix_loss: bool = Field(True, description="per-patch normalised pixel targets (as MAE)")
    n_codes: int = Field(1024, ge=2, description="k-means tokenizer codebook size")
    tokenizer_iters: int = Field(20, ge=1, description="k-means Lloyd iterations")
    tokenizer_max_patches: int = Field(200_000, ge=16, description="patches sampled to fit the codebook")
    mim_loss_weight: float = Field(1.0, ge=0, description="the paper sums the two terms")
    contrastive_loss_weight: float = Field(1.0, ge=0, description="the paper sums the two terms")
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature (MoCo v3's 0.2)")
    encoder_masking: Literal["auto", "drop", "mask_token"] = Field("auto", description="as in MAEConfig")
    decoder: DecoderConfig = Field(
        default_factory=lambda: DecoderConfig(depth=2),
        description="SplitMask: a shallow decoder (2 blocks)",
    )
    aug: MIMAugConfig = Field(default_factory=MIMAugConfig)
