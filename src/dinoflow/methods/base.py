"""The Method interface: everything the shared trainer (``dinoflow.train``) needs from a
self-supervised (or distillation) recipe, and nothing more.

A method is an ``nn.Module`` that owns all its modules (student, teacher, heads, decoders). The
trainer calls, for every optimizer step::

    batch = method.prepare(images_uint8, view)      # batched augmentation on the device
    loss, logs = method(batch, state)               # forward; loss and logs are tensors
    loss.backward(); method.after_backward(state)   # e.g. freeze a head's last layer early on
    clip, optimizer.step()
    method.after_step(state)                        # e.g. the EMA update of a teacher

* ``prepare`` turns the raw uint8 images of this rank ``[b, C, H, W]`` into whatever the method's
  forward wants (crops, masks...). Random choices come from ``view.generator``, which is seeded
  identically on every rank for a step, and are drawn for the whole global batch; each rank keeps
  rows ``view.offset : view.offset + b``. So the same global batch gives the same crops whether it
  runs on 1 process or N, and a resumed run redraws exactly what the interrupted run drew.
* ``param_groups`` lists the trainable parameters with ``lr_mult`` / ``wd_mult`` (layer-wise LR
  decay, patch-embed multiplier, no decay on norms/biases/tokens); the trainer multiplies its
  scheduled LR / weight decay by them.
* ``export_backbone`` is the backbone a downstream stage should use (DINOv2: the EMA teacher).
* ``head_state`` returns extra modules worth keeping next to the exported backbone (DINO heads).
* ``from_config`` builds the method from the training configuration; ``fit_data``, ``clip_groups``
  and ``fsdp_units`` are optional hooks with defaults (nothing to fit, clip the whole method, no
  FSDP2 unit below the method itself).

Logs are detached 0-d tensors: the trainer turns them into numbers only at its logging interval,
so a step never waits for the device to report a value.

MAE, SplitMask, DINOv2 and distillation are each one subclass; none changes the trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dinoflow.errors import SpecError
from dinoflow.models.backbone import Backbone

if TYPE_CHECKING:
    from dinoflow.data.stream import CropGroup
    from dinoflow.storage.client import ObjectStore
    from dinoflow.train.config import TrainConfig

Logs = dict[str, torch.Tensor]


@dataclass
class StepState:
    """Where training stands; passed to every method call."""

    step: int  # optimizer steps done before this one (0-based index of the current step)
    max_steps: int
    steps_per_epoch: int = 1
    world_size: int = 1
    rank: int = 0

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.step / max(1, self.max_steps)


@dataclass
class BatchView:
    """This rank's slice of the global batch and the step's shared random generator."""

    generator: torch.Generator
    offset: int
    global_batch: int


def backbone_from_config(cfg: TrainConfig, store: ObjectStore | None = None) -> Backbone:
    """The backbone ``cfg`` names, started from ``cfg.init_backbone_uri`` when it gives one."""
    from dinoflow.models import create_backbone, load_backbone

    bb = create_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate)
    if cfg.init_backbone_uri:
        if store is None:
            raise SpecError("init_backbone_uri needs an object store")
        init = load_backbone(store, cfg.init_backbone_uri)
        if init.timm_model != bb.timm_model or init.embed_dim != bb.embed_dim:
            raise SpecError(
                f"init_backbone_uri {cfg.init_backbone_uri} holds {init.name} (dim {init.embed_dim}); "
                f"the spec trains {cfg.backbone} (dim {bb.embed_dim})"
            )
        bb.model.load_state_dict(init.model.state_dict())
        bb.mask_token.data.copy_(init.mask_token.data)
    return bb


def scalar_log(value: float) -> torch.Tensor:
    """A host-side number (a schedule value) as a log entry."""
    return torch.tensor(float(value), dtype=torch.float64)


def param_groups_for_backbone(
    backbone: Backbone,
    prefix: str = "",
    layer_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    extra_depth: int = 1,
) -> list[dict[str, Any]]:
    """One group per parameter with layer-wise LR decay (DINOv2: 0.9) and patch-embed LR multiplier
    (DINOv2: 0.2). Layer 0 = patch embed / tokens, layer i+1 = block i, the rest the top layer."""
    depth = backbone.depth
    top = depth + extra_depth
    groups = []
    for name, p in backbone.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("model.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif (
            any(t in name for t in ("patch_embed", "cls_token", "pos_embed", "reg_token", "mask_token"))
            and "cls_attn" not in name
        ):
            layer = 0
        else:
            layer = top
        lr_mult = layer_decay ** (top - layer)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        groups.append(
            {"params": [p], "name": prefix + name, "lr_mult": lr_mult, "wd_mult": _wd_mult(name, p)}
        )
    return groups


def param_groups_plain(module: nn.Module, prefix: str = "", lr_mult: float = 1.0) -> list[dict[str, Any]]:
    return [
        {"params": [p], "name": prefix + n, "lr_mult": lr_mult, "wd_mult": _wd_mult(n, p)}
        for n, p in module.named_parameters()
        if p.requires_grad
    ]


def _wd_mult(name: str, p: torch.Tensor) -> float:
    # No weight decay on biases, norms, LayerScale gammas, tokens (DINOv2 official: wd 0 for them).
    if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name or ".gamma" in name:
        return 0.0
    return 1.0


def merge_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fuse groups with equal (lr_mult, wd_mult) so the optimizer has few groups."""
    fused: dict[tuple[float, float], dict[str, Any]] = {}
    for g in groups:
        key = (round(g["lr_mult"], 12), g["wd_mult"])
        if key not in fused:
            fused[key] = {"params": [], "lr_mult": g["lr_mult"], "wd_mult": g["wd_mult"]}
        fused[key]["params"].extend(g["params"])
    return list(fused.values())


