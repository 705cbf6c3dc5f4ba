"""evaluate: frozen-feature k-NN and linear probes (the DINOv2 protocols), report and model card.

Reads an exported backbone and two labelled manifests; writes under ``output_uri``:
``report.html`` (self-contained), ``model_card.md``, ``metrics.json`` and, unless ``feature_cache_uri``
points elsewhere, ``features/{split}-{key}.safetensors`` (reused by any later evaluation of the same
backbone on the same data). Model selection uses a held-out part of TRAIN only.

The protocols themselves are plain functions in ``dinoflow.eval.protocols``; the curves are read in
the trainer's one format (``dinoflow.eval.curves``). This stage keeps the I/O, the cache and the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

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
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where features are extracted; auto: cuda when available"
    )
    baseline: bool = Field(True, description="also run every protocol on raw pixels (the reference)")
    baseline_size_px: int | None = Field(
        None, ge=4, description="raw-pixel baseline resolution (default: the backbone's input size)"
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
    from dinoflow.errors import StorageError

    if spec.class_names:
        return list(spec.class_names)
    # Manifests from the ingest stage sit at {ingest_output}/{split}/manifest.parquet.
    parent = spec.train_manifest_uri.rsplit("/", 2)[0]
    try:
        marker = store.read_success(parent)
    except (StorageError, ValueError):  # no readable ingest record just means "no names recorded"
        marker = None
    names = (
        (marker or {}).get("spec", {}).get("label_names") if (marker or {}).get("stage") == "ingest" else None
    )
    if names and len(names) >= n:
        return list(names)
    return [f"class {i}" for i in range(n)]


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


@dataclass
class _Inputs:
    """The backbone and the two labelled tables, checked before any heavy work."""

    backbone: Any
    meta: dict[str, Any]
    tables: dict[str, Any]  # split -> pyarrow table
    training: dict[str, Any]
    curves_uri: str | None


@dataclass
class _Features:
    """Per split: decoded images, labels, features (from the cache when there) and their URIs."""

    images: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    feats: dict[str, Any] = field(default_factory=dict)
    uris: dict[str, str] = field(default_factory=dict)
    hits: list[bool] = field(default_factory=list)
    data_keys: dict[str, str] = field(default_factory=dict)  # the split's images, whatever the backbone


def _load_inputs(spec: EvaluateSpec, store: Any) -> _Inputs:
    from dinoflow.data.manifest import read_manifest
    from dinoflow.errors import SpecError
    from dinoflow.models import load_backbone
    from dinoflow.storage.client import join_uri

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
    return _Inputs(backbone, meta, tables, training, curves_uri)


def _features(spec: EvaluateSpec, store: Any, inp: _Inputs) -> _Features:
    """Features extracted once per (backbone, data) and cached in object storage."""
    from dinoflow import metrics as prom
    from dinoflow.data.dataset import load_images
    from dinoflow.eval.features import available_blocks, cache_key, cached_features, extract_features
    from dinoflow.storage.client import join_uri

    backbone = inp.backbone.to(_device(spec.device))
    n_last = min(4, available_blocks(backbone))  # DINOv2 linear eval: last 1 or 4 blocks
    cache = spec.feature_cache_uri or spec.out("features")
    bb_version = [
        store.stat(join_uri(spec.backbone_uri, f))["etag"] for f in ("backbone.safetensors", "backbone.json")
    ]
    out = _Features()
    for split, t in inp.tables.items():
        src = spec.train_manifest_uri if split == "train" else spec.test_manifest_uri
        imgs, labs = load_images(store, t, channels=backbone.in_chans, size_px=backbone.img_size)
        out.images[split], out.labels[split] = imgs, labs
        data = {
            "manifest": src,
            "manifest_etag": store.stat(src)["etag"],
            "rows": t.column("key").to_pylist()[:3] + [t.num_rows],
            "limit": spec.max_train_images if split == "train" else spec.max_test_images,
            "seed": spec.seed,
        }
        out.data_keys[split] = cache_key(**data)
        key = cache_key(backbone=bb_version, **data, n_last=n_last, v=1)
        uri = join_uri(cache, f"{split}-{key}.safetensors")
        out.uris[split] = uri
        fs, hit = cached_features(
            store,
            uri,
            lambda imgs=imgs, labs=labs: extract_features(
                backbone, imgs, labs, inp.meta, spec.batch_size, n_last
            ),
        )
        out.feats[split] = fs
        out.hits.append(hit)
        prom.IMAGES_PROCESSED.labels(stage="evaluate").inc(0 if hit else len(fs))
    inp.backbone = backbone.to("cpu")  # the report's few examples run on the CPU
    return out


def _device(want: str) -> str:
    import torch

    from dinoflow.errors import SpecError

    if want == "cuda" and not torch.cuda.is_available():
        raise SpecError("evaluate spec asks for device 'cuda' but no CUDA device is visible")
    return "cuda" if want != "cpu" and torch.cuda.is_available() else "cpu"


def _protocol_params(spec: EvaluateSpec):
    from dinoflow.eval.protocols import ProtocolParams

    return ProtocolParams(
        knn_k=tuple(spec.knn_k),
        knn_temperature=spec.knn_temperature,
        linear_lrs=tuple(spec.linear_lrs),
        linear_epochs=spec.linear_epochs,
        logreg_cs=tuple(spec.logreg_cs),
        logreg_max_iter=spec.logreg_max_iter,
        heldout_fraction=spec.heldout_fraction,
        seed=spec.seed,
    )


def _curves(store: Any, curves_uri: str | None) -> dict[str, tuple[list[float], list[float]]]:
    from dinoflow.errors import DinoflowError
    from dinoflow.eval.curves import parse_curves

    if not curves_uri:
        return {}
    try:
        return parse_curves(store.get_bytes(curves_uri), curves_uri)
    except DinoflowError as e:  # a missing or unreadable curve file must not sink the evaluation
        log.warning("could not read training curves at %s: %s", curves_uri, e)
        return {}


def _report_images(spec: EvaluateSpec, inp: _Inputs, f: _Features, knn: Any) -> tuple[Any, Any]:
    """The retrieval grid (test queries and their nearest train images) and the PCA panel."""
    import torch

    from dinoflow.eval.features import patch_tokens
    from dinoflow.eval.report import pca_panel, pca_rgb, retrieval_grid

    backbone = inp.backbone
    n_ex = min(spec.report_examples, len(f.feats["test"]))
    ex = torch.randperm(len(f.feats["test"]), generator=torch.Generator().manual_seed(spec.seed))[:n_ex]
    nb = knn.neighbours[ex, :5]
    retrieval = retrieval_grid(
        f.images["test"][ex].numpy(),
        f.images["train"][nb].numpy(),
        f.labels["test"][ex].tolist(),
        f.labels["train"][nb].tolist(),
    )
    tokens = patch_tokens(backbone, f.images["test"][ex], inp.meta).numpy()
    rgb = pca_rgb(tokens, backbone.patch_grid(backbone.img_size, backbone.img_size))
    return retrieval, pca_panel(f.images["test"][ex].numpy(), rgb)


@dataclass
class _Outcome:
    """What the protocols gave, for the report, the card and the result."""

    metrics: dict[str, float]
    baseline: dict[str, float]
    protocols: Any  # ProtocolResults on the backbone's features
    confusion: Any  # int64 [C, C]
    class_names: list[str]
    details: dict[str, str]


def _pixel_baseline(
    spec: EvaluateSpec, store: Any, f: _Features, num_classes: int, params: Any
) -> dict[str, float]:
    """Every protocol on raw pixels. It depends on the images and the protocol settings alone, not on
    the backbone, so it is cached as JSON beside the features: evaluations that share a
    ``feature_cache_uri`` (the teacher's and the students' in one run, a retrain on the same test
    split) compute it once."""
    import dataclasses
    import json

    from dinoflow.errors import DinoflowError
    from dinoflow.eval.features import cache_key
    from dinoflow.eval.protocols import pixel_features, run_protocols
    from dinoflow.storage.client import join_uri

    size = {split: spec.baseline_size_px or f.images[split].shape[-1] for split in ("train", "test")}
    key = cache_key(
        data=[f.data_keys["train"], f.data_keys["test"]],
        size_px=size,
        num_classes=num_classes,
        params=dataclasses.asdict(params),
        v=1,
    )
    uri = join_uri(spec.feature_cache_uri or spec.out("features"), f"pixel-baseline-{key}.json")
    if store.exists(uri):
        try:
            got = json.loads(store.get_bytes(uri))
            cached = {str(k): float(v) for k, v in got["metrics"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DinoflowError(
                f"{uri}: not a pixel-baseline cache entry ({e}); delete it to recompute"
            ) from e
        log.info("pixel baseline: cache hit %s", uri)
        return cached
    metrics = run_protocols(
        pixel_features(f.images["train"], f.labels["train"], size["train"]),
        pixel_features(f.images["test"], f.labels["test"], size["test"]),
        num_classes,
        params,
    ).metrics
    store.put_bytes(uri, json.dumps({"metrics": metrics}, sort_keys=True).encode())
    return metrics


def _score(spec: EvaluateSpec, store: Any, inp: _Inputs, f: _Features) -> _Outcome:
    """Every protocol on the backbone's features and (when asked) on raw pixels."""
    from dinoflow import metrics as prom
    from dinoflow.eval.protocols import confusion_matrix, run_protocols

    num_classes = int(max(f.labels["train"].max(), f.labels["test"].max())) + 1
    params = _protocol_params(spec)
    res = run_protocols(f.feats["train"], f.feats["test"], num_classes, params)
    baseline: dict[str, float] = {}
    if spec.baseline:
        baseline = _pixel_baseline(spec, store, f, num_classes, params)
    for name, v in res.metrics.items():
        prom.EVAL_TOP1.labels(protocol=name).set(v)
    lin = res.linear
    n_train = inp.tables["train"].num_rows
    details = {
        "linear probe chosen on held-out train": f"{lin.selection.best.name} "
        f"(held-out top-1 {100 * lin.selection.val_top1[lin.selection.best.name]:.1f}%)",
        "logistic regression C chosen on held-out train": f"{res.logreg.best_c:g}",
        "train / held-out / test images": f"{n_train - len(lin.selection.heldout_indices)} / "
        f"{len(lin.selection.heldout_indices)} / {len(f.feats['test'])}",
        "k-NN": f"cosine, T={spec.knn_temperature:g}, k in {spec.knn_k}",
        **{f"training {k}": v for k, v in inp.training.items()},
    }
    return _Outcome(
        metrics=res.metrics,
        baseline=baseline,
        protocols=res,
        confusion=confusion_matrix(f.labels["test"], lin.test_predictions, num_classes),
        class_names=_class_names(spec, store, num_classes),
        details=details,
    )


