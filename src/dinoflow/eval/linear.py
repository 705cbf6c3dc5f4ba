"""Linear probes on frozen features (the DINOv2 protocol) and logistic regression.

The grid is learning rate x {CLS, CLS + mean-pooled patch tokens} x {last block, last 4 blocks}
(the DINOv2 linear evaluation). Every configuration is fitted on the train split minus a held-out part,
scored on that held-out part, and the best one is refitted on the whole train split. The selection
functions take no test data at all, so test labels cannot leak into the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinoflow.errors import SpecError
from dinoflow.eval.features import FeatureSet

# A coarse slice of DINOv2's grid (1e-5 ... 0.1), shifted up one decade: we train far fewer steps.
DEFAULT_LRS = (1e-3, 1e-2, 1e-1, 1.0)
# DINOv2 sweeps C over logspace(-6, 5); a short slice around the useful range keeps CPU runs short.
DEFAULT_CS = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class ProbeConfig:
    n_last_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        return f"blocks{self.n_last_blocks}_{'cls+avgpool' if self.avgpool else 'cls'}_lr{self.lr:g}"


@dataclass
class LinearSelection:
    best: ProbeConfig
    val_top1: dict[str, float]  # config name -> accuracy on the held-out part of train
    classifier: torch.nn.Linear  # the best config refitted on the whole train split
    num_classes: int
    heldout_indices: torch.Tensor  # rows of the train split used for selection
    curves: dict[str, list[float]] = field(default_factory=dict)  # config name -> mean loss per epoch

    def predict(self, features: FeatureSet) -> torch.Tensor:
        x = features.linear_input(self.best.n_last_blocks, self.best.avgpool)
        with torch.no_grad():
            return self.classifier(x).argmax(1)


def heldout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a seeded random partition of range(n)."""
    if not 0 < fraction < 1:
        raise SpecError(f"heldout_fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 1:
        raise SpecError(f"train split too small ({n} rows) to hold out {fraction:.0%} for model selection")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    lrs: list[float],
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[list[torch.nn.Linear], list[list[float]]]:
    """Train one linear head per learning rate, together, on the same mini-batches (as DINOv2 does).

    SGD with momentum 0.9, no weight decay, cosine schedule, weights ~ N(0, 0.01) (DINOv2 linear eval).
    """
    g = torch.Generator().manual_seed(seed)
    heads = []
    for _ in lrs:
        head = torch.nn.Linear(x.shape[1], num_classes)
        with torch.no_grad():
            head.weight.normal_(0, 0.01, generator=g)
            head.bias.zero_()
        heads.append(head)
    opt = torch.optim.SGD(
        [{"params": h.parameters(), "lr": lr, "base_lr": lr} for h, lr in zip(heads, lrs, strict=True)],
        momentum=0.9,
        weight_decay=0.0,
    )
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    curves: list[list[float]] = [[] for _ in lrs]
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        sums = [0.0] * len(lrs)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
            losses = [F.cross_entropy(h(xb), yb) for h in heads]
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()  # heads are independent: the sum's gradients are each head's
            opt.step()
            for i, loss in enumerate(losses):
                sums[i] += loss.item() / steps_per_epoch
            step += 1
        for i in range(len(lrs)):
            curves[i].append(sums[i] if math.isfinite(sums[i]) else float("nan"))
    return heads, curves


def _accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = head(x)
    if not torch.isfinite(logits).all():
        return 0.0  # a diverged head (too high an LR) is never selected
    return float((logits.argmax(1) == y).float().mean())


def probe_grid(features: FeatureSet, lrs: list[float] | tuple[float, ...]) -> list[ProbeConfig]:
    """Every configuration the features allow (last 4 blocks only when 4 were extracted)."""
    blocks = sorted({1, min(4, features.n_blocks)})
    pools = [False, True] if features.patch_mean is not None else [False]
    return [ProbeConfig(b, p, float(lr)) for b in blocks for p in pools for lr in lrs]


def select_linear_probe(
    train: FeatureSet,
    train_labels: torch.Tensor,
    lrs: list[float] | tuple[float, ...] = DEFAULT_LRS,
    epochs: int = 10,
    batch_size: int = 256,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearSelection:
    """Choose the best probe on a held-out part of TRAIN, then refit it on all of TRAIN."""
    y = train_labels.long()
    if y.shape[0] != len(train):
        raise SpecError(f"linear probe: {len(train)} train features but {y.shape[0]} labels")
    if int(y.min()) < 0:
        raise SpecError("linear probe: training labels must be known (>= 0); found -1 (unlabelled) rows")
    if not lrs or min(lrs) <= 0:
        raise SpecError(f"linear probe: learning rates must be > 0, got {list(lrs)}")
    c = int(num_classes if num_classes is not None else int(y.max()) + 1)
    fit, val = heldout_split(len(train), heldout_fraction, seed)
    configs = probe_grid(train, lrs)
    val_top1: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for b, p in sorted({(c_.n_last_blocks, c_.avgpool) for c_ in configs}):
        x = train.linear_input(b, p)
        group = [c_ for c_ in configs if (c_.n_last_blocks, c_.avgpool) == (b, p)]
        heads, hc = _train_heads(x[fit], y[fit], [c_.lr for c_ in group], c, epochs, batch_size, seed)
        for cfg, head, curve in zip(group, heads, hc, strict=True):
            val_top1[cfg.name] = _accuracy(head, x[val], y[val])
            curves[cfg.name] = curve
    best = max(configs, key=lambda c_: val_top1[c_.name])  # first of equals wins: deterministic
    x = train.linear_input(best.n_last_blocks, best.avgpool)
    (head,), _ = _train_heads(x, y, [best.lr], c, epochs, batch_size, seed)
    return LinearSelection(best, val_top1, head, c, val, curves)


@dataclass
class LogRegSelection:
    best_c: float
    val_top1: dict[str, float]  # "C=<c>" -> held-out accuracy
    model: object  # the sklearn pipeline refitted on all of train

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.model.predict(x.float().numpy()))).long()


def select_logistic_regression(
    train_x: torch.Tensor,
    train_labels: torch.Tensor,
    cs: list[float] | tuple[float, ...] = DEFAULT_CS,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 200,
) -> LogRegSelection:
    """L2 logistic regression (L-BFGS) on standardised features; C chosen on held-out TRAIN."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not cs or min(cs) <= 0:
        raise SpecError(f"logistic regression: every C must be > 0, got {list(cs)}")
    x = train_x.float().numpy()
    y = train_labels.long().numpy()
    fit, val = heldout_split(len(y), heldout_fraction, seed)
    fit, val = fit.numpy(), val.numpy()

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))

    val_top1: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped iteration count is a budget choice
        for c in cs:
            m = model(c).fit(x[fit], y[fit])
            val_top1[f"C={c:g}"] = float((m.predict(x[val]) == y[val]).mean())
        best_c = max(cs, key=lambda c: val_top1[f"C={c:g}"])
        final = model(best_c).fit(x, y)
    return LogRegSelection(float(best_c), val_top1, final)


@dataclass
class LinearReport:
    selection: LinearSelection
    test_top1: float
    test_predictions: torch.Tensor


def linear_protocol(train: FeatureSet, test: FeatureSet, **search: Any) -> LinearReport:
    """Select on held-out TRAIN (``search``: the keyword arguments of ``select_linear_probe``), then
    score the chosen probe once on TEST."""
    sel = select_linear_probe(train, train.labels, **search)
    pred = sel.predict(test)
    return LinearReport(sel, float((pred == test.labels).float().mean()), pred)
