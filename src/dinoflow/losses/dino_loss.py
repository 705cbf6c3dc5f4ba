"""DINO CLS-token loss: cross-entropy between teacher targets and the student's softmax.

``loss = sum over (student crop s, teacher crop t), s != t for global crops, of
mean_batch( -sum_k target_t[k] * log_softmax(student_s / tau_s)[k] )``, divided by the number of
(s, t) pairs (the official normalisation). Student temperature 0.1 (DINOv2 default).
"""

from __future__ import annotations

import torch
from torch import nn


class DINOLoss(nn.Module):
    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self,
        student_global: list[torch.Tensor],
        student_local: list[torch.Tensor],
        targets: list[torch.Tensor],
    ) -> torch.Tensor:
        """student_global[i] / targets[i]: logits / targets of global crop i ``[B, K]`` (crossed: the
        target of crop i never supervises student crop i); student_local: one ``[B, K]`` per local crop."""
        total, n_terms = 0.0, 0
        for i, s in enumerate(student_global):
            lsm = torch.log_softmax(s.float() / self.student_temp, dim=-1)
            for j, t in enumerate(targets):
                if i == j:
                    continue
                total = total - (t * lsm).sum(dim=-1).mean()
                n_terms += 1
        for s in student_local:
            lsm = torch.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in targets:
                total = total - (t * lsm).sum(dim=-1).mean()
                n_terms += 1
        if n_terms == 0:
            raise ValueError("DINO loss needs >= 2 global crops or >= 1 local crop")
        return total / n_terms  # type: ignore[return-value]
