"""What MAE and SplitMask share: the light augmentation, the masked encoder pass for ViT and XCiT,
and the light transformer decoder that predicts every patch of the grid.

Two ways for an encoder not to see a masked patch
-------------------------------------------------
* ``drop`` (ViT; MAE and SplitMask as published): the masked tokens are removed after the patch
  embedding and position embedding; the blocks run on the visible tokens only (cheaper, too).
* ``mask_token`` (XCiT): XCiT's convolutional patch embedding (3x3 stride-2 convs) has a receptive
  field wider than one patch, and its LPI blocks (depthwise 3x3 convs on the token grid) need the
  full grid, so tokens cannot be dropped. Instead the masked patches' pixels are zeroed in the input
  (so no border pixel of a hidden patch leaks into a visible token through the conv stem), their
  embeddings are replaced by the backbone's learned mask token in place, and the encoder runs on
  the whole grid. Compute is not reduced, and the encoder sees *where* the holes are (as in
  SimMIM / BEiT) — a different task from MAE's, documented in the README.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dinoflow.data.augment import crop_boxes, resized_crop
from dinoflow.data.stream import CropGroup
from dinoflow.errors import SpecError
from dinoflow.methods.base import BatchView, Method, param_groups_for_backbone, param_groups_plain
from dinoflow.methods.mim_config import DecoderConfig, MIMAugConfig
from dinoflow.models.backbone import Backbone


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [gh*gw, dim] (as MAE's decoder; base 10000)."""
    if dim % 4:
        raise SpecError(f"decoder dim must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1).float()


def ids_visible(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the unmasked patches, in token order: long [B, N_visible] (same count per row)."""
    counts = (~mask).sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every image of the batch must keep the same number of visible patches")
    b, n = mask.shape
    return torch.arange(n, device=mask.device).expand(b, n)[~mask].view(b, -1)


class PatchDecoder(nn.Module):
    """Encoder tokens -> per-patch predictions over the full grid.

    Masked positions get the decoder's own mask token; positions are fixed 2-D sin-cos; the encoder's
    CLS token is prepended (as in MAE). ``forward`` returns (hidden [B, N, dim], pred [B, N, out]).
    """

    def __init__(self, in_dim: int, cfg: DecoderConfig, out_dim: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.dim = cfg.dim
        self.embed = nn.Linear(in_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.pred = nn.Linear(cfg.dim, out_dim)
        self._pos: dict[tuple[int, int], torch.Tensor] = {}
        nn.init.normal_(self.mask_token, std=0.02)  # MAE
        for m in self.modules():
            if isinstance(m, nn.Linear):  # MAE: xavier-uniform linears, zero biases
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def pos(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        if grid not in self._pos:
            self._pos[grid] = sincos_2d(grid, self.dim)
        return self._pos[grid].to(device)

    def forward(
        self,
        cls: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        ids_keep: torch.Tensor | None,
        grid: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = mask.shape
        t = self.embed(tokens)
        mt = self.mask_token.to(t.dtype)
        if ids_keep is not None:  # visible tokens only: scatter them into a grid of mask tokens
            full = mt.expand(b, n, self.dim).scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, self.dim), t)
        else:  # the full grid came out of the encoder: overwrite the masked positions
            full = torch.where(mask.unsqueeze(-1), mt.expand(b, n, self.dim), t)
        x = torch.cat([self.embed(cls).unsqueeze(1), full + self.pos(grid, t.device).to(t.dtype)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        hidden = self.norm(x)[:, 1:]
        return hidden, self.pred(hidden)


class MaskedImageModel(Method):
    """Base of MAE and SplitMask: one backbone (the exported encoder) and one ``PatchDecoder``."""

    def __init__(
        self,
        backbone: Backbone,
        aug: MIMAugConfig,
        encoder_masking: str,
        decoder: DecoderConfig,
        out_dim: int,
    ):
        super().__init__()
        self.backbone = backbone
        self.aug = aug
        p = backbone.patch_size
        if encoder_masking == "auto":
            encoder_masking = "drop" if backbone.family == "vit" else "mask_token"
        if encoder_masking == "drop" and backbone.family != "vit":
            raise SpecError(
                f"{backbone.name} is an XCiT: its conv patch embedding and LPI mix neighbouring tokens, so "
                "masked tokens cannot be dropped; use encoder_masking='mask_token' (or 'auto')"
            )
        self.encoder_masking = encoder_masking
        self.crop_px = aug.crop_px or -(-backbone.img_size // p) * p
        if self.crop_px % p:
            raise SpecError(f"crop_px {self.crop_px} must be a multiple of {backbone.name}'s patch size {p}")
        self.grid = backbone.patch_grid(self.crop_px, self.crop_px)
        if self.grid != (self.crop_px // p, self.crop_px // p):
            raise SpecError(
                f"{backbone.name} gives a {self.grid} grid at {self.crop_px} px, not patch-aligned"
            )
        self.n_patches = self.grid[0] * self.grid[1]
        self.decoder = PatchDecoder(backbone.embed_dim, decoder, out_dim)
        # The mask token is unused when tokens are dropped: keep it out of the optimizer (and of DDP).
        backbone.mask_token.requires_grad_(encoder_masking == "mask_token")
        self.register_buffer("mean", torch.tensor(backbone.entry.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.entry.std).view(1, -1, 1, 1), persistent=False)

    @property
    def patch_px(self) -> int:
        return self.backbone.patch_size

    # -- data ----------------------------------------------------------------------------------
    def crop_groups(self) -> list[CropGroup]:
        return [
            CropGroup(
                1, self.crop_px, (self.aug.crop_scale_min, self.aug.crop_scale_max), flip_p=self.aug.flip_p
            )
        ]

    def augment(self, images: torch.Tensor | list[torch.Tensor], view: BatchView) -> torch.Tensor:
        """uint8 [b, C, H, W] -> float crops in [0, 1], [b, C, crop_px, crop_px] (drawn for the
        global batch from the shared generator, then sliced). Crops the data workers already cut
        (``[crops]``, uint8 ``[1, b, C, crop_px, crop_px]``) are only scaled to [0, 1]."""
        if isinstance(images, list):
            return images[0][0].float() / 255.0
        if images.ndim != 4 or images.shape[1] != self.backbone.in_chans:
            raise SpecError(
                f"{self.name} on {self.backbone.name} wants uint8 images [B, {self.backbone.in_chans}, H, W], "
                f"got {tuple(images.shape)}"
            )
        g, n, b = view.generator, view.global_batch, images.shape[0]
        sl = slice(view.offset, view.offset + b)
        boxes = crop_boxes(g, n, (self.aug.crop_scale_min, self.aug.crop_scale_max), (3 / 4, 4 / 3))[sl]
        flip = (torch.rand(n, generator=g) < self.aug.flip_p)[sl]
        return resized_crop(images.float() / 255.0, boxes, flip, self.crop_px).clamp(0, 1)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Encoder pass hiding the patches where ``mask`` is True.

        Returns ``cls`` [B, D], ``tokens`` (visible only [B, Nv, D] in drop mode, the full grid
        [B, N, D] in mask-token mode) and ``ids_keep`` (drop mode) or None.
        """
        if self.encoder_masking == "drop":
            ids_keep = ids_visible(mask)
            cls, tokens = self._encode_visible_vit(x, ids_keep)
            return {"cls": cls, "tokens": tokens, "ids_keep": ids_keep}
        p, (gh, gw) = self.patch_px, self.grid
        pix = mask.view(-1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)
        x = x.masked_fill(pix, 0.0)  # 0 = the dataset mean after normalisation: no pixel leaks
        out = self.backbone.encode(x, masks=mask)
        return {"cls": out["cls"], "tokens": out["patch"], "ids_keep": None}

    def _encode_visible_vit(
        self, x: torch.Tensor, ids_keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.backbone.model
        t = m._pos_embed(m.patch_embed(x))  # [B, prefix + N, D], positions already added
        k = self.backbone.num_prefix_tokens()
        pat = t[:, k:].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        t = m.norm_pre(torch.cat([t[:, :k], pat], dim=1))
        t = m.norm(self.backbone.forward_blocks(t))  # activation checkpointing applies here too
        return t[:, 0], t[:, k:]

    def decode(self, enc: dict[str, Any], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(enc["cls"], enc["tokens"], mask, enc["ids_keep"], self.grid)

    # -- optimizer / export --------------------------------------------------------------------
    def param_groups(
        self, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
    ) -> list[dict[str, Any]]:
        groups = param_groups_for_backbone(self.backbone, "backbone.", layer_decay, patch_embed_lr_mult)
        return groups + param_groups_plain(self.decoder, "decoder.")

    def export_backbone(self) -> Backbone:
        return self.backbone
