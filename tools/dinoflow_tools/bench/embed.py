"""dinoflow bench embed: embed-stage throughput (S3 shards -> DataLoader workers -> model ->
float16 shards) against the bare model forward on the same images already in memory (ratio).

The stage runs fanned out as a pipeline runs it (``--parts``: a plan, then each part's rows, then
the collect step; here one after another), its rate the images over the parts' embedding time.
Bare and stage runs alternate (``--reps`` of each, after one warm-up of each) so that a load change
on a shared machine hits both alike; the ratio is of the medians. Workers default to the stage's
choice (``embed.loader_workers``: on a CPU whose cores the model's threads take, none)."""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench embed", description=__doc__)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--backbone", default="vit_mini_p4_28")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=None, help="default: the stage's (loader_workers)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each, interleaved")
    ap.add_argument("--parts", type=int, default=2, help="the embed stage's fan-out (parts)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import uuid

    import numpy as np
    import torch

    from dinoflow.data.dataset import load_images
    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow.data.images import encode_png
    from dinoflow.data.manifest import from_rows, write_manifest
    from dinoflow.data.shards import ShardWriter
    from dinoflow.models import create_backbone, export_backbone
    from dinoflow.stages import get_stage
    from dinoflow.stages.embed import features_of, loader_workers, pick_device

    from ._store import bench_store

    workers = a.num_workers  # None: the stage chooses (embed.loader_workers)
    torch.set_num_threads(a.threads)
    with bench_store() as store:
        root = f"s3://bench-embed/{uuid.uuid4().hex[:8]}"
        x, _ = load_fashion_mnist("train")
        rows = []
        with ShardWriter(store, f"{root}/shards", 5000) as w:
            for i in range(a.images):
                data = encode_png(x[i])
                shard, member = w.add(f"im{i:07d}", data, "png", {})
                rows.append(
                    {
                        "key": f"im{i:07d}",
                        "shard": shard,
                        "member": member,
                        "source": "fashion_mnist",
                        "label": -1,
                        "width": 28,
                        "height": 28,
                        "sha256": "",
                        "split": "bench",
                    }
                )
        write_manifest(store, f"{root}/manifest.parquet", from_rows(rows))
        # throughput does not depend on the weights: an untrained backbone of the requested shape
        bb = create_backbone(a.backbone)
        export_backbone(store, f"{root}/bb", bb)
        device = pick_device("auto")
        bb = bb.to(device).eval()
        imgs, _ = load_images(store, f"{root}/manifest.parquet", channels=1)
        stage = get_stage("embed")

        def bare_run() -> float:
            with torch.inference_mode():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for s in range(0, len(imgs), a.batch_size):
                    f = features_of(bb, imgs[s : s + a.batch_size].to(device), "cls")
                    _ = f.half().cpu().numpy()
                return len(imgs) / (time.perf_counter() - t0)

        def stage_run(i: int) -> float:
            spec = {
                "output_uri": f"{root}/emb-{i}",
                "manifest_uri": f"{root}/manifest.parquet",
                "backbone_uri": f"{root}/bb",
                "batch_size": a.batch_size,
                "num_workers": workers,
                "parts": a.parts,
            }
            return stage.run(stage.parse_spec(spec), store).images_per_second

        bare_run()  # warm-up of each
        stage_run(-1)
        bares, stages = [], []
        for i in range(a.reps):
            bares.append(bare_run())
            stages.append(stage_run(i))
    bare, staged = float(np.median(bares)), float(np.median(stages))
    ratio = staged / bare
    print(
        f"{a.images} images, {a.backbone} on {device}: bare forward {bare:.0f} img/s, embed stage "
        f"{staged:.0f} img/s (medians of {a.reps}), ratio {ratio:.3f}"
    )
    print(
        json.dumps(
            {
                "embed_ratio": round(ratio, 3),
                "bare_images_per_second": round(bare, 1),
                "stage_images_per_second": round(staged, 1),
                "bare_runs": [round(v, 1) for v in bares],
                "stage_runs": [round(v, 1) for v in stages],
                "ratio_per_rep": [round(s / b, 3) for s, b in zip(stages, bares, strict=True)],
                "images": a.images,
                "backbone": a.backbone,
                "device": device,
                "num_workers": loader_workers(workers, device),
                "parts": a.parts,
                "threads": a.threads,
                "batch_size": a.batch_size,
            }
        )
    )
