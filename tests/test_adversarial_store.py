"""Probes of the embedded store as a local attacker would run them: every port the server opens
must require the store's generated credentials, and a recorded pid is trusted only when it is the
store's own process."""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from dinoflow.storage import ObjectStore
from dinoflow.storage.embedded import EmbeddedStore, StoreState, _alive

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + SETTINGS


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            m = re.match(r"socket:\[(\d+)\]", str(fd.readlink()))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    return inodes


def _listening_tcp(pid: int) -> set[int]:
    """Ports of the TCP sockets in LISTEN state that ``pid`` holds (from /proc, like ss -ltnp)."""
    inodes, ports = _socket_inodes(pid), set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def _listening_unix(pid: int) -> set[str]:
    inodes, paths = _socket_inodes(pid), set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[6] in inodes and f[5] == "01":  # 01: listening
            paths.add(f[7])
    return paths


def _plain_http(port: int, method: str, path: str, body: bytes | None = None) -> int | None:
    """The status of a plain HTTP request, or None when the port does not answer HTTP at all."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _tls_exchange(port: int, home: Path, *, client_cert: bool, h2: bool) -> bytes:
    """Open TLS (trusting the store's CA), send one request, return what came back ('' or an
    exception's name when the server refused)."""
    ctx = ssl.create_default_context(cafile=str(home / "tls" / "ca.pem"))
    ctx.check_hostname = False
    if client_cert:
        ctx.load_cert_chain(str(home / "tls" / "cert.pem"), str(home / "tls" / "key.pem"))
    if h2:
        ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(_H2_PREFACE if h2 else b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                return s.recv(64)
    except (OSError, ssl.SSLError) as e:
        return type(e).__name__.encode()


def test_only_the_s3_port_answers_without_the_generated_credentials(embedded_store, store, bucket_uri):
    home = Path(embedded_store.data_dir).parent
    ports = embedded_store.ports
    # nothing is opened beyond the eight ports the store records (no metrics, Iceberg, Lance, IAM)
    assert _listening_tcp(embedded_store.pid) == set(ports.values())
    # the probe over the filer's HTTP port: read, create and delete an object without keys
    bucket = bucket_uri.split("/")[2]
    store.put_bytes(f"{bucket_uri}/secret.txt", b"top secret")
    filer = ports["filer"]
    path = f"/buckets/{bucket}/run/secret.txt"
    for method, target, body in (
        ("GET", path, None),
        ("POST", f"/buckets/{bucket}/run/planted.txt", b"planted"),
        ("PUT", f"/buckets/{bucket}/run/planted2.txt", b"planted"),
        ("DELETE", path, None),
    ):
        status = _plain_http(filer, method, target, body)
        assert status is None or status >= 400, (method, target, status)
    assert store.get_bytes(f"{bucket_uri}/secret.txt") == b"top secret"
    assert not store.exists(f"{bucket_uri}/planted.txt") and not store.exists(f"{bucket_uri}/planted2.txt")
    # every port but S3: plain HTTP gets no service, TLS without the store's client certificate is
    # refused, and the same TLS with it succeeds (so the refusals are the certificate's doing)
    for name, port in ports.items():
        if name in ("s3", "s3_grpc"):
            continue
        grpc = name.endswith("_grpc")
        status = _plain_http(port, "GET", "/dir/status" if name == "master" else "/")
        assert status is None or status == 400, (name, status)  # 400: "HTTP request to an HTTPS server"
        refused = _tls_exchange(port, home, client_cert=False, h2=grpc)
        assert not refused.startswith(b"HTTP/") and refused[3:4] != b"\x04", (name, refused)
        accepted = _tls_exchange(port, home, client_cert=True, h2=grpc)
        assert accepted.startswith(b"HTTP/") if not grpc else accepted[3:4] == b"\x04", (name, accepted)
    refused = _tls_exchange(ports["s3_grpc"], home, client_cert=False, h2=True)
    assert refused[3:4] != b"\x04", refused
    # the S3 port itself: an unsigned request is denied
    assert _plain_http(ports["s3"], "GET", f"/{bucket}/run/secret.txt") == 403
    # local sockets: the filer's and S3's live in the private home; gRPC's in /tmp speak TLS only
    assert home.stat().st_mode & 0o077 == 0
    for path in _listening_unix(embedded_store.pid):
        if Path(path).parent == home:
            continue
        assert re.fullmatch(r"/tmp/seaweedfs-(master|volume|filer|s3)-grpc-\d+\.sock", path), path
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(_H2_PREFACE)
            try:
                got = s.recv(64)
            except OSError:
                got = b""
        assert got[3:4] != b"\x04", (path, got)  # no HTTP/2 SETTINGS: TLS is required there too
    # and a filer request through its socket still needs the JWT the S3 gateway signs
    conn = http.client.HTTPConnection("localhost", timeout=5)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(home / "filer.sock"))
    conn.request("GET", path)
    assert conn.getresponse().status == 401
    conn.close()


def test_telemetry_is_off_and_weed_gets_no_outside_overrides(embedded_store):
    argv = Path(f"/proc/{embedded_store.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-master.telemetry=false" in argv
    env = Path(f"/proc/{embedded_store.pid}/environ").read_bytes().split(b"\0")
    assert not [e for e in env if e.startswith(b"WEED_")]


def test_a_recorded_pid_is_trusted_only_when_it_is_the_stores_own_process(tmp_path):
    """state.json and weed.pid naming an unrelated live process: `status` does not report it and
    `down` does not kill it (the issue's probe: `store down` killed the unrelated process)."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        es = EmbeddedStore(tmp_path / "store")
        es.home.mkdir(parents=True)
        fake = StoreState(
            endpoint="127.0.0.1:9",
            access_key="a",
            secret_key="b",
            pid=bystander.pid,
            data_dir=str(es.data_dir),
            log_file=str(es.home / "weed.log"),
        )
        es.state_file.write_text(fake.model_dump_json())
        es.pid_file.write_text(str(bystander.pid))
        assert es.status() is None  # so `store up` starts a real server instead of trusting it
        assert not es.state_file.exists()
        es.state_file.write_text(fake.model_dump_json())
        assert es.down() is False
        time.sleep(0.2)
        assert _alive(bystander.pid) and bystander.poll() is None
        # a state file that is not JSON is not a running store either (no traceback)
        es.state_file.write_text("{not json")
        assert es.status() is None
        cli = subprocess.run(
            [str(Path(__import__("sys").executable)), "-m", "dinoflow.cli", "store", "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "DINOFLOW_HOME": str(tmp_path)},
        )
        assert cli.returncode == 1 and "not running" in cli.stdout, cli.stderr
    finally:
        bystander.kill()
        bystander.wait()


def test_unsigned_and_wrongly_signed_s3_requests_are_refused(embedded_store, bucket_uri):
    from pydantic import SecretStr

    from dinoflow.errors import StorageError

    wrong = embedded_store.settings().model_copy(update={"secret_key": SecretStr("x" * 32), "max_retries": 0})
    with pytest.raises(StorageError, match="refused the credentials"):
        ObjectStore(wrong).put_bytes(f"{bucket_uri}/{uuid.uuid4().hex}", b"x")


# -- killed transfers: a partial download is never a cached copy, a killed upload is aborted ---------
_KILLED_DOWNLOAD = textwrap.dedent(
    """
    import os, signal, sys
    from dinoflow.settings import S3Settings
    from dinoflow.storage import ObjectStore
    store = ObjectStore(S3Settings())
    get_object = store._client.get_object
    def get_then_die(*a, **k):  # dies like kill -9 once the first MiB is on disk
        resp = get_object(*a, **k)
        stream = resp.stream
        def first_chunk_then_die(*sa, **sk):
            yield next(iter(stream(*sa, **sk)))
            os.kill(os.getpid(), signal.SIGKILL)
        resp.stream = first_chunk_then_die
        return resp
    store._client.get_object = get_then_die
    store.cached(sys.argv[1], sys.argv[2])
    """
)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_a_download_killed_midway_is_never_a_cached_copy_and_its_partial_is_removed(
    store, s3_env, bucket_uri, tmp_path
):
    data = os.urandom(3 << 20)
    uri = f"{bucket_uri}/shard-000.tar"
    store.put_bytes(uri, data)
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_DOWNLOAD, uri, str(cache)],
        env={**os.environ, **s3_env},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = _files(cache)
    assert left and all(0 < p.stat().st_size < len(data) for p in left), "a partial file, nothing complete"
    path = store.cached(uri, cache)
    assert path.read_bytes() == data
    assert _files(cache) == [path], "the dead download's partial file is removed"


def test_a_cached_copy_that_is_not_the_objects_size_is_downloaded_again(store, bucket_uri, tmp_path):
    """A copy cut short (a full disk, a machine that crashed before the rename reached the disk)
    is never returned as the object."""
    data = os.urandom(1 << 20)
    uri = f"{bucket_uri}/groups.parquet"
    store.put_bytes(uri, data)
    path = store.cached(uri, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert store.cached(uri, tmp_path) == path and path.read_bytes() == data


def test_a_download_of_a_replaced_version_fails_in_one_line_and_keeps_nothing(store, bucket_uri, tmp_path):
    from dinoflow.storage.client import ObjectChanged

    uri = f"{bucket_uri}/m.json"
    store.put_bytes(uri, b"old")
    old = store.stat(uri)["etag"]
    store.put_bytes(uri, b"new!")
    with pytest.raises(ObjectChanged) as e:
        store.get_file(uri, tmp_path / "m.json", etag=old)
    assert "changed while downloading" in str(e.value) and "\n" not in str(e.value)
    assert _files(tmp_path) == []
    assert store.cached(uri, tmp_path / "c").read_bytes() == b"new!"


_KILLED_UPLOAD = textwrap.dedent(
    """
    import os, signal, sys
    from dinoflow.settings import S3Settings
    from dinoflow.storage import ObjectStore
    store = ObjectStore(S3Settings())
    upload_part = store._client._upload_part
    def one_part_then_die(*a, **k):  # dies like kill -9 after the first part reached the store
        upload_part(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    store._client._upload_part = one_part_then_die
    store.put_file(sys.argv[1], sys.argv[2])
    """
)


def _uploads(store, bucket: str, prefix: str) -> list[str]:
    return [u.object_name for u in store._client._list_multipart_uploads(bucket, prefix=prefix).uploads]


def test_an_upload_killed_midway_is_aborted_by_the_next_stage(
    embedded_store, store, s3_env, bucket_uri, tmp_path
):
    """A large put_file killed after its first part leaves an unfinished multipart upload under
    `_tmp/` (no key shows it, its parts take space); the next stage in the bucket aborts it, and
    leaves uploads outside `_tmp/` alone."""
    from test_adversarial_stages import _tiny_png

    from dinoflow.stages import get_stage
    from dinoflow.storage import parse_uri

    bucket = parse_uri(bucket_uri)[0]
    big = tmp_path / "big.pt"
    big.write_bytes(os.urandom(12 << 20))  # over minio's 5 MiB part size: a multipart upload
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_UPLOAD, f"{bucket_uri}/train/ckpt.pt", str(big)],
        env={**os.environ, **s3_env},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [k for k in _uploads(store, bucket, "_tmp/") if k.endswith("/run/train/ckpt.pt")]
    theirs = store._client._create_multipart_upload(bucket, "elsewhere/upload.bin", {})
    impatient = ObjectStore(embedded_store.settings().model_copy(update={"tmp_max_age_seconds": 0}))
    (tmp_path / "a.png").write_bytes(_tiny_png())
    stage = get_stage("ingest")
    spec = {"output_uri": f"{bucket_uri}/ingest", "kind": "files", "splits": {"s": [str(tmp_path / "a.png")]}}
    stage.run(stage.parse_spec({**spec, "source": "t"}), impatient)
    assert _uploads(store, bucket, "_tmp/") == []
    assert _uploads(store, bucket, "elsewhere/") == ["elsewhere/upload.bin"]
    store._client._abort_multipart_upload(bucket, "elsewhere/upload.bin", theirs)
