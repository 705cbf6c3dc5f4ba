"""iBOT block-wise masks (BEiT-style blocks) and the DINOv2 masking policy for a batch of crops.

Half of the global-crop samples are masked (DINOv2 ``mask_sample_probability`` 0.5); their mask
ratios are spread over [0.1, 0.5] (``mask_ratio_min_max``) in equal bins, one draw per bin; each mask
is grown from rectangular blocks (min 4 patches, aspect ratio 0.3-3.3) and topped up with random
patches so it holds exactly ``int(ratio * N)`` patches. All draws come from the shared generator.
"""

from __future__ import annotations

import math

import torch


def block_mask(
    g: torch.Generator, grid: tuple[int, int], n_mask: int, min_block: int = 4, max_attempts: int = 10
):
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    while count < n_mask:
        left = n_mask - count
        added = 0
        for _ in range(max_attempts):
            lo = min(min_block, left)
            area = lo + (left - lo) * float(torch.rand(1, generator=g))
            ar = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand(1, generator=g)))
            bh = int(round(math.sqrt(area * ar)))
            bw = int(round(math.sqrt(area / ar)))
            if 1 <= bh <= h and 1 <= bw <= w:
                top = int(torch.randint(0, h - bh + 1, (1,), generator=g))
                lft = int(torch.randint(0, w - bw + 1, (1,), generator=g))
                region = mask[top : top + bh, lft : lft + bw]
                new = int((~region).sum())
                if 0 < new <= left:
                    region.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    if count < n_mask:  # top up with random single patches: exact count
        free = (~mask.flatten()).nonzero().flatten()
        pick = free[torch.randperm(free.numel(), generator=g)[: n_mask - count]]
        mask.view(-1)[pick] = True
    return mask.flatten()


def ibot_masks(
    g: torch.Generator,
    n_samples: int,
    grid: tuple[int, int],
    sample_p: float = 0.5,  # DINOv2 mask_sample_probability
    ratio_min_max: tuple[float, float] = (0.1, 0.5),  # DINOv2 mask_ratio_min_max
) -> torch.Tensor:
    """bool ``[n_samples, H*W]``: ``int(n_samples * sample_p)`` masked rows, shuffled."""
    n = grid[0] * grid[1]
    n_masked = int(n_samples * sample_p)
    edges = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    rows = []
    for i in range(n_masked):
        r = float(edges[i] + (edges[i + 1] - edges[i]) * torch.rand(1, generator=g))
        rows.append(block_mask(g, grid, int(n * r)))
    rows += [torch.zeros(n, dtype=torch.bool)] * (n_samples - n_masked)
    out = torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.bool)
    return out[torch.randperm(n_samples, generator=g)]
