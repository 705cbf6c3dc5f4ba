"""Chaos: the tiny full pipeline through kfp.local while its embedded store is paused (SIGSTOP) in
the middle of a stage and, later, killed (SIGKILL) and restarted between stages. The run finishes,
or fails in one line and finishes when submitted again; every stage that had finished keeps its
outputs (its _SUCCESS marker and every object its result names, byte for byte)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from dinoflow.data.idx import fashion_mnist_paths
from dinoflow.errors import DinoflowError
from dinoflow.kfp.configs import tiny_arguments
from dinoflow.kfp.local import run_pipeline
from dinoflow.storage import ObjectStore
from dinoflow.storage.embedded import EmbeddedStore


def _uris(value) -> list[str]:
    """Every s3:// URI inside a stage result."""
    if isinstance(value, str):
        return [value] if value.startswith("s3://") else []
    if isinstance(value, dict):
        return [u for v in value.values() for u in _uris(v)]
    if isinstance(value, list):
        return [u for v in value for u in _uris(v)]
    return []


def _finished(store: ObjectStore, root: str) -> dict[str, dict[str, str]]:
    """Each finished stage output under ``root``: its objects and their etags."""
    out = {}
    for marker in [u for u in store.list(root + "/") if u.endswith("/_SUCCESS")]:
        prefix = marker[: -len("/_SUCCESS")]
        out[prefix] = {u: store.stat(u)["etag"] for u in store.list(prefix + "/")}
    return out


class _Chaos(threading.Thread):
    """Pauses the store once a stage has started, then kills and restarts it once a later stage
    has finished; it never touches the store while it is down or stopped."""

    def __init__(self, es: EmbeddedStore, store: ObjectStore, root: str):
        super().__init__(daemon=True)
        self.es, self.store, self.root = es, store, root
        self.paused_during = self.killed_after = None
        self.before_kill: dict[str, dict[str, str]] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def _wait_for(self, wanted) -> str | None:
        while not self.stop.is_set():
            try:
                found = [u for u in self.store.list(self.root + "/") if wanted(u)]
            except DinoflowError:
                found = []
            if found:
                return found[0]
            time.sleep(0.05)
        return None

    def run(self) -> None:
        try:
            pid = self.es.status().pid
            # ingest has claimed its output ({root}/ingest/{hash}/_STARTED) and is reading its inputs
            started = self._wait_for(lambda u: "/ingest/" in u and u.endswith("/_STARTED"))
            if started is None:
                return
            os.kill(pid, signal.SIGSTOP)
            self.paused_during = started
            time.sleep(4)
            os.kill(pid, signal.SIGCONT)
            done = self._wait_for(lambda u: u.endswith("/_SUCCESS"))  # the first stage to finish
            if done is None:
                return
            self.before_kill = _finished(self.store, self.root)
            os.kill(pid, signal.SIGKILL)  # between stages: one has just finished
            self.killed_after = done
            time.sleep(1)
            self.es.up()  # same ports and keys: clients holding the old settings carry on
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture
def chaos_store(tmp_path):
    es = EmbeddedStore(tmp_path / "store")
    es.up()
    yield es
    es.down()


def test_full_pipeline_survives_a_paused_and_a_restarted_store(chaos_store, tmp_path):
    state = chaos_store.status()
    store = ObjectStore(state.settings())
    root = f"s3://chaos-{uuid.uuid4().hex[:10]}/runs"
    from dinoflow.pipelines.full import full

    args = tiny_arguments(fashion_mnist_paths(), root, data_version="c1")
    chaos = _Chaos(chaos_store, store, f"{root}/c1")
    chaos.start()
    first_error = None
    try:
        run = run_pipeline(full, args, tmp_path / "kfp", state.settings(), caching=True)
    except DinoflowError as e:
        first_error = str(e)
    chaos.stop.set()
    chaos.join(timeout=120)
    assert chaos.error is None, chaos.error
    assert chaos.paused_during and chaos.killed_after, "the store was not paused and killed during the run"
    assert chaos_store.status() is not None  # restarted
    if first_error is not None:  # a failure is one line, and a second submission finishes
        assert "\n" not in first_error, first_error
        run = run_pipeline(full, args, tmp_path / "kfp", state.settings(), caching=True)
    assert run.result("promote")["promoted"] is True
    # every output finished before the kill is intact, and so is everything its result names
    after = _finished(store, f"{root}/c1")
    for prefix, objects in chaos.before_kill.items():
        assert after.get(prefix) == objects, prefix
        result = store.read_success(prefix)["result"]
        for uri in _uris(result):
            if uri.startswith(prefix + "/"):
                assert store.exists(uri) or store.list(uri + "/"), uri
    # and every task of the full run has its finished output
    tasks = {u.split("/c1/")[1].split("/")[0] for u in after}
    assert {"ingest", "dedup", "curate", "pretrain", "distill", "evaluate", "promote"} <= tasks
