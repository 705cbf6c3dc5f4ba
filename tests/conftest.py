"""Shared fixtures: one real embedded SeaweedFS S3 server per test session (no fake S3 anywhere)."""

from __future__ import annotations

import os
import uuid

import pytest

# Keep the 2-core CI machine responsive: tests use few threads unless they ask for more.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory):
    from dinoflow.storage.embedded import EmbeddedStore

    es = EmbeddedStore(tmp_path_factory.mktemp("seaweedfs"))
    state = es.up()
    yield state
    es.down()


@pytest.fixture(scope="session")
def s3_env(embedded_store):
    """DINOFLOW_S3_* env vars pointing at the session's embedded store (for code that reads env)."""
    env = {
        "DINOFLOW_S3_ENDPOINT": embedded_store.endpoint,
        "DINOFLOW_S3_ACCESS_KEY": embedded_store.access_key,
        "DINOFLOW_S3_SECRET_KEY": embedded_store.secret_key,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def store(embedded_store, s3_env):
    from dinoflow.storage import ObjectStore

    return ObjectStore(embedded_store.settings())


@pytest.fixture
def bucket_uri(store):
    """A fresh, empty s3:// prefix for one test."""
    return f"s3://test-{uuid.uuid4().hex[:12]}/run"


@pytest.fixture(scope="session")
def fmnist_dir():
    from dinoflow.data.idx import fashion_mnist_paths

    paths = fashion_mnist_paths()
    return paths["train"][0].parent
