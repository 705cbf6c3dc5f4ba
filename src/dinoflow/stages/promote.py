"""promote: a challenger becomes champion only if it beats the champion by a margin.

Registry layout under ``registry_uri``::

    {model_name}/champion.json                  the pointer: version, backbone prefix, metric, metrics
    {model_name}/versions/v0001/backbone.*      an immutable copy of each promoted backbone
    {model_name}/versions/v0001/metrics.json    (+ model_card.md when the evaluation wrote one)
    {model_name}/decisions/<utc>-<id>.json      one object per decision (append-only log), both values

The backbone is copied before ``champion.json`` is rewritten, so a reader never sees a pointer to a
half-written version. Two promoters racing on one model name is not guarded against (run one
scheduled retrain per model).
"""

from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class PromoteSpec(StageSpec):
    model_name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$", description="registry entry name")
    registry_uri: str = Field(..., description="s3:// prefix of the model registry")
    evaluation_uri: str = Field(..., description="output prefix of the challenger's evaluate run")
    backbone_uri: str | None = Field(
        None, description="the challenger backbone; default (and must equal) the one the evaluation scored"
    )
    metric: str = Field("knn_top1", description="a key of the evaluation's metrics (higher is better)")
    margin: float = Field(0.0, ge=0, description="the challenger must beat the champion by MORE than this")
    require_same_test_set: bool = Field(
        True, description="refuse to compare scores measured on different test manifests"
    )


class PromoteResult(StageResult):
    promoted: bool
    champion_uri: str = Field(..., description="the champion's versioned backbone prefix after the decision")
    champion_version: str
    metric: str
    challenger_metric: float
    champion_metric: float | None = Field(
        ..., description="the previous champion's value (None: first model)"
    )
    decision_uri: str
    reason: str


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def read_decisions(store: Any, registry_uri: str, model_name: str) -> list[dict[str, Any]]:
    """Every decision recorded for a model, oldest first."""
    from dinoflow.storage.client import join_uri

    return [store.get_json(u) for u in store.list(join_uri(registry_uri, model_name, "decisions") + "/")]


def _evaluation(spec: PromoteSpec, store: Any) -> tuple[dict[str, Any], dict[str, float], str, str]:
    """The evaluate run's result, its metrics, the backbone it scored and its test manifest."""
    from dinoflow.errors import SpecError

    marker = store.read_success(spec.evaluation_uri)
    if marker is None or marker.get("stage") != "evaluate":
        raise SpecError(
            f"evaluation_uri {spec.evaluation_uri} holds no finished evaluate run (_SUCCESS missing)"
        )
    ev = marker["result"]
    metrics: dict[str, float] = ev["metrics"]
    if spec.metric not in metrics:
        raise SpecError(
            f"metric {spec.metric!r} is not in the evaluation; choose one of: {', '.join(sorted(metrics))}"
        )
    challenger_uri = ev["backbone_uri"]
    if spec.backbone_uri is not None and spec.backbone_uri.rstrip("/") != challenger_uri.rstrip("/"):
        raise SpecError(
            f"backbone_uri {spec.backbone_uri} is not the backbone the evaluation scored ({challenger_uri})"
        )
    return ev, metrics, challenger_uri, marker["spec"]["test_manifest_uri"]


def _champion_value(spec: PromoteSpec, champion: dict[str, Any] | None, test_manifest: str) -> float | None:
    """The champion's score on ``spec.metric`` (None without a champion), checked comparable."""
    from dinoflow.errors import SpecError

    if champion is None:
        return None
    old_metrics = champion.get("metrics", {})
    if spec.metric not in old_metrics:
        raise SpecError(
            f"the champion {champion['version']} has no {spec.metric!r} score; choose one of: "
            f"{', '.join(sorted(old_metrics))}"
        )
    if spec.require_same_test_set and champion.get("test_manifest_uri") != test_manifest:
        raise SpecError(
            f"the champion was scored on {champion.get('test_manifest_uri')} but the challenger on "
            f"{test_manifest}: scores are not comparable (re-evaluate one, or set require_same_test_set=false)"
        )
    return float(old_metrics[spec.metric])


