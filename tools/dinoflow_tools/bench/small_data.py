"""``dinoflow bench small-data``: the second seed's claim at small scale.

Claim (El-Nouby et al. 2021): denoising autoencoders (BEiT, SplitMask, MAE) pretrained on the target
data alone rival large-scale pretraining and are more robust to the size of the pretraining set
than joint-embedding methods (DINO).

Here: pretrain on only N Fashion-MNIST *train* images (no other data; N = 2,000 and 10,000), with an
equal compute budget per run (CPU seconds of this process, so that other processes on a shared
machine do not change who gets how much), for DINOv2, MAE, SplitMask (pixel targets) and SplitMask
(k-means tokens), each on a tiny ViT and a tiny XCiT; then evaluate the frozen features on the 10k
test set with the evaluate stage's functions (``dinoflow.eval``): weighted k-NN on the CLS token
(cosine, T = 0.07, k = 20, DINOv2's protocol) with the same N images as the
memory, and a linear probe (``dinoflow.eval.linear``: learning rate and feature variant chosen on a
held-out part of the N train images). References: raw pixels with the same N images, and raw
pixels with all 60k (84.3 %, FACTS.md).

Each step is the trainer's own (``dinoflow.train.trainer.train_step``), with one optimizer recipe for
every method (AdamW, linear warm-up, cosine to 0, weight decay 0.05, clip
3.0); the number of steps of a run is set from the CPU time of its first steps so that the run
fills its budget. The table and the JSON go to ``--out``; the last output line is the JSON list.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from dinoflow.eval.knn import FASHION_MNIST_RAW_PIXEL_KNN_TOP1

METHODS = ["dinov2", "mae", "splitmask_pixels", "splitmask_kmeans"]
BACKBONES = {"vit": "vit_mini_p4_28", "xcit": "xcit_tiny_p8_28"}


def _build(method: str, backbone_name: str, images: Any, seed: int) -> Any:
    """The method with small-model settings (paper defaults where they make sense at 28 px)."""
    from dinoflow.methods.config import CropsConfig, DINOv2Config
    from dinoflow.methods.dinov2 import DINOv2
    from dinoflow.methods.mae import MAE
    from dinoflow.methods.mim_config import DecoderConfig, MAEConfig, SplitMaskConfig
    from dinoflow.methods.splitmask import SplitMask
    from dinoflow.models import create_backbone
    from dinoflow.train.presets import FASHION_MNIST_CPU

    bb = create_backbone(backbone_name)
    if method == "dinov2":  # the project's Fashion-MNIST CPU preset's head; crops fit both patch sizes
        crops = {
            **FASHION_MNIST_CPU["crops"],
            "global_crop_px": 28,
            "local_crop_px": 16,
            "local_crops_number": 6,
        }
        return DINOv2(bb, DINOv2Config(**FASHION_MNIST_CPU["dinov2"]), CropsConfig(**crops))
    dec_dim = 128
    if method == "mae":  # MAE: ratio 0.75, a light decoder (8x512 in the paper; 2x128 for a 128-d encoder)
        return MAE(bb, MAEConfig(decoder=DecoderConfig(dim=dec_dim, depth=2, heads=4)))
    target = method.split("_", 1)[1]
    # SplitMask: a shallow 2-block decoder (paper); k-means codebook of 512 for 4x4 / 8x8 patches.
    cfg = SplitMaskConfig(target=target, n_codes=512, decoder=DecoderConfig(dim=dec_dim, depth=2, heads=4))
    m = SplitMask(bb, cfg)
    m.fit_data(images, seed=seed)
    return m


def _pretrain(
    method: Any, images: Any, budget_cpu_s: float, batch: int, lr: float, seed: int, dev: Any
) -> dict:
    import torch

    from dinoflow.methods.base import BatchView, StepState, merge_groups
    from dinoflow.train.trainer import train_step

    method.to(dev).train()
    groups = merge_groups(method.param_groups())
    for gr in groups:
        gr["weight_decay"] = 0.05 * gr["wd_mult"]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))  # MAE's betas
    n = images.shape[0]
    spe = max(1, n // batch)
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    t_cpu0, t_wall0 = clock(), time.perf_counter()
    max_steps, step, losses = None, 0, []
    probe = 5  # steps timed before the schedule length is fixed
    while max_steps is None or step < max_steps:
        if max_steps is None and step == probe:
            per_step = (clock() - t_cpu0) / probe
            max_steps = max(probe + 1, int(budget_cpu_s / per_step))
        total = max_steps or 10**9
        warm = max(1, int(0.1 * (max_steps or 50)))
        f = (
            (step + 1) / warm
            if step < warm
            else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        )
        for gr in opt.param_groups:
            gr["lr"] = lr * f * gr["lr_mult"]
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(n, (batch,), generator=g)
        state = StepState(step, total if max_steps else 10**6, steps_per_epoch=spe)
        loss, _ = train_step(
            method, method, opt, images[idx].to(dev), BatchView(g, 0, batch), state, clip_grad=3.0
        )
        losses.append(loss.detach())  # DINOv2's clip (3.0) above; read back once, after the run
        step += 1
    losses = torch.stack(losses).cpu().tolist()
    return {
        "steps": step,
        "images_seen": step * batch,
        "train_cpu_s": round(clock() - t_cpu0, 1),
        "train_wall_s": round(time.perf_counter() - t_wall0, 1),
        "loss_first": round(sum(losses[:5]) / 5, 4),
        "loss_last": round(sum(losses[-5:]) / min(5, len(losses)), 4),
    }


def _features(backbone: Any, images: Any, labels: Any, dev: Any) -> Any:
    import torch

    from dinoflow.eval.features import extract_features

    bb = backbone.to(dev)
    meta = bb.metadata()
    with torch.no_grad():
        fs = extract_features(bb, images.to(dev), labels.to(dev), meta, batch_size=512, n_last_blocks=1)
    return fs.__class__(
        fs.cls_blocks.cpu(), fs.patch_mean.cpu() if fs.patch_mean is not None else None, fs.labels.cpu()
    )


def _evaluate(train_fs: Any, test_fs: Any, seed: int) -> dict:
    from dinoflow.eval.knn import knn_classify
    from dinoflow.eval.linear import linear_protocol

    # The evaluate stage's k-NN: the CLS token, cosine, T = 0.07, k = 20.
    knn = knn_classify(train_fs.cls, train_fs.labels, test_fs.cls, test_fs.labels, ks=(20,), temperature=0.07)
    lin = linear_protocol(train_fs, test_fs, seed=seed, num_classes=10)
    return {
        "knn_top1": round(float(knn.top1[20]), 4),
        "linear_top1": round(lin.test_top1, 4),
        "linear_choice": lin.selection.best.name,
    }


def _raw_pixels(train_x: Any, train_y: Any, test_x: Any, test_y: Any) -> float:
    from dinoflow.eval.knn import knn_classify

    a = train_x.flatten(1).float() / 255.0
    b = test_x.flatten(1).float() / 255.0
    return round(float(knn_classify(a, train_y, b, test_y, ks=(20,), temperature=0.07).top1[20]), 4)


def _load_data(seed: int) -> tuple[Any, Any, Any, Any, Any]:
    import numpy as np
    import torch

    from dinoflow.data.idx import load_fashion_mnist

    tx, ty = load_fashion_mnist("train")
    vx, vy = load_fashion_mnist("test")
    perm = torch.randperm(tx.shape[0], generator=torch.Generator().manual_seed(seed))
    return (
        torch.from_numpy(np.array(tx)).unsqueeze(1),
        torch.from_numpy(np.array(ty)),
        torch.from_numpy(np.array(vx)).unsqueeze(1),
        torch.from_numpy(np.array(vy)),
        perm,
    )


def run_one(cfg: dict) -> dict:
    """One (method, backbone, N) cell: pretrain within the budget, then evaluate frozen features."""
    import torch

    torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    train_all, labels_all, test_x, test_y, perm = _load_data(cfg["seed"])
    sub = perm[: cfg["n_images"]]
    xs, ys = train_all[sub], labels_all[sub]
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    method = _build(cfg["method"], BACKBONES[cfg["family"]], xs, cfg["seed"])
    tr = _pretrain(method, xs, cfg["budget_cpu_s"], cfg["batch"], cfg["lr"], cfg["seed"], dev)
    bb = method.export_backbone().eval()
    ev = _evaluate(_features(bb, xs, ys, dev), _features(bb, test_x, test_y, dev), cfg["seed"])
    return {
        "method": cfg["method"],
        "backbone": BACKBONES[cfg["family"]],
        "family": cfg["family"],
        "n_images": cfg["n_images"],
        "budget_cpu_s": cfg["budget_cpu_s"],
        **tr,
        **ev,
        "run_wall_s": round(time.perf_counter() - t0, 1),
    }


def _run_child(cfg: dict) -> dict:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dinoflow_tools.bench.small_data", "--child", json.dumps(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {**cfg, "backbone": BACKBONES[cfg["family"]], "error": " | ".join(tail)[:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench small-data", description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--n", nargs="+", type=int, default=[2000, 10000], help="pretraining images (train split)"
    )
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument(
        "--budget-cpu-s",
        type=float,
        default=90.0,
        help="compute per pretraining run: CPU seconds of its process (wall seconds on CUDA)",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW LR, the same for every method")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, each in its own process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="small_data_bench.txt", help="table + closing note + JSON")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return

    import torch

    from dinoflow.errors import SpecError

    torch.set_num_threads(args.threads)
    train_all, labels_all, test_x, test_y, perm = _load_data(args.seed)
    if max(args.n) > train_all.shape[0]:
        raise SpecError(f"--n {max(args.n)} exceeds the {train_all.shape[0]} Fashion-MNIST train images")
    refs = {n: _raw_pixels(train_all[perm[:n]], labels_all[perm[:n]], test_x, test_y) for n in args.n}
    cfgs = [
        {
            "method": m,
            "family": f,
            "n_images": n,
            "budget_cpu_s": args.budget_cpu_s,
            "batch": args.batch,
            "lr": args.lr,
            "threads": args.threads,
            "device": args.device,
            "seed": args.seed,
        }
        for n in args.n
        for f in args.backbones
        for m in args.methods
    ]
    lines = [
        f"small-data: pretrain on N Fashion-MNIST train images only, {args.budget_cpu_s:.0f} "
        f"{'CPU' if args.device == 'cpu' else 'wall'}-s per run, batch {args.batch}, {args.device}, "
        f"{args.threads} threads per run, {args.jobs} runs at a time; frozen features on the 10k test set",
        f"{'N':>6} {'method':<17} {'backbone':<16} {'steps':>6} {'imgs':>8} {'cpu s':>6} {'wall s':>6} "
        f"{'loss0':>7} {'lossT':>7} {'k-NN':>6} {'linear':>6}",
    ]
    lines += [
        f"{n:>6} {'raw pixels':<17} {'-':<16} {'':>6} {'':>8} {'':>6} {'':>6} {'':>7} {'':>7} {v:>6.3f}"
        for n, v in refs.items()
    ]
    print("\n".join(lines), flush=True)
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as ex:
            rows = list(ex.map(_run_child, cfgs))
    else:
        rows = [run_one(c) for c in cfgs]
    for row in rows:
        row["raw_pixels_knn_same_n"] = refs[row["n_images"]]
        if "error" in row:
            line = f"{row['n_images']:>6} {row['method']:<17} {row['backbone']:<16} error: {row['error']}"
        else:
            line = (
                f"{row['n_images']:>6} {row['method']:<17} {row['backbone']:<16} {row['steps']:>6} "
                f"{row['images_seen']:>8} {row['train_cpu_s']:>6.0f} {row['train_wall_s']:>6.0f} "
                f"{row['loss_first']:>7.3f} {row['loss_last']:>7.3f} {row['knn_top1']:>6.3f} {row['linear_top1']:>6.3f}"
            )
        lines.append(line)
        print(line, flush=True)
    ok = [r for r in rows if "error" not in r]
    note = closing_note(ok, refs)
    lines += ["", note]
    print("\n" + note, flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n" + json.dumps(rows) + "\n")
    print(json.dumps(rows))


def closing_note(rows: list[dict], refs: dict[int, float]) -> str:
    """What the numbers say about the claim, computed from them (no hard-coded verdict)."""
    out = [
        f"Reference: raw-pixel k-NN with all 60k train images {FASHION_MNIST_RAW_PIXEL_KNN_TOP1:.3f}; with the same N: "
        + ", ".join(f"N={n}: {v:.3f}" for n, v in refs.items())
        + "."
    ]
    dae = ("mae", "splitmask_pixels", "splitmask_kmeans")
    for fam in sorted({r["family"] for r in rows}):
        for n in sorted({r["n_images"] for r in rows}):
            rs = {r["method"]: r for r in rows if r["family"] == fam and r["n_images"] == n}
            if "dinov2" not in rs or not any(m in rs for m in dae):
                continue
            best = max((rs[m] for m in dae if m in rs), key=lambda r: r["linear_top1"])
            d = rs["dinov2"]
            out.append(
                f"{fam} N={n}: best denoising AE {best['method']} linear {best['linear_top1']:.3f} / k-NN "
                f"{best['knn_top1']:.3f} vs DINOv2 {d['linear_top1']:.3f} / {d['knn_top1']:.3f}; "
                f"beats raw pixels (same N, k-NN): DAE {best['knn_top1'] > refs[n]}, DINOv2 {d['knn_top1'] > refs[n]}."
            )
    ns = sorted({r["n_images"] for r in rows})
    if len(ns) >= 2:
        lo, hi = ns[0], ns[-1]
        for fam in sorted({r["family"] for r in rows}):
            drops = {}
            for m in {r["method"] for r in rows}:
                a = [r for r in rows if r["method"] == m and r["family"] == fam and r["n_images"] == lo]
                b = [r for r in rows if r["method"] == m and r["family"] == fam and r["n_images"] == hi]
                if a and b:
                    drops[m] = round(b[0]["linear_top1"] - a[0]["linear_top1"], 4)
            if drops:
                out.append(
                    f"{fam}: linear top-1 lost going from N={hi} to N={lo} (smaller = more robust to data "
                    f"size): " + ", ".join(f"{m} {v:+.3f}" for m, v in sorted(drops.items()))
                )
    if rows:
        dae_rows = [r for r in rows if r["method"] in dae]
        dino_rows = [r for r in rows if r["method"] == "dinov2"]
        if dae_rows and dino_rows:
            wins = sum(
                1
                for d in dino_rows
                if max(
                    (
                        r["linear_top1"]
                        for r in dae_rows
                        if r["family"] == d["family"] and r["n_images"] == d["n_images"]
                    ),
                    default=-1,
                )
                > d["linear_top1"]
            )
            out.append(
                f"Claim check: a denoising autoencoder beats DINOv2 (linear) in {wins} of {len(dino_rows)} "
                f"(backbone, N) cells at this budget. Tiny models and minutes of CPU are far from the "
                f"paper's scale (ViT-B, hundreds of epochs); read this as a smoke-scale check, not a verdict."
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
