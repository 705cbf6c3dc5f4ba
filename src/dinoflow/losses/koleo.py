"""KoLeo regulariser (Sablayrolles et al.; DINOv2 weight 0.1): ``-mean_i log(min_{j != i} ||x_i - x_j||)``
over L2-normalised features, pushing each feature away from its nearest neighbour.

Stable where the official code is not: batch size 1 has no neighbour (loss 0), and duplicate rows
(distance 0) are clamped at ``eps`` with a clamp whose gradient is zero, so no NaN/inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):  # official pdist eps
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            return x.sum() * 0.0  # no neighbour to repel; keeps the graph connected
        x = F.normalize(x.float(), dim=-1, eps=1e-8)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-2.0)  # never pick oneself
            nn_idx = sim.argmax(dim=1)
        sq = (x - x[nn_idx]).pow(2).sum(dim=-1)
        dist = sq.clamp_min(self.eps**2).sqrt()
        return -torch.log(dist).mean()
