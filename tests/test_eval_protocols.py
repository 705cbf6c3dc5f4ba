"""The evaluation protocols as plain functions over features and labels, and the curve reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dinoflow.errors import SpecError
from dinoflow.eval.curves import parse_curves
from dinoflow.eval.features import FeatureSet
from dinoflow.eval.protocols import ProtocolParams, confusion_matrix, pixel_features, run_protocols


def _blobs(n_per_class: int, seed: int) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 8) * 4
    labels = torch.arange(3).repeat_interleave(n_per_class)
    x = centres[labels] + torch.randn(len(labels), 8, generator=g)
    return FeatureSet(x[:, None, :], None, labels)


def test_protocols_separate_clean_blobs_and_report_every_metric():
    params = ProtocolParams(
        knn_k=(5, 20), linear_lrs=(0.1,), linear_epochs=5, logreg_cs=(1.0,), logreg_max_iter=50
    )
    res = run_protocols(_blobs(40, 0), _blobs(20, 1), 3, params)
    assert set(res.metrics) == {"knn_top1", "knn_top1_k5", "knn_top1_k20", "linear_top1", "logreg_top1"}
    assert res.metrics["knn_top1"] == res.metrics["knn_top1_k20"]  # the headline k
    assert all(v > 0.9 for v in res.metrics.values())
    cm = confusion_matrix(torch.arange(3).repeat_interleave(20), res.linear.test_predictions, 3)
    assert cm.shape == (3, 3) and cm.sum() == 60 and np.trace(cm) >= 54


def test_headline_knn_falls_back_to_the_smallest_k():
    params = ProtocolParams(
        knn_k=(3, 7), linear_lrs=(0.1,), linear_epochs=1, logreg_cs=(1.0,), logreg_max_iter=20
    )
    res = run_protocols(_blobs(10, 0), _blobs(5, 1), 3, params)
    assert res.metrics["knn_top1"] == res.metrics["knn_top1_k3"]


def test_pixel_features_resize_to_the_baseline_size():
    imgs = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    fs = pixel_features(imgs, torch.zeros(4, dtype=torch.long), 28)
    assert fs.cls.shape == (4, 28 * 28) and float(fs.cls.max()) <= 1.0
    assert pixel_features(imgs, torch.zeros(4, dtype=torch.long), 32).cls.shape == (4, 32 * 32)


def test_curves_read_the_trainers_json_lines_only():
    rows = [
        {"step": i + 1, "loss": 1.0 / (i + 1), "dino_loss": 0.5, "lr": 1e-3, "step_seconds": 0.1}
        for i in range(3)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    curves = parse_curves(data)
    assert set(curves) == {"loss", "dino_loss"}  # schedule and timing columns are not curves
    assert curves["loss"] == ([1.0, 2.0, 3.0], [1.0, 0.5, 1.0 / 3])
    with pytest.raises(SpecError, match="line 1"):
        parse_curves(b'{"step": [1, 2], "loss": [3, 4]')
    with pytest.raises(SpecError, match="JSON object per step"):
        parse_curves(b"[1, 2]\n")
