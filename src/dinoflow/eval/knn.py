"""Weighted k-NN on frozen features, the DINOv2 protocol.

Features are L2-normalised, similarity is cosine, each of the k nearest training samples votes for
its class with weight ``exp(sim / T)``; the class with the largest summed vote wins.
(DINOv2 / DINO: T = 0.07, k in {10, 20, 100, 200}.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinoflow.errors import SpecError

DINOV2_KS = (10, 20, 100, 200)  # DINOv2 k-NN protocol
DINOV2_TEMPERATURE = 0.07  # DINOv2 k-NN protocol
# Weighted k-NN (k = 20) on raw Fashion-MNIST pixels, 60k train -> 10k test, measured here: the bar a
# self-supervised feature must clear to have learned anything.
FASHION_MNIST_RAW_PIXEL_KNN_TOP1 = 0.843


@dataclass
class KnnResult:
    """Predictions and accuracy for each k; neighbour indices of the largest k (for retrieval views)."""

    ks: list[int]
    top1: dict[int, float]  # k -> top-1 accuracy in [0, 1] (nan when no labels were given)
    predictions: dict[int, torch.Tensor]  # k -> int64 [N_test]
    neighbours: torch.Tensor  # int64 [N_test, max k], most similar first
    similarities: torch.Tensor  # float32 [N_test, max k]


def _check(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, ks: list[int], t: float
) -> None:
    if train.ndim != 2 or test.ndim != 2:
        raise SpecError(
            f"k-NN wants 2-D features, got train {tuple(train.shape)} and test {tuple(test.shape)}"
        )
    if train.shape[1] != test.shape[1]:
        raise SpecError(f"k-NN: train features have {train.shape[1]} dims but test features {test.shape[1]}")
    if train_labels.shape != (train.shape[0],):
        raise SpecError(
            f"k-NN: {train.shape[0]} train features but labels of shape {tuple(train_labels.shape)}"
        )
    if not ks or min(ks) < 1:
        raise SpecError(f"k-NN: every k must be >= 1, got {ks}")
    if max(ks) > train.shape[0]:
        raise SpecError(f"k-NN: k={max(ks)} exceeds the {train.shape[0]} training samples; lower knn_k")
    if int(train_labels.min()) < 0:
        raise SpecError("k-NN: training labels must be known (>= 0); found -1 (unlabelled) rows")
    if t <= 0:
        raise SpecError(f"k-NN temperature must be > 0, got {t}")


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None = None,
    ks: list[int] | tuple[int, ...] = DINOV2_KS,
    temperature: float = DINOV2_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> KnnResult:
    """Classify ``test_features`` by weighted cosine k-NN against ``train_features``, for every k."""
    ks = sorted({int(k) for k in ks})
    train_labels = train_labels.long()
    _check(train_features, train_labels, test_features, ks, temperature)
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    train = F.normalize(train_features.float(), dim=1)
    kmax = ks[-1]
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    all_idx, all_sim = [], []
    for start in range(0, test_features.shape[0], chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        sim, idx = (q @ train.T).topk(kmax, dim=1)  # sorted, most similar first
        all_idx.append(idx)
        all_sim.append(sim)
        weights = (sim / temperature).exp()
        onehot = F.one_hot(train_labels[idx], c).float()  # [B, kmax, C]
        for k in ks:
            votes = (onehot[:, :k] * weights[:, :k, None]).sum(1)
            preds[k].append(votes.argmax(1))
    predictions = {k: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for k, v in preds.items()}
    top1: dict[int, float] = {}
    for k in ks:
        if test_labels is None or len(test_labels) == 0:
            top1[k] = float("nan")
        else:
            top1[k] = float((predictions[k] == test_labels.long()).float().mean())
    return KnnResult(
        ks=ks,
        top1=top1,
        predictions=predictions,
        neighbours=torch.cat(all_idx) if all_idx else torch.empty(0, kmax, dtype=torch.long),
        similarities=torch.cat(all_sim) if all_sim else torch.empty(0, kmax),
    )
