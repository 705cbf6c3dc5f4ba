"""``dinoflow demo`` (``make demo``): the full pipeline through ``kfp.local`` on the embedded store.

Fashion-MNIST is ingested, embedded with a bootstrapped embedder, deduplicated (and decontaminated
against its test split), curated, pretrained on, distilled, evaluated and promoted, with a CPU-sized
configuration (``dinoflow.kfp.configs.demo_arguments``). Prints each stage's duration and the final
metrics and writes ``summary.json`` (and ``report.html``) to ``$DINOFLOW_DEMO_OUT`` (default
``./demo-out``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dinoflow.eval.knn import FASHION_MNIST_RAW_PIXEL_KNN_TOP1

log = logging.getLogger(__name__)


def _metric(metrics: dict[str, float], protocol: str) -> float | None:
    """``knn_top1`` / ``linear_top1`` or, failing those names, the best ``<protocol>*top1`` figure."""
    if f"{protocol}_top1" in metrics:
        return metrics[f"{protocol}_top1"]
    cands = [v for k, v in metrics.items() if k.startswith(protocol) and "top1" in k]
    return max(cands) if cands else None


def summarise(run: Any, out: Path, store: Any) -> dict[str, Any]:
    res = {e["task"]: e["result"] for e in run.events}
    ev = res.get("evaluate", {})
    metrics = ev.get("metrics", {})
    counts: dict[str, Any] = {}
    if "ingest" in res:
        counts["ingested"] = res["ingest"].get("counts", {})
        counts["ingested_by_label"] = res["ingest"].get("label_counts", {})
    if "dedup" in res:
        counts["dedup_input"] = res["dedup"].get("input_count")
        counts["dedup_kept"] = res["dedup"].get("kept_count")
    if "curate" in res:
        counts["curated"] = res["curate"].get("count")
    report_html = None
    if ev.get("report_uri"):
        report_html = str(out / "report.html")
        Path(report_html).write_bytes(store.get_bytes(ev["report_uri"]))
    return {
        "stage_seconds": {e["task"]: e["seconds"] for e in run.events},
        "wall_seconds": run.wall_seconds,
        "counts": counts,
        "knn_top1": _metric(metrics, "knn"),
        "linear_top1": _metric(metrics, "linear"),
        "metrics": metrics,
        "promoted": res.get("promote", {}).get("promoted"),
        "champion_uri": res.get("promote", {}).get("champion_uri"),
        "report_html": report_html,
        "raw_pixel_knn_baseline": FASHION_MNIST_RAW_PIXEL_KNN_TOP1,
    }


def run_demo(
    out_dir: str | os.PathLike[str] | None = None, arguments: dict[str, Any] | None = None
) -> dict[str, Any]:
    from dinoflow.data.idx import fashion_mnist_paths
    from dinoflow.kfp.configs import demo_arguments
    from dinoflow.kfp.local import run_pipeline
    from dinoflow.pipelines.full import full
    from dinoflow.storage import ObjectStore, configured_settings
    from dinoflow.storage.embedded import EmbeddedStore

    out = Path(out_dir or os.environ.get("DINOFLOW_DEMO_OUT") or "demo-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    embedded = None
    settings = configured_settings()
    if settings is None:  # a fresh embedded store per demo, so every stage really runs
        shutil.rmtree(out / "store", ignore_errors=True)
        shutil.rmtree(out / "kfp", ignore_errors=True)
        embedded = EmbeddedStore(out / "store")
        settings = embedded.up().settings()
    try:
        store = ObjectStore(settings)
        args = arguments or demo_arguments(
            fashion_mnist_paths(), "s3://dinoflow-demo/runs", f"demo-{int(time.time())}"
        )
        print(
            f"dinoflow demo: full pipeline through kfp.local, store {settings.endpoint}, output {out}",
            flush=True,
        )
        run = run_pipeline(full, args, out / "kfp", settings, caching=False)
        summary = summarise(run, out, store)
    finally:
        if embedded is not None:
            embedded.down()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print_summary(summary, out)
    return summary


def print_summary(summary: dict[str, Any], out: Path) -> None:
    print("\nstage                seconds")
    for task, sec in summary["stage_seconds"].items():
        print(f"  {task:<18} {sec:8.1f}")
    print(f"  {'(wall, all)':<18} {summary['wall_seconds']:8.1f}")
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    print(
        f"\nk-NN top-1 {fmt(summary['knn_top1'])}   linear top-1 {fmt(summary['linear_top1'])}   "
        f"(raw-pixel k-NN baseline {fmt(FASHION_MNIST_RAW_PIXEL_KNN_TOP1)})"
    )
    by_label = summary["counts"].get("ingested_by_label", {})
    for split, labels in by_label.items():
        print(f"ingested {split:<5} " + ", ".join(f"{name}: {n}" for name, n in labels.items()))
    print(f"counts: {json.dumps({k: v for k, v in summary['counts'].items() if k != 'ingested_by_label'})}")
    print(f"summary: {out / 'summary.json'}   report: {summary['report_html']}")
