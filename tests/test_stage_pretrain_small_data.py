"""The pretrain stage's small-data path: MAE / SplitMask on a labelled dataset's own train split."""

from __future__ import annotations

import pytest

from dinoflow.data.ingest import fashion_mnist_spec
from dinoflow.errors import SpecError
from dinoflow.models.export import load_backbone
from dinoflow.stages import get_stage

TINY_DECODER = {"dim": 32, "depth": 1, "heads": 2}


@pytest.fixture(scope="module")
def fmnist(store, fmnist_dir):
    ingest = get_stage("ingest")
    spec = ingest.parse_spec(
        fashion_mnist_spec("s3://small-data-fixture/fm", str(fmnist_dir), limit_per_split=256)
    )
    return ingest.run(spec, store)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("mae", {"mae": {"decoder": TINY_DECODER}}),
        (
            "splitmask",
            {"splitmask": {"target": "kmeans", "n_codes": 16, "tokenizer_iters": 3, "decoder": TINY_DECODER}},
        ),
    ],
)
def test_target_only_pretrain(store, bucket_uri, fmnist, method, extra):
    stage = get_stage("pretrain")
    spec = stage.parse_spec(
        {
            "output_uri": f"{bucket_uri}/{method}",
            "manifest_uri": fmnist.manifests["train"],
            "target_only": True,
            "method": method,
            "backbone": "vit_test_p4_28",
            "steps": 3,
            "batch_size": 16,
            **extra,
        }
    )
    assert spec.split == "train"  # target-only defaults to the dataset's own train split
    res = stage.run(spec, store)
    assert res.steps == 3 and res.n_images == 256
    bb = load_backbone(store, res.backbone_uri)
    assert bb.name == "vit_test_p4_28"


def test_target_only_refuses_an_unlabelled_pool(store, bucket_uri, tmp_path):
    import numpy as np
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((28, 28), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    ingest = get_stage("ingest")
    pool = ingest.run(
        ingest.parse_spec(
            {
                "output_uri": f"{bucket_uri}/pool",
                "kind": "folder",
                "splits": {"train": [str(tmp_path)]},
                "source": "pool",
            }
        ),
        store,
    )
    stage = get_stage("pretrain")
    spec = stage.parse_spec(
        {
            "output_uri": f"{bucket_uri}/p",
            "manifest_uri": pool.manifests["train"],
            "target_only": True,
            "method": "mae",
            "backbone": "vit_test_p4_28",
            "steps": 1,
            "batch_size": 4,
        }
    )
    with pytest.raises(SpecError, match="unlabelled rows"):
        stage.run(spec, store)
