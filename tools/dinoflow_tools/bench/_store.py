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
