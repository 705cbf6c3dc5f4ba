"""evaluate: frozen-feature k-NN and linear probes (the DINOv2 protocols), report and model card.

Reads an exported backbone and two labelled manifests; writes under ``output_uri``:
``report.html`` (self-contained), ``model_card.md``, ``metrics.json`` and, unless ``feature_cache_uri``
points elsewhere, ``features/{split}-{key}.safetensors`` (reused by any later evaluation of the same
backbone on the same data). Model selection uses a held-out part of TRAIN only.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, field_validator

from dinoflow.stages.base import StageResult, StageSpec

log = logging.getLogger(__name__)


class EvaluateSpec(StageSpec):
    """Evaluate a backbone's frozen features on a labelled train/test pair."""

    backbone_uri: str = Field(
        ..., description="prefix of an exported backbone (backbone.json + .safetensors)"
    )
    train_manifest_uri: str = Field(..., description="labelled manifest: k-NN memory bank, probe training")
    test_manifest_uri: str = Field(..., description="labelled manifest: scored once, never used to select")
    knn_k: list[int] = Field(
        default_factory=lambda: [10, 20, 100, 200], min_length=1, description="DINOv2 k-NN protocol"
    )
    knn_temperature: float = Field(0.07, gt=0, description="DINOv2 k-NN protocol")
    linear_lrs: list[float] = Field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0],
        min_length=1,
        description="linear-probe learning rates (a coarse slice of DINOv2's 1e-5..0.1 grid, shifted up for short runs)",
    )
    linear_epochs: int = Field(10, ge=1, description="epochs of SGD per probe")
    logreg_cs: list[float] = Field(
        default_factory=lambda: [0.01, 0.1, 1.0], min_length=1, description="inverse L2 strengths tried"
    )
    logreg_max_iter: int = Field(200, ge=1, description="L-BFGS iterations per fit")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="part of TRAIN held out for model selection")
    max_train_images: int | None = Field(None, ge=10, description="seeded random subset of train (CPU runs)")
    max_test_images: int | None = Field(None, ge=1, description="seeded random subset of test (CPU runs)")
    batch_size: int = Field(256, ge=1, description="images per forward pass when extracting features")
    baseline: bool = Field(True, description="also run every protocol on raw pixels (the reference)")
    baseline_size_px: int = Field(
        28, ge=4, description="raw-pixel baseline resolution (Fashion-MNIST native: 28)"
    )
    class_names: list[str] = Field(
        default_factory=list, description="index = label; empty: taken from the ingest run, else 'class i'"
    )
    training_uri: str | None = Field(
        None, description="output prefix of the pretrain/distill run that made the backbone (curves, budget)"
    )
    curves_uri: str | None = Field(None, description="training-curves JSON (default: the training run's)")
    feature_cache_uri: str | None = Field(
        None, description="feature cache prefix (default {output_uri}/features)"
    )
    model_name: str = Field(
        "dinoflow-backbone", min_length=1, description="name on the report and model card"
    )
    report_examples: int = Field(8, ge=1, le=64, description="test images shown for retrieval and PCA")
    seed: int = 0

    @field_validator("knn_k")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if min(v) < 1:
            raise ValueError(f"every k must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("linear_lrs", "logreg_cs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if min(v) <= 0:
            raise ValueError(f"every value must be > 0, got {v}")
        return v


class EvaluateResult(StageResult):
    """What the component layer turns into KFP Metrics / ClassificationMetrics / HTML / Markdown."""

    backbone_uri: str
    metrics: dict[str, float] = Field(
        ...,
        description="top-1 in [0,1]: knn_top1 (k=20, DINO's headline), knn_top1_k{k}, linear_top1, logreg_top1",
    )
    baseline_metrics: dict[str, float] = Field(
        default_factory=dict, description="the same protocols on raw pixels"
    )
    linear_config: str = Field(..., description="probe chosen on held-out train")
    linear_val_top1: dict[str, float] = Field(
        default_factory=dict, description="held-out-train top-1 per probe"
    )
    logreg_c: float
    confusion_matrix: list[list[int]] = Field(..., description="rows = true class, columns = predicted")
    confusion_protocol: str
    class_names: list[str]
    num_train: int
    num_test: int
    report_uri: str
    model_card_uri: str
    metrics_uri: str
    feature_uris: dict[str, str]
    feature_cache_hit: bool


def _subset(table: Any, limit: int | None, seed: int) -> Any:
    import numpy as np

    if limit is None or table.num_rows <= limit:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=limit, replace=False))
    return table.take(idx)


