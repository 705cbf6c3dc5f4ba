"""Object storage against the real embedded SeaweedFS server."""

from __future__ import annotations

import socket
import threading

import pytest
from pydantic import SecretStr

from dinoflow.errors import StorageError
from dinoflow.settings import S3Settings
from dinoflow.storage import ObjectStore, parse_uri


def test_round_trip_list_and_stream(store, bucket_uri):
    data = bytes(range(256)) * 4096  # 1 MiB, binary
    store.put_bytes(f"{bucket_uri}/a/blob.bin", data)
    store.put_json(f"{bucket_uri}/a/meta.json", {"n": 3})
    assert store.get_bytes(f"{bucket_uri}/a/blob.bin") == data
    assert b"".join(store.open(f"{bucket_uri}/a/blob.bin", chunk_bytes=65536)) == data
    assert store.get_json(f"{bucket_uri}/a/meta.json") == {"n": 3}
    assert store.list(f"{bucket_uri}/a/") == [f"{bucket_uri}/a/blob.bin", f"{bucket_uri}/a/meta.json"]
    assert store.exists(f"{bucket_uri}/a/blob.bin") and not store.exists(f"{bucket_uri}/a/nope")
    local = store.cached(f"{bucket_uri}/a/blob.bin")
    assert local.read_bytes() == data and store.cached(f"{bucket_uri}/a/blob.bin") == local


def test_crash_between_temporary_and_final_write_leaves_no_final_object(embedded_store, bucket_uri):
    class Crash(RuntimeError):
        pass

    def crash(uri):
        raise Crash(uri)

    crashing = ObjectStore(embedded_store.settings(), crash_hook=crash)
    with pytest.raises(Crash):
        crashing.put_bytes(f"{bucket_uri}/x.bin", b"partial")
    plain = ObjectStore(embedded_store.settings())
    assert not plain.exists(f"{bucket_uri}/x.bin")
    assert plain.list(f"{bucket_uri}/") == []  # the temporary key is cleaned up too
    # an existing object stays intact when an overwrite crashes
    plain.put_bytes(f"{bucket_uri}/y.bin", b"old")
    with pytest.raises(Crash):
        crashing.put_bytes(f"{bucket_uri}/y.bin", b"new")
    assert plain.get_bytes(f"{bucket_uri}/y.bin") == b"old"


def test_reader_never_sees_a_partial_object(store, bucket_uri):
    uri = f"{bucket_uri}/big.bin"
    versions = [bytes([i]) * (2 << 20) for i in range(4)]
    store.put_bytes(uri, versions[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(store.get_bytes(uri))

    t = threading.Thread(target=reader)
    t.start()
    for v in versions[1:]:
        store.put_bytes(uri, v)
    stop.set()
    t.join()
    assert seen and all(s in versions for s in seen)


class FlakyProxy:
    """A loopback TCP proxy that drops the first ``drops`` connections, then forwards."""

    def __init__(self, target: str, drops: int):
        host, port = target.split(":")
        self.target = (host, int(port))
        self.drops = drops
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drops:
                conn.close()
                continue
            up = socket.create_connection(self.target)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_retries_with_backoff_on_dropped_connections(embedded_store, store, bucket_uri):
    store.put_bytes(f"{bucket_uri}/r.txt", b"survives")
    proxy = FlakyProxy(embedded_store.endpoint, drops=2)
    try:
        settings = embedded_store.settings().model_copy(
            update={"endpoint": f"127.0.0.1:{proxy.port}", "max_retries": 3, "retry_base_seconds": 0.05}
        )
        flaky = ObjectStore(settings)
        assert flaky.get_bytes(f"{bucket_uri}/r.txt") == b"survives"
        assert proxy.accepted >= 3
    finally:
        proxy.close()


def test_unreachable_endpoint_is_a_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    settings = S3Settings(
        endpoint=f"127.0.0.1:{port}",
        access_key=SecretStr("a"),
        secret_key=SecretStr("b"),
        max_retries=1,
        retry_base_seconds=0.01,
        timeout_seconds=2,
    )
    with pytest.raises(StorageError, match=r"unreachable .* after 2 attempt"):
        ObjectStore(settings).get_bytes("s3://some-bucket/key")


def test_missing_and_wrong_credentials(embedded_store):
    with pytest.raises(StorageError, match="credentials missing"):
        ObjectStore(S3Settings(endpoint=embedded_store.endpoint, access_key=None, secret_key=None))
    with pytest.raises(StorageError, match="no object-store endpoint"):
        ObjectStore(S3Settings(endpoint=None))
    bad = embedded_store.settings().model_copy(update={"secret_key": SecretStr("wrong-secret")})
    with pytest.raises(StorageError, match="refused the credentials"):
        ObjectStore(bad).list("s3://dinoflow-health/")


def test_missing_bucket_and_key(store, bucket_uri):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        store.get_bytes("s3://no-such-bucket-x/k")
    store.put_bytes(f"{bucket_uri}/present", b"1")
    with pytest.raises(StorageError, match="does not exist"):
        store.get_bytes(f"{bucket_uri}/absent")


@pytest.mark.parametrize("bad", ["bucket/key", "s3://", "s3://Ab/k", "gs://b/k"])
def test_bad_uris(bad):
    with pytest.raises(StorageError, match="s3://|bucket"):
        parse_uri(bad)


def test_success_marker(store, bucket_uri):
    assert store.read_success(bucket_uri) is None
    store.write_success(bucket_uri, {"stage": "x"})
    assert store.read_success(bucket_uri) == {"stage": "x"}
