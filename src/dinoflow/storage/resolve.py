"""Which object store to use: the one place that decides "configured endpoint or embedded store".

A configured endpoint (``DINOFLOW_S3_ENDPOINT``) always wins; without one, the embedded SeaweedFS
store whose state lives in ``home`` (``dinoflow store up``'s by default) is used, started on demand
only when the caller allows it.
"""

from __future__ import annotations

import os

from dinoflow.errors import StorageError
from dinoflow.settings import S3Settings
from dinoflow.storage.client import ObjectStore
from dinoflow.storage.embedded import EmbeddedStore


def configured_settings(settings: S3Settings | None = None) -> S3Settings | None:
    """``settings`` (default: from ``DINOFLOW_S3_*``) when they name an endpoint, else None."""
    settings = settings if settings is not None else S3Settings()
    return settings if settings.endpoint else None


def resolve_settings(
    *,
    start_embedded: bool = False,
    home: str | os.PathLike[str] | None = None,
    settings: S3Settings | None = None,
) -> S3Settings:
    """The configured endpoint's settings; else the embedded store's at ``home`` (started when
    ``start_embedded``, otherwise it must already run: a clear error says how to get one)."""
    configured = configured_settings(settings)
    if configured is not None:
        return configured
    embedded = EmbeddedStore(home)
    state = embedded.up() if start_embedded else embedded.status()
    if state is None:
        raise StorageError(
            "no object store: set DINOFLOW_S3_ENDPOINT/ACCESS_KEY/SECRET_KEY, or start the "
            "embedded one with `dinoflow store up`"
        )
    return state.settings()


def open_store(*, start_embedded: bool = False, home: str | os.PathLike[str] | None = None) -> ObjectStore:
    """A client for the resolved store: ``DINOFLOW_S3_*`` if they name an endpoint, else the embedded
    store (running, or started when ``start_embedded``)."""
    return ObjectStore(resolve_settings(start_embedded=start_embedded, home=home))
