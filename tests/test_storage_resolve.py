"""The one store resolver: a configured endpoint wins; without one, the embedded store."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinoflow.errors import StorageError
from dinoflow.storage import ObjectStore, configured_settings, resolve_settings

_ENV = ("DINOFLOW_S3_ENDPOINT", "DINOFLOW_S3_ACCESS_KEY", "DINOFLOW_S3_SECRET_KEY")


@pytest.fixture
def no_env(monkeypatch):
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_configured_endpoint_wins(no_env, tmp_path):
    no_env.setenv("DINOFLOW_S3_ENDPOINT", "http://minio.example:9000")
    no_env.setenv("DINOFLOW_S3_ACCESS_KEY", "a")
    no_env.setenv("DINOFLOW_S3_SECRET_KEY", "b")
    # start_embedded is moot when an endpoint is configured: nothing starts under home
    s = resolve_settings(start_embedded=True, home=tmp_path / "never")
    assert s.endpoint == "http://minio.example:9000" and s.access_key.get_secret_value() == "a"
    assert configured_settings() is not None and not (tmp_path / "never").exists()


def test_no_endpoint_means_the_embedded_store(no_env, embedded_store, tmp_path):
    home = tmp_path / "none"
    assert configured_settings() is None
    with pytest.raises(StorageError, match="dinoflow store up"):
        resolve_settings(home=home)  # not running and not allowed to start one
    # the running embedded store at home (the session's store records its state in its own home)
    s = resolve_settings(home=Path(embedded_store.data_dir).parent)
    assert s.endpoint == embedded_store.endpoint
    store = ObjectStore(s)
    assert store.bucket_exists("no-such-bucket-here") is False


def test_cli_and_open_store_share_the_resolver(no_env, monkeypatch):
    from dinoflow import cli
    from dinoflow.storage import resolve

    calls = []

    def fake(**kw):
        calls.append(kw)
        raise StorageError("resolved")

    monkeypatch.setattr(resolve, "resolve_settings", fake)
    with pytest.raises(StorageError, match="resolved"):
        cli._ensure_store(embedded=True)
    with pytest.raises(StorageError, match="resolved"):
        resolve.open_store()
    assert calls == [{"start_embedded": True, "home": None}, {"start_embedded": False, "home": None}]
