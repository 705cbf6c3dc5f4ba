"""iBOT masked-patch loss: at each masked patch, cross-entropy between the teacher's target (from the
unmasked view) and the student's prediction (from the masked view).

Each image's masked patches share weight 1 / (its number of masked patches), and the sum is divided
by the number of images in the batch, masked or not (official DINOv2 normalisation).
"""

from __future__ import annotations

import torch
from torch import nn


class IBOTPatchLoss(nn.Module):
    def __init__(self, student_temp: float = 0.1):  # DINOv2 default
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self, student_logits: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """student_logits / targets: ``[M, K]`` for the M masked patches (in ``masks[masks]`` order);
        masks: bool ``[B, N]``."""
        n_per_image = masks.sum(dim=-1, keepdim=True).clamp_min(1).float()
        weights = (1.0 / n_per_image).expand_as(masks)[masks]
        ce = -(targets * torch.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(dim=-1)
        return (ce * weights).sum() / masks.shape[0]
