"""Prometheus metrics, ``dinoflow_`` prefix, base units, ``_total`` on counters.

Long training pods serve ``/metrics`` from rank 0 (``serve_metrics``); short batch stages push to a
Pushgateway when ``DINOFLOW_PUSHGATEWAY`` is set (``push_metrics``) and do nothing otherwise.
Metrics live on one registry object that callers may replace in tests.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

IMAGES_PROCESSED = Counter(
    "dinoflow_images_processed_total", "Images processed by a stage", ["stage"], registry=REGISTRY
)
IMAGES_QUARANTINED = Counter(
    "dinoflow_images_quarantined_total",
    "Inputs skipped as unreadable, by reason",
    ["stage", "reason"],
    registry=REGISTRY,
)
STAGE_SECONDS = Gauge(
    "dinoflow_stage_seconds", "Wall time of the last run of a stage", ["stage"], registry=REGISTRY
)
STAGE_RUNS = Counter(
    "dinoflow_stage_runs_total", "Stage runs by outcome", ["stage", "outcome"], registry=REGISTRY
)
TRAIN_STEP_SECONDS = Histogram(
    "dinoflow_train_step_seconds",
    "Wall time of one optimizer step",
    ["method"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TRAIN_LOSS = Gauge("dinoflow_train_loss", "Last training loss", ["method", "term"], registry=REGISTRY)
TRAIN_IMAGES_PER_SECOND = Gauge(
    "dinoflow_train_images_per_second", "Training throughput", ["method"], registry=REGISTRY
)
TRAIN_STEP = Gauge("dinoflow_train_step", "Current optimizer step", ["method"], registry=REGISTRY)
EVAL_TOP1 = Gauge(
    "dinoflow_eval_top1_ratio", "Top-1 accuracy of an evaluation protocol", ["protocol"], registry=REGISTRY
)
STAGE_LAST_SUCCESS = Gauge(
    "dinoflow_stage_last_success_timestamp_seconds",
    "Unix time of a stage's last successful run",
    ["stage"],
    registry=REGISTRY,
)
TRAIN_IMAGES = Counter(
    "dinoflow_train_images_total", "Images seen by training", ["method"], registry=REGISTRY
)
TRAIN_LEARNING_RATE = Gauge(
    "dinoflow_train_learning_rate", "Current base learning rate", ["method"], registry=REGISTRY
)
TRAIN_GPU_MEMORY_PEAK = Gauge(
    "dinoflow_train_gpu_memory_peak_bytes",
    "Peak accelerator memory allocated on a rank",
    ["method", "rank"],
    registry=REGISTRY,
)

# Prometheus naming: the prefix, snake case, base units (seconds, bytes, ratio), `_total` only on counters.
_NAME_RE = re.compile(r"^dinoflow_[a-z][a-z0-9_]*[a-z0-9]$")
_NON_BASE_UNITS = re.compile(
    r"_(ms|msec|milliseconds|us|microseconds|ns|minutes|hours|days|kb|mb|gb|kib|mib|gib|kilobytes|megabytes|percent)(_|$)"
)


def naming_problems(registry: CollectorRegistry = REGISTRY) -> list[str]:
    """Every metric on ``registry`` that breaks the convention, as one line each (empty = all good)."""
    problems = []
    for metric in registry.collect():
        name, kind = metric.name, metric.type
        full = name + "_total" if kind == "counter" else name  # the client strips _total from counter names
        if not _NAME_RE.match(full):
            problems.append(f"{full}: not dinoflow_<snake_case>")
        if kind == "counter" and full.endswith("_total_total"):
            problems.append(f"{full}: doubled _total")
        if kind != "counter" and full.endswith("_total"):
            problems.append(f"{full}: _total is for counters only ({kind})")
        if _NON_BASE_UNITS.search(full):
            problems.append(f"{full}: use base units (seconds, bytes, ratio)")
        if not metric.documentation.strip():
            problems.append(f"{full}: no help text")
    return problems


@contextmanager
def stage_run(stage: str, push: bool = True) -> Iterator[None]:
    """Time one run of a batch stage: wall time, outcome count, last-success time; then push them
    to the Pushgateway when one is configured (``push_metrics``; a no-op otherwise)."""
    t0 = time.perf_counter()
    outcome = "failure"
    try:
        yield
        outcome = "success"
        STAGE_LAST_SUCCESS.labels(stage=stage).set(time.time())
    finally:
        STAGE_SECONDS.labels(stage=stage).set(time.perf_counter() - t0)
        STAGE_RUNS.labels(stage=stage, outcome=outcome).inc()
        if push:
            push_metrics(f"dinoflow-{stage}")


def record_train_step(
    method: str,
    step: int,
    step_seconds: float,
    images: int,
    losses: Mapping[str, float],
    learning_rate: float | None = None,
    gpu_memory_peak_bytes: int | None = None,
    rank: int = 0,
) -> None:
    """Record one optimizer step of a training loop (call it on rank 0, or on every rank for memory)."""
    TRAIN_STEP.labels(method=method).set(step)
    TRAIN_STEP_SECONDS.labels(method=method).observe(step_seconds)
    TRAIN_IMAGES.labels(method=method).inc(images)
    if step_seconds > 0:
        TRAIN_IMAGES_PER_SECOND.labels(method=method).set(images / step_seconds)
    for term, value in losses.items():
        TRAIN_LOSS.labels(method=method, term=term).set(float(value))
    if learning_rate is not None:
        TRAIN_LEARNING_RATE.labels(method=method).set(learning_rate)
    if gpu_memory_peak_bytes is not None:
        TRAIN_GPU_MEMORY_PEAK.labels(method=method, rank=str(rank)).set(gpu_memory_peak_bytes)


def serve_metrics(port: int, addr: str | None = None) -> Any:
    """Serve ``/metrics`` over HTTP (rank 0 of a training job) from a daemon thread.

    Binds ``addr``, else ``$DINOFLOW_METRICS_ADDR``, else loopback only: a laptop's training run
    exposes nothing; a pod that Prometheus scrapes sets ``DINOFLOW_METRICS_ADDR=0.0.0.0`` (the
    chart's training runtime does). Returns the server; ``server.shutdown()`` stops it. Port 0 picks
    a free port (``server.server_port`` says which)."""
    addr = addr or os.environ.get("DINOFLOW_METRICS_ADDR") or "127.0.0.1"
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server


def push_metrics(
    job: str,
    gateway: str | None = None,
    grouping_key: Mapping[str, str] | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> bool:
    """Push to the Pushgateway at ``gateway`` or ``$DINOFLOW_PUSHGATEWAY``; no-op when unset.

    Returns whether the push happened; a failed push is logged, never raised (metrics must not fail
    a stage)."""
    gateway = gateway or os.environ.get("DINOFLOW_PUSHGATEWAY")
    if not gateway:
        return False
    try:
        push_to_gateway(
            gateway, job=job, registry=registry, grouping_key=dict(grouping_key or {}), timeout=10
        )
        return True
    except OSError as e:  # metrics must never fail a stage
        log.warning("could not push metrics to %s: %s", gateway, e)
        return False
