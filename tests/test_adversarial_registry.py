"""Probes of the model registry that promote keeps: a damaged pointer, scores that are not numbers,
and version folders with gaps."""

from __future__ import annotations

import math

import pytest
from test_stage_promote import _evaluation, _promote

from dinoflow.errors import SpecError


def _registry(bucket_uri):
    return f"{bucket_uri}/registry/fmnist-vit"


@pytest.mark.parametrize(
    "content, says",
    [
        (b"{not json", "not valid JSON"),
        (b"", "is empty"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"version": "v0001"}', "lacks or mangles ['backbone_uri', 'metrics']"),
        (b'{"version": "latest", "backbone_uri": "s3://x/y", "metrics": {}}', "['version']"),
    ],
)
def test_a_damaged_champion_pointer_is_one_line_and_nothing_is_written(store, bucket_uri, content, says):
    pointer = f"{_registry(bucket_uri)}/champion.json"
    store.put_bytes(pointer, content)
    ev = _evaluation(store, f"{bucket_uri}/m1", 0.8)
    with pytest.raises(SpecError) as e:
        _promote(store, bucket_uri, ev, 1)
    assert says in str(e.value) and "\n" not in str(e.value) and "champion.json" in str(e.value)
    assert store.list(f"{_registry(bucket_uri)}/") == [pointer]  # no version, no decision
    assert store.get_bytes(pointer) == content


def test_scores_that_are_not_numbers(store, bucket_uri):
    # a NaN challenger is refused (not a score), nothing written
    with pytest.raises(SpecError, match="not a finite score"):
        _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m0", float("nan")), 0)
    assert store.list(f"{_registry(bucket_uri)}/") == []
    first = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m1", 0.8), 1)
    assert first.promoted
    # a champion whose score became NaN (the probe: it could never be beaten) is beaten
    pointer = f"{_registry(bucket_uri)}/champion.json"
    champ = store.get_json(pointer)
    champ["metrics"]["knn_top1"] = float("nan")
    store.put_json(pointer, champ)  # json writes NaN, as the earlier registry did
    nxt = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m2", 0.5), 2)
    assert nxt.promoted and nxt.champion_metric is None and "not a finite score" in nxt.reason
    # and the new pointer holds only JSON numbers (or null)
    assert all(v is None or math.isfinite(v) for v in store.get_json(pointer)["metrics"].values())
    assert b"NaN" not in store.get_bytes(pointer)


def test_version_numbers_continue_after_the_highest_never_over_one(store, bucket_uri):
    first = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m1", 0.8), 1)
    assert first.champion_version == "v0001"
    # a gap: v0003 exists (e.g. v0002 was deleted by hand); counting folders would give v0003 again
    gap = f"{_registry(bucket_uri)}/versions/v0003/metrics.json"
    store.put_json(gap, {"metrics": {"knn_top1": 0.7}, "keep": "me"})
    win = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m2", 0.9), 2)
    assert win.promoted and win.champion_version == "v0004"
    assert store.get_json(gap) == {"metrics": {"knn_top1": 0.7}, "keep": "me"}
    assert store.get_json(f"{_registry(bucket_uri)}/champion.json")["version"] == "v0004"