class Method(nn.Module, ABC):
    """Base class of every training recipe run by ``dinoflow.train``."""

    name: str = "method"

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: TrainConfig, store: ObjectStore | None = None) -> Method:
        """Build from the training configuration (and the object store, for methods that start
        from stored weights)."""

    def fit_data(self, images: torch.Tensor, seed: int = 0) -> None:
        """Fit data-dependent parts on the training images (uint8 ``[N, C, H, W]``) before the first
        step; must be deterministic for a seed (every rank fits its own copy). Default: nothing."""

    def crop_groups(self) -> list[CropGroup]:
        """The random-resized crops (+ flips) the data workers cut from each original image, at its
        own size and aspect ratio (``dinoflow.data.stream``); ``prepare`` then gets them as a list,
        one uint8 ``[n, b, C, px, px]`` per group."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its crops (crop_groups)")

    @abstractmethod
    def prepare(self, images: torch.Tensor | list[torch.Tensor], view: BatchView) -> dict[str, Any]:
        """This rank's share of the batch on the training device -> the batch ``forward`` takes:
        either the crops of ``crop_groups()`` (what the trainer passes) or uint8 square images
        ``[b, C, H, W]`` that the method crops itself on the device (benches, unit tests)."""

    @abstractmethod
    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, Logs]:
        """Return the scalar loss to minimise and its logs (loss terms, schedule values), each a
        detached 0-d tensor; loss terms end in ``loss``."""

    def after_backward(self, state: StepState) -> None:
        """Called after ``loss.backward()`` and before clipping / the optimizer step."""

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        """Called after each optimizer step (EMA teachers update here)."""

    @abstractmethod
    def param_groups(
        self, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
    ) -> list[dict[str, Any]]:
        """Trainable parameters as optimizer groups carrying ``lr_mult`` and ``wd_mult``."""

    def clip_groups(self) -> list[nn.Module]:
        """Modules whose gradients are clipped each on its own norm. Default: the whole method."""
        return [self]

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules to shard as their own FSDP2 units, inner ones first; the trainer shards the
        method itself last. Default: none below the method."""
        return []

    @abstractmethod
    def export_backbone(self) -> Backbone:
        """The backbone a downstream stage should use."""

    def head_state(self) -> dict[str, torch.Tensor]:
        """Extra tensors to save next to the exported backbone (e.g. DINO heads); default none."""
        return {}


def student_units(parts: nn.ModuleDict) -> list[nn.Module]:
    """FSDP2 units of a dict of backbones and heads: each backbone's blocks, then each part."""
    units: list[nn.Module] = []
    for part in parts.values():
        if isinstance(part, Backbone):
            units += part.block_modules()
        units.append(part)
    return units
