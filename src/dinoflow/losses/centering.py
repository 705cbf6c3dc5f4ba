"""Teacher centering: Sinkhorn-Knopp (DINOv2 default, 3 iterations) and EMA centering (DINO, 0.9).

Both turn teacher logits ``[B, K]`` into target distributions whose rows sum to 1. Sinkhorn-Knopp
also balances the prototypes (columns) across the GLOBAL batch: every sum is all-reduced, so N
processes with B/N rows each give the same targets as one process with all B rows.
"""

from __future__ import annotations

import torch
from torch import nn

from dinoflow.losses._dist import all_reduce_max, all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor, temp: float, n_iters: int = 3, n_rows_valid: int | None = None
) -> torch.Tensor:
    """Targets ``[B, K]``: rows sum to 1, columns each carry ~B/K of the mass (global batch).

    Computed in float32 with the global max subtracted before ``exp`` (same result, no overflow).
    """
    x = logits.float() / temp
    mx = all_reduce_max(x.max().clone() if x.numel() else torch.tensor(-1e30, device=x.device))
    q = torch.exp(x - mx).t()  # [K, B]
    k = q.shape[0]
    b = all_reduce_sum(
        torch.tensor(float(q.shape[1] if n_rows_valid is None else n_rows_valid), device=q.device)
    )
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iters):
        # Each prototype (row of q) gets total mass 1/K across the global batch.
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
        q /= k
        # Each sample (column) gets total mass 1/B.
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= b
    q *= b
    return q.t()


class EMACenter(nn.Module):
    """DINO centering: ``softmax((t - c) / temp)`` with ``c <- m c + (1 - m) mean_batch(t)``."""

    def __init__(self, dim: int, momentum: float = 0.9):  # DINO / DINOv2 center_momentum 0.9
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        return torch.softmax((logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        total = all_reduce_sum(logits.float().sum(dim=0, keepdim=True))
        n = all_reduce_sum(torch.tensor(float(logits.shape[0]), device=logits.device))
        self.center.mul_(self.momentum).add_(total / n, alpha=1 - self.momentum)
