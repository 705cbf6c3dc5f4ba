"""Champion/challenger promotion over a real object-store registry."""

from __future__ import annotations

import pytest
import torch

from dinoflow.errors import SpecError
from dinoflow.models import create_backbone, export_backbone, load_backbone
from dinoflow.stages import get_stage
from dinoflow.stages.evaluate import EvaluateResult
from dinoflow.stages.promote import read_decisions


def _evaluation(
    store, prefix: str, knn: float, test_manifest: str = "s3://data/test/manifest.parquet"
) -> str:
    """A real exported backbone plus the _SUCCESS record an evaluate run leaves for it."""
    bb_uri = f"{prefix}/backbone"
    export_backbone(store, bb_uri, create_backbone("vit_test_p4_28"))
    ev_uri = f"{prefix}/eval"
    result = EvaluateResult(
        output_uri=ev_uri,
        backbone_uri=bb_uri,
        metrics={"knn_top1": knn, "linear_top1": knn + 0.01},
        linear_config="blocks1_cls_lr0.1",
        logreg_c=1.0,
        confusion_matrix=[[1, 0], [0, 1]],
        confusion_protocol="linear probe",
        class_names=["a", "b"],
        num_train=10,
        num_test=2,
        report_uri=f"{ev_uri}/report.html",
        model_card_uri=f"{ev_uri}/model_card.md",
        metrics_uri=f"{ev_uri}/metrics.json",
        feature_uris={},
        feature_cache_hit=False,
    )
    store.put_bytes(result.model_card_uri, b"# card\n")
    spec = {"test_manifest_uri": test_manifest, "backbone_uri": bb_uri}
    store.write_success(
        ev_uri, {"stage": "evaluate", "spec_hash": "x", "spec": spec, "result": result.model_dump()}
    )
    return ev_uri


def _promote(store, bucket_uri, ev_uri, i, **kw):
    spec = {
        "output_uri": f"{bucket_uri}/promote-{i}",
        "model_name": "fmnist-vit",
        "registry_uri": f"{bucket_uri}/registry",
        "evaluation_uri": ev_uri,
        "margin": 0.01,
        **kw,
    }
    stage = get_stage("promote")
    return stage.run(stage.parse_spec(spec), store)


def test_challenger_must_beat_champion_by_more_than_margin(store, bucket_uri):
    torch.manual_seed(0)
    first = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m1", 0.80), 1)
    assert first.promoted and first.champion_version == "v0001" and first.champion_metric is None
    # The registry holds its own copy of the weights, identical to the challenger's.
    a = load_backbone(store, f"{bucket_uri}/m1/backbone").model.state_dict()
    b = load_backbone(store, first.champion_uri).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    tie = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m2", 0.80), 2)
    loss = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m3", 0.75), 3)
    within = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m4", 0.805), 4)
    for r in (tie, loss, within):
        assert not r.promoted and r.champion_version == "v0001" and r.champion_uri == first.champion_uri
    win = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m5", 0.82), 5)
    assert win.promoted and win.champion_version == "v0002" and win.champion_metric == pytest.approx(0.80)
    champion = store.get_json(f"{bucket_uri}/registry/fmnist-vit/champion.json")
    assert champion["version"] == "v0002" and champion["value"] == pytest.approx(0.82)
    assert champion["source_backbone_uri"] == f"{bucket_uri}/m5/backbone"
    assert store.exists(f"{champion['backbone_uri']}/model_card.md")

    log = read_decisions(store, f"{bucket_uri}/registry", "fmnist-vit")
    assert [d["promoted"] for d in log] == [True, False, False, False, True]
    assert [d["challenger_value"] for d in log] == [0.80, 0.80, 0.75, 0.805, 0.82]
    assert [d["champion_value"] for d in log] == [None, 0.80, 0.80, 0.80, 0.80]
    # A different metric may decide: the champion's full metrics are kept in the pointer.
    other = _promote(store, bucket_uri, _evaluation(store, f"{bucket_uri}/m6", 0.70), 6, metric="linear_top1")
    assert not other.promoted and other.champion_metric == pytest.approx(0.83)


def test_promote_refuses_what_cannot_be_compared(store, bucket_uri):
    ev = _evaluation(store, f"{bucket_uri}/m1", 0.8)
    with pytest.raises(SpecError, match="metric 'top5' is not in the evaluation"):
        _promote(store, bucket_uri, ev, 1, metric="top5")
    with pytest.raises(SpecError, match="no finished evaluate run"):
        _promote(store, bucket_uri, f"{bucket_uri}/nothing", 2)
    _promote(store, bucket_uri, ev, 3)
    other = _evaluation(store, f"{bucket_uri}/m2", 0.9, test_manifest="s3://data/other/manifest.parquet")
    with pytest.raises(SpecError, match="not comparable"):
        _promote(store, bucket_uri, other, 4)
    assert _promote(store, bucket_uri, other, 5, require_same_test_set=False).promoted
