"""Any image: a folder of RGB JPEGs of mixed sizes and aspect ratios (crops of the photos that
scikit-learn ships as files) goes through ingest -> embed -> dedup -> curate -> pretrain -> distill ->
evaluate on a 64 px, patch-8 RGB backbone; the embedder is bootstrapped on a shape picked from the
images (RGB, their size), nothing is squashed to 28 px grayscale on the way."""

from __future__ import annotations

import numpy as np
import pytest

from dinoflow.stages import get_stage

CLASSES = ("china", "flower")


def _photo_crops(folder, per_class: dict[str, int], seed: int = 0) -> list[tuple[int, int]]:
    """Random crops (side 40-220 px, aspect 1:2 to 2:1, some resized) of each photo, saved as JPEG
    under ``folder/<split>/<photo>/``; returns the (width, height) of every file written."""
    from pathlib import Path

    import sklearn.datasets
    from PIL import Image

    photos = {c: Image.open(Path(sklearn.datasets.__file__).parent / "images" / f"{c}.jpg") for c in CLASSES}
    rng = np.random.default_rng(seed)
    sizes = []
    for split, n in per_class.items():
        for cls, photo in photos.items():
            out = folder / split / cls
            out.mkdir(parents=True)
            w, h = photo.size
            for i in range(n):
                side = int(rng.integers(40, 221))
                aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
                cw, ch = min(w, int(side * aspect**0.5)), min(h, int(side / aspect**0.5))
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                crop = photo.crop((x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.3:  # some resized, as a crawl would find them
                    f = rng.uniform(0.6, 1.5)
                    crop = crop.resize((max(16, int(cw * f)), max(16, int(ch * f))), Image.BILINEAR)
                crop.save(out / f"{i:03d}.jpg", quality=int(rng.integers(70, 96)))
                sizes.append(crop.size)
    return sizes


@pytest.mark.timeout(1200)
def test_rgb_photos_of_any_size_go_through_every_stage(store, bucket_uri, tmp_path):
    from dinoflow.data.dataset import load_images
    from dinoflow.data.manifest import read_manifest

    sizes = _photo_crops(tmp_path, {"train": 60, "test": 20})
    aspects = {round(w / h, 1) for w, h in sizes}
    assert len({w for w, _ in sizes}) > 50 and min(aspects) < 0.8 and max(aspects) > 1.25

    def run(stage: str, **fields):
        st = get_stage(stage)
        return st.run(st.parse_spec({"output_uri": f"{bucket_uri}/{stage}", **fields}), store)

    ing = run(
        "ingest",
        kind="folder",
        source="photos",
        splits={"train": [str(tmp_path / "train")], "test": [str(tmp_path / "test")]},
    )
    train, test = ing.manifests["train"], ing.manifests["test"]
    t = read_manifest(store, train)
    assert t.num_rows == 120 and sorted(set(t.column("label").to_pylist())) == [0, 1]
    assert len(set(zip(t.column("width").to_pylist(), t.column("height").to_pylist(), strict=True))) > 50

    # the embedder: bootstrapped on a shape chosen from the pool (RGB, short sides >= 64 px)
    emb = get_stage("embed")
    pool = emb.run(
        emb.parse_spec(
            {
                "output_uri": f"{bucket_uri}/embed-pool",
                "manifest_uri": train,
                "bootstrap_sample": 64,
                "bootstrap_steps": 3,
                "batch_size": 32,
                "num_workers": 0,
                "parts": 2,
            }
        ),
        store,
    )
    meta = store.get_json(pool.backbone_uri + "/backbone.json")
    assert pool.bootstrapped and meta["dinoflow_backbone"] == "vit_mini_p8_64" and meta["in_chans"] == 3
    ev = emb.run(
        emb.parse_spec(
            {
                "output_uri": f"{bucket_uri}/embed-eval",
                "manifest_uri": test,
                "backbone_uri": pool.backbone_uri,
                "num_workers": 0,
            }
        ),
        store,
    )
    assert pool.count == 120 and ev.count == 40 and pool.dim == ev.dim == meta["embed_dim"]
    dd = run(
        "dedup",
        manifest_uri=train,
        embeddings_uri=pool.embeddings_uri,
        eval_manifest_uris=[test],
        eval_embeddings_uris=[ev.embeddings_uri],
        k=8,
        # a 3-step bootstrap does not separate crops of one photo: cosine rules off, hashes and
        # pixel copy detection on
        threshold_cos=1.0,
        decontam_threshold_cos=1.0,
    )
    assert 0 < dd.kept_count <= 120
    cu = run(
        "curate",
        manifest_uri=dd.manifest_uri,
        embeddings_uri=dd.embeddings_uri,
        seed_manifest_uris=[test],
        seed_embeddings_uris=[ev.embeddings_uri],
        target_size=min(64, dd.kept_count),
        parts=2,
    )
    crops = {"global_crop_px": 64, "local_crop_px": 32, "local_crops_number": 2}
    head = {"head_prototypes": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 32}
    pt = run(
        "pretrain",
        manifest_uri=cu.manifest_uri,
        method="dinov2",
        backbone="vit_test_p8_64",
        steps=2,
        batch_size=16,
        crops=crops,
        dinov2=head,
        data={"workers": 0},
    )
    assert pt.steps == 2 and pt.n_images == cu.count and np.isfinite(pt.final_loss)
    ds = run(
        "distill",
        manifest_uri=cu.manifest_uri,
        teacher_uri=pt.backbone_uri,
        students=["vit_test_p8_64"],
        steps=2,
        batch_size=16,
        crops=crops,
        data={"workers": 0},
    )
    student = ds.backbone_uris["vit_test_p8_64"]
    res = run(
        "evaluate",
        backbone_uri=student,
        train_manifest_uri=train,
        test_manifest_uri=test,
        knn_k=[5],
        linear_epochs=2,
        linear_lrs=[0.01],
        logreg_cs=[1.0],
        report_examples=2,
    )
    assert 0.0 <= res.metrics["knn_top1"] <= 1.0 and 0.0 <= res.baseline_metrics["knn_top1"] <= 1.0
    # what evaluate decoded: the originals resized to the student's 64 px, three channels
    imgs, _ = load_images(store, test, channels=3, size_px=64)
    assert imgs.shape == (40, 3, 64, 64) and imgs.float().std(dim=(0, 2, 3)).min() > 10


def test_bootstrap_shape_follows_the_pools_channels_and_size():
    from dinoflow.errors import SpecError
    from dinoflow.stages.embed import EmbedSpec, bootstrap_backbone_for, bootstrap_fields

    assert bootstrap_backbone_for(1, 28) == "vit_mini_p7_28"
    assert bootstrap_backbone_for(1, 500) == "vit_mini_p7_28"  # the only grayscale shape
    assert bootstrap_backbone_for(3, 40) == "vit_mini_p8_64"  # smaller than any: the smallest
    assert bootstrap_backbone_for(3, 150) == "vit_mini_p8_64"
    assert bootstrap_backbone_for(3, 640) == "vit_small_p14"
    spec = EmbedSpec(output_uri="s3://b/e", manifest_uri="s3://b/m.parquet", bootstrap_steps=20)
    fields = bootstrap_fields(spec, 3, 640, "s3://b/s.parquet", 100)
    # crops at the backbone's size and DINOv2's local/global ratio (98/224), on its patch grid
    assert fields["backbone"] == "vit_small_p14" and fields["crops"]["global_crop_px"] == 224
    assert fields["crops"]["local_crop_px"] == 98
    gray = EmbedSpec(**{**spec.model_dump(), "bootstrap_backbone": "vit_test_p4_28"})
    with pytest.raises(SpecError, match="takes 1-channel images but the pool's are RGB"):
        bootstrap_fields(gray, 3, 64, "s3://b/s.parquet", 100)
