"""The object store a benchmark uses: the configured one (``DINOFLOW_S3_*``, or the embedded store
that ``dinoflow store up`` started), else a private embedded store in a temporary directory that is
stopped and removed when the benchmark ends, so a benchmark never leaves a server running."""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dinoflow.errors import StorageError

log = logging.getLogger(__name__)


@contextmanager
def bench_store() -> Iterator:  # yields an ObjectStore
    from dinoflow.storage import ObjectStore, resolve_settings
    from dinoflow.storage.embedded import EmbeddedStore

    try:
        settings = resolve_settings()
    except StorageError:
        settings = None
    if settings is not None:
        yield ObjectStore(settings)
        return
    # a SIGTERM (a timeout, a kill) becomes SystemExit, so the finally below still stops the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    home = tempfile.mkdtemp(prefix="dinoflow-bench-store-")
    es = EmbeddedStore(home)
    log.info("no object store configured: a private embedded store in %s (stopped at the end)", home)
    try:
        yield ObjectStore(es.up().settings())
    finally:
        es.down()
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def demo_teacher_store(demo_out: str | Path) -> Iterator[tuple]:  # (ObjectStore, teacher backbone URI)
    """The store of a finished ``dinoflow demo --out DEMO_OUT`` (its embedded store, started for the
    benchmark and stopped after unless it was already running) and the URI of that demo's pretrained
    teacher (``summary.json``'s ``teacher.backbone_uri``). The benchmark only adds keys under its own
    prefix: nothing the demo wrote is changed."""
    import json

    from dinoflow.storage import ObjectStore
    from dinoflow.storage.embedded import EmbeddedStore

    out = Path(demo_out)
    summary, home = out / "summary.json", out / "store"
    if not summary.is_file() or not home.is_dir():
        raise StorageError(
            f"{out} is not a finished demo's output: it needs summary.json and the embedded store's "
            "folder store/ (a demo run against a configured DINOFLOW_S3_ENDPOINT: pass --teacher-uri)"
        )
    try:
        uri = json.loads(summary.read_text())["teacher"]["backbone_uri"]
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{summary} names no teacher (teacher.backbone_uri): {e!r}") from None
    es = EmbeddedStore(home)
    was_running = es.status() is not None
    try:
        yield ObjectStore(es.up().settings()), uri
    finally:
        if not was_running:
            es.down()
