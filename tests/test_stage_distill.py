"""Distillation on the shared trainer: real Fashion-MNIST images, real object store, tiny models."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from dinoflow.data.idx import load_fashion_mnist
from dinoflow.data.ingest import fashion_mnist_spec
from dinoflow.errors import SpecError
from dinoflow.eval.knn import knn_classify
from dinoflow.losses import DINOHead
from dinoflow.methods.config import CropsConfig
from dinoflow.methods.distill import check_pair
from dinoflow.methods.distill_config import DistillConfig
from dinoflow.models import create_backbone, export_backbone, load_backbone
from dinoflow.stages import get_stage

torch.set_num_threads(2)
CROPS = {
    "global_crop_px": 28,
    "global_scale_min": 0.35,
    "local_crops_number": 2,
    "local_crop_px": 16,
    "local_scale_min": 0.1,
    "local_scale_max": 0.35,
}  # the Fashion-MNIST CPU preset's crops, fewer locals


@pytest.fixture(scope="module")
def data(store):
    uri = f"s3://dinoflow-eval-tests/{uuid.uuid4().hex[:10]}/ingest"
    manifests = get_stage("ingest").run(fashion_mnist_spec(uri, limit_per_split=1000), store).manifests
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    sub = (
        torch.from_numpy(xtr[:1000].copy())[:, None],
        torch.from_numpy(ytr[:1000].copy()),
        torch.from_numpy(xte[:300].copy())[:, None],
        torch.from_numpy(yte[:300].copy()),
    )
    return manifests, sub


@pytest.fixture(scope="module")
def teacher_uri(store):
    """A frozen teacher with DINO heads in the pretrain stage's export format.

    LayerScale starts at 1 (not DINOv2's 1e-5) so this untrained ViT already has image-dependent
    features (random-feature k-NN on FMNIST is far above chance); pretraining one is the
    benchmark's job, too slow for the default test run.
    """
    torch.manual_seed(0)
    uri = f"s3://dinoflow-eval-tests/{uuid.uuid4().hex[:10]}/pretrain/backbone"
    bb = create_backbone("vit_mini_p4_28", init_values=1.0)
    export_backbone(store, uri, bb)
    from safetensors.torch import save

    head = DINOHead(bb.embed_dim, 256, 64, 32, 3)
    store.put_bytes(
        f"{uri}/heads.safetensors", save({f"dino_head.{k}": v for k, v in head.state_dict().items()})
    )
    return uri


def _features(bb, x) -> torch.Tensor:
    with torch.no_grad():
        return bb.encode(bb.normalize(x))["cls"]


def _knn(bb, sub) -> float:
    xtr, ytr, xte, yte = sub
    return knn_classify(_features(bb, xtr), ytr, _features(bb, xte), yte, ks=[20]).top1[20]


def test_distillation_moves_students_toward_the_teacher(store, bucket_uri, data, teacher_uri):
    manifests, sub = data
    students = ["vit_test_p4_28", "vit_test_p4_28_reg2"]  # two students from one teacher in one run
    torch.manual_seed(0)
    fresh = {s: create_backbone(s) for s in students}
    before = {s: _knn(fresh[s], sub) for s in students}
    teacher = load_backbone(store, teacher_uri)
    teacher_knn = _knn(teacher, sub)
    spec = {
        "output_uri": bucket_uri,
        "manifest_uri": manifests["train"],
        "teacher_uri": teacher_uri,
        "students": students,
        "steps": 30,
        "batch_size": 32,
        "crops": CROPS,
        "distill": {"ema_momentum_start": 0.8},  # a short run: the EMA must follow the student
        "optim": {"lr_per_1024": 0.01, "warmup_steps": 3},
    }
    stage = get_stage("distill")
    res = stage.run(stage.parse_spec(spec), store)
    assert set(res.backbone_uris) == set(students) and res.steps == 30
    curves = [line for line in store.get_bytes(res.curves_uri).decode().splitlines() if line]
    assert len(curves) == 30 and '"vit_test_p4_28/ibot_loss"' in curves[0]
    for s in students:
        assert load_backbone(store, res.backbone_uris[s]).embed_dim == 32
        meta = store.get_json(f"{res.backbone_uris[s]}/backbone.json")
        assert meta["dinoflow_backbone"] == s and meta["method"] == "distill"
        # Each student's outputs move toward the teacher's targets: its DINO loss falls.
        losses = [json.loads(line)[f"{s}/dino_loss"] for line in curves]
        assert sum(losses[-5:]) < sum(losses[:5]) - 0.5, (s, losses)
    # k-NN rises: LayerScale 1e-5 makes a fresh student's CLS nearly image-independent.
    first = load_backbone(store, res.backbone_uris[students[0]])
    assert _knn(first, sub) > before[students[0]] + 0.15, (before, teacher_knn)


def _meta(**kw):
    base = {"in_chans": 1, "embed_dim": 128, "patch_size": 4, "family": "vit", "grid": (7, 7)}
    return {**base, **kw}


def test_impossible_pairs_are_refused_with_the_reason():
    from dinoflow.methods.distill import HeadShape

    heads = {"dino_head": HeadShape(128, 256, 64, 32, 3)}
    cfg, crops = DistillConfig(), CropsConfig(**CROPS)
    check_pair(_meta(), heads, _meta(embed_dim=32, name="s"), cfg, crops)  # narrower student: fine
    with pytest.raises(SpecError, match="patch grid"):
        check_pair(_meta(), heads, _meta(patch_size=8, family="xcit", grid=(4, 4), name="s"), cfg, crops)
    check_pair(
        _meta(),
        heads,
        _meta(patch_size=8, family="xcit", grid=(4, 4)),
        DistillConfig(ibot_loss_weight=0),
        crops,
    )
    with pytest.raises(SpecError, match="3-channel images"):
        check_pair(_meta(), heads, _meta(in_chans=3, name="s"), cfg, crops)
    with pytest.raises(SpecError, match="no stochastic depth"):
        check_pair(_meta(), heads, _meta(name="s"), cfg, crops, drop_path_rate=0.1)
    with pytest.raises(SpecError, match="has no DINO head"):
        check_pair(_meta(), {}, _meta(name="s"), cfg, crops)
    with pytest.raises(SpecError, match="not a multiple"):
        check_pair(_meta(), heads, _meta(patch_size=3, name="s"), cfg, crops)


def test_stage_refuses_a_teacher_without_heads(store, bucket_uri, data):
    export_backbone(store, f"{bucket_uri}/mae/backbone", create_backbone("vit_test_p4_28"))
    spec = {
        "output_uri": f"{bucket_uri}/d",
        "manifest_uri": data[0]["train"],
        "teacher_uri": f"{bucket_uri}/mae/backbone",
        "students": ["vit_test_p4_28"],
    }
    stage = get_stage("distill")
    with pytest.raises(SpecError, match="no teacher heads"):
        stage.run(stage.parse_spec(spec), store)
    with pytest.raises(SpecError, match="repeat"):
        stage.parse_spec({**spec, "students": ["vit_test_p4_28", "vit_test_p4_28"]})
