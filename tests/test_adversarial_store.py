"""Probes of the embedded store as a local attacker would run them: every port the server opens
must require the store's generated credentials, and a recorded pid is trusted only when it is the
store's own process."""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import subprocess
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
