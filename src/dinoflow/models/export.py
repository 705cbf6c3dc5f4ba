"""The backbone export format shared by all stages.

``{prefix}/backbone.safetensors`` holds the timm state dict only (loads into
``timm.create_model(meta["timm_model"], **meta["model_args"])``); ``{prefix}/backbone.json`` holds the
metadata; the learned mask token, which plain timm has no slot for, sits in
``{prefix}/backbone_extra.safetensors``. Heads trained with the backbone (DINO / iBOT heads, which
distillation reuses) may sit in ``{prefix}/heads.safetensors``.
"""

from __future__ import annotations

from typing import Any

import torch

from dinoflow.errors import SpecError, StorageError
from dinoflow.models.backbone import Backbone
from dinoflow.models.registry import BACKBONES, BackboneEntry
from dinoflow.storage.client import ObjectStore, join_uri


def backbone_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.model.state_dict().items()}


def export_backbone(
    store: ObjectStore, prefix: str, backbone: Backbone, extra_meta: dict[str, Any] | None = None
) -> str:
    """Write the backbone under ``prefix``; returns ``prefix``. JSON is written last."""
    from safetensors.torch import save

    store.put_bytes(join_uri(prefix, "backbone.safetensors"), save(backbone_state(backbone)))
    extra = {"mask_token": backbone.mask_token.detach().cpu().contiguous().clone()}
    store.put_bytes(join_uri(prefix, "backbone_extra.safetensors"), save(extra))
    meta = {**backbone.metadata(), **(extra_meta or {})}
    store.put_json(join_uri(prefix, "backbone.json"), meta)
    return prefix


def load_backbone(store: ObjectStore, prefix: str, map_location: str = "cpu") -> Backbone:
    """Rebuild an exported backbone (eval mode, no stochastic depth)."""
    from safetensors.torch import load

    meta_uri = join_uri(prefix, "backbone.json")
    if not store.exists(meta_uri):
        raise StorageError(f"no exported backbone at {prefix} ({meta_uri} is missing)")
    meta = store.get_json(meta_uri)
    name = meta.get("dinoflow_backbone", meta["timm_model"])
    entry = BACKBONES.get(name) or BackboneEntry(
        meta["timm_model"],
        meta["model_args"],
        meta.get("family", "xcit" if meta["timm_model"].startswith("xcit") else "vit"),
        meta["img_size"],
        meta["in_chans"],
        meta["patch_size"],
        tuple(meta["mean"]),
        tuple(meta["std"]),
    )
    bb = Backbone(name, entry, meta["model_args"])
    bb.model.load_state_dict(load(store.get_bytes(join_uri(prefix, "backbone.safetensors"))))
    extra_uri = join_uri(prefix, "backbone_extra.safetensors")
    if store.exists(extra_uri):
        bb.mask_token.data.copy_(load(store.get_bytes(extra_uri))["mask_token"])
    return bb.to(map_location).eval()


HEADS_FILE = "heads.safetensors"


def heads_uri(prefix: str) -> str:
    return join_uri(prefix, HEADS_FILE)


def export_heads(store: ObjectStore, prefix: str, heads: dict[str, torch.Tensor]) -> str:
    """Write the heads next to the backbone exported under ``prefix``; returns their URI."""
    from safetensors.torch import save

    uri = heads_uri(prefix)
    store.put_bytes(uri, save(heads))
    return uri


def load_heads(store: ObjectStore, prefix: str) -> dict[str, torch.Tensor]:
    """The heads exported next to the backbone under ``prefix``."""
    from safetensors.torch import load

    uri = heads_uri(prefix)
    if not store.exists(uri):
        raise SpecError(
            f"no teacher heads at {uri}: distillation needs a backbone exported by the dinov2 pretrain "
            "stage (it saves the DINO/iBOT heads next to the backbone)"
        )
    return load(store.get_bytes(uri))
