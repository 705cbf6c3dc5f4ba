"""promote: a challenger becomes champion only if it beats the champion by a margin.

Registry layout under ``registry_uri``::

    {model_name}/champion.json                  the pointer: version, backbone prefix, metric, metrics
    {model_name}/versions/v0001/backbone.*      an immutable copy of each promoted backbone
    {model_name}/versions/v0001/metrics.json    (+ model_card.md when the evaluation wrote one)
    {model_name}/decisions/<utc>-<id>.json      one object per decision (append-only log), both values

The backbone is copied before ``champion.json`` is rewritten, so a reader never sees a pointer to a
half-written version. A new version is numbered after the highest one present (folders and the
pointer), never by counting, and never written over an existing folder. A ``champion.json`` that is
not valid JSON, or lacks the fields a decision needs, stops the stage in one line with nothing
written. A score that is not a finite number is never compared: a NaN challenger is refused, a NaN
champion can be beaten. Two promoters racing on one model name is not guarded against (run one
scheduled retrain per model).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
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


_VERSION = re.compile(r"^v(\d+)$")
_POINTER_FIELDS = {"version": str, "backbone_uri": str, "metrics": dict}


def _finite(value: Any) -> float | None:
    """A score as a float, or None when it is not a finite number (NaN, inf, missing, text)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_champion(store: Any, uri: str) -> dict[str, Any] | None:
    """The registry pointer at ``uri`` (None when there is none), checked: a file that is not a
    JSON object with a version, a backbone and metrics is a one-line ``SpecError``."""
    from dinoflow.errors import SpecError

    if not store.exists(uri):
        return None
    raw = store.get_bytes(uri)
    fix = "restore it from the decisions log beside it, or delete it to start a new lineage"
    try:
        pointer = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        what = "empty" if not raw.strip() else f"not valid JSON ({str(e)[:80]})"
        raise SpecError(f"registry pointer {uri} is {what}: {fix}") from None
    if not isinstance(pointer, dict):
        raise SpecError(f"registry pointer {uri} is not a JSON object: {fix}")
    bad = [k for k, t in _POINTER_FIELDS.items() if not isinstance(pointer.get(k), t)]
    if bad or not _VERSION.match(pointer["version"]):
        raise SpecError(f"registry pointer {uri} lacks or mangles {bad or ['version']}: {fix}")
    return pointer


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
    if _finite(metrics[spec.metric]) is None:
        raise SpecError(
            f"the evaluation's {spec.metric} is {metrics[spec.metric]!r}, not a finite score: nothing to "
            "compare (re-run the evaluation)"
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
    return _finite(old_metrics[spec.metric])


def _verdict(
    spec: PromoteSpec, value: float, champion: dict[str, Any] | None, old_value: float | None
) -> tuple[bool, str]:
    if champion is None:
        return True, "no champion yet"
    if old_value is None:
        return (
            True,
            f"the champion's {spec.metric} ({champion['metrics'][spec.metric]!r}) is not a finite score",
        )
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
    previous: str | None,
) -> str:
    """Copy the challenger into a new registry version (its JSON last); returns the version's prefix.
    ``previous`` is the current champion's version (numbers continue after the highest one)."""
    from dinoflow.errors import SpecError
    from dinoflow.storage.client import join_uri

    folders = {u.split("/versions/")[1].split("/")[0] for u in store.list(join_uri(root, "versions") + "/")}
    numbers = [int(m.group(1)) for f in folders | {previous} if (m := _VERSION.match(f or ""))]
    champion["version"] = f"v{max(numbers, default=0) + 1:04d}"
    dest = join_uri(root, "versions", champion["version"])
    if store.list(dest + "/"):  # a concurrent promoter got there first
        raise SpecError(f"registry version {dest} already exists: nothing overwritten, promote again")
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
    champion = read_champion(store, champion_json)
    old_value = _champion_value(spec, champion, test_manifest)
    promoted, reason = _verdict(spec, value, champion, old_value)

    if promoted or champion is None:  # (no champion: always promoted)
        new_champion: dict[str, Any] = {
            "model_name": spec.model_name,
            "source_backbone_uri": challenger_uri,
            "evaluation_uri": spec.evaluation_uri,
            "test_manifest_uri": test_manifest,
            "metric": spec.metric,
            "value": value,
            "metrics": {k: _finite(v) for k, v in metrics.items()},  # JSON has no NaN
        }
        previous = None if champion is None else champion["version"]
        dest = _publish(spec, store, root, ev, challenger_uri, new_champion, previous)
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
