"""The SSCD copy descriptor: its training step (through the shared trainer) lowers the loss, its batch
does not depend on how it is split over processes, it never draws a held-out edit family, and the
dedup stage on its descriptors (pretrain stage -> embed stage -> dedup stage, on the embedded store)
finds planted copies in a tiny pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dinoflow.data import edits
from dinoflow.data.edits import HELDOUT_FAMILIES, PRIMITIVE_TRAIN_FAMILIES
from dinoflow.methods.base import BatchView
from dinoflow.methods.sscd_config import SSCDConfig


@pytest.fixture(scope="module")
def fmnist():
    from dinoflow.data.idx import load_fashion_mnist

    tr, _ = load_fashion_mnist("train")
    te, _ = load_fashion_mnist("test")
    return tr, te


def _method(**cfg):
    from dinoflow.methods.sscd import SSCD
    from dinoflow.models import create_backbone

    torch.manual_seed(0)
    return SSCD(create_backbone("vit_test_p4_28"), SSCDConfig(**cfg))


def test_training_step_lowers_the_loss(fmnist):
    from dinoflow.train.config import TrainConfig
    from dinoflow.train.trainer import train

    torch.set_num_threads(1)
    images = torch.from_numpy(fmnist[0][:512].copy())[:, None]
    cfg = TrainConfig(
        method="sscd",
        backbone="vit_test_p4_28",
        steps=40,
        batch_size=64,
        log_every_steps=1,
        optim={"lr_per_1024": 0.004, "warmup_steps": 5, "layer_decay": 1.0, "patch_embed_lr_mult": 1.0},
        data={"workers": 0},
        sscd={"entropy_weight": 1.0, "temperature": 0.1},
    )
    out = train(cfg, images, None, "s3://unused/sscd", progress=False)
    loss = [c["loss"] for c in out.curves]
    nce = [c["infonce_loss"] for c in out.curves]
    assert len(loss) == 40 and all(np.isfinite(loss))
    assert np.mean(loss[-5:]) < np.mean(loss[:5])
    assert np.mean(nce[-5:]) < np.mean(nce[:5]), "the contrastive term itself must fall"
    assert out.method.export_backbone().name == "vit_test_p4_28"


def test_batch_is_the_same_split_over_ranks(fmnist):
    m = _method()
    x = torch.from_numpy(fmnist[0][:8].copy())[:, None]
    whole = m.prepare(x, BatchView(torch.Generator().manual_seed(5), 0, 8))
    parts = [m.prepare(x[o : o + 4], BatchView(torch.Generator().manual_seed(5), o, 8)) for o in (0, 4)]
    for k in ("a", "b"):
        assert whole[k].shape == (8, 1, 28, 28)
        assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))


def test_heldout_families_are_never_drawn(fmnist, monkeypatch):
    with pytest.raises(ValidationError, match="held out"):
        SSCDConfig(families=["crop", HELDOUT_FAMILIES[0]])

    def refuse(x, g):
        raise AssertionError("a held-out family was drawn in training")

    for name in HELDOUT_FAMILIES:
        monkeypatch.setitem(edits.FAMILIES, name, edits.FAMILIES[name].__class__(name, "x", True, refuse))
    m = _method()
    assert set(m.families) == set(PRIMITIVE_TRAIN_FAMILIES)
    x = torch.from_numpy(fmnist[0][:16].copy())[:, None]
    for step in range(8):
        m.prepare(x, BatchView(torch.Generator().manual_seed(step), 0, 16))


def test_wrong_images_are_refused():
    from dinoflow.errors import SpecError

    m = _method()
    with pytest.raises(SpecError, match="uint8 images"):
        m.prepare(torch.zeros(4, 3, 28, 28, dtype=torch.uint8), BatchView(torch.Generator(), 0, 4))


EASY = ["noise", "jpeg", "color", "blur", "downscale"]  # learned within a test's few steps


def _plant(base, families, n, seed):
    from dinoflow.data.edits import apply_edit, seed_generator

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(base), n, replace=False)
    copies = np.stack(
        [
            apply_edit(
                torch.from_numpy(base[r].copy()), families[i % len(families)], seed_generator(seed * 1000 + i)
            ).numpy()
            for i, r in enumerate(rows)
        ]
    )
    return rows, copies


def test_dedup_on_the_descriptor_finds_planted_copies(store, bucket_uri, fmnist):
    import io

    import pyarrow.parquet as pq

    from dinoflow.data.manifest import read_manifest
    from dinoflow.stages import get_stage
    from dinoflow_tools.pool import _write_set

    torch.set_num_threads(1)
    tr, te = fmnist
    base, ev = tr[:400], te[:100]
    dup_rows, dups = _plant(base, EASY, 30, 1)
    con_rows, cons = _plant(ev, EASY, 10, 2)
    pool = np.concatenate([base, dups, cons])
    pool_m = _write_set(
        store, f"{bucket_uri}/pool", pool, ["fmnist"] * len(pool), np.full(len(pool), -1), "pool", 1000
    )[0]
    eval_m = _write_set(
        store, f"{bucket_uri}/eval", ev, ["fmnist"] * len(ev), np.zeros(len(ev), int), "test", 1000
    )[0]

    pretrain = get_stage("pretrain")
    trained = pretrain.run(
        pretrain.parse_spec(
            {
                "output_uri": f"{bucket_uri}/sscd",
                "manifest_uri": pool_m,
                "method": "sscd",
                "backbone": "vit_micro_p7_28",
                "steps": 80,
                "batch_size": 64,
                "sscd": {"families": EASY, "entropy_weight": 10.0, "temperature": 0.1},
                "optim": {
                    "lr_per_1024": 0.02,
                    "warmup_steps": 5,
                    "layer_decay": 1.0,
                    "patch_embed_lr_mult": 1.0,
                },
                "data": {"workers": 0},
            }
        ),
        store,
    )
    embed = get_stage("embed")
    desc = {
        name: embed.run(
            embed.parse_spec(
                {
                    "output_uri": f"{bucket_uri}/desc-{name}",
                    "manifest_uri": m,
                    "backbone_uri": trained.backbone_uri,
                    "num_workers": 0,
                }
            ),
            store,
        ).embeddings_uri
        for name, m in (("pool", pool_m), ("eval", eval_m))
    }
    dedup = get_stage("dedup")
    res = dedup.run(
        dedup.parse_spec(
            {
                "output_uri": f"{bucket_uri}/dedup",
                "manifest_uri": pool_m,
                "embeddings_uri": desc["pool"],
                "eval_manifest_uris": [eval_m],
                "eval_embeddings_uris": [desc["eval"]],
                "copy_descriptor": {"embeddings_uri": desc["pool"], "eval_embeddings_uris": [desc["eval"]]},
                "threshold_cos": 0.9,
                "decontam_threshold_cos": 0.9,
                "phash_max_bits": -1,
                "k": 8,
            }
        ),
        store,
    )
    keys = read_manifest(store, pool_m).column("key").to_pylist()
    groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri))).to_pylist()
    by_key = {g["key"]: g for g in groups}
    n = len(base)
    # each duplicate copy sits in its original's group; each contamination copy is dropped
    found = sum(
        1
        for i, r in enumerate(dup_rows)
        if keys[n + i] in by_key and by_key[keys[n + i]]["group"] == by_key.get(keys[r], {}).get("group")
    )
    dropped = sum(
        1
        for i in range(len(cons))
        if by_key.get(keys[n + len(dups) + i], {}).get("reason") == "contamination"
    )
    originals = {keys[r] for r in dup_rows}
    clean_removed = sum(
        1 for k in keys[:n] if k not in originals and by_key.get(k, {}).get("reason", "kept") != "kept"
    )
    # a descriptor trained for 80 tiny steps: most copies found, few clean images touched
    assert found >= 0.4 * len(dups), f"{found} of {len(dups)} planted copies found"
    assert dropped >= 0.5 * len(cons), f"{dropped} of {len(cons)} contamination copies dropped"
    assert clean_removed <= 0.05 * n, f"{clean_removed} of {n} clean images removed"
    report = store.get_json(res.report_uri)
    assert report["compared"] == desc["pool"] and report["copy_detection"] is None
