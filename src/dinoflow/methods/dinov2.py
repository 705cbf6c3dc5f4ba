"""DINOv2: a student and its EMA teacher, crossed global crops, local crops through the student
only, DINO (CLS) + iBOT (masked patches) + KoLeo losses."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dinoflow.data.augment import MultiCrop, MultiCropConfig
from dinoflow.data.masks import ibot_masks
from dinoflow.errors import SpecError
from dinoflow.losses import DINOHead, DINOLoss, EMACenter, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from dinoflow.losses.schedules import cosine, teacher_temperature
from dinoflow.methods.base import BatchView, Method, StepState, param_groups_for_backbone, param_groups_plain
from dinoflow.methods.config import CropsConfig, DINOv2Config
from dinoflow.models.backbone import Backbone


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
            if type(m).__name__ == "DropPath":
                m.drop_prob = 0.0
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(cfg.student_temp)
        self.ibot_loss = IBOTPatchLoss(cfg.student_temp)
        self.koleo_loss = KoLeoLoss()
        if cfg.centering == "ema":
            self.dino_center = EMACenter(cfg.head_prototypes, cfg.center_momentum)
            n_ibot = cfg.ibot_prototypes if cfg.ibot_separate_head else cfg.head_prototypes
            self.ibot_center = EMACenter(n_ibot, cfg.center_momentum)
        self.multicrop = MultiCrop(multicrop_config(crops), backbone.entry.mean, backbone.entry.std)

    # -- data ----------------------------------------------------------------------------------
    def prepare(self, images: torch.Tensor, view: BatchView) -> dict[str, Any]:
        g = view.generator
        glob, loc = self.multicrop(images, g, view.offset, view.global_batch)
        n_g, b = self.crops.global_crops_number, images.shape[0]
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
            masks = m.reshape(n_g * b, -1).to(images.device)
        return {"global": glob, "local": loc, "masks": masks}

    # -- schedules -----------------------------------------------------------------------------
    def teacher_temp(self, state: StepState) -> float:
        warm = int(round(self.cfg.teacher_temp_warmup_epochs * state.steps_per_epoch))
        return teacher_temperature(state.step, warm, self.cfg.teacher_temp_start, self.cfg.teacher_temp_end)

    def momentum(self, state: StepState) -> float:
        # DINOv2: cosine 0.992 -> 1.0 over the whole run.
        return cosine(state.step, state.max_steps, self.cfg.momentum_start, self.cfg.momentum_end)

    def _targets(self, logits: torch.Tensor, temp: float, which: str) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iters)
        center: EMACenter = getattr(self, f"{which}_center")
        t = center.targets(logits, temp)
        center.update(logits)
        return t

    # -- step ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        glob, loc, masks = batch["global"], batch["local"], batch["masks"]
        n_g = self.crops.global_crops_number
        b = glob.shape[0] // n_g
        temp = self.teacher_temp(state)
        ibot_on = masks is not None and cfg.ibot_loss_weight > 0
        t_ibot_head = self.teacher["ibot_head"] if cfg.ibot_separate_head else self.teacher["dino_head"]
        s_ibot_head = self.student["ibot_head"] if cfg.ibot_separate_head else self.student["dino_head"]

        with torch.no_grad():
            t_out = self.teacher["backbone"].encode(glob)
            t_logits = self.teacher["dino_head"](t_out["cls"])
            t_targets = self._targets(t_logits, temp, "dino").view(n_g, b, -1)
            if ibot_on:
                t_patch_logits = t_ibot_head(t_out["patch"][masks])
                t_patch_targets = self._targets(t_patch_logits, temp, "ibot")

        s_out = self.student["backbone"].encode(glob, masks if ibot_on else None)
        s_cls = s_out["cls"]
        n_loc = 0
        head_in = [s_cls]
        if loc is not None:
            s_loc = self.student["backbone"].encode(loc)["cls"]
            n_loc = s_loc.shape[0] // b
            head_in.append(s_loc)
        s_masked = s_out["patch"][masks] if ibot_on else None
        if ibot_on and not cfg.ibot_separate_head:
            head_in.append(s_masked)
        # One head call for all tokens that share the head (fewer, larger matmuls).
        head_out = self.student["dino_head"](torch.cat(head_in))
        s_glob_logits = head_out[: n_g * b].view(n_g, b, -1)
        s_loc_logits = head_out[n_g * b : (n_g + n_loc) * b].view(n_loc, b, -1) if n_loc else None

        dino = self.dino_loss(
            list(s_glob_logits.unbind(0)),
            list(s_loc_logits.unbind(0)) if s_loc_logits is not None else [],
            list(t_targets.unbind(0)),
        )
        loss = cfg.dino_loss_weight * dino
        logs = {"dino_loss": float(dino.detach()), "teacher_temp": temp}
        if ibot_on:
            if cfg.ibot_separate_head:
                s_patch_logits = s_ibot_head(s_masked)
            else:
                s_patch_logits = head_out[(n_g + n_loc) * b :]
            ibot = self.ibot_loss(s_patch_logits, t_patch_targets, masks)
            loss = loss + cfg.ibot_loss_weight * ibot
            logs["ibot_loss"] = float(ibot.detach())
        if cfg.koleo_loss_weight > 0:
            koleo = sum(self.koleo_loss(c) for c in s_cls.view(n_g, b, -1).unbind(0))
            loss = loss + cfg.koleo_loss_weight * koleo
            logs["koleo_loss"] = float(koleo.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def after_backward(self, state: StepState) -> None:
        if state.step < self.cfg.freeze_prototypes_epochs * state.steps_per_epoch:
            for name, p in self.student.named_parameters():
                if name.endswith("prototypes"):
                    p.grad = None  # DINO: the last layer is frozen during the first epoch

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        m = self.momentum(state)
        t_params = list(self.teacher.parameters())
        s_params = [p.detach() for p in self.student.parameters()]
        # teacher <- m * teacher + (1 - m) * student
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1 - m)
        for tb, sb in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            tb.copy_(sb)

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
