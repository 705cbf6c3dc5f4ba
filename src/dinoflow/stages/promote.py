"""promote: a challenger becomes champion only if it beats the champion by a margin."""

from __future__ import annotations

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class PromoteSpec(StageSpec):
    model_name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$")
    registry_uri: str = Field(..., description="s3:// prefix of the model registry")
    backbone_uri: str
    evaluation_uri: str
    metric: str = "knn_top1"
    margin: float = Field(0.0, ge=0)


class PromoteResult(StageResult):
    promoted: bool
    champion_uri: str
    challenger_metric: float
    champion_metric: float | None


def run(spec: PromoteSpec, store):  # noqa: ANN001, ANN201
    raise NotImplementedError("promote stage: see issue 5")
