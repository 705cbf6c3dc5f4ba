"""A thin wrapper around a timm ViT / XCiT that adds what self-supervised methods need.

``encode(x, masks)`` returns the CLS token, the patch tokens and the CLS token of the last blocks;
masked patches are replaced by a learned mask token right after the patch embedding (before the
position embedding and the blocks, as in iBOT / DINOv2), for XCiT too (after its conv patch embed).
The wrapped timm module keeps timm's parameter names, so its state dict loads into plain timm.

``activation_checkpointing = True`` (ViT) recomputes each block's activations in the backward
(non-reentrant ``torch.utils.checkpoint`` around the block's call): only the block inputs are kept,
so ViT-g/14 trains on one 80 GB GPU. The blocks stay the modules they are (same names, the same
FSDP2 units from ``block_modules()``, compiled in place by ``torch.compile``): the checkpoint wraps
the call, not the module, so a sharded block re-gathers its weights for the recomputation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinoflow.errors import SpecError
from dinoflow.models.registry import BackboneEntry, get_entry


class Backbone(nn.Module):
    def __init__(self, name: str, entry: BackboneEntry, model_args: dict[str, Any]):
        super().__init__()
        import timm

        self.name = name
        self.entry = entry
        self.family = entry.family
        self.timm_model = entry.timm_model
        self.model_args = dict(model_args)
        self.model = timm.create_model(entry.timm_model, pretrained=False, **model_args)
        self.embed_dim = int(self.model.embed_dim)
        self.patch_size = entry.patch_size
        self.in_chans = entry.in_chans
        self.img_size = entry.img_size
        self.register_buffer("mean", torch.tensor(entry.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(entry.std).view(1, -1, 1, 1), persistent=False)
        # Learned mask token (iBOT); zero-init as in the official DINOv2 code.
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}
        self._checkpointing = False

    def set_fused_attention(self, on: bool) -> None:
        """Run timm's attention through ``F.scaled_dot_product_attention`` (``on``, timm's default) or
        through its explicit ``q @ k^T``, softmax, ``@ v``. Same maths, same parameters; the trainer turns
        the fused kernel off for bf16 autocast on the CPU, where its backward is ~10x slower than in
        float32 (147 vs 16 ms a step for vit_mini_p7_28 at batch 64, 2 cores) while the explicit
        matmuls run on the CPU's bf16 matrix units and the softmax stays float32 under autocast."""
        for m in self.model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = bool(on)  # type: ignore[assignment]  # timm reads it at each forward

    @property
    def activation_checkpointing(self) -> bool:
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        if on and self.family != "vit":
            # XCiT's LPI BatchNorm would update its running statistics again in the recomputation.
            raise SpecError(f"activation checkpointing runs on ViT backbones; {self.name} is {self.family}")
        self._checkpointing = bool(on)

    def run_block(self, blk: nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """``blk(x, *args)``, recomputed in the backward when activation checkpointing is on and a
        gradient is being recorded (the RNG state is replayed, so drop path draws the same)."""
        if self._checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, *args, use_reentrant=False)
        return blk(x, *args)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT tokens ``[B, N, D]`` through every block (for callers that run the blocks on
        their own tokens, e.g. MAE's visible patches)."""
        for blk in self.model.blocks:
            x = self.run_block(blk, x)
        return x

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 255]) images -> float input normalised by the backbone's mean/std."""
        x = x.float() / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def patch_grid(self, h: int, w: int) -> tuple[int, int]:
        """The patch-token grid (rows, cols) for an ``h x w`` input (exact: measured once per size)."""
        key = (h, w)
        if key not in self._grids:
            if self.family == "vit":
                p = self.model.patch_embed.patch_size
                self._grids[key] = (h // p[0], w // p[1])
            else:  # XCiT: stride-2 3x3 convs with padding 1, each rounds up
                n = {16: 4, 8: 3}[self.patch_size]
                gh, gw = h, w
                for _ in range(n):
                    gh, gw = (gh + 1) // 2, (gw + 1) // 2
                self._grids[key] = (gh, gw)
        return self._grids[key]

    def _apply_mask(self, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        if masks is None:
            return x
        b = x.shape[0]
        n = x[0].numel() // x.shape[-1]
        if masks.shape != (b, n):
            raise SpecError(f"masks must be [batch={b}, patches={n}], got {tuple(masks.shape)}")
        m = masks.reshape(*x.shape[:-1], 1)
        return torch.where(m, self.mask_token.to(x.dtype).expand_as(x), x)

    def encode(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, n_last_blocks: int = 1
    ) -> dict[str, Any]:
        """x: normalised float [B, C, H, W]; masks: bool [B, N_patches] or None."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise SpecError(f"{self.name} wants images [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        return (
            self._encode_vit(x, masks, n_last_blocks)
            if self.family == "vit"
            else self._encode_xcit(x, masks, n_last_blocks)
        )

    def _encode_vit(self, x: torch.Tensor, masks: torch.Tensor | None, n_last: int) -> dict[str, Any]:
        m = self.model
        if n_last < 1 or n_last > len(m.blocks):
            raise SpecError(f"n_last_blocks must be in [1, {len(m.blocks)}], got {n_last}")
        x = m.patch_embed(x)  # [B, H, W, D] (dynamic image size)
        x = self._apply_mask(x, masks)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        outs = []
        first = len(m.blocks) - n_last
        for i, blk in enumerate(m.blocks):
            x = self.run_block(blk, x)
            if i >= first:
                outs.append(x)
        last = m.norm(outs[-1])
        k = self.num_prefix_tokens()
        cls_blocks = [m.norm(o)[:, 0] for o in outs[:-1]] + [last[:, 0]]
        return {"cls": last[:, 0], "patch": last[:, k:], "cls_blocks": cls_blocks}

    def _encode_xcit(self, x: torch.Tensor, masks: torch.Tensor | None, n_last: int) -> dict[str, Any]:
        m = self.model
        n_cls = len(m.cls_attn_blocks)
        if n_last < 1 or n_last > n_cls:
            raise SpecError(
                f"XCiT gives the CLS of its {n_cls} class-attention layers: n_last_blocks <= {n_cls}"
            )
        b = x.shape[0]
        x, (hp, wp) = m.patch_embed(x)  # [B, N, D]
        x = self._apply_mask(x, masks)
        if m.pos_embed is not None:
            x = x + m.pos_embed(b, hp, wp).reshape(b, -1, x.shape[1]).permute(0, 2, 1)
        x = m.pos_drop(x)
        for blk in m.blocks:
            x = self.run_block(blk, x, hp, wp)
        x = torch.cat((m.cls_token.expand(b, -1, -1), x), dim=1)
        outs = []
        for blk in m.cls_attn_blocks:
            x = self.run_block(blk, x)
            outs.append(x)
        outs = outs[n_cls - n_last :]
        last = m.norm(outs[-1])
        cls_blocks = [m.norm(o)[:, 0] for o in outs[:-1]] + [last[:, 0]]
        return {"cls": last[:, 0], "patch": last[:, 1:], "cls_blocks": cls_blocks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)["cls"]

    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks (XCiT: then its class-attention blocks), e.g. as FSDP2 units."""
        return list(self.model.blocks) + list(getattr(self.model, "cls_attn_blocks", []))

    def metadata(self) -> dict[str, Any]:
        return {
            "timm_model": self.timm_model,
            "model_args": self.export_args(),
            "dinoflow_backbone": self.name,
            "family": self.family,
            "img_size": self.img_size,
            "in_chans": self.in_chans,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "mean": list(self.entry.mean),
            "std": list(self.entry.std),
        }

    def export_args(self) -> dict[str, Any]:
        """Arguments for plain ``timm.create_model``: inference shape, no stochastic depth."""
        args = dict(self.model_args)
        args["drop_path_rate"] = 0.0
        return args


def create_backbone(name: str, drop_path_rate: float = 0.0, **overrides: Any) -> Backbone:
    """Build a registered backbone; ``overrides`` go to timm (e.g. ``init_values`` for LayerScale)."""
    entry = get_entry(name)
    if not 0.0 <= drop_path_rate < 1.0:
        raise SpecError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    args: dict[str, Any] = {
        **entry.model_args,
        "num_classes": 0,
        "drop_path_rate": drop_path_rate,
        **overrides,
    }
    if entry.family == "vit":
        args.setdefault("dynamic_img_size", True)  # global and local crops through the same model
    return Backbone(name, entry, args)
