"""dinoflow bench data-plane: the streaming training input (``dinoflow.data.stream``).

* **Rate**: images/s that ONE DataLoader worker turns from shard bytes into a sample's DINOv2
  multi-crop (decode, mode conversion, random-resized crops from the original image, flips), at
  28 px grayscale (2 x 28 px global + 8 x 12 px local crops) and at 224 px RGB JPEG (2 x 224 +
  8 x 98, DINOv2's recipe). Measured in the process itself (workers 0), the first step (the shard
  download) left out.
* **Memory**: peak RSS of a fresh training-input process (manifest read, the per-rank stream over
  the shards through ``--workers`` DataLoader workers, ``--rss-steps`` batches of ``--batch-size``)
  for each dataset size in ``--sizes``: the main process and the largest worker. It should not grow
  with the dataset beyond the manifest's own columns.

Synthetic images are distinct random images encoded once and repeated (the reader cannot tell);
shards hold 5,000 samples as the ingest stage writes them. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

GRAY28 = {"px": 28, "channels": 1, "ext": "png", "global_px": 28, "local_px": 12}
RGB224 = {"px": 224, "channels": 3, "ext": "jpg", "global_px": 224, "local_px": 98}


def _encoded(kind: dict, distinct: int, seed: int = 0) -> list[bytes]:
    """``distinct`` smooth random images (so JPEG/PNG sizes are realistic), encoded."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    px, c = kind["px"], kind["channels"]
    for _ in range(distinct):
        small = rng.integers(0, 256, (px // 4, px // 4) + ((3,) if c == 3 else ()), dtype=np.uint8)
        img = Image.fromarray(small).resize((px, px), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG" if kind["ext"] == "png" else "JPEG", **({"quality": 90} if c == 3 else {}))
        out.append(buf.getvalue())
    return out


def write_dataset(store, root: str, n: int, kind: dict, per_shard: int = 5000) -> str:
    """``n`` synthetic images in tar shards under ``root`` and their manifest; returns its URI."""
    import pyarrow as pa

    from dinoflow.data.manifest import SCHEMA, write_manifest
    from dinoflow.data.shards import ShardWriter

    pool = _encoded(kind, 256)
    shards, members = [], []
    with ShardWriter(store, f"{root}/shards", per_shard) as w:
        for i in range(n):
            s, m = w.add(f"im{i:08d}", pool[i % len(pool)], kind["ext"], {})
            shards.append(s)
            members.append(m)
    px = kind["px"]
    cols = {
        "key": [m.split(".")[0] for m in members],
        "shard": shards,
        "member": members,
        "source": ["synthetic"] * n,
        "label": np.full(n, -1, np.int64),
        "width": np.full(n, px, np.int32),
        "height": np.full(n, px, np.int32),
        "sha256": [""] * n,
        "split": ["train"] * n,
    }
    uri = f"{root}/manifest.parquet"
    write_manifest(store, uri, pa.table(cols, schema=SCHEMA))
    return uri


def _groups(kind: dict):
    from dinoflow.data.stream import CropGroup

    return [CropGroup(2, kind["global_px"], (0.32, 1.0)), CropGroup(8, kind["local_px"], (0.05, 0.32))]


def _stream(settings, manifest_uri: str, kind: dict, batch: int, steps: int, workers: int, buffer: int):
    from dinoflow.data.stream import Batches, ManifestSource, StreamPlan, TrainStream

    source = ManifestSource(settings, manifest_uri)
    plan = StreamPlan(len(source), batch, batch, seed=0, buffer=buffer)
    stream = TrainStream(source, plan, _groups(kind), kind["channels"], 0, 1, 0, steps, workers)
    return Batches(stream)


def rate(store, kind: dict, images: int, batch: int) -> float:
    """images/s of one reader (in-process) after the first step."""
    root = f"s3://bench-data-plane/{uuid.uuid4().hex[:8]}"
    uri = write_dataset(store, root, images, kind)
    steps = images // batch
    it = iter(_stream(store.settings, uri, kind, batch, steps, 0, 1000))
    next(it)  # downloads the first shards
    t0 = time.perf_counter()
    done = sum(1 for _ in it) * batch
    return done / (time.perf_counter() - t0)


def _child(argv: list[str]) -> None:
    """The measured training-input process: reads ``steps`` batches, prints its peak RSS."""
    uri, steps, workers, batch, buffer = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    import torch

    from dinoflow.storage import resolve_settings

    torch.set_num_threads(1)
    rows = 0
    for b in _stream(resolve_settings(), uri, GRAY28, batch, steps, workers, buffer):
        rows += len(b["rows"])
    from ._rss import peak_rss_mib

    me = peak_rss_mib()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # forked workers: shared pages count
    print(json.dumps({"rows": rows, "main_mib": me, "worker_mib": kids}))


def peak_rss(store, uri: str, steps: int, workers: int, batch: int, buffer: int) -> dict:
    s = store.settings
    env = {
        **os.environ,
        "DINOFLOW_S3_ENDPOINT": s.endpoint,
        "DINOFLOW_S3_ACCESS_KEY": s.access_key.get_secret_value(),
        "DINOFLOW_S3_SECRET_KEY": s.secret_key.get_secret_value(),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", __name__, "--child", uri, str(steps), str(workers), str(batch), str(buffer)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"training-input process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        _child(argv[1:])
        return
    ap = argparse.ArgumentParser(prog="dinoflow bench data-plane", description=__doc__)
    ap.add_argument("--sizes", default="10000,1000000", help="dataset sizes (images) for peak RSS")
    ap.add_argument("--rate-images", default="3000,600", help="images timed at 28 px gray, 224 px RGB")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the RSS process")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rss-steps", type=int, default=150, help="batches the RSS process reads")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    a = ap.parse_args(argv)
    import torch

    from ._store import bench_store

    torch.set_num_threads(1)
    sizes = [int(s) for s in a.sizes.split(",")]
    n28, n224 = (int(s) for s in a.rate_images.split(","))
    home = tempfile.mkdtemp(prefix="dinoflow-bench-data-plane-")
    os.environ["DINOFLOW_HOME"] = home  # the shard cache of this bench, removed at the end
    figures: dict[str, float] = {}
    try:
        with bench_store() as store:
            figures["gray28_images_per_s_per_worker"] = round(rate(store, GRAY28, n28, a.batch_size), 1)
            print(f"28 px grayscale: {figures['gray28_images_per_s_per_worker']:.0f} images/s per worker")
            figures["rgb224_images_per_s_per_worker"] = round(
                rate(store, RGB224, n224, min(a.batch_size, 32)), 1
            )
            print(f"224 px RGB: {figures['rgb224_images_per_s_per_worker']:.0f} images/s per worker")
            for n in sizes:
                t0 = time.perf_counter()
                uri = write_dataset(store, f"s3://bench-data-plane/{uuid.uuid4().hex[:8]}", n, GRAY28)
                made = time.perf_counter() - t0
                r = peak_rss(store, uri, a.rss_steps, a.workers, a.batch_size, a.shuffle_buffer)
                figures[f"peak_rss_main_mib_{n}_images"] = round(r["main_mib"], 1)
                figures[f"peak_rss_worker_mib_{n}_images"] = round(r["worker_mib"], 1)
                print(
                    f"{n} images ({made:.0f} s to write): peak RSS main {r['main_mib']:.0f} MiB, "
                    f"largest worker {r['worker_mib']:.0f} MiB ({r['rows']} images read)"
                )
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    figures.update(workers=a.workers, batch_size=a.batch_size, rss_steps=a.rss_steps)
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