def _write_report_and_card(
    spec: EvaluateSpec, store: Any, inp: _Inputs, f: _Features, o: _Outcome
) -> tuple[str, str, str]:
    """``report.html``, ``model_card.md`` and ``metrics.json``; returns their URIs."""
    from dinoflow.eval.card import CardData, render_card
    from dinoflow.eval.report import ReportData, render_report

    report_uri, card_uri, metrics_uri = (
        spec.out("report.html"),
        spec.out("model_card.md"),
        spec.out("metrics.json"),
    )
    retrieval, pca = _report_images(spec, inp, f, o.protocols.knn)
    html = render_report(
        ReportData(
            title=f"dinoflow evaluation: {spec.model_name}",
            backbone=inp.meta,
            metrics=o.metrics,
            baseline=o.baseline,
            class_names=o.class_names,
            confusion=o.confusion.tolist(),
            confusion_protocol=f"linear probe {o.protocols.linear.selection.best.name}",
            curves=_curves(store, inp.curves_uri),
            retrieval=retrieval,
            pca=pca,
            details=o.details,
        )
    )
    store.put_bytes(report_uri, html.encode(), "text/html")
    card = render_card(
        CardData(
            model_name=spec.model_name,
            backbone_uri=spec.backbone_uri,
            backbone=inp.meta,
            train_manifest_uri=spec.train_manifest_uri,
            test_manifest_uri=spec.test_manifest_uri,
            num_train=inp.tables["train"].num_rows,
            num_test=len(f.feats["test"]),
            class_names=o.class_names,
            metrics=o.metrics,
            baseline=o.baseline,
            selection={k: v for k, v in o.details.items() if not k.startswith("training")},
            training=inp.training,
            report_uri=report_uri,
        )
    )
    store.put_bytes(card_uri, card.encode(), "text/markdown")
    store.put_json(metrics_uri, {"metrics": o.metrics, "baseline": o.baseline})
    return report_uri, card_uri, metrics_uri


def run(spec: EvaluateSpec, store: Any) -> EvaluateResult:
    import torch

    inp = _load_inputs(spec, store)
    torch.manual_seed(spec.seed)
    f = _features(spec, store, inp)
    o = _score(spec, store, inp, f)
    report_uri, card_uri, metrics_uri = _write_report_and_card(spec, store, inp, f, o)
    best = o.protocols.linear.selection
    return EvaluateResult(
        output_uri=spec.output_uri,
        backbone_uri=spec.backbone_uri,
        metrics={k: round(v, 6) for k, v in o.metrics.items()},
        baseline_metrics={k: round(v, 6) for k, v in o.baseline.items()},
        linear_config=best.best.name,
        linear_val_top1={k: round(v, 6) for k, v in best.val_top1.items()},
        logreg_c=o.protocols.logreg.best_c,
        confusion_matrix=o.confusion.tolist(),
        confusion_protocol=f"linear probe {best.best.name}",
        class_names=o.class_names,
        num_train=inp.tables["train"].num_rows,
        num_test=len(f.feats["test"]),
        report_uri=report_uri,
        model_card_uri=card_uri,
        metrics_uri=metrics_uri,
        feature_uris=f.uris,
        feature_cache_hit=all(f.hits),
    )
