"""``dinoflow bench distill``: DINOv2's distillation claim at small scale.

Claim (DINOv2 Sec. 5): a small model distilled from a larger pretrained one beats the same small
model trained from scratch with the same recipe. Here, on Fashion-MNIST and 2 CPU cores:

1. teacher: a larger ViT pretrained with DINOv2 (the shared trainer, the project's Fashion-MNIST CPU
   preset) on N train images;
2. distilled: the small student distilled from that frozen teacher (``dinoflow.methods.distill``);
3. scratch: the same student pretrained with DINOv2 from scratch;

2 and 3 get the same student compute: the same steps, batch size and crops through the student.
Each exported backbone (the distilled student's EMA; the scratch run's EMA teacher) is scored on
frozen features: weighted k-NN (cosine, T = 0.07, k = 20) and the linear-probe grid (chosen on
held-out train), on the Fashion-MNIST test split. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from typing import Any


def _evaluate(backbone: Any, meta: dict, data: tuple, seed: int) -> dict[str, float]:
    from dinoflow.eval.features import extract_features
    from dinoflow.eval.knn import knn_classify
    from dinoflow.eval.linear import linear_protocol

    xtr, ytr, xte, yte = data
    tr = extract_features(backbone, xtr, ytr, meta, batch_size=500)
    te = extract_features(backbone, xte, yte, meta, batch_size=500)
    knn = knn_classify(tr.cls, ytr, te.cls, yte, ks=[20], temperature=0.07)  # DINO's headline k
    lin = linear_protocol(tr, te, epochs=10, seed=seed, num_classes=10)
    return {
        "knn_top1": round(knn.top1[20], 4),
        "linear_top1": round(lin.test_top1, 4),
        "probe": lin.selection.best.name,
    }


def _recipe(a: argparse.Namespace, backbone: str, steps: int, crops: Any) -> Any:
    """The CPU preset's DINOv2 recipe for ``backbone`` at this run's batch, seed and crops."""
    from dinoflow.train.presets import get_preset

    return get_preset(
        "fashion-mnist-cpu",
        backbone=backbone,
        steps=steps,
        batch_size=a.batch_size,
        checkpoint_every_steps=10**9,
        seed=a.seed,
    ).model_copy(update={"crops": crops})


def _teacher(a: argparse.Namespace, store: Any, crops: Any, images: Any, out_uri: str) -> tuple[Any, Any]:
    """The frozen teacher (backbone, DINO/iBOT heads): loaded from ``--teacher-uri``, or pretrained
    here with the CPU preset (DINOv2; its EMA teacher and heads)."""
    from dinoflow.models import load_backbone
    from dinoflow.models.export import load_heads
    from dinoflow.train.trainer import train

    if a.teacher_uri:
        return load_backbone(store, a.teacher_uri), load_heads(store, a.teacher_uri)
    cfg = _recipe(a, a.teacher, a.teacher_steps, crops)
    method = train(cfg, images, store, out_uri, progress=True).method
    return method.export_backbone(), method.head_state()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dinoflow bench distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="vit_mini_p4_28", help="teacher backbone (default 128-d, 4 blocks)")
    p.add_argument("--teacher-steps", type=int, default=600)
    which = p.add_mutually_exclusive_group()  # one named teacher at most; argparse refuses both
    which.add_argument("--teacher-uri", default=None, help="reuse an exported dinov2 teacher (skips step 1)")
    which.add_argument(
        "--teacher-demo",
        default=None,
        metavar="DEMO_OUT",
        help="the teacher of a finished `dinoflow demo --out DEMO_OUT` (its store is started for the run)",
    )
    p.add_argument("--student", default="vit_test_p4_28", help="student backbone (default 32-d, 2 blocks)")
    p.add_argument(
        "--student-steps", type=int, default=400, help="steps for the distilled AND the scratch student"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-images", type=int, default=10000, help="Fashion-MNIST train images to train on")
    p.add_argument("--eval-train-images", type=int, default=10000, help="k-NN memory / probe training set")
    p.add_argument("--eval-test-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch

    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow.eval.features import FeatureSet
    from dinoflow.eval.knn import knn_classify
    from dinoflow.eval.linear import linear_protocol
    from dinoflow.methods.distill import Distill
    from dinoflow.methods.distill_config import DistillConfig
    from dinoflow.models import create_backbone, get_entry, load_backbone
    from dinoflow.train.presets import get_preset
    from dinoflow.train.trainer import train
    from dinoflow_tools.bench._store import bench_store, demo_teacher_store

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(a.seed)
    xtr_all, ytr_all = load_fashion_mnist("train")
    xte_all, yte_all = load_fashion_mnist("test")
    xtr_all, ytr_all = torch.from_numpy(xtr_all.copy())[:, None], torch.from_numpy(ytr_all.copy())
    perm = torch.randperm(len(ytr_all), generator=g)
    train_images = xtr_all[perm[: a.train_images]]
    ev = perm[: a.eval_train_images]
    te = torch.randperm(len(yte_all), generator=g)[: a.eval_test_images]
    data = (
        xtr_all[ev],
        ytr_all[ev],
        torch.from_numpy(xte_all.copy())[:, None][te],
        torch.from_numpy(yte_all.copy())[te],
    )

    stack = contextlib.ExitStack()
    if a.teacher_demo:
        store, a.teacher_uri = stack.enter_context(demo_teacher_store(a.teacher_demo))
    else:
        store = stack.enter_context(bench_store())
    root = f"s3://bench-distill/{int(time.time())}"
    rows: dict[str, dict[str, Any]] = {}
    try:
        # Crops: the preset's, local crops rounded up to a multiple of both patch sizes.
        t_patch = (
            load_backbone(store, a.teacher_uri).patch_size
            if a.teacher_uri
            else get_entry(a.teacher).patch_size
        )
        unit = math.lcm(t_patch, get_entry(a.student).patch_size)
        preset_crops = get_preset("fashion-mnist-cpu").crops
        crops = preset_crops.model_copy(
            update={"local_crop_px": -(-preset_crops.local_crop_px // unit) * unit}
        )

        # 1. the teacher: DINOv2 pretraining of the larger model
        t0 = time.perf_counter()
        teacher_steps = 0 if a.teacher_uri else a.teacher_steps
        teacher, heads = _teacher(a, store, crops, train_images, f"{root}/teacher")
        rows["teacher"] = {
            **_evaluate(teacher, teacher.metadata(), data, a.seed),
            "backbone": teacher.name,
            "steps": teacher_steps,
            "seconds": round(time.perf_counter() - t0, 1),
        }

        # The same student recipe for both runs: the preset's crops, batch, steps and optimizer.
        scfg = _recipe(a, a.student, a.student_steps, crops)

        # 2. distilled student
        dcfg = scfg.model_copy(update={"method": "distill"})

        def make() -> Distill:
            return Distill(
                copy.deepcopy(teacher),
                heads,
                {a.student: create_backbone(a.student)},
                DistillConfig(ema_momentum_start=scfg.dinov2.momentum_start),
                crops,
            )

        t0 = time.perf_counter()
        out = train(dcfg, train_images, store, f"{root}/distilled", progress=True, method_factory=make)
        student = out.method.export_students()[a.student]
        rows["distilled"] = {
            **_evaluate(student, student.metadata(), data, a.seed),
            "backbone": a.student,
            "steps": a.student_steps,
            "seconds": round(time.perf_counter() - t0, 1),
        }

        # 3. the same student from scratch (DINOv2 pretraining, its EMA teacher exported)
        t0 = time.perf_counter()
        out = train(scfg, train_images, store, f"{root}/scratch", progress=True)
        scratch = out.method.export_backbone()
        rows["scratch"] = {
            **_evaluate(scratch, scratch.metadata(), data, a.seed),
            "backbone": a.student,
            "steps": a.student_steps,
            "seconds": round(time.perf_counter() - t0, 1),
        }

        # reference: raw pixels, same protocols, same images
        xtr, ytr, xte, yte = data
        ptr, pte = FeatureSet.from_pixels(xtr, ytr), FeatureSet.from_pixels(xte, yte)
        knn = knn_classify(ptr.cls, ytr, pte.cls, yte, ks=[20], temperature=0.07)
        lin = linear_protocol(ptr, pte, epochs=10, seed=a.seed, num_classes=10)
        rows["raw pixels"] = {
            "knn_top1": round(knn.top1[20], 4),
            "linear_top1": round(lin.test_top1, 4),
            "backbone": "-",
            "steps": 0,
            "seconds": 0.0,
            "probe": lin.selection.best.name,
        }
    finally:
        stack.close()  # stops a private embedded store (also on SIGTERM, see bench_store)

    print(
        f"\nFashion-MNIST: train on {a.train_images} images, k-NN memory {a.eval_train_images}, test {a.eval_test_images}"
    )
    print(f"{'model':<11} {'backbone':<16} {'steps':>6} {'seconds':>8} {'k-NN@20':>8} {'linear':>7}  probe")
    for name, r in rows.items():
        print(
            f"{name:<11} {r['backbone']:<16} {r['steps']:>6} {r['seconds']:>8} {r['knn_top1']:>8.4f} "
            f"{r['linear_top1']:>7.4f}  {r['probe']}"
        )
    d, s = rows["distilled"], rows["scratch"]
    verdict = (
        "holds" if d["knn_top1"] > s["knn_top1"] and d["linear_top1"] > s["linear_top1"] else "does NOT hold"
    )
    print(f"claim (distilled beats scratch on both k-NN and linear at equal student compute): {verdict}")
    print(
        json.dumps(
            {
                "distilled_knn_top1": d["knn_top1"],
                "scratch_knn_top1": s["knn_top1"],
                "distilled_linear_top1": d["linear_top1"],
                "scratch_linear_top1": s["linear_top1"],
                "teacher_knn_top1": rows["teacher"]["knn_top1"],
                "teacher_linear_top1": rows["teacher"]["linear_top1"],
                "raw_pixels_knn_top1": rows["raw pixels"]["knn_top1"],
                "raw_pixels_linear_top1": rows["raw pixels"]["linear_top1"],
                "teacher_backbone": rows["teacher"]["backbone"],
                "teacher_uri": a.teacher_uri,  # None: pretrained in this run (teacher_steps)
                "student_backbone": a.student,
                "teacher_steps": rows["teacher"]["steps"],
                "student_steps": a.student_steps,
                "batch_size": a.batch_size,
                "train_images": a.train_images,
                "distill_seconds": d["seconds"],
                "scratch_seconds": s["seconds"],
                "teacher_seconds": rows["teacher"]["seconds"],
            }
        )
    )


if __name__ == "__main__":
    main()
