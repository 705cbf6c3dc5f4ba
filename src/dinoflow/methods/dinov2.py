"""DINOv2: a student and its EMA teacher, crossed global crops, local crops through the student
only, DINO (CLS) + iBOT (masked patches) + KoLeo losses."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import DropPath
from torch import nn

from dinoflow.data.augment import MultiCrop, MultiCropConfig
from dinoflow.data.masks import ibot_masks
from dinoflow.data.stream import CropGroup
from dinoflow.errors import SpecError
from dinoflow.losses import DINOHead
from dinoflow.losses.schedules import cosine, teacher_temperature
from dinoflow.methods.base import (
    BatchView,
    Logs,
    Method,
    StepState,
    backbone_from_config,
    param_groups_for_backbone,
    param_groups_plain,
    scalar_log,
    student_units,
)
from dinoflow.methods.config import CropsConfig, DINOv2Config
from dinoflow.methods.dino_objective import DINOObjective, ema_update_
from dinoflow.models.backbone import Backbone

if TYPE_CHECKING:
    from dinoflow.storage.client import ObjectStore
    from dinoflow.train.config import TrainConfig


def multicrop_config(c: CropsConfig) -> MultiCropConfig:
    return MultiCropConfig(
        global_crops_number=c.global_crops_number,
        global_crop_px=c.global_crop_px,
        global_scale=(c.global_scale_min, c.global_scale_max),
        local_crops_number=c.local_crops_number,
        local_crop_px=c.local_crop_px,
        local_scale=(c.local_scale_min, c.local_scale_max),
        flip_p=c.flip_p,
        jitter_p=c.jitter_p,
        grayscale_p=c.grayscale_p,
        solarize_p=c.solarize_p,
        blur_p=(c.blur_p_global1, c.blur_p_global2, c.blur_p_local),
    )


class DINOv2(Method):
    name = "dinov2"

    def __init__(self, backbone: Backbone, cfg: DINOv2Config | None = None, crops: CropsConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DINOv2Config()
        self.crops = crops = crops or CropsConfig()
        if backbone.family == "vit":
            for field in ("global_crop_px", "local_crop_px"):
                if getattr(crops, field) % backbone.patch_size:
                    raise SpecError(
                        f"crops.{field} = {getattr(crops, field)} is not a multiple of {backbone.name}'s "
                        f"patch size {backbone.patch_size}"
                    )
        d = backbone.embed_dim
        student: dict[str, nn.Module] = {
            "backbone": backbone,
            "dino_head": DINOHead(
                d, cfg.head_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers
            ),
        }
        if cfg.ibot_separate_head:
            student["ibot_head"] = DINOHead(
                d, cfg.ibot_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers
            )
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for m in self.teacher.modules():  # the teacher never uses stochastic depth
            if isinstance(m, DropPath):
                m.drop_prob = 0.0
        self.teacher.requires_grad_(False)
        ibot_prototypes = cfg.ibot_prototypes if cfg.ibot_separate_head else cfg.head_prototypes
        self.objective = DINOObjective(cfg, cfg.head_prototypes, ibot_prototypes)
        self.multicrop = MultiCrop(multicrop_config(crops), backbone.entry.mean, backbone.entry.std)

    @classmethod
    def from_config(cls, cfg: TrainConfig, store: ObjectStore | None = None) -> DINOv2:
        return cls(backbone_from_config(cfg, store), cfg.dinov2, cfg.crops)

    # -- data ----------------------------------------------------------------------------------
    def crop_groups(self) -> list[CropGroup]:
        return self.multicrop.groups()

    def prepare(self, images: torch.Tensor, view: BatchView) -> dict[str, Any]:
        g = view.generator
        if isinstance(images, list):  # crops the data workers cut from the original images
            glob, loc = self.multicrop.photometric(images, g, view.offset, view.global_batch)
        else:
            glob, loc = self.multicrop(images, g, view.offset, view.global_batch)
        n_g, b = self.crops.global_crops_number, glob.shape[0] // self.crops.global_crops_number
        grid = self.student["backbone"].patch_grid(self.crops.global_crop_px, self.crops.global_crop_px)
        masks = None
        if self.cfg.ibot_loss_weight > 0:
            m = ibot_masks(
                g,
                n_g * view.global_batch,
                grid,
                self.cfg.mask_sample_p,
                (self.cfg.mask_ratio_min, self.cfg.mask_ratio_max),
            )
            m = m.view(n_g, view.global_batch, -1)[:, view.offset : view.offset + b]
            masks = m.reshape(n_g * b, -1).to(glob.device)
        return {"global": glob, "local": loc, "masks": masks}

    # -- schedules -----------------------------------------------------------------------------
    def teacher_temp(self, state: StepState) -> float:
        warm = int(round(self.cfg.teacher_temp_warmup_epochs * state.steps_per_epoch))
        return teacher_temperature(state.step, warm, self.cfg.teacher_temp_start, self.cfg.teacher_temp_end)

    def momentum(self, state: StepState) -> float:
        # DINOv2: cosine 0.992 -> 1.0 over the whole run.
        return cosine(state.step, state.max_steps, self.cfg.momentum_start, self.cfg.momentum_end)

    # -- step ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, Logs]:
        glob, loc, masks = batch["global"], batch["local"], batch["masks"]
        n_g = self.crops.global_crops_number
        b = glob.shape[0] // n_g
        temp = self.teacher_temp(state)
        ibot_on = masks is not None and self.cfg.ibot_loss_weight > 0
        separate = self.cfg.ibot_separate_head
        objective = self.objective

        with torch.no_grad():
            t_out = self.teacher["backbone"].encode(glob)
            t_logits = self.teacher["dino_head"](t_out["cls"])
            t_targets = objective.targets(t_logits, temp, "dino").view(n_g, b, -1)
            t_patch_targets = None
            if ibot_on:
                t_ibot_head = self.teacher["ibot_head"] if separate else self.teacher["dino_head"]
                t_patch_targets = objective.targets(t_ibot_head(t_out["patch"][masks]), temp, "ibot")

        s_out = self.student["backbone"].encode(glob, masks if ibot_on else None)
        s_loc = self.student["backbone"].encode(loc)["cls"] if loc is not None else None
        loss, logs = objective.student_loss(
            self.student["dino_head"],
            s_out["cls"],
            s_loc,
            s_out["patch"][masks] if ibot_on else None,
            t_targets,
            t_patch_targets,
            masks,
            n_g,
            self.student["ibot_head"] if ibot_on and separate else None,
        )
        logs["teacher_temp"] = scalar_log(temp)
        return loss, logs

    def after_backward(self, state: StepState) -> None:
        if state.step < self.cfg.freeze_prototypes_epochs * state.steps_per_epoch:
            for name, p in self.student.named_parameters():
                if name.endswith("prototypes"):
                    p.grad = None  # DINO: the last layer is frozen during the first epoch

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        ema_update_(self.teacher, self.student, self.momentum(state))

    def clip_groups(self) -> list[nn.Module]:
        return list(self.student.values())  # official DINOv2: each student part clipped on its own

    def fsdp_units(self) -> list[nn.Module]:
        return student_units(self.student) + student_units(self.teacher)

    def param_groups(
        self, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
    ) -> list[dict[str, Any]]:
        groups = param_groups_for_backbone(
            self.student["backbone"], "student.backbone.", layer_decay, patch_embed_lr_mult
        )
        for k, mod in self.student.items():
            if k != "backbone":
                groups += param_groups_plain(mod, f"student.{k}.")
        return groups

    def export_backbone(self) -> Backbone:
        return self.teacher["backbone"]

    def head_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{k}.{n}": v.detach().cpu().contiguous().clone()
            for k, mod in self.teacher.items()
            if k != "backbone"
            for n, v in mod.state_dict().items()
        }
