"""The DINOv2 objective, shared by self-supervised pretraining (``DINOv2``) and distillation
(``Distill``): teacher targets (Sinkhorn-Knopp or EMA centering), one batched DINO-head call per
student, and the DINO (CLS) + iBOT (patch) + KoLeo losses. Also ``ema_update_``, the one EMA step
every teacher or student average in the code uses.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dinoflow.losses import DINOLoss, EMACenter, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from dinoflow.methods.config import DINOObjectiveConfig


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` on parameters; buffers (e.g. norm
    statistics) are copied. One multi-tensor call per operation over ALL the parameters (and one
    for the buffers), however many modules there are: a handful of kernel launches a step."""
    t_params = list(target.parameters())
    s_params = list(source.parameters())  # no_grad: no detach needed
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
    t_bufs, s_bufs = list(target.buffers()), list(source.buffers())
    if len(t_bufs) != len(s_bufs):
        raise ValueError(f"EMA target has {len(t_bufs)} buffers, source {len(s_bufs)}")
    if t_bufs:
        torch._foreach_copy_(t_bufs, s_bufs)


class DINOObjective(nn.Module):
    """Teacher targets and student losses of DINOv2.

    ``dino_prototypes`` / ``ibot_prototypes`` size the EMA centres (unused with Sinkhorn-Knopp).
    """

    def __init__(self, cfg: DINOObjectiveConfig, dino_prototypes: int, ibot_prototypes: int):
        super().__init__()
        self.centering = cfg.centering
        self.sinkhorn_iters = cfg.sinkhorn_iters
        self.dino_loss_weight = cfg.dino_loss_weight
        self.ibot_loss_weight = cfg.ibot_loss_weight
        self.koleo_loss_weight = cfg.koleo_loss_weight
        self.dino_loss = DINOLoss(cfg.student_temp)
        self.ibot_loss = IBOTPatchLoss(cfg.student_temp)
        self.koleo_loss = KoLeoLoss()
        if cfg.centering == "ema":
            self.dino_center = EMACenter(dino_prototypes, cfg.center_momentum)
            self.ibot_center = EMACenter(ibot_prototypes, cfg.center_momentum)

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, temp: float, which: Literal["dino", "ibot"]) -> torch.Tensor:
        """Teacher logits ``[B, K]`` -> target distributions (rows sum to 1) over the global batch."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.sinkhorn_iters)
        center: EMACenter = self.dino_center if which == "dino" else self.ibot_center
        t = center.targets(logits, temp)
        center.update(logits)
        return t

    def student_loss(
        self,
        dino_head: nn.Module,
        s_cls: torch.Tensor,
        s_local_cls: torch.Tensor | None,
        s_patches: torch.Tensor | None,
        t_targets: torch.Tensor,
        t_patch_targets: torch.Tensor | None,
        masks: torch.Tensor | None,
        n_global: int,
        ibot_head: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One student's weighted DINO + iBOT + KoLeo loss and its detached terms.

        ``s_cls`` ``[G*b, D]`` (global crops, crop-major), ``s_local_cls`` ``[L*b, D]`` or None,
        ``s_patches`` the student's patch tokens at the iBOT positions ``[M, D]`` (None: no iBOT),
        ``t_targets`` ``[G, b, K]``, ``t_patch_targets`` ``[M, K]``, ``masks`` the iBOT positions
        ``[G*b, N]``. The tokens that share ``dino_head`` go through it in one call (fewer, larger
        matmuls); ``ibot_head`` is the separate patch head when there is one.
        """
        b = s_cls.shape[0] // n_global
        head_in = [s_cls]
        n_loc = 0
        if s_local_cls is not None:
            head_in.append(s_local_cls)
            n_loc = s_local_cls.shape[0] // b
        ibot_on = s_patches is not None
        if ibot_on and ibot_head is None:
            head_in.append(s_patches)
        out = dino_head(torch.cat(head_in))
        s_glob = out[: n_global * b].view(n_global, b, -1)
        s_loc = out[n_global * b : (n_global + n_loc) * b].view(n_loc, b, -1) if n_loc else None
        dino = self.dino_loss(
            list(s_glob.unbind(0)),
            list(s_loc.unbind(0)) if s_loc is not None else [],
            list(t_targets.unbind(0)),
        )
        loss = self.dino_loss_weight * dino
        logs = {"dino_loss": dino.detach()}
        if ibot_on:
            s_patch = ibot_head(s_patches) if ibot_head is not None else out[(n_global + n_loc) * b :]
            ibot = self.ibot_loss(s_patch, t_patch_targets, masks)
            loss = loss + self.ibot_loss_weight * ibot
            logs["ibot_loss"] = ibot.detach()
        if self.koleo_loss_weight > 0:
            koleo = sum(self.koleo_loss(c) for c in s_cls.view(n_global, b, -1).unbind(0))
            loss = loss + self.koleo_loss_weight * koleo
            logs["koleo_loss"] = koleo.detach()
        logs["loss"] = loss.detach()
        return loss, logs
