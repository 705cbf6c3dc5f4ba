"""Prometheus metrics, ``dinoflow_`` prefix, base units, ``_total`` on counters.

Long training pods serve ``/metrics`` from rank 0 (``serve_metrics``); short batch stages push to a
Pushgateway when ``DINOFLOW_PUSHGATEWAY`` is set (``push_metrics``) and do nothing otherwise.
Metrics live on one registry object that callers may replace in tests.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

IMAGES_PROCESSED = Counter(
    "dinoflow_images_processed_total", "Images processed by a stage", ["stage"], registry=REGISTRY
)
IMAGES_QUARANTINED = Counter(
    "dinoflow_images_quarantined_total", "Inputs skipped as unreadable, by reason", ["stage", "reason"],
    registry=REGISTRY,
)
STAGE_SECONDS = Gauge("dinoflow_stage_seconds", "Wall time of the last run of a stage", ["stage"], registry=REGISTRY)
STAGE_RUNS = Counter("dinoflow_stage_runs_total", "Stage runs by outcome", ["stage", "outcome"], registry=REGISTRY)
TRAIN_STEP_SECONDS = Histogram(
    "dinoflow_train_step_seconds", "Wall time of one optimizer step", ["method"], registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TRAIN_LOSS = Gauge("dinoflow_train_loss", "Last training loss", ["method", "term"], registry=REGISTRY)
TRAIN_IMAGES_PER_SECOND = Gauge(
    "dinoflow_train_images_per_second", "Training throughput", ["method"], registry=REGISTRY
)
TRAIN_STEP = Gauge("dinoflow_train_step", "Current optimizer step", ["method"], registry=REGISTRY)
EVAL_TOP1 = Gauge("dinoflow_eval_top1_ratio", "Top-1 accuracy of an evaluation protocol", ["protocol"], registry=REGISTRY)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` over HTTP (rank 0 of a training job)."""
    start_http_server(port, addr=addr, registry=REGISTRY)


def push_metrics(job: str, gateway: str | None = None) -> bool:
    """Push to the Pushgateway at ``gateway`` or ``$DINOFLOW_PUSHGATEWAY``; no-op when unset."""
    gateway = gateway or os.environ.get("DINOFLOW_PUSHGATEWAY")
    if not gateway:
        return False
    try:
        push_to_gateway(gateway, job=job, registry=REGISTRY, timeout=10)
        return True
    except OSError as e:  # metrics must never fail a stage
        log.warning("could not push metrics to %s: %s", gateway, e)
        return False
