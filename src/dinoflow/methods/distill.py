"""DINOv2 distillation: a frozen pretrained teacher (backbone + its DINO/iBOT heads) teaches one or
more smaller students through the DINOv2 losses; an EMA of each student is the final model.

Per step the teacher sees the global crops once; every student sees the global and local crops.
Each student has its own DINO head (and iBOT head when the teacher has a separate one) with the
teacher's prototype count, so its width may differ from the teacher's. The iBOT loss is applied to
every patch token of the global crops (no masking, DINOv2 Sec. 5), which needs student and teacher
patch grids to match; with ``ibot_loss_weight = 0`` the patch size may differ too.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dinoflow.data.augment import MultiCrop
from dinoflow.errors import SpecError
from dinoflow.losses import DINOHead, DINOLoss, EMACenter, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from dinoflow.losses.schedules import cosine
from dinoflow.methods.base import BatchView, Method, StepState, param_groups_for_backbone, param_groups_plain
from dinoflow.methods.config import CropsConfig
from dinoflow.methods.dinov2 import multicrop_config
from dinoflow.methods.distill_config import DistillConfig
from dinoflow.models.backbone import Backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadShape:
    in_dim: int
    out_dim: int  # prototypes
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int


def head_shape(state: dict[str, torch.Tensor], prefix: str) -> HeadShape | None:
    """Recover a DINOHead's shape from its saved state (``{prefix}.mlp.{i}.weight``, ``.prototypes``)."""
    linears = sorted(
        (int(k.split(".")[2]), v)
        for k, v in state.items()
        if k.startswith(prefix + ".mlp.") and k.endswith(".weight")
    )
    protos = state.get(prefix + ".prototypes")
    if not linears or protos is None:
        return None
    hidden = linears[0][1].shape[0] if len(linears) > 1 else protos.shape[1]
    return HeadShape(linears[0][1].shape[1], protos.shape[0], hidden, protos.shape[1], len(linears))


def load_head(state: dict[str, torch.Tensor], prefix: str, shape: HeadShape) -> DINOHead:
    head = DINOHead(shape.in_dim, shape.out_dim, shape.hidden_dim, shape.bottleneck_dim, shape.nlayers)
    head.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})
    return head


def check_pair(
    teacher: dict[str, Any],
    teacher_heads: dict[str, HeadShape],
    student: dict[str, Any],
    cfg: DistillConfig,
    crops: CropsConfig,
    drop_path_rate: float = 0.0,
) -> None:
    """Refuse a teacher/student combination that cannot work, with the reason and the fix.

    ``teacher`` / ``student``: backbone metadata (``backbone.json`` keys: in_chans, embed_dim,
    patch_size, family, grid for the global crop as ``grid``).
    """
    name = student.get("name", "student")
    if drop_path_rate > 0:
        raise SpecError(
            f"{name}: DINOv2 distillation uses no stochastic depth in the student; set drop_path_rate=0"
        )
    if "dino_head" not in teacher_heads:
        raise SpecError(
            "the teacher has no DINO head (heads.safetensors next to its backbone): distillation needs a "
            "backbone exported by the dinov2 pretrain stage, not an MAE/SplitMask one"
        )
    h = teacher_heads["dino_head"]
    if h.in_dim != teacher["embed_dim"]:
        raise SpecError(
            f"the teacher's DINO head takes width {h.in_dim} but its backbone has width {teacher['embed_dim']}: "
            "backbone and heads come from different runs"
        )
    if student["in_chans"] != teacher["in_chans"]:
        raise SpecError(
            f"{name} takes {student['in_chans']}-channel images but the teacher {teacher['in_chans']}: both "
            "must see the same crops"
        )
    for who, meta in (("teacher", teacher), (name, student)):
        if meta["family"] == "vit" and crops.global_crop_px % meta["patch_size"]:
            raise SpecError(
                f"global_crop_px {crops.global_crop_px} is not a multiple of the {who}'s patch size {meta['patch_size']}"
            )
        if meta["family"] == "vit" and crops.local_crops_number and crops.local_crop_px % meta["patch_size"]:
            raise SpecError(
                f"local_crop_px {crops.local_crop_px} is not a multiple of the {who}'s patch size {meta['patch_size']}"
            )
    if cfg.ibot_loss_weight > 0 and student["grid"] != teacher["grid"]:
        raise SpecError(
            f"{name} sees a {student['grid']} patch grid on {crops.global_crop_px} px crops but the teacher "
            f"a {teacher['grid']} grid: the iBOT patch loss pairs patch tokens one to one. Use a student with "
            "the teacher's patch size, or set ibot_loss_weight=0 (CLS-only distillation)"
        )


