"""A small client over the ``minio`` SDK for ``s3://bucket/key`` URIs.

Writes are atomic from a reader's view: the bytes go to a temporary key under ``_tmp/``, are copied
server-side to the final key, and the temporary key is removed. A stage directory is complete only
when its ``_SUCCESS`` marker (written last, holding the result JSON) exists.

A writer killed between the two steps leaves its ``_tmp/`` key behind (or, killed mid-upload of a
large file, an unfinished multipart upload there): ``clean_stale_tmp`` removes or aborts those older
than ``S3Settings.tmp_max_age_seconds``. Local temporary files (``local_tmp_file``) and partial
downloads are named after the process that made them, so ``sweep_local_tmp`` and
``sweep_partial_downloads`` remove those of dead processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import S3Error

from dinoflow.errors import StorageError
from dinoflow.settings import S3Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

SUCCESS = "_SUCCESS"
_TMP_DIR = "_tmp"
# S3 error codes worth retrying: the server is busy or failed internally, not our request.
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted"}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CRED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PARTIAL = ".part"  # suffix of a download in progress (``get_file``)
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")  # a single-part upload's ETag is its MD5; a multipart's is not


class ObjectChanged(StorageError):
    """The object is not the version asked for (it was replaced since it was looked at)."""


# What a cloud injects into a pod whose ServiceAccount has an identity: EKS IRSA / pod identity
# (a web identity token for STS), ECS-style container credential endpoints.
_IDENTITY_ENV = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def workload_identity() -> Any:
    """Credentials without static keys: minio's IAM provider (``IamAwsProvider``: a web identity token
    exchanged at STS, ``DINOFLOW_S3_STS_ENDPOINT`` for a non-AWS STS such as MinIO's, or a container
    credentials endpoint), tried once here so that a pod without either fails at once, in one line."""
    from minio.credentials import IamAwsProvider

    found = [k for k in _IDENTITY_ENV if os.environ.get(k)]
    if not found:
        raise StorageError(
            "object-store credentials missing: set DINOFLOW_S3_ACCESS_KEY and DINOFLOW_S3_SECRET_KEY, or run "
            "with workload identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN, e.g. EKS IRSA)"
        )
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=10), retries=urllib3.Retry(total=2, backoff_factor=0.2)
    )
    provider = IamAwsProvider(custom_endpoint=os.environ.get("DINOFLOW_S3_STS_ENDPOINT"), http_client=http)
    try:
        provider.retrieve()
    except Exception as e:  # the provider raises whatever its HTTP client or STS answered
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise StorageError(
            f"workload identity ({found[0]}) gave no object-store credentials: {type(e).__name__}: {text}"
        ) from None
    return provider


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; anything else is a clear error."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise StorageError(f"not an object-store URI: {uri!r} (expected s3://bucket/key)")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(
            f"URI {uri!r}: bucket {bucket!r} is not a valid S3 bucket name "
            "(3-63 characters: lowercase letters, digits, '.', '-')"
        )
    problem = key_problem(uri)
    if problem:
        raise StorageError(problem)
    return bucket, key


def key_problem(uri: str) -> str | None:
    """Why the key part of an ``s3://`` URI is unsafe (a '.'/'..' segment, a control character), or None."""
    key = uri[len("s3://") :].partition("/")[2]
    if any(seg in (".", "..") for seg in key.split("/")):
        return f"URI {uri!r}: '.' and '..' are not allowed as key segments (no relative paths)"
    if _CONTROL.search(key):
        return f"URI {uri!r}: control characters are not allowed in object keys"
    return None


