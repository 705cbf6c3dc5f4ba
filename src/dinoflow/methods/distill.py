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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dinoflow.data.augment import MultiCrop
from dinoflow.data.stream import CropGroup
from dinoflow.errors import SpecError
from dinoflow.losses import DINOHead
from dinoflow.losses.schedules import cosine
from dinoflow.methods.base import (
    BatchView,
    Logs,
    Method,
    StepState,
    param_groups_for_backbone,
    param_groups_plain,
    scalar_log,
    student_units,
)
from dinoflow.methods.config import CropsConfig
from dinoflow.methods.dino_objective import DINOObjective, ema_update_
from dinoflow.methods.dinov2 import multicrop_config
from dinoflow.methods.distill_config import DistillConfig
from dinoflow.models.backbone import Backbone

if TYPE_CHECKING:
    from dinoflow.storage.client import ObjectStore
    from dinoflow.train.config import TrainConfig

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


def default_crops(img_size: int, patch: int) -> CropsConfig:
    """Global crops at the image size; local crops at 3/7 of it rounded to the patch (224 -> 96 / 98)."""
    local = max(patch, round(img_size * 3 / 7 / patch) * patch)
    return CropsConfig(global_crop_px=img_size, local_crop_px=local)


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
        ibot_prototypes = shapes["ibot_head"].out_dim if self.has_ibot_head else dino.out_dim
        self.objective = DINOObjective(cfg, dino.out_dim, ibot_prototypes)
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

    @classmethod
    def from_config(cls, cfg: TrainConfig, store: ObjectStore | None = None) -> Distill:
        """Load the teacher (and its heads) named by a ``DistillTrainConfig`` and create the students."""
        from dinoflow.models import create_backbone, get_entry, load_backbone
        from dinoflow.models.export import load_heads
        from dinoflow.train.config import DistillTrainConfig

        if not isinstance(cfg, DistillTrainConfig):
            raise SpecError(
                "method 'distill' needs a teacher and students: give a DistillTrainConfig (the distill "
                "stage's spec), not a plain TrainConfig"
            )
        if store is None:
            raise SpecError("distillation loads its teacher from an object store; none was given")
        teacher = load_backbone(store, cfg.teacher_uri)
        heads = load_heads(store, cfg.teacher_uri)
        for s in cfg.students:
            get_entry(s)  # unknown names fail here, with the list of known ones
        crops = cfg.crops or default_crops(teacher.img_size, teacher.patch_size)
        students = {s: create_backbone(s, drop_path_rate=cfg.drop_path_rate) for s in cfg.students}
        return cls(teacher, heads, students, cfg.distill, crops)

    # -- the trainer's interface --------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.frozen.eval()  # the teacher is frozen: always in inference mode
        self.ema.eval()
        return self

    def crop_groups(self) -> list[CropGroup]:
        return self.multicrop.groups()

    def prepare(self, images: torch.Tensor | list[torch.Tensor], view: BatchView) -> dict[str, Any]:
        if isinstance(images, list):  # crops the data workers cut from the original images
            glob, loc = self.multicrop.photometric(images, view.generator, view.offset, view.global_batch)
            return {"global": glob, "local": loc}
        glob, loc = self.multicrop(images, view.generator, view.offset, view.global_batch)
        return {"global": glob, "local": loc}

    def forward(self, batch: dict[str, Any], state: StepState) -> tuple[torch.Tensor, Logs]:
        glob, loc = batch["global"], batch["local"]
        n_g = self.crops.global_crops_number
        b = glob.shape[0] // n_g
        ibot_on = self.cfg.ibot_loss_weight > 0
        temp = self.cfg.teacher_temp
        objective = self.objective
        masks = t_patch_targets = None
        with torch.no_grad():
            t_out = self.frozen["backbone"].encode(glob * self.renorm_scale + self.renorm_shift)
            t_targets = objective.targets(self.frozen["dino_head"](t_out["cls"]), temp, "dino").view(
                n_g, b, -1
            )
            if ibot_on:
                patches = t_out["patch"]  # [n_g * b, N, D]: every patch, no masking (DINOv2 distillation)
                masks = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
                t_ibot_head = self.frozen["ibot_head"] if self.has_ibot_head else self.frozen["dino_head"]
                t_patch_targets = objective.targets(t_ibot_head(patches.flatten(0, 1)), temp, "ibot")
        loss = glob.new_zeros(())
        logs: Logs = {}
        for i, name in enumerate(self.names):
            bb = self.student[f"s{i}_backbone"]
            s_out = bb.encode(glob)
            li, terms = objective.student_loss(
                self.student[f"s{i}_dino_head"],
                s_out["cls"],
                bb.encode(loc)["cls"] if loc is not None else None,
                s_out["patch"].flatten(0, 1) if ibot_on else None,
                t_targets,
                t_patch_targets,
                masks,
                n_g,
                self.student[f"s{i}_ibot_head"] if ibot_on and self.has_ibot_head else None,
            )
            logs.update({f"{name}/{k}": v for k, v in terms.items()})
            loss = loss + li
        logs["loss"] = loss.detach()
        logs["ema_momentum"] = scalar_log(self.momentum(state))
        return loss, logs

    def momentum(self, state: StepState) -> float:
        return cosine(state.step, state.max_steps, self.cfg.ema_momentum_start, self.cfg.ema_momentum_end)

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        m = self.momentum(state)
        for i in range(len(self.names)):
            ema_update_(self.ema[f"s{i}"], self.student[f"s{i}_backbone"], m)

    def clip_groups(self) -> list[nn.Module]:
        return list(self.student.values())

    def fsdp_units(self) -> list[nn.Module]:
        return student_units(self.student)

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
