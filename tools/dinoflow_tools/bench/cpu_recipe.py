"""``dinoflow bench cpu-recipe``: DINOv2 pretraining on Fashion-MNIST on the CPU, then weighted k-NN
(k=20, T=0.07, cosine) of the teacher's CLS features on the 10,000 test images.

Raw pixels give 84.3 % (FACTS.md); the target is >= 88 % within 60 min on 2 cores.
Then the evaluate stage's linear probe (selected on held-out train). Last output line: JSON with
``knn_top1`` and ``linear_top1`` (fractions), ``knn_top1_init``, ``wall_seconds``.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from dinoflow.eval.knn import FASHION_MNIST_RAW_PIXEL_KNN_TOP1

VAL_SPLIT = 50_000  # --eval-on val: train[:50k] trains and is the memory bank, train[50k:] queries


def _features(backbone, train_x, train_y, test_x, test_y, n_last_blocks: int):
    import torch

    from dinoflow.eval.features import extract_features

    meta = backbone.metadata()
    with torch.no_grad():
        tr = extract_features(backbone, train_x, train_y, meta, batch_size=1000, n_last_blocks=n_last_blocks)
        te = extract_features(backbone, test_x, test_y, meta, batch_size=1000, n_last_blocks=n_last_blocks)
    return tr, te


def knn_top1(backbone, train_x, train_y, test_x, test_y, k: int = 20) -> float:
    """Weighted k-NN top-1 on the CLS token, with the evaluate stage's feature extraction and k-NN."""
    from dinoflow.eval.knn import knn_classify

    tr, te = _features(backbone, train_x, train_y, test_x, test_y, n_last_blocks=1)
    return float(knn_classify(tr.cls, tr.labels, te.cls, te.labels, ks=[k], temperature=0.07).top1[k])


def linear_top1(backbone, train_x, train_y, test_x, test_y) -> tuple[float, str]:
    """The evaluate stage's linear probe (DINOv2: the last blocks' CLS tokens with the average-pooled
    patch tokens, learning rate and input chosen on held-out TRAIN, scored once on the queries)."""
    from dinoflow.eval.features import N_LAST_BLOCKS
    from dinoflow.eval.protocols import linear_from_params

    tr, te = _features(backbone, train_x, train_y, test_x, test_y, n_last_blocks=N_LAST_BLOCKS)
    rep = linear_from_params(tr, te, num_classes=10)
    return rep.test_top1, rep.selection.best.name


