"""iBOT block-wise masks (BEiT-style blocks) and the DINOv2 masking policy for a batch of crops.

Half of the global-crop samples are masked (DINOv2 ``mask_sample_probability`` 0.5); their mask
ratios are spread over [0.1, 0.5] (``mask_ratio_min_max``) in equal bins, one draw per bin; each mask
is grown from rectangular blocks (min 4 patches, aspect ratio 0.3-3.3) and topped up with random
patches so it holds exactly ``int(ratio * N)`` patches. All draws come from the shared generator.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def block_mask(
    rng: random.Random, grid: tuple[int, int], n_mask: int, min_block: int = 4, max_attempts: int = 10
) -> np.ndarray:
    """bool ``[H*W]`` with exactly ``n_mask`` patches set. Plain Python/numpy (no per-draw tensor
    calls): masks are drawn on the step's critical path, before the forward is launched."""
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    while count < n_mask:
        left = n_mask - count
        added = 0
        for _ in range(max_attempts):
            lo = min(min_block, left)
            area = rng.uniform(lo, left)
            ar = math.exp(rng.uniform(log_lo, log_hi))
            bh = int(round(math.sqrt(area * ar)))
            bw = int(round(math.sqrt(area / ar)))
            if 1 <= bh <= h and 1 <= bw <= w:
                top = rng.randint(0, h - bh)
                lft = rng.randint(0, w - bw)
                region = mask[top : top + bh, lft : lft + bw]
                new = region.size - int(region.sum())
                if 0 < new <= left:
                    region[...] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    if count < n_mask:  # top up with random single patches: exact count
        free = np.flatnonzero(~flat).tolist()
        flat[rng.sample(free, n_mask - count)] = True
    return flat


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
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))  # shared seed: same on all ranks
    edges = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    ratios = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(n_masked, generator=g)  # one per bin
    out = np.zeros((n_samples, n), dtype=bool)
    for i, r in enumerate(ratios.tolist()):
        out[i] = block_mask(rng, grid, int(n * r))
    return torch.from_numpy(out)[torch.randperm(n_samples, generator=g)]