def _verdict(spec: PromoteSpec, value: float, old_value: float | None) -> tuple[bool, str]:
    if old_value is None:
        return True, "no champion yet"
    if value > old_value + spec.margin:
        return True, f"{spec.metric} {value:.4f} > champion {old_value:.4f} + margin {spec.margin:g}"
    return False, f"{spec.metric} {value:.4f} <= champion {old_value:.4f} + margin {spec.margin:g}"


def _publish(
    spec: PromoteSpec,
    store: Any,
    root: str,
    ev: dict[str, Any],
    challenger_uri: str,
    champion: dict[str, Any],
) -> str:
    """Copy the challenger into a new registry version (its JSON last); returns the version's prefix."""
    from dinoflow.storage.client import join_uri

    n = len({u.split("/versions/")[1].split("/")[0] for u in store.list(join_uri(root, "versions") + "/")})
    champion["version"] = f"v{n + 1:04d}"
    dest = join_uri(root, "versions", champion["version"])
    for name in ("backbone.safetensors", "backbone_extra.safetensors", "backbone.json"):  # JSON last
        src = join_uri(challenger_uri, name)
        if name == "backbone.json" or store.exists(src):
            store.put_bytes(join_uri(dest, name), store.get_bytes(src))
    card = ev.get("model_card_uri")
    if card and store.exists(card):
        store.put_bytes(join_uri(dest, "model_card.md"), store.get_bytes(card), "text/markdown")
    store.put_json(
        join_uri(dest, "metrics.json"),
        {"metrics": champion["metrics"], "evaluation_uri": spec.evaluation_uri},
    )
    return dest


def run(spec: PromoteSpec, store: Any) -> PromoteResult:
    from dinoflow.storage.client import join_uri

    ev, metrics, challenger_uri, test_manifest = _evaluation(spec, store)
    value = float(metrics[spec.metric])
    root = join_uri(spec.registry_uri, spec.model_name)
    champion_json = join_uri(root, "champion.json")
    champion = store.get_json(champion_json) if store.exists(champion_json) else None
    old_value = _champion_value(spec, champion, test_manifest)
    promoted, reason = _verdict(spec, value, old_value)

    if promoted:
        new_champion = {
            "model_name": spec.model_name,
            "source_backbone_uri": challenger_uri,
            "evaluation_uri": spec.evaluation_uri,
            "test_manifest_uri": test_manifest,
            "metric": spec.metric,
            "value": value,
            "metrics": metrics,
        }
        dest = _publish(spec, store, root, ev, challenger_uri, new_champion)
        new_champion.update(backbone_uri=dest, promoted_at=_now())
        store.put_json(champion_json, new_champion)  # the pointer moves last
        champion_uri, champion_version = dest, new_champion["version"]
    else:
        champion_uri, champion_version = champion["backbone_uri"], champion["version"]

    decision = {
        "time": _now(),
        "model_name": spec.model_name,
        "metric": spec.metric,
        "margin": spec.margin,
        "challenger_backbone_uri": challenger_uri,
        "challenger_evaluation_uri": spec.evaluation_uri,
        "challenger_value": value,
        "champion_version": None if champion is None else champion["version"],
        "champion_value": old_value,
        "promoted": promoted,
        "new_champion_version": champion_version,
        "reason": reason,
    }
    decision_uri = join_uri(root, "decisions", f"{decision['time']}-{uuid.uuid4().hex[:8]}.json")
    store.put_json(decision_uri, decision)
    return PromoteResult(
        output_uri=spec.output_uri,
        promoted=promoted,
        champion_uri=champion_uri,
        champion_version=champion_version,
        metric=spec.metric,
        challenger_metric=value,
        champion_metric=old_value,
        decision_uri=decision_uri,
        reason=reason,
    )
