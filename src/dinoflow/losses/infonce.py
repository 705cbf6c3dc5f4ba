"""InfoNCE (CPC, van den Oord et al. 2018) between two views, negatives from the global batch.

SplitMask (El-Nouby et al. 2021) ties the average-pooled representations of an image's two disjoint
patch halves with this loss; every other image of the (all-gathered, when distributed) batch is a
negative. Symmetric: A->B and B->A cross-entropies are averaged.

Distributed: each rank holds its local rows; the keys are all-gathered with the autograd-aware
``torch.distributed.nn.functional.all_gather`` so that gradients flow back to the rank that
produced each key. Each rank's loss is the mean over its own queries; averaging gradients over ranks
(DDP / FSDP do) then gives exactly the gradient of the global-batch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import distributed as dist


def _gather(x: torch.Tensor, group: object | None) -> tuple[torch.Tensor, int]:
    """All rows of every rank (with gradient), and the offset of this rank's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous(), group=group or dist.group.WORLD)
    sizes = [p.shape[0] for p in parts]
    if len(set(sizes)) != 1:
        raise ValueError(f"InfoNCE needs the same local batch on every rank, got {sizes}")
    return torch.cat(parts, dim=0), dist.get_rank(group) * x.shape[0]


def info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2, group: object | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE of row-paired embeddings ``a``, ``b`` [B, D] (cosine similarity / T).

    Row i of ``a`` is the positive of row i of ``b``; all other rows of the global batch are negatives.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"info_nce wants two [B, D] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    a_all, offset = _gather(a, group)
    b_all, _ = _gather(b, group)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    loss_ab = F.cross_entropy(a @ b_all.t() / temperature, labels)
    loss_ba = F.cross_entropy(b @ a_all.t() / temperature, labels)
    return 0.5 * (loss_ab + loss_ba)