def join_uri(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


class ObjectStore:
    """S3 access with retries, atomic writes, and errors that say what to fix."""

    def __init__(self, settings: S3Settings, *, crash_hook: Callable[[str], None] | None = None):
        if not settings.endpoint:
            raise StorageError(
                "no object-store endpoint: set DINOFLOW_S3_ENDPOINT (or run `dinoflow store up` "
                "for the embedded store)"
            )
        self.settings = settings
        host, secure = settings.host_and_tls()
        timeout = urllib3.Timeout(connect=settings.timeout_seconds, read=settings.timeout_seconds)
        http = urllib3.PoolManager(timeout=timeout, retries=urllib3.Retry(total=0), maxsize=16)
        access, secret = settings.access_key, settings.secret_key
        static = access is not None and secret is not None
        self._client = Minio(
            host,
            access_key=access.get_secret_value() if access is not None and static else None,
            secret_key=secret.get_secret_value() if secret is not None and static else None,
            credentials=None if static else workload_identity(),
            secure=secure,
            region=settings.region,
            http_client=http,
        )
        self.endpoint = host
        # Test seam: called between the temporary write and the final copy (simulates a crash).
        self._crash_hook = crash_hook
        self._known_buckets: set[str] = set()

    # -- retries -------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        attempts = self.settings.max_retries + 1
        for i in range(attempts):
            try:
                return fn()
            except S3Error as e:
                if e.code in _TRANSIENT_CODES and i + 1 < attempts:
                    self._sleep(i, what, e)
                    continue
                raise self._explain(what, e) from None
            except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError) as e:
                if i + 1 < attempts:
                    self._sleep(i, what, e)
                    continue
                raise StorageError(
                    f"object store at {self.endpoint} unreachable while {what} after {attempts} "
                    f"attempt(s): {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                ) from None
        raise AssertionError("unreachable")

    def _sleep(self, i: int, what: str, e: Exception) -> None:
        delay = self.settings.retry_base_seconds * (2**i) * (1 + 0.25 * random.random())
        log.warning("transient error while %s (%s); retry %d in %.2fs", what, type(e).__name__, i + 1, delay)
        time.sleep(delay)

    def _explain(self, what: str, e: S3Error) -> StorageError:
        if e.code == "PreconditionFailed":
            return ObjectChanged(f"s3://{e.bucket_name}/{e.object_name} changed while {what}")
        if e.code == "NoSuchBucket":
            return StorageError(f"bucket {e.bucket_name!r} does not exist (while {what})")
        if e.code in ("NoSuchKey", "NoSuchObject"):
            return StorageError(f"object s3://{e.bucket_name}/{e.object_name} does not exist (while {what})")
        if e.code in _CRED_CODES:
            return StorageError(
                f"object store at {self.endpoint} refused the credentials ({e.code}) while {what}: "
                "check DINOFLOW_S3_ACCESS_KEY / DINOFLOW_S3_SECRET_KEY"
            )
        return StorageError(f"object store error {e.code} while {what}: {e.message}")

    # -- buckets -------------------------------------------------------------------------------
    def ensure_bucket(self, bucket: str) -> None:
        if bucket in self._known_buckets:
            return
        if not self._call(f"checking bucket {bucket}", lambda: self._client.bucket_exists(bucket)):
            try:
                self._call(f"creating bucket {bucket}", lambda: self._client.make_bucket(bucket))
            except StorageError as e:  # a concurrent writer may have created it
                if "BucketAlreadyOwnedByYou" not in str(e) and "BucketAlreadyExists" not in str(e):
                    raise
        self._known_buckets.add(bucket)

    def bucket_exists(self, bucket: str) -> bool:
        return self._call(f"checking bucket {bucket}", lambda: self._client.bucket_exists(bucket))

    # -- writes --------------------------------------------------------------------------------
    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Atomic put: temporary key, server-side copy to the final key, temporary key removed."""
        bucket, key = parse_uri(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"cannot write to {uri!r}: it names a folder, not an object")
        self.ensure_bucket(bucket)
        tmp = f"{_TMP_DIR}/{uuid.uuid4().hex}/{key}"
        self._call(
            f"writing {uri}",
            lambda: self._client.put_object(
                bucket, tmp, io.BytesIO(data), len(data), content_type=content_type
            ),
        )
        self._publish(uri, bucket, key, tmp)

    def _publish(self, uri: str, bucket: str, key: str, tmp: str) -> None:
        """Server-side copy of the uploaded temporary object to its final key (what makes a write
        atomic for readers), then remove the temporary object whatever happened."""
        try:
            if self._crash_hook is not None:
                self._crash_hook(uri)
            self._call(
                f"publishing {uri}", lambda: self._client.copy_object(bucket, key, CopySource(bucket, tmp))
            )
        finally:
            self._call(f"cleaning {tmp}", lambda: self._client.remove_object(bucket, tmp))

    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        bucket, key = parse_uri(uri)
        self.ensure_bucket(bucket)
        tmp = f"{_TMP_DIR}/{uuid.uuid4().hex}/{key}"
        self._call(f"uploading {path} to {uri}", lambda: self._client.fput_object(bucket, tmp, str(path)))
        self._publish(uri, bucket, key, tmp)

    def put_json(self, uri: str, obj: Any) -> None:
        self.put_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode(), "application/json")

    # -- reads ---------------------------------------------------------------------------------
    def get_bytes(self, uri: str) -> bytes:
        bucket, key = parse_uri(uri)

        def read() -> bytes:
            resp = self._client.get_object(bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"reading {uri}", read)

    def get_json(self, uri: str) -> Any:
        return json.loads(self.get_bytes(uri))

    def open(self, uri: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object in chunks (for objects too large to hold in memory)."""
        bucket, key = parse_uri(uri)
        resp = self._call(f"opening {uri}", lambda: self._client.get_object(bucket, key))
        try:
            yield from resp.stream(chunk_bytes)
        finally:
            resp.close()
            resp.release_conn()

    def get_file(self, uri: str, path: str | os.PathLike[str], etag: str | None = None) -> Path:
        """Download to ``path`` atomically and checked: the bytes go to a temporary file named after
        this process (``.{name}.{pid}-{start}-{id}.part``), renamed to ``path`` only when their size,
        and their MD5 where the ETag is one, are what the store sent. ``etag`` asks for that version
        (``ObjectChanged`` otherwise). A download killed midway leaves only the temporary file, which
        ``sweep_partial_downloads`` removes once its process is gone."""
        bucket, key = parse_uri(uri)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{_process_tag()}-{uuid.uuid4().hex}{_PARTIAL}")
        headers: Any = {"If-Match": f'"{etag}"'} if etag else None

        def fetch() -> str | None:
            resp = self._client.get_object(bucket, key, request_headers=headers)
            try:
                size, md5 = 0, hashlib.md5()
                with open(tmp, "wb") as f:
                    for chunk in resp.stream(1 << 20):
                        f.write(chunk)
                        md5.update(chunk)
                        size += len(chunk)
                sent = resp.headers.get("Content-Length")
                tag = (resp.headers.get("ETag") or "").strip('"')
            finally:
                resp.close()
                resp.release_conn()
            if sent is not None and int(sent) != size:
                return f"{size} of {sent} bytes"
            if _MD5_ETAG.match(tag) and md5.hexdigest() != tag:
                return f"MD5 {md5.hexdigest()} is not the ETag {tag}"
            return None

        try:
            problem = self._call(f"downloading {uri}", fetch)
            if problem:
                raise StorageError(f"download of {uri} is not the object ({problem}); nothing was kept")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def cached(self, uri: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local copy of ``uri``, downloaded once per (uri, etag). A copy is used only while its size
        is the object's (else fetched again); a download is checked and renamed into place
        (``get_file``), after the partial downloads of dead processes beside it are removed."""
        root = Path(cache_dir or default_cache_dir() / "objects")
        for attempt in range(3):
            st = self.stat(uri)
            name = hashlib.sha1(f"{self.endpoint}|{uri}|{st['etag']}".encode()).hexdigest()
            dest = root / name[:2] / f"{name}{Path(parse_uri(uri)[1]).suffix}"
            try:
                if dest.stat().st_size == st["size"]:
                    return dest
                log.warning("cached copy of %s is not the object's size: downloading it again", uri)
            except FileNotFoundError:
                pass
            sweep_partial_downloads(dest.parent, self.settings.tmp_max_age_seconds)
            try:
                return self.get_file(uri, dest, etag=st["etag"])
            except ObjectChanged:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stat(self, uri: str) -> dict[str, Any]:
        bucket, key = parse_uri(uri)
        st = self._call(f"stat {uri}", lambda: self._client.stat_object(bucket, key))
        return {"size": st.size, "etag": st.etag, "last_modified": st.last_modified}

    def exists(self, uri: str) -> bool:
        bucket, key = parse_uri(uri)
        try:
            self._call(f"stat {uri}", lambda: self._client.stat_object(bucket, key))
            return True
        except StorageError as e:
            if "does not exist" in str(e):
                return False
            raise

    def list(self, prefix_uri: str, recursive: bool = True) -> list[str]:
        """URIs of the objects under a prefix (temporary keys excluded), sorted."""
        bucket, prefix = parse_uri(prefix_uri)
        if not self.bucket_exists(bucket):
            return []
        objs = self._call(
            f"listing {prefix_uri}",
            lambda: list(self._client.list_objects(bucket, prefix=prefix, recursive=recursive)),
        )
        return sorted(
            f"s3://{bucket}/{o.object_name}" for o in objs if not o.object_name.startswith(_TMP_DIR + "/")
        )

    def delete(self, uri: str) -> None:
        bucket, key = parse_uri(uri)
        self._call(f"deleting {uri}", lambda: self._client.remove_object(bucket, key))

    def delete_prefix(self, prefix_uri: str) -> int:
        uris = self.list(prefix_uri)
        for u in uris:
            self.delete(u)
        return len(uris)

    def clean_stale_tmp(self, bucket: str, older_than_seconds: float | None = None) -> int:
        """Remove ``_tmp/`` keys of ``bucket`` older than ``older_than_seconds`` (default
        ``settings.tmp_max_age_seconds``) and abort its unfinished multipart uploads under ``_tmp/``
        started before then: what writers killed mid-write left. Returns how many."""
        age = self.settings.tmp_max_age_seconds if older_than_seconds is None else older_than_seconds
        if not self.bucket_exists(bucket):
            return 0
        objs = self._call(
            f"listing s3://{bucket}/{_TMP_DIR}/",
            lambda: list(self._client.list_objects(bucket, prefix=_TMP_DIR + "/", recursive=True)),
        )
        now = dt.datetime.now(dt.UTC)
        stale = [
            o.object_name for o in objs if o.last_modified and (now - o.last_modified).total_seconds() >= age
        ]
        for key in stale:
            self.delete(f"s3://{bucket}/{key}")
        if stale:
            log.info("removed %d stale temporary object(s) under s3://%s/%s/", len(stale), bucket, _TMP_DIR)
        return len(stale) + self._abort_stale_uploads(bucket, now - dt.timedelta(seconds=age))

    def _abort_stale_uploads(self, bucket: str, before: dt.datetime) -> int:
        """Abort the multipart uploads under ``_tmp/`` of ``bucket`` started before ``before`` (a
        killed ``put_file`` of a large file leaves one: its parts take space but no key shows them)."""
        client = self._client
        stale: list[Any] = []
        marker: str | None = None
        while True:
            page = self._call(
                f"listing unfinished uploads under s3://{bucket}/{_TMP_DIR}/",
                partial(client._list_multipart_uploads, bucket, prefix=_TMP_DIR + "/", key_marker=marker),
            )
            stale += [u for u in page.uploads if u.initiated_time is None or u.initiated_time <= before]
            marker = page.next_key_marker
            if not page.is_truncated or not marker:
                break
        for u in stale:
            self._call(
                f"aborting the upload of s3://{bucket}/{u.object_name}",
                partial(client._abort_multipart_upload, bucket, u.object_name, u.upload_id),
            )
        if stale:
            log.info("aborted %d unfinished upload(s) under s3://%s/%s/", len(stale), bucket, _TMP_DIR)
        return len(stale)

    # -- stage directories -----------------------------------------------------------------------
    def write_success(self, prefix_uri: str, payload: dict[str, Any]) -> None:
        """Mark a stage directory complete; written last."""
        self.put_json(join_uri(prefix_uri, SUCCESS), payload)

    def read_success(self, prefix_uri: str) -> dict[str, Any] | None:
        uri = join_uri(prefix_uri, SUCCESS)
        return self.get_json(uri) if self.exists(uri) else None


def read_local_bytes(path: str | os.PathLike[str], what: str, max_bytes: int, dir_hint: str = "") -> bytes:
    """A local file's bytes, or one ``SpecError`` line saying why not: missing, a directory, larger
    than ``max_bytes``, unreadable. ``what`` names the file for the message ("input", "spec file")."""
    from dinoflow.errors import SpecError

    p = Path(path)
    if not p.exists():
        raise SpecError(f"{what} {p} does not exist")
    if p.is_dir():
        raise SpecError(f"{what} {p} is a directory, not a file{dir_hint}")
    try:
        if p.stat().st_size > max_bytes:
            raise SpecError(f"{what} {p} is larger than {max_bytes} bytes")
        return p.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read {what} {p}: {e.strerror or e}") from None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): with the pid, a process's
    identity that survives pid reuse; None when the process does not exist (or no /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def local_tmp_dir() -> Path:
    """The folder of dinoflow's local temporary files (private to its owner)."""
    path = Path(tempfile.gettempdir()) / f"dinoflow-tmp-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _process_tag() -> str:
    """``{pid}-{start}``: this process, told apart from a later one that reuses its pid."""
    pid = os.getpid()
    return f"{pid}-{_start_time(pid) or 0}"


def _maker_exited(tag: str) -> bool | None:
    """For a name that starts with ``{pid}-{start}-``: whether that process has exited; None when
    the name carries no such tag."""
    pid, _, rest = tag.partition("-")
    start = rest.partition("-")[0]
    if not pid.isdigit() or not start:
        return None
    return _start_time(int(pid)) != start


def local_tmp_file(suffix: str = "") -> Path:
    """A new empty local temporary file named after this process (``{pid}-{start}-{id}{suffix}``),
    so ``sweep_local_tmp`` can tell when its maker is gone. The caller deletes it when done."""
    path = local_tmp_dir() / f"{_process_tag()}-{uuid.uuid4().hex}{suffix}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    return path


def sweep_local_tmp() -> int:
    """Delete the local temporary files whose making process has exited (killed before it could
    clean up: a killed pretrain leaves its checkpoint files). Returns how many."""
    if _start_time(os.getpid()) is None:
        return 0  # no /proc here: a process's identity cannot be told, so nothing is removed
    removed = 0
    for f in local_tmp_dir().iterdir():
        if not _maker_exited(f.name):
            continue  # not ours, or its process still runs
        f.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d local temporary file(s) of exited processes", removed)
    return removed


def sweep_partial_downloads(folder: Path, max_age_seconds: float) -> int:
    """Delete the partial downloads in ``folder`` (``get_file``'s ``.part`` files) whose process has
    exited, and those without a process tag (``minio``'s ``.part.minio``, earlier versions') not
    written to for ``max_age_seconds``. Returns how many."""
    if not folder.is_dir():
        return 0
    knows_processes = _start_time(os.getpid()) is not None
    removed = 0
    now = time.time()
    for f in folder.iterdir():
        if not f.name.startswith(".") or not f.name.endswith((_PARTIAL, ".part.minio")):
            continue
        exited = _maker_exited(f.name[: -len(_PARTIAL)].rpartition(".")[2]) if knows_processes else None
        try:
            if exited or (exited is None and now - f.stat().st_mtime >= max_age_seconds):
                f.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # its download finished, or another sweep took it
    if removed:
        log.info("removed %d partial download(s) of exited processes in %s", removed, folder)
    return removed


def default_cache_dir() -> Path:
    base = os.environ.get("DINOFLOW_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dinoflow"
    )
    return Path(base)