def _pixel_knn(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    """The same weighted k-NN on raw pixels (the bar to clear), on the splits this run reports."""
    from dinoflow.eval.knn import knn_classify

    flat = lambda x: x.flatten(1).float()  # noqa: E731
    return float(knn_classify(flat(train_x), train_y, flat(test_x), test_y, ks=[k], temperature=0.07).top1[k])


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def apply_overrides(cfg, assignments: list[str]):  # TrainConfig in and out
    """``["dinov2.momentum_start=0.95", "batch_size=64"]`` applied to a ``TrainConfig`` (revalidated,
    so a wrong key or value fails with pydantic's message naming it)."""
    from dinoflow.errors import SpecError
    from dinoflow.train.config import TrainConfig

    data = cfg.model_dump()
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as a backbone name
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SpecError(f"--set {key}: {part!r} is not a section of the training config")
            node = node[part]
        if leaf not in node:
            raise SpecError(f"--set {key}: no field {leaf!r} (see `dinoflow schema pretrain`)")
        node[leaf] = value
    if any(item.startswith("steps=") for item in assignments):
        data["epochs"] = None
    return TrainConfig.model_validate(data)


def main(argv: list[str]) -> None:
    import torch

    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow.train.presets import PRESETS, get_preset
    from dinoflow_tools.bench._store import bench_store

    p = argparse.ArgumentParser(prog="dinoflow bench cpu-recipe", description=__doc__)
    p.add_argument("--preset", default="fashion-mnist-cpu", choices=sorted(PRESETS))
    p.add_argument("--epochs", type=float, default=None, help="override the preset's epochs")
    p.add_argument("--steps", type=int, default=None, help="override: a fixed number of steps")
    p.add_argument("--train-images", type=int, default=60000, help="pretrain on the first N train images")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any preset field, dotted for nested ones (JSON values): "
        "--set batch_size=64 --set dinov2.momentum_start=0.95",
    )
    p.add_argument(
        "--eval-on",
        choices=["test", "val"],
        default="test",
        help="test: k-NN of the 10k test images against the 60k train images (the reported figure); "
        "val: pretrain on train[:50k] only and k-NN of train[50k:] against train[:50k] (for sweeps: "
        "choose settings here, never on the test images)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-init", action="store_true", help="skip the k-NN of the untrained teacher")
    p.add_argument("--skip-linear", action="store_true", help="skip the linear probe (k-NN only)")
    p.add_argument("--output-uri", default=None, help="s3:// prefix (default: a fresh one on the store)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    over = {}
    if a.epochs is not None:
        over["epochs"] = a.epochs
    if a.steps is not None:
        over.update(steps=a.steps, epochs=None)
    cfg = apply_overrides(get_preset(a.preset, **over), a.set)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    train_x = torch.from_numpy(xtr.copy()).unsqueeze(1)
    test_x = torch.from_numpy(xte.copy()).unsqueeze(1)
    train_y, test_y = torch.from_numpy(ytr.copy()), torch.from_numpy(yte.copy())
    if a.eval_on == "val":  # the last 10k train images are the queries, never trained on
        test_x, test_y = train_x[VAL_SPLIT:], train_y[VAL_SPLIT:]
        train_x, train_y = train_x[:VAL_SPLIT], train_y[:VAL_SPLIT]

    with bench_store() as store:
        _run(a, cfg, store, train_x, train_y, test_x, test_y, t_start)


def _run(a, cfg, store, train_x, train_y, test_x, test_y, t_start: float) -> None:
    import torch

    from dinoflow.models.export import export_backbone, export_heads
    from dinoflow.storage import join_uri
    from dinoflow.train.trainer import build_method, train

    out_uri = a.output_uri or f"s3://bench-{uuid.uuid4().hex[:10]}/cpu-recipe"

    init_acc = float("nan")
    pixel_acc = _pixel_knn(train_x, train_y, test_x, test_y)
    print(f"k-NN top-1 of raw pixels on these splits: {pixel_acc:.4f}")
    if not a.skip_init:
        torch.manual_seed(cfg.seed)
        init_acc = knn_top1(build_method(cfg).export_backbone(), train_x, train_y, test_x, test_y)
        print(f"k-NN top-1 of the untrained teacher: {init_acc:.4f}")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = train(cfg, train_x[: a.train_images], store, out_uri)
    train_s, train_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    t1 = time.perf_counter()
    teacher = out.method.export_backbone()
    acc = knn_top1(teacher, train_x, train_y, test_x, test_y)
    lin_acc, lin_cfg = (float("nan"), "")
    if not a.skip_linear:
        lin_acc, lin_cfg = linear_top1(teacher, train_x, train_y, test_x, test_y)
    eval_s = time.perf_counter() - t1
    # kept for later use (e.g. `dinoflow bench distill --teacher-uri`), in the stages' export format
    backbone_uri = export_backbone(store, join_uri(out_uri, "backbone"), teacher, {"method": cfg.method})
    export_heads(store, backbone_uri, out.method.head_state())
    wall = time.perf_counter() - t_start
    print(f"{'preset':<24}{a.preset}")
    print(f"{'backbone':<24}{cfg.backbone}")
    print(f"{'steps x batch':<24}{out.steps} x {cfg.batch_size}")
    print(f"{'train seconds':<24}{train_s:.0f}")
    print(f"{'k-NN top-1 init':<24}{init_acc:.4f}")
    where = "test" if a.eval_on == "test" else "validation: train[50k:] vs train[:50k]"
    print(
        f"{'k-NN top-1 trained':<24}{acc:.4f} on {where}   (raw pixels on test {FASHION_MNIST_RAW_PIXEL_KNN_TOP1})"
    )
    print(f"{'linear top-1 trained':<24}{lin_acc:.4f} ({lin_cfg or 'skipped'})")
    print(f"{'wall seconds':<24}{wall:.0f}")
    print(
        json.dumps(
            {
                "preset": a.preset,
                "overrides": a.set,
                "backbone": cfg.backbone,
                "steps": out.steps,
                "batch_size": cfg.batch_size,
                "knn_top1": round(acc, 4),
                "knn_top1_init": round(init_acc, 4),
                "linear_top1": round(lin_acc, 4),
                "linear_config": lin_cfg,
                "raw_pixel_knn_top1": round(pixel_acc, 4),
                "train_seconds": round(train_s, 1),
                # CPU time of this process and its finished children (DataLoader workers): the
                # training's cost independent of other load on the machine
                "train_cpu_seconds": round(train_cpu, 1),
                "eval_on": a.eval_on,
                "eval_seconds": round(eval_s, 1),
                "wall_seconds": round(wall, 1),
                "threads": a.threads,
                "backbone_uri": backbone_uri,
            }
        )
    )
