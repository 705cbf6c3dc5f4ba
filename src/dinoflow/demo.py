"""``dinoflow demo`` (``make demo``): the full pipeline through ``kfp.local`` on the embedded store.

Fashion-MNIST is ingested, embedded with a bootstrapped embedder, deduplicated (and decontaminated
against its test split), curated, pretrained on, distilled, evaluated and promoted, with a CPU-sized
configuration (``dinoflow.kfp.configs.demo_arguments``). Prints each stage's duration and the final
metrics and writes ``summary.json`` (and ``report.html``) to ``$DINOFLOW_DEMO_OUT`` (default
``./demo-out``).

``dinoflow demo --containers`` (``make demo-containers``) runs the same pipeline through kfp.local's
DockerRunner in the built images (``dinoflow.kfp.IMAGE`` and ``GPU_IMAGE``) as the chart runs a pod:
each component's own container command, uid 10001, a read-only root filesystem with ``/tmp``
writable, against the embedded store on the host.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dinoflow.errors import DinoflowError
from dinoflow.eval.knn import FASHION_MNIST_RAW_PIXEL_KNN_TOP1

log = logging.getLogger(__name__)

# A pod as the chart runs it: the images' numeric USER (runAsNonRoot), readOnlyRootFilesystem, and
# /tmp as the only writable path (the chart's "tmp" emptyDir, values.yaml tmpSize: 2Gi).
CONTAINER_USER = "10001:10001"
CONTAINER_TMP = {"/tmp": "rw,size=2g,mode=1777"}
# host env the tasks also get in containers (the subprocess runner inherits all of it)
PASSED_ENV = ("OMP_NUM_THREADS",)


def docker_runner(read_only_dirs: Iterable[Path]) -> Callable[[dict[str, str]], Any]:
    """A ``run_pipeline`` runner factory: kfp.local's DockerRunner, each task in its component's
    image. The component's container command replaces the image ENTRYPOINT (as a Kubernetes
    ``command`` does), the host network lets the tasks reach the embedded store on the host's
    loopback, and ``read_only_dirs`` (the inputs ingest reads) are bind-mounted read-only at their
    host paths. The tasks get only their env (S3 settings, events file) and ``PASSED_ENV``."""
    from docker.types import Mount
    from kfp import local

    _vanished_container_is_not_found()
    mounts = [Mount(str(d), str(d), type="bind", read_only=True) for d in sorted(set(read_only_dirs))]

    def make(env: dict[str, str]) -> Any:
        passed = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        return local.DockerRunner(
            user=CONTAINER_USER,
            read_only=True,
            tmpfs=CONTAINER_TMP,
            network_mode="host",
            entrypoint=[""],  # reset, as `docker run --entrypoint ""` sends it ([] means "unset" to podman)
            mounts=mounts,
            environment={**passed, **env},
        )

    return make


def _vanished_container_is_not_found() -> None:
    """podman's Docker API answers a question about a container that is gone with 500 "no such
    container" where Docker answers 404. kfp.local's DockerRunner starts self-removing containers and
    expects NotFound when a quick one is gone before it reads its logs; make the docker SDK raise
    that for this answer too (process-wide, idempotent; every other error is unchanged)."""
    import docker.api.client as api_client
    from docker.errors import NotFound

    original = api_client.create_api_error_from_http_exception
    if getattr(original, "dinoflow_shim", False):
        return

    def create(e: Any) -> Any:
        r = e.response
        if r is not None and r.status_code == 500 and "no such container" in (r.text or "").lower():
            raise NotFound(e, response=r, explanation=r.text.strip()) from e
        return original(e)

    create.dinoflow_shim = True  # type: ignore[attr-defined]
    api_client.create_api_error_from_http_exception = create


def input_dirs(arguments: dict[str, Any]) -> set[Path]:
    """Host folders the ingest spec reads from (its absolute paths that exist), to mount read-only."""
    found: set[Path] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v.startswith("/") and Path(v).exists():
            found.add(Path(v).resolve() if Path(v).is_dir() else Path(v).resolve().parent)

    walk(json.loads(arguments["ingest_spec"]))
    return found


def require_images(refs: Iterable[str]) -> None:
    """One line, before any work, when no Docker API engine answers or it lacks an image."""
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise DinoflowError("--containers needs the 'docker' Python package: pip install docker") from None
    try:
        client = docker.from_env(timeout=60)
        client.ping()
        present = {t for image in client.images.list() for t in image.tags}
    except (DockerException, OSError):
        raise DinoflowError(
            f"no Docker API engine answers at {where}: `make demo-containers` builds the images and "
            "starts podman's when no Docker engine runs"
        ) from None
    missing = [r for r in refs if r not in present]
    if missing:
        raise DinoflowError(
            f"image {missing[0]} is not in the engine at {where}: build it with `make images`"
        )


def _metric(metrics: dict[str, float], protocol: str) -> float | None:
    """``knn_top1`` / ``linear_top1`` or, failing those names, the best ``<protocol>*top1`` figure."""
    if f"{protocol}_top1" in metrics:
        return metrics[f"{protocol}_top1"]
    cands = [v for k, v in metrics.items() if k.startswith(protocol) and "top1" in k]
    return max(cands) if cands else None


def _model_row(result: dict[str, Any]) -> dict[str, Any]:
    metrics = result.get("metrics", {})
    return {
        "backbone_uri": result.get("backbone_uri"),
        "knn_top1": _metric(metrics, "knn"),
        "linear_top1": _metric(metrics, "linear"),
        "baseline_knn_top1": _metric(result.get("baseline_metrics", {}), "knn"),
    }


def summarise(run: Any, out: Path, store: Any, tools: Any = None, pool: dict | None = None) -> dict[str, Any]:
    res = {e["task"]: e["result"] for e in run.events if not e.get("phase")}
    teacher = res.get("evaluate-teacher", {})
    student = res.get("evaluate", {})
    counts: dict[str, Any] = {}
    if "ingest" in res:
        counts["ingested"] = res["ingest"].get("counts", {})
        counts["ingested_by_label"] = res["ingest"].get("label_counts", {})
    if "dedup" in res:
        counts["dedup_input"] = res["dedup"].get("input_count")
        counts["dedup_kept"] = res["dedup"].get("kept_count")
        counts["dedup_removed_per_rule"] = res["dedup"].get("removed_per_rule")
    if "curate" in res:
        counts["curated"] = res["curate"].get("count")
    report_html = None
    if teacher.get("report_uri"):
        report_html = str(out / "report.html")
        Path(report_html).write_bytes(store.get_bytes(teacher["report_uri"]))
    curation = tools.curation_report(store, pool, res) if tools is not None and pool else None
    head = _model_row(teacher)
    return {
        # a fanned-out stage's plan and parts are events of their own: its time is their sum
        "stage_seconds": _stage_seconds(run.events),
        "wall_seconds": run.wall_seconds,
        "counts": counts,
        # the headline is the pretrained teacher; the distilled student has its own row
        "knn_top1": head["knn_top1"],
        "linear_top1": head["linear_top1"],
        "teacher": head,
        "students": {
            next(iter(res.get("distill", {}).get("backbone_uris", {})), "student"): _model_row(student)
        },
        "metrics": teacher.get("metrics", {}),
        "curation": curation,
        "promoted": res.get("promote", {}).get("promoted"),
        "champion_uri": res.get("promote", {}).get("champion_uri"),
        "report_html": report_html,
        "raw_pixel_knn_baseline": FASHION_MNIST_RAW_PIXEL_KNN_TOP1,
    }


def _stage_seconds(events: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in events:
        out[e["task"]] = round(out.get(e["task"], 0.0) + float(e["seconds"]), 3)
    return out


def demo_tools() -> Any:
    """The demo's input generator and curation report (``dinoflow_tools.demo_input``, found through
    the ``dinoflow.tools`` entry point as the benchmarks are)."""
    from importlib.metadata import entry_points

    found = entry_points(group="dinoflow.tools", name="demo")
    if not found:
        raise DinoflowError(
            "the demo's input generator is not installed: it lives beside the library in a source "
            "checkout (pip install -e tools, which `make demo` does)"
        )
    return next(iter(found)).load()


def run_demo(
    out_dir: str | os.PathLike[str] | None = None,
    arguments: dict[str, Any] | None = None,
    containers: bool = False,
    pretrain_steps: int | None = None,
) -> dict[str, Any]:
    from dinoflow.data.idx import fashion_mnist_paths
    from dinoflow.kfp import GPU_IMAGE, IMAGE
    from dinoflow.kfp.configs import demo_arguments
    from dinoflow.kfp.local import run_pipeline
    from dinoflow.pipelines.full import full
    from dinoflow.storage import ObjectStore, configured_settings
    from dinoflow.storage.embedded import EmbeddedStore

    out = Path(out_dir or os.environ.get("DINOFLOW_DEMO_OUT") or "demo-out").resolve()
    if containers:
        require_images([IMAGE, GPU_IMAGE])
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
        tools, pool = None, None
        args = arguments
        if args is None:
            tools = demo_tools()
            t0 = time.perf_counter()
            print("dinoflow demo: writing the uncurated input pool (setup) ...", flush=True)
            pool = tools.write_demo_input(store, "s3://dinoflow-demo/input")
            print(
                f"  {pool['size']} pool images {pool['per_source']}, {pool['planted_copies']} planted "
                f"duplicates, {pool['contamination']} planted copies of test images "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            args = demo_arguments(
                fashion_mnist_paths(),
                "s3://dinoflow-demo/runs",
                f"demo-{int(time.time())}",
                shards=pool["splits"],
                pretrain_steps=pretrain_steps,
            )
        runner = None
        where = "kfp.local"
        if containers:
            runner = docker_runner(input_dirs(args))
            where = f"kfp.local's DockerRunner ({IMAGE}, {GPU_IMAGE})"
            (out / "kfp").mkdir(parents=True, exist_ok=True)
            (out / "kfp").chmod(0o777)  # the tasks write their outputs there as uid 10001
        print(
            f"dinoflow demo: full pipeline through {where}, store {settings.endpoint}, output {out}",
            flush=True,
        )
        run = run_pipeline(full, args, out / "kfp", settings, caching=False, runner=runner)
        summary = summarise(run, out, store, tools, pool)
        summary["runner"] = "containers" if containers else "subprocess"
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
    print(f"\n{'model':<28}{'k-NN top-1':>12}{'linear top-1':>14}")
    rows = {"teacher (pretrained)": summary["teacher"]}
    rows.update({f"student {k} (distilled)": v for k, v in summary["students"].items()})
    for name, row in rows.items():
        print(f"{name:<28}{fmt(row['knn_top1']):>12}{fmt(row['linear_top1']):>14}")
    base = summary["teacher"].get("baseline_knn_top1") or FASHION_MNIST_RAW_PIXEL_KNN_TOP1
    print(f"{'raw pixels (baseline)':<28}{fmt(base):>12}")
    if summary.get("curation"):
        print("\ncuration against the pool's ground truth (no stage reads it):")
        print(demo_tools().format_report(summary["curation"]))
    by_label = summary["counts"].get("ingested_by_label", {})
    for split, labels in by_label.items():
        print(f"ingested {split:<5} " + ", ".join(f"{name}: {n}" for name, n in labels.items()))
    print(f"counts: {json.dumps({k: v for k, v in summary['counts'].items() if k != 'ingested_by_label'})}")
    print(f"summary: {out / 'summary.json'}   report: {summary['report_html']}")
    headline = {
        "teacher_knn_top1": summary["teacher"]["knn_top1"],
        "teacher_linear_top1": summary["teacher"]["linear_top1"],
        **{f"student_{k}_knn_top1": v["knn_top1"] for k, v in summary["students"].items()},
        "raw_pixel_knn_top1": base,
        "wall_seconds": summary["wall_seconds"],
        "pretrain_seconds": summary["stage_seconds"].get("pretrain"),
    }
    if summary.get("curation"):
        c = summary["curation"]
        headline.update(
            {
                k: c[k]
                for k in ("contamination_recall", "contamination_precision", "dup_recall", "dup_precision")
            }
        )
        headline["clean_fashion_mnist_removed_fraction"] = c["clean_fashion_mnist_removed_fraction"]
    print(json.dumps(headline))
