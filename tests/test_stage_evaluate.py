"""The evaluate stage end to end on real Fashion-MNIST (small subsets) and a real embedded S3 store."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from dinoflow.data.ingest import fashion_mnist_spec
from dinoflow.errors import DinoflowError, SpecError
from dinoflow.models import create_backbone, export_backbone
from dinoflow.stages import get_stage

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def fmnist(store):
    """A small labelled Fashion-MNIST ingest (train 600, test 200), shared by this module's tests."""
    import uuid

    uri = f"s3://dinoflow-eval-tests/{uuid.uuid4().hex[:10]}/ingest"
    res = get_stage("ingest").run(fashion_mnist_spec(uri, limit_per_split=600), store)
    return res.manifests


@pytest.fixture(scope="module")
def backbone_uri(store):
    import uuid

    torch.manual_seed(0)
    uri = f"s3://dinoflow-eval-tests/{uuid.uuid4().hex[:10]}/backbone"
    export_backbone(store, uri, create_backbone("vit_test_p4_28"))
    return uri


class _Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.tables: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "table":
            self.tables.append(a.get("id"))
        assert not (
            tag in ("img", "script", "link") and (a.get("src") or a.get("href") or "").startswith("http")
        )


def _spec(out, fmnist, backbone_uri, **kw):
    return {
        "output_uri": out,
        "backbone_uri": backbone_uri,
        "train_manifest_uri": fmnist["train"],
        "test_manifest_uri": fmnist["test"],
        "max_test_images": 200,
        "linear_lrs": [0.1, 1.0],
        "linear_epochs": 3,
        "logreg_cs": [0.1],
        "logreg_max_iter": 50,
        "report_examples": 4,
        **kw,
    }


def test_evaluate_writes_metrics_report_card_and_caches_features(store, bucket_uri, fmnist, backbone_uri):
    stage = get_stage("evaluate")
    # Training curves in the trainer's JSON Lines format.
    rows = [{"step": i + 1, "loss": 5.0 / (i + 1), "dino_loss": 4.0 / (i + 1), "lr": 1e-3} for i in range(20)]
    store.put_bytes(bucket_uri + "/curves.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = _spec(bucket_uri + "/a", fmnist, backbone_uri, curves_uri=bucket_uri + "/curves.jsonl")
    res = stage.run(stage.parse_spec(spec), store)
    assert res.num_train == 600 and res.num_test == 200
    assert {"knn_top1", "knn_top1_k10", "knn_top1_k200", "linear_top1", "logreg_top1"} <= set(res.metrics)
    assert all(0 <= v <= 1 for v in res.metrics.values())
    # The raw-pixel baseline by the same code: well above chance on 600 FMNIST images.
    assert res.baseline_metrics["knn_top1"] > 0.6 and res.baseline_metrics["linear_top1"] > 0.6
    assert res.class_names[0] == "T-shirt/top" and len(res.class_names) == 10  # from the ingest run
    cm = torch.tensor(res.confusion_matrix)
    assert cm.shape == (10, 10) and int(cm.sum()) == 200
    assert res.linear_config in res.linear_val_top1 and not res.feature_cache_hit

    # The report: every section, images embedded as decodable PNG, nothing fetched from outside.
    html = store.get_bytes(res.report_uri).decode()
    p = _Sections()
    p.feed(html)
    assert p.sections == ["metrics", "curves", "confusion", "retrieval", "pca"]
    assert {"metrics-table", "confusion-table"} <= set(p.tables)
    assert len(p.images) == 3  # curves, retrieval, PCA
    assert "No training curves" not in html
    for src in p.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "T-shirt/top" in html
    card = store.get_bytes(res.model_card_uri).decode()
    for heading in ("## Model", "## Method and budget", "## Evaluation data", "## Metrics", "## Limits"):
        assert heading in card
    assert f"{100 * res.metrics['linear_top1']:.1f}" in card

    # A second evaluation sharing the feature cache extracts nothing and scores the same k-NN.
    res2 = stage.run(
        stage.parse_spec(
            _spec(bucket_uri + "/b", fmnist, backbone_uri, feature_cache_uri=bucket_uri + "/a/features")
        ),
        store,
    )
    assert res2.feature_cache_hit and res2.feature_uris == res.feature_uris
    assert res2.metrics["knn_top1_k20"] == res.metrics["knn_top1_k20"]
    # ... nor the raw-pixel baseline: one JSON entry beside the features, read back, not rewritten
    (entry,) = [u for u in store.list(bucket_uri + "/a/features") if "pixel-baseline-" in u]
    assert res2.baseline_metrics == res.baseline_metrics and res.baseline_metrics["knn_top1"] > 0.5
    etag = store.stat(entry)["etag"]
    stage.run(
        stage.parse_spec(
            _spec(bucket_uri + "/c", fmnist, backbone_uri, feature_cache_uri=bucket_uri + "/a/features")
        ),
        store,
    )
    assert store.stat(entry)["etag"] == etag
    # a damaged entry is refused with its name (JSON only: nothing read from the cache runs code)
    store.put_bytes(entry, b"not json")
    with pytest.raises(DinoflowError, match="not a pixel-baseline cache entry"):
        stage.run(
            stage.parse_spec(
                _spec(bucket_uri + "/d", fmnist, backbone_uri, feature_cache_uri=bucket_uri + "/a/features")
            ),
            store,
        )


def test_evaluate_refuses_bad_inputs_early(store, bucket_uri, fmnist, backbone_uri):
    stage = get_stage("evaluate")
    with pytest.raises(SpecError, match="knn_k"):
        stage.parse_spec(_spec(bucket_uri, fmnist, backbone_uri, knn_k=[0, 10]))
    with pytest.raises(SpecError, match="exceeds the 100 train images"):
        stage.run(stage.parse_spec(_spec(bucket_uri, fmnist, backbone_uri, max_train_images=100)), store)
