"""Workload identity: with no static keys the object-store client takes its credentials from minio's
IAM provider; without static keys or an identity it fails at once, in one line."""

from __future__ import annotations

import datetime
import json
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from minio.credentials import IamAwsProvider

from dinoflow.errors import StorageError
from dinoflow.settings import S3Settings
from dinoflow.storage.client import ObjectStore

IDENTITY_ENV = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "DINOFLOW_S3_STS_ENDPOINT",
)


@pytest.fixture
def no_identity(monkeypatch):
    for k in IDENTITY_ENV:
        monkeypatch.delenv(k, raising=False)


def _keyless(embedded_store) -> S3Settings:
    return S3Settings(endpoint=embedded_store.endpoint, access_key=None, secret_key=None, max_retries=0)


def test_container_credentials_endpoint_gives_the_keys(embedded_store, no_identity, monkeypatch):
    """The credentials endpoint a pod's identity provides (the ECS/EKS pod-identity protocol: JSON with
    AccessKeyId, SecretAccessKey, Token, Expiration), served on loopback with the embedded store's
    keys: the client signs real requests with what the provider fetched."""
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    body = json.dumps(
        {
            "AccessKeyId": embedded_store.access_key,
            "SecretAccessKey": embedded_store.secret_key,
            "Token": "",
            "Expiration": expires,
        }
    ).encode()
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{server.server_port}/creds"
        )
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "pod-token")
        store = ObjectStore(_keyless(embedded_store))
        assert isinstance(store._client._provider, IamAwsProvider)
        uri = f"s3://test-{uuid.uuid4().hex[:12]}/wi/x.json"
        store.put_json(uri, {"ok": True})
        assert store.get_json(uri) == {"ok": True}
        assert asked and asked[0] == "pod-token"
    finally:
        server.shutdown()


def test_an_identity_that_fails_is_one_line(embedded_store, no_identity, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.sig")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing answers there: the STS is unreachable
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/dinoflow")
    monkeypatch.setenv("DINOFLOW_S3_STS_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError) as e:
        ObjectStore(_keyless(embedded_store))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("workload identity (AWS_WEB_IDENTITY_TOKEN_FILE) gave no")


def test_no_keys_and_no_identity_names_both_ways(embedded_store, no_identity):
    with pytest.raises(StorageError) as e:
        ObjectStore(_keyless(embedded_store))
    msg = str(e.value)
    assert "\n" not in msg
    assert "DINOFLOW_S3_ACCESS_KEY" in msg and "AWS_WEB_IDENTITY_TOKEN_FILE" in msg
