"""evaluate: frozen-feature k-NN and linear probes (the DINOv2 protocols), report and model card."""

from __future__ import annotations

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class EvaluateSpec(StageSpec):
    backbone_uri: str
    train_manifest_uri: str
    test_manifest_uri: str
    knn_k: list[int] = Field(default_factory=lambda: [10, 20, 100, 200], description="DINOv2 k-NN protocol")
    knn_temperature: float = Field(0.07, gt=0, description="DINOv2 k-NN protocol")


class EvaluateResult(StageResult):
    metrics: dict[str, float]
    report_uri: str
    model_card_uri: str


def run(spec: EvaluateSpec, store):  # noqa: ANN001, ANN201
    raise NotImplementedError("evaluate stage: see issue 5")