def _class_names(spec: EvaluateSpec, store: Any, n: int) -> list[str]:
    if spec.class_names:
        return list(spec.class_names)
    # Manifests from the ingest stage sit at {ingest_output}/{split}/manifest.parquet.
    parent = spec.train_manifest_uri.rsplit("/", 2)[0]
    try:
        marker = store.read_success(parent)
    except Exception:  # noqa: BLE001 — any failure just means "no names recorded"
        marker = None
    names = (
        (marker or {}).get("spec", {}).get("label_names") if (marker or {}).get("stage") == "ingest" else None
    )
    if names and len(names) >= n:
        return list(names)
    return [f"class {i}" for i in range(n)]


def _read_json_or_lines(data: bytes) -> Any:
    """A JSON document, or JSON Lines (the trainer's ``curves.jsonl``) as a list of rows."""
    import json

    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _parse_curves(obj: Any) -> dict[str, tuple[list[float], list[float]]]:
    """Accept {"step": [...], "loss": [...]} or [{"step": s, "loss": l, ...}, ...]."""
    if isinstance(obj, dict) and "curves" in obj:
        obj = obj["curves"]
    rows: list[dict[str, Any]] = []
    if isinstance(obj, list):
        rows = [r for r in obj if isinstance(r, dict)]
    elif isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        n = max((len(v) for v in lists.values()), default=0)
        rows = [{k: v[i] for k, v in lists.items() if i < len(v)} for i in range(n)]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(rows):
        step = r.get("step", i)
        for k, v in r.items():
            if k in (
                "step",
                "time",
                "seconds",
                "step_seconds",
                "epoch",
                "lr",
                "wd",
                "teacher_temp",
                "ema_momentum",
            ):
                continue
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(float(step))
            ys.append(float(v))
    return out


def _training_info(spec: EvaluateSpec, store: Any) -> tuple[dict[str, Any], str | None]:
    if not spec.training_uri:
        return {}, spec.curves_uri
    marker = store.read_success(spec.training_uri)
    if marker is None:
        from dinoflow.errors import SpecError

        raise SpecError(f"training_uri {spec.training_uri} holds no finished run (_SUCCESS missing)")
    s, r = marker.get("spec", {}), marker.get("result", {})
    info = {"stage": marker.get("stage")}
    for k in (
        "method",
        "backbone",
        "students",
        "teacher_uri",
        "steps",
        "batch_size",
        "manifest_uri",
        "nproc",
        "nnodes",
    ):
        if k in s:
            info[k] = s[k]
    for k in ("final_loss", "seconds"):
        if k in r:
            info[k if k != "seconds" else "wall_seconds"] = r[k]
    return info, spec.curves_uri or r.get("curves_uri")


