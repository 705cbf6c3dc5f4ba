"""Prometheus metrics: naming convention, a real Pushgateway round trip, and /metrics scraped over
HTTP while a short real training loop runs."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from dinoflow import metrics

ROOT = Path(__file__).resolve().parents[1]
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _value(samples, name, **labels) -> float | None:
    for (n, ls), v in samples.items():
        if n == name and set(labels.items()) <= ls:
            return v
    return None


@pytest.fixture(scope="module")
def pushgateway():
    """A real Prometheus Pushgateway (Debian package) on a free loopback port."""
    exe = shutil.which("prometheus-pushgateway") or (PUSHGATEWAY if Path(PUSHGATEWAY).exists() else None)
    if exe is None:
        pytest.skip(
            "PUSHGATEWAY TESTS SKIPPED: prometheus-pushgateway is not installed; run scripts/install-tools.sh as root "
            "(apt-get install prometheus-pushgateway)"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [exe, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"pushgateway did not start: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_registered_metrics_follow_the_convention():
    names = {m.name for m in metrics.REGISTRY.collect()}
    for expected in ("dinoflow_images_processed", "dinoflow_train_step_seconds", "dinoflow_train_loss"):
        assert expected in names
    assert metrics.naming_problems() == []


def test_naming_check_catches_bad_names():
    reg = CollectorRegistry()
    Gauge("dinoflow_step_ms", "step time", registry=reg)
    Gauge("dinoflow_images_total", "a gauge named like a counter", registry=reg)
    Counter("images_seen_total", "no prefix", registry=reg)
    Gauge("dinoflow_ok_seconds", "fine", registry=reg)
    problems = "\n".join(metrics.naming_problems(reg))
    assert "dinoflow_step_ms: use base units" in problems
    assert "dinoflow_images_total: _total is for counters only" in problems
    assert "images_seen_total: not dinoflow_" in problems
    assert "dinoflow_ok_seconds" not in problems


def test_dashboard_queries_only_registered_metrics():
    dash = json.loads((ROOT / "charts/dinoflow/dashboards/dinoflow-training.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"dinoflow_[a-z0-9_]+", e)
    }
    registered = set()
    for m in metrics.REGISTRY.collect():
        registered |= {m.name, m.name + "_total"}
    assert used and used <= registered, f"dashboard queries unknown metrics: {sorted(used - registered)}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_push_without_gateway_is_a_noop(monkeypatch):
    monkeypatch.delenv("DINOFLOW_PUSHGATEWAY", raising=False)
    assert metrics.push_metrics("dinoflow-test") is False


def test_push_to_a_dead_gateway_logs_and_never_raises(caplog):
    port = _free_port()  # nothing listens there
    assert metrics.push_metrics("dinoflow-test", gateway=f"127.0.0.1:{port}") is False
    assert any("could not push metrics" in r.message for r in caplog.records)


def test_batch_stage_metrics_reach_a_real_pushgateway(pushgateway, monkeypatch):
    monkeypatch.setenv("DINOFLOW_PUSHGATEWAY", pushgateway)
    stage = f"t{uuid.uuid4().hex[:8]}"
    with metrics.stage_run(stage):
        metrics.IMAGES_PROCESSED.labels(stage=stage).inc(123)
    with pytest.raises(RuntimeError), metrics.stage_run(stage):
        raise RuntimeError("boom")
    got = _scrape(f"http://{pushgateway}/metrics")
    job = f"dinoflow-{stage}"
    assert _value(got, "dinoflow_images_processed_total", job=job, stage=stage) == 123
    assert _value(got, "dinoflow_stage_runs_total", job=job, stage=stage, outcome="success") == 1
    assert _value(got, "dinoflow_stage_runs_total", job=job, stage=stage, outcome="failure") == 1
    assert _value(got, "dinoflow_stage_seconds", job=job, stage=stage) >= 0
    assert (
        abs(_value(got, "dinoflow_stage_last_success_timestamp_seconds", job=job, stage=stage) - time.time())
        < 60
    )


def test_training_metrics_endpoint_is_scraped_during_a_run(fmnist_dir):
    """A short real training loop (linear probe on Fashion-MNIST pixels) records each step; /metrics,
    served as rank 0 serves it, is scraped over HTTP mid-run and at the end."""
    import torch

    from dinoflow.data.idx import load_fashion_mnist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = load_fashion_mnist("test")
    x = torch.tensor(x[:1024]).float().flatten(1) / 255.0
    y = torch.as_tensor(y[:1024])
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = f"probe-{uuid.uuid4().hex[:6]}"
    server = metrics.serve_metrics(0, addr="127.0.0.1")
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        mid, batch, losses = None, 128, []
        for step in range(1, 41):
            i = torch.randint(0, len(x), (batch,))
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            metrics.record_train_step(
                method, step, time.perf_counter() - t0, batch, {"ce": loss.item()}, learning_rate=0.1
            )
            if step == 20:
                mid = _scrape(url)
        end = _scrape(url)
    finally:
        server.shutdown()
    assert _value(mid, "dinoflow_train_step", method=method) == 20
    assert _value(mid, "dinoflow_train_images_total", method=method) == 20 * batch
    assert _value(end, "dinoflow_train_step", method=method) == 40
    assert _value(end, "dinoflow_train_step_seconds_count", method=method) == 40
    assert _value(end, "dinoflow_train_loss", method=method, term="ce") == pytest.approx(losses[-1])
    assert _value(end, "dinoflow_train_learning_rate", method=method) == 0.1
    assert _value(end, "dinoflow_train_images_per_second", method=method) > 0
    assert sum(losses[-5:]) < sum(losses[:5])  # it really trained


def test_every_stage_run_is_recorded_where_stages_are_dispatched(store, bucket_uri):
    from dinoflow.stages.base import StageResult, StageSpec, run_with_marker

    stage = f"t{uuid.uuid4().hex[:8]}"

    def sample(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, {"stage": stage, **labels})

    def ok(spec, store):
        return StageResult(output_uri=spec.output_uri)

    def boom(spec, store):
        raise RuntimeError("boom")

    spec = StageSpec(output_uri=f"{bucket_uri}/ok")
    run_with_marker(stage, spec, store, ok, StageResult)
    run_with_marker(stage, spec, store, ok, StageResult)  # reuses the recorded result: not a run
    with pytest.raises(RuntimeError):
        run_with_marker(stage, StageSpec(output_uri=f"{bucket_uri}/bad"), store, boom, StageResult)
    assert sample("dinoflow_stage_runs_total", outcome="success") == 1
    assert sample("dinoflow_stage_runs_total", outcome="failure") == 1
    assert sample("dinoflow_stage_seconds") >= 0
    assert abs(sample("dinoflow_stage_last_success_timestamp_seconds") - time.time()) < 60
