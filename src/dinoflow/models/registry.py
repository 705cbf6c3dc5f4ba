"""One registry of backbones over timm: a dinoflow name maps to a timm model name plus arguments.

Every entry is plain JSON (``timm_model`` + ``model_args``), so an exported backbone can be rebuilt
with nothing but ``timm.create_model(timm_model, **model_args)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dinoflow.errors import SpecError


@dataclass(frozen=True)
class BackboneEntry:
    timm_model: str
    model_args: dict[str, Any] = field(default_factory=dict)
    family: str = "vit"  # "vit" | "xcit"
    img_size: int = 224
    in_chans: int = 3
    patch_size: int = 16
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet statistics (timm / DINOv2 default)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


_FMNIST_MEAN, _FMNIST_STD = (0.286,), (0.353,)  # Fashion-MNIST train pixel statistics


def _vit(base: str, img: int, patch: int, chans: int = 3, **args: Any) -> BackboneEntry:
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if chans == 3 else (_FMNIST_MEAN, _FMNIST_STD)
    model_args = {"img_size": img, "patch_size": patch, "in_chans": chans, **args}
    return BackboneEntry(base, model_args, "vit", img, chans, patch, mean, std)


def _xcit(base: str, img: int, patch: int, chans: int = 3, **args: Any) -> BackboneEntry:
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if chans == 3 else (_FMNIST_MEAN, _FMNIST_STD)
    # timm's XCiT wants img_size divisible by the patch size at build time; any size runs afterwards.
    build = -(-img // patch) * patch
    model_args = {"img_size": build, "patch_size": patch, "in_chans": chans, **args}
    return BackboneEntry(base, model_args, "xcit", img, chans, patch, mean, std)


# DINOv2 shapes (patch 14, LayerScale 1e-5, timm's *_dinov2 definitions; giant2 = dim 1536, 40 layers,
# 24 heads, SwiGLU FFN as in the DINOv2 paper). Default training size 224 (global crops).
BACKBONES: dict[str, BackboneEntry] = {
    "vit_small_p14": _vit("vit_small_patch14_dinov2", 224, 14),
    "vit_base_p14": _vit("vit_base_patch14_dinov2", 224, 14),
    "vit_large_p14": _vit("vit_large_patch14_dinov2", 224, 14),
    "vit_giant2_p14": _vit("vit_giant_patch14_dinov2", 224, 14),
    "vit_small_p14_reg4": _vit("vit_small_patch14_reg4_dinov2", 224, 14),
    "vit_base_p14_reg4": _vit("vit_base_patch14_reg4_dinov2", 224, 14),
    "vit_large_p14_reg4": _vit("vit_large_patch14_reg4_dinov2", 224, 14),
    "vit_giant2_p14_reg4": _vit("vit_giant_patch14_reg4_dinov2", 224, 14),
    # Tiny CPU shapes (28 px grayscale, patch 4 -> 7x7 tokens).
    "vit_tiny_p4_28": _vit("vit_small_patch14_dinov2", 28, 4, 1, embed_dim=192, depth=6, num_heads=3),
    "vit_mini_p4_28": _vit("vit_small_patch14_dinov2", 28, 4, 1, embed_dim=128, depth=4, num_heads=4),
    "vit_mini_p7_28": _vit("vit_small_patch14_dinov2", 28, 7, 1, embed_dim=128, depth=4, num_heads=4),
    "vit_small_p7_28": _vit("vit_small_patch14_dinov2", 28, 7, 1, embed_dim=192, depth=6, num_heads=3),
    # a distillation student for the 28 px p7 teachers (same patch grid, so iBOT can be distilled)
    "vit_micro_p7_28": _vit("vit_small_patch14_dinov2", 28, 7, 1, embed_dim=64, depth=3, num_heads=2),
    "vit_test_p4_28": _vit("vit_small_patch14_dinov2", 28, 4, 1, embed_dim=32, depth=2, num_heads=2),
    "vit_test_p4_28_reg2": _vit(
        "vit_small_patch14_reg4_dinov2", 28, 4, 1, embed_dim=32, depth=2, num_heads=2, reg_tokens=2
    ),
    "xcit_tiny_p8_28": _xcit("xcit_nano_12_p8_224", 28, 8, 1, embed_dim=128, depth=6, num_heads=4),
    "xcit_test_p8_28": _xcit("xcit_nano_12_p8_224", 28, 8, 1, embed_dim=32, depth=2, num_heads=2),
    # Small RGB shapes (64 px, patch 8 -> 8x8 tokens): photos on a CPU, bootstrap embedders
    "vit_mini_p8_64": _vit("vit_small_patch14_dinov2", 64, 8, 3, embed_dim=128, depth=4, num_heads=4),
    "vit_test_p8_64": _vit("vit_small_patch14_dinov2", 64, 8, 3, embed_dim=32, depth=2, num_heads=2),
}
for _n in ("nano_12", "tiny_12", "small_12", "tiny_24", "small_24", "medium_24", "large_24"):
    for _p in (16, 8):
        BACKBONES[f"xcit_{_n}_p{_p}"] = _xcit(f"xcit_{_n}_p{_p}_224", 224, _p)


def get_entry(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        raise SpecError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]