def run(spec: EvaluateSpec, store: Any) -> EvaluateResult:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dinoflow import metrics as prom
    from dinoflow.data.dataset import load_images
    from dinoflow.data.manifest import read_manifest
    from dinoflow.errors import SpecError
    from dinoflow.eval.card import CardData, render_card
    from dinoflow.eval.features import (
        FeatureSet,
        available_blocks,
        cache_key,
        cached_features,
        extract_features,
        patch_tokens,
    )
    from dinoflow.eval.knn import knn_classify
    from dinoflow.eval.linear import linear_protocol, select_logistic_regression
    from dinoflow.eval.report import ReportData, pca_panel, pca_rgb, render_report, retrieval_grid
    from dinoflow.models import load_backbone
    from dinoflow.storage.client import join_uri

    # -- inputs, checked before any heavy work ----------------------------------------------------
    backbone = load_backbone(store, spec.backbone_uri)
    meta = store.get_json(join_uri(spec.backbone_uri, "backbone.json"))
    tables = {
        "train": _subset(read_manifest(store, spec.train_manifest_uri), spec.max_train_images, spec.seed),
        "test": _subset(read_manifest(store, spec.test_manifest_uri), spec.max_test_images, spec.seed + 1),
    }
    for split, t in tables.items():
        unlabelled = int((t.column("label").to_numpy(zero_copy_only=False) < 0).sum())
        if unlabelled:
            raise SpecError(
                f"{split} manifest has {unlabelled} unlabelled rows (label -1): evaluation needs labels"
            )
    n_train = tables["train"].num_rows
    n_fit = n_train - max(1, round(n_train * spec.heldout_fraction))
    if max(spec.knn_k) > n_train:
        raise SpecError(
            f"knn_k={max(spec.knn_k)} exceeds the {n_train} train images; lower knn_k or add data"
        )
    if n_fit < 2:
        raise SpecError(
            f"train split of {n_train} images is too small to hold out {spec.heldout_fraction:.0%}"
        )
    training, curves_uri = _training_info(spec, store)
    torch.manual_seed(spec.seed)

    # -- features, extracted once per (backbone, data) and cached ---------------------------------
    n_last = min(4, available_blocks(backbone))  # DINOv2 linear eval: last 1 or 4 blocks
    cache = spec.feature_cache_uri or spec.out("features")
    bb_version = [
        store.stat(join_uri(spec.backbone_uri, f))["etag"] for f in ("backbone.safetensors", "backbone.json")
    ]
    images: dict[str, torch.Tensor] = {}
    labels: dict[str, torch.Tensor] = {}
    feats: dict[str, FeatureSet] = {}
    feature_uris: dict[str, str] = {}
    hits = []
    for split, t in tables.items():
        src = spec.train_manifest_uri if split == "train" else spec.test_manifest_uri
        imgs, labs = load_images(store, t, channels=backbone.in_chans, size_px=backbone.img_size)
        images[split], labels[split] = imgs, labs
        key = cache_key(
            backbone=bb_version,
            manifest=src,
            manifest_etag=store.stat(src)["etag"],
            rows=t.column("key").to_pylist()[:3] + [t.num_rows],
            limit=spec.max_train_images if split == "train" else spec.max_test_images,
            seed=spec.seed,
            n_last=n_last,
            v=1,
        )
        uri = join_uri(cache, f"{split}-{key}.safetensors")
        feature_uris[split] = uri
        fs, hit = cached_features(
            store,
            uri,
            lambda imgs=imgs, labs=labs: extract_features(
                backbone, imgs, labs, meta, spec.batch_size, n_last
            ),
        )
        feats[split] = fs
        hits.append(hit)
        prom.IMAGES_PROCESSED.labels(stage="evaluate").inc(0 if hit else len(fs))
    num_classes = int(max(labels["train"].max(), labels["test"].max())) + 1
    class_names = _class_names(spec, store, num_classes)

    # -- the protocols, on the backbone and on raw pixels ------------------------------------------
    def protocols(train: FeatureSet, test: FeatureSet) -> tuple[dict[str, float], Any, Any, Any]:
        knn = knn_classify(
            train.cls, train.labels, test.cls, test.labels, spec.knn_k, spec.knn_temperature, num_classes
        )
        lin = linear_protocol(
            train,
            test,
            spec.linear_lrs,
            spec.linear_epochs,
            256,
            spec.heldout_fraction,
            spec.seed,
            num_classes,
        )
        lr_x = train.linear_input(1, train.patch_mean is not None)
        lr = select_logistic_regression(
            lr_x, train.labels, spec.logreg_cs, spec.heldout_fraction, spec.seed, spec.logreg_max_iter
        )
        lr_pred = lr.predict(test.linear_input(1, test.patch_mean is not None))
        out = {f"knn_top1_k{k}": v for k, v in knn.top1.items()}
        out["knn_top1"] = knn.top1[20 if 20 in knn.top1 else knn.ks[0]]  # DINO's headline k-NN is k=20
        out["linear_top1"] = lin.test_top1
        out["logreg_top1"] = float((lr_pred == test.labels).float().mean())
        return out, knn, lin, lr

    result_metrics, knn, lin, lr = protocols(feats["train"], feats["test"])
    baseline: dict[str, float] = {}
    if spec.baseline:

        def px(x: torch.Tensor) -> torch.Tensor:
            s = spec.baseline_size_px
            if x.shape[-1] != s or x.shape[-2] != s:
                x = (
                    F.interpolate(x.float(), size=(s, s), mode="bilinear", antialias=True)
                    .round()
                    .clamp(0, 255)
                )
            return x

        baseline, *_ = protocols(
            FeatureSet.from_pixels(px(images["train"]), labels["train"]),
            FeatureSet.from_pixels(px(images["test"]), labels["test"]),
        )
    for name, v in result_metrics.items():
        prom.EVAL_TOP1.labels(protocol=name).set(v)

    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels["test"].numpy(), lin.test_predictions.numpy()), 1)

    # -- report pieces -----------------------------------------------------------------------------
    n_ex = min(spec.report_examples, len(feats["test"]))
    ex = torch.randperm(len(feats["test"]), generator=torch.Generator().manual_seed(spec.seed))[:n_ex]
    nb = knn.neighbours[ex, :5]
    retrieval = retrieval_grid(
        images["test"][ex].numpy(),
        images["train"][nb].numpy(),
        labels["test"][ex].tolist(),
        labels["train"][nb].tolist(),
    )
    tokens = patch_tokens(backbone, images["test"][ex], meta).numpy()
    rgb = pca_rgb(tokens, backbone.patch_grid(backbone.img_size, backbone.img_size))
    pca = pca_panel(images["test"][ex].numpy(), rgb)
    curves: dict[str, tuple[list[float], list[float]]] = {}
    if curves_uri:
        try:
            curves = _parse_curves(_read_json_or_lines(store.get_bytes(curves_uri)))
        except Exception as e:  # noqa: BLE001 — a missing curve file must not sink the evaluation
            log.warning("could not read training curves at %s: %s", curves_uri, e)
    details = {
        "linear probe chosen on held-out train": f"{lin.selection.best.name} "
        f"(held-out top-1 {100 * lin.selection.val_top1[lin.selection.best.name]:.1f}%)",
        "logistic regression C chosen on held-out train": f"{lr.best_c:g}",
        "train / held-out / test images": f"{n_train - len(lin.selection.heldout_indices)} / "
        f"{len(lin.selection.heldout_indices)} / {len(feats['test'])}",
        "k-NN": f"cosine, T={spec.knn_temperature:g}, k in {spec.knn_k}",
        **{f"training {k}": v for k, v in training.items()},
    }
    report_uri = spec.out("report.html")
    card_uri = spec.out("model_card.md")
    metrics_uri = spec.out("metrics.json")
    html = render_report(
        ReportData(
            title=f"dinoflow evaluation: {spec.model_name}",
            backbone=meta,
            metrics=result_metrics,
            baseline=baseline,
            class_names=class_names,
            confusion=cm.tolist(),
            confusion_protocol=f"linear probe {lin.selection.best.name}",
            curves=curves,
            retrieval=retrieval,
            pca=pca,
            details=details,
        )
    )
    store.put_bytes(report_uri, html.encode(), "text/html")
    card = render_card(
        CardData(
            model_name=spec.model_name,
            backbone_uri=spec.backbone_uri,
            backbone=meta,
            train_manifest_uri=spec.train_manifest_uri,
            test_manifest_uri=spec.test_manifest_uri,
            num_train=n_train,
            num_test=len(feats["test"]),
            class_names=class_names,
            metrics=result_metrics,
            baseline=baseline,
            selection={k: v for k, v in details.items() if not k.startswith("training")},
            training=training,
            report_uri=report_uri,
        )
    )
    store.put_bytes(card_uri, card.encode(), "text/markdown")
    store.put_json(metrics_uri, {"metrics": result_metrics, "baseline": baseline})
    prom.push_metrics("dinoflow-evaluate")
    return EvaluateResult(
        output_uri=spec.output_uri,
        backbone_uri=spec.backbone_uri,
        metrics={k: round(v, 6) for k, v in result_metrics.items()},
        baseline_metrics={k: round(v, 6) for k, v in baseline.items()},
        linear_config=lin.selection.best.name,
        linear_val_top1={k: round(v, 6) for k, v in lin.selection.val_top1.items()},
        logreg_c=lr.best_c,
        confusion_matrix=cm.tolist(),
        confusion_protocol=f"linear probe {lin.selection.best.name}",
        class_names=class_names,
        num_train=n_train,
        num_test=len(feats["test"]),
        report_uri=report_uri,
        model_card_uri=card_uri,
        metrics_uri=metrics_uri,
        feature_uris=feature_uris,
        feature_cache_hit=all(hits),
    )
