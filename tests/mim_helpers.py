"""Helpers for the method tests: real Fashion-MNIST images and a few optimizer steps through the
Method interface (prepare -> forward -> backward -> after_backward -> step -> after_step)."""

from __future__ import annotations

import numpy as np
import torch

from dinoflow.data.idx import load_fashion_mnist
from dinoflow.methods.base import BatchView, Method, StepState, merge_groups

_CACHE: dict[int, torch.Tensor] = {}


def fmnist_images(n: int = 512) -> torch.Tensor:
    """uint8 [n, 1, 28, 28] real Fashion-MNIST train images."""
    if n not in _CACHE:
        x, _ = load_fashion_mnist("train")
        _CACHE[n] = torch.from_numpy(np.array(x[:n])).unsqueeze(1)
    return _CACHE[n]


def train_steps(
    method: Method, images: torch.Tensor, steps: int = 12, batch: int = 32, lr: float = 1e-3
) -> list[float]:
    opt = torch.optim.AdamW(merge_groups(method.param_groups()), lr=lr, weight_decay=0.05)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        idx = torch.randint(images.shape[0], (batch,), generator=g)
        state = StepState(step, steps, steps_per_epoch=max(1, steps // 4))
        b = method.prepare(images[idx], BatchView(g, 0, batch))
        loss, logs = method(b, state)
        assert torch.isfinite(loss) and all(bool(torch.isfinite(v)) for v in logs.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(state)
        opt.step()
        method.after_step(state)
        losses.append(loss.item())
    return losses


def decreased(losses: list[float], factor: float = 0.9) -> bool:
    return float(np.mean(losses[-3:])) < factor * float(np.mean(losses[:3]))
