"""The frozen-feature evaluation protocols (DINOv2): k-NN, linear probe, logistic regression.

Plain functions over ``FeatureSet``s (features and labels): the evaluate stage runs them on a
backbone's features and on raw pixels, and benches call them directly. Model selection uses a
held-out part of TRAIN only; TEST is scored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dinoflow.eval.features import FeatureSet
from dinoflow.eval.knn import KnnResult, knn_classify
from dinoflow.eval.linear import (
    DEFAULT_CS,
    DEFAULT_LRS,
    LinearReport,
    LogRegSelection,
    linear_protocol,
    select_logistic_regression,
)

HEADLINE_K = 20  # DINO's headline k-NN accuracy is k=20


@dataclass(frozen=True)
class ProtocolParams:
    """The knobs of the three protocols (defaults: the evaluate stage's)."""

    knn_k: tuple[int, ...] = (10, 20, 100, 200)
    knn_temperature: float = 0.07  # DINOv2 k-NN protocol
    linear_lrs: tuple[float, ...] = DEFAULT_LRS
    linear_epochs: int = 10
    linear_batch_size: int = 256
    logreg_cs: tuple[float, ...] = DEFAULT_CS
    logreg_max_iter: int = 200
    heldout_fraction: float = 0.1
    seed: int = 0


@dataclass
class ProtocolResults:
    """Top-1 per protocol (``metrics``) and what each protocol chose and predicted."""

    metrics: dict[str, float]  # knn_top1 (k=20), knn_top1_k{k}, linear_top1, logreg_top1; in [0, 1]
    knn: KnnResult
    linear: LinearReport
    logreg: LogRegSelection
    logreg_predictions: torch.Tensor = field(repr=False)


def knn_metrics(knn: KnnResult) -> dict[str, float]:
    """``knn_top1_k{k}`` for every k, and ``knn_top1`` at the headline k (else the smallest k)."""
    out = {f"knn_top1_k{k}": v for k, v in knn.top1.items()}
    out["knn_top1"] = knn.top1[HEADLINE_K if HEADLINE_K in knn.top1 else knn.ks[0]]
    return out


def linear_from_params(
    train: FeatureSet, test: FeatureSet, num_classes: int, params: ProtocolParams = ProtocolParams()
) -> LinearReport:
    """The linear probe alone, with ``params``' search (selected on held-out TRAIN, TEST scored once)."""
    p = params
    return linear_protocol(
        train,
        test,
        lrs=list(p.linear_lrs),
        epochs=p.linear_epochs,
        batch_size=p.linear_batch_size,
        heldout_fraction=p.heldout_fraction,
        seed=p.seed,
        num_classes=num_classes,
    )


def run_protocols(
    train: FeatureSet, test: FeatureSet, num_classes: int, params: ProtocolParams = ProtocolParams()
) -> ProtocolResults:
    """k-NN on CLS features, a linear probe and an L2 logistic regression, all selected on held-out
    TRAIN and scored once on TEST."""
    p = params
    knn = knn_classify(
        train.cls, train.labels, test.cls, test.labels, list(p.knn_k), p.knn_temperature, num_classes
    )
    lin = linear_from_params(train, test, num_classes, p)
    lr = select_logistic_regression(
        train.linear_input(1, train.patch_mean is not None),
        train.labels,
        list(p.logreg_cs),
        p.heldout_fraction,
        p.seed,
        p.logreg_max_iter,
    )
    lr_pred = lr.predict(test.linear_input(1, test.patch_mean is not None))
    metrics = knn_metrics(knn)
    metrics["linear_top1"] = lin.test_top1
    metrics["logreg_top1"] = float((lr_pred == test.labels).float().mean())
    return ProtocolResults(metrics, knn, lin, lr, lr_pred)


def pixel_features(images: torch.Tensor, labels: torch.Tensor, size_px: int) -> FeatureSet:
    """The raw-pixel baseline's features: uint8 images resized (antialiased) to ``size_px``."""
    x = images
    if x.shape[-1] != size_px or x.shape[-2] != size_px:
        x = F.interpolate(x.float(), size=(size_px, size_px), mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255)
    return FeatureSet.from_pixels(x, labels)


def confusion_matrix(true: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """int64 [C, C]: rows = true class, columns = predicted."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(true), np.asarray(predicted)), 1)
    return cm