class Distill(Method):
    """Frozen ``frozen`` teacher, trainable ``student`` modules, and ``ema`` copies of the students."""

    name = "distill"

    def __init__(
        self,
        teacher: Backbone,
        teacher_heads: dict[str, torch.Tensor],
        students: dict[str, Backbone],
        cfg: DistillConfig | None = None,
        crops: CropsConfig | None = None,
    ):
        super().__init__()
        self.cfg = cfg = cfg or DistillConfig()
        self.crops = crops = crops or CropsConfig()
        if not students:
            raise SpecError("distillation needs at least one student")
        shapes = {p: s for p in ("dino_head", "ibot_head") if (s := head_shape(teacher_heads, p)) is not None}
        g = crops.global_crop_px
        t_meta = {**teacher.metadata(), "grid": teacher.patch_grid(g, g)}
        for n, bb in students.items():
            s_meta = {**bb.metadata(), "grid": bb.patch_grid(g, g), "name": n}
            dp = max((float(getattr(m, "drop_prob", 0.0)) for m in bb.modules()), default=0.0)
            check_pair(t_meta, shapes, s_meta, cfg, crops, dp)
        frozen: dict[str, nn.Module] = {"backbone": teacher}
        for p, s in shapes.items():
            frozen[p] = load_head(teacher_heads, p, s)
        self.frozen = nn.ModuleDict(frozen).requires_grad_(False).eval()
        self.has_ibot_head = "ibot_head" in shapes
        self.names = list(students)
        dino = shapes["dino_head"]
        parts: dict[str, nn.Module] = {}
        for i, (_, bb) in enumerate(students.items()):
            parts[f"s{i}_backbone"] = bb
            for p in ("dino_head", "ibot_head") if self.has_ibot_head else ("dino_head",):
                s = shapes[p]
                parts[f"s{i}_{p}"] = DINOHead(
                    bb.embed_dim, s.out_dim, s.hidden_dim, s.bottleneck_dim, s.nlayers
                )
        self.student = nn.ModuleDict(parts)
        self.ema = nn.ModuleDict({f"s{i}": copy.deepcopy(bb) for i, bb in enumerate(students.values())})
        self.ema.requires_grad_(False)
        self.dino_loss = DINOLoss(cfg.student_temp)
        self.ibot_loss = IBOTPatchLoss(cfg.student_temp)
        self.koleo_loss = KoLeoLoss()
        if cfg.centering == "ema":
            self.dino_center = EMACenter(dino.out_dim, cfg.center_momentum)
            n_ibot = shapes["ibot_head"].out_dim if self.has_ibot_head else dino.out_dim
            self.ibot_center = EMACenter(n_ibot, cfg.center_momentum)
        first = next(iter(students.values()))
        for bb in students.values():
            if tuple(bb.entry.mean) != tuple(first.entry.mean) or tuple(bb.entry.std) != tuple(
                first.entry.std
            ):
                raise SpecError("all students of one run must share input normalisation (mean/std)")
        self.multicrop = MultiCrop(multicrop_config(crops), first.entry.mean, first.entry.std)
        # Crops are normalised for the students; the teacher gets them re-normalised for itself.
        s_mean, s_std = torch.tensor(first.entry.mean), torch.tensor(first.entry.std)
        t_mean, t_std = torch.tensor(teacher.entry.mean), torch.tensor(teacher.entry.std)
        self.register_buffer("renorm_scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("renorm_shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)

    # -- the trainer's interface --------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.frozen.eval()  # the teacher is frozen: always in inference mode
        self.ema.eval()
        return self

    def prepare(self, images: torch.Tensor, view: BatchView) -> dict[str, Any]:
        glob, loc = self.multicrop(images, view.generator, view.offset, view.global_batch)
        return {"global": glob, "local": loc}

    def _targets(self, logits: torch.Tensor, which: str) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, self.cfg.teacher_temp, self.cfg.sinkhorn_iters)
        center: EMACenter = getattr(self, f"{which}_center")
        t = center.targets(logits, self.cfg.teacher_temp)
        center.update(logits)
        return t

    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        glob, loc = batch["global"], batch["local"]
        n_g = self.crops.global_crops_number
        b = glob.shape[0] // n_g
        ibot_on = cfg.ibot_loss_weight > 0
        with torch.no_grad():
            t_out = self.frozen["backbone"].encode(glob * self.renorm_scale + self.renorm_shift)
            t_targets = self._targets(self.frozen["dino_head"](t_out["cls"]), "dino").view(n_g, b, -1)
            if ibot_on:
                patches = t_out["patch"]  # [n_g * b, N, D]: every patch, no masking (DINOv2 distillation)
                masks = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
                t_ibot_head = self.frozen["ibot_head"] if self.has_ibot_head else self.frozen["dino_head"]
                t_patch_targets = self._targets(t_ibot_head(patches.flatten(0, 1)), "ibot")
        loss = glob.new_zeros(())
        logs: dict[str, float] = {}
        for i, name in enumerate(self.names):
            bb = self.student[f"s{i}_backbone"]
            head = self.student[f"s{i}_dino_head"]
            s_out = bb.encode(glob)
            s_cls = s_out["cls"]
            head_in = [s_cls]
            n_loc = 0
            if loc is not None:
                head_in.append(bb.encode(loc)["cls"])
                n_loc = head_in[-1].shape[0] // b
            if ibot_on and not self.has_ibot_head:
                head_in.append(s_out["patch"].flatten(0, 1))
            out = head(torch.cat(head_in))  # one call for every token that shares the head
            s_glob = out[: n_g * b].view(n_g, b, -1)
            s_loc = out[n_g * b : (n_g + n_loc) * b].view(n_loc, b, -1) if n_loc else None
            dino = self.dino_loss(
                list(s_glob.unbind(0)),
                list(s_loc.unbind(0)) if s_loc is not None else [],
                list(t_targets.unbind(0)),
            )
            li = cfg.dino_loss_weight * dino
            logs[f"{name}/dino_loss"] = float(dino.detach())
            if ibot_on:
                if self.has_ibot_head:
                    s_patch = self.student[f"s{i}_ibot_head"](s_out["patch"].flatten(0, 1))
                else:
                    s_patch = out[(n_g + n_loc) * b :]
                ibot = self.ibot_loss(s_patch, t_patch_targets, masks)
                li = li + cfg.ibot_loss_weight * ibot
                logs[f"{name}/ibot_loss"] = float(ibot.detach())
            if cfg.koleo_loss_weight > 0:
                koleo = sum(self.koleo_loss(c) for c in s_cls.view(n_g, b, -1).unbind(0))
                li = li + cfg.koleo_loss_weight * koleo
                logs[f"{name}/koleo_loss"] = float(koleo.detach())
            logs[f"{name}/loss"] = float(li.detach())
            loss = loss + li
        logs["loss"] = float(loss.detach())
        logs["ema_momentum"] = self.momentum(state)
        return loss, logs

    def momentum(self, state: StepState) -> float:
        return cosine(state.step, state.max_steps, self.cfg.ema_momentum_start, self.cfg.ema_momentum_end)

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        m = self.momentum(state)
        for i in range(len(self.names)):
            ema, bb = self.ema[f"s{i}"], self.student[f"s{i}_backbone"]
            e_params = list(ema.parameters())
            torch._foreach_mul_(e_params, m)  # ema <- m * ema + (1 - m) * student
            torch._foreach_add_(e_params, [p.detach() for p in bb.parameters()], alpha=1 - m)
            for eb, sb in zip(ema.buffers(), bb.buffers(), strict=True):
                eb.copy_(sb)

    def param_groups(
        self, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
    ) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        for k, mod in self.student.items():
            if k.endswith("_backbone"):
                groups += param_groups_for_backbone(mod, f"student.{k}.", layer_decay, patch_embed_lr_mult)
            else:
                groups += param_groups_plain(mod, f"student.{k}.")
        return groups

    def export_backbone(self) -> Backbone:
        return self.ema["s0"]

    def export_students(self) -> dict[str, Backbone]:
        """Every student's EMA, by student name (the distillation's result)."""
        return {n: self.ema[f"s{i}"] for i, n in enumerate(self.names)}

    def images_per_step(self, batch_size: int) -> int:
        return batch_size
