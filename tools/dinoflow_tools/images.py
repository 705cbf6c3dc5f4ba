"""Build, tag and push dinoflow's container images through the Docker Engine API.

    python -m dinoflow_tools.images [--only cpu|cuda] [--registry REG] [--tag TAG] [--push]
                                    [--base auto|public|debootstrap|IMAGE] [--wheels auto|index|wheelhouse]
                                    [-- COMMAND ...]

(``make images`` runs this; ``make demo-containers`` adds ``-- dinoflow demo --containers``.)

**Engine.** Whatever serves the Docker API: ``DOCKER_HOST``, else ``/var/run/docker.sock``. Where no
Docker engine answers and podman is installed, this starts ``podman system service`` on a private
socket for the run and stops it afterwards (its configuration and image storage live under the cache
dir, so images and build layers outlive the service). COMMAND, when given, runs after the builds with
``DOCKER_HOST`` pointing at the same engine.

**Base and wheels.** ``public`` builds the Dockerfiles' defaults: the digest-pinned python image and
the package index. Where Docker Hub does not answer (``auto``), the build stays on this machine: a
Debian bookworm base made with ``debootstrap`` and imported through the API
(``localhost/dinoflow-base:bookworm-<key>``), and a wheelhouse that ``pip wheel`` fills on the host
(through the host's own pip configuration, index or mirror) and that is served to the build on
127.0.0.1 (the build runs with host networking, ``PIP_NO_INDEX=1``). Both are cached under
``DINOFLOW_CACHE_DIR`` (default ``/var/cache/dinoflow`` for root, else ``~/.cache/dinoflow``), keyed
by their inputs, so a second build of unchanged dependencies reuses every heavy layer.

Registry credentials come from the engine's own login and are never read, printed or passed here.
The command ends its output with one JSON line: build seconds and sizes per image.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import filecmp
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinoflow.errors import DinoflowError

REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (Dockerfile relative to the repo root, what runs in it)
IMAGES: dict[str, tuple[str, str]] = {
    "cpu": ("images/Dockerfile.cpu", "ingest, dedup, curate, evaluate, promote, KFP components"),
    "cuda": ("images/Dockerfile.cuda", "pretrain, distill, embed on NVIDIA GPUs"),
}

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # the Dockerfile.cpu default
REGISTRY_PROBE = "https://registry-1.docker.io/v2/"  # answers 401 where Docker Hub can be reached
WHEELHOUSE_PORT = int(os.environ.get("DINOFLOW_WHEELHOUSE_PORT", "47311"))

# podman as a Docker API engine on a VM or CI machine without systemd: runc (crun refuses hybrid
# cgroup hierarchies), cgroupfs, no default ulimits (the stock ones exceed a container's hard limit
# here), host networking (tasks reach the embedded store on the host's loopback; builds reach the
# wheelhouse), events to a file (no journald).
PODMAN_CONF = """\
# written by dinoflow_tools.images
[containers]
default_ulimits = []
netns = "host"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

# The debootstrap base: Debian's Python 3.11 and venv, minus documentation, locales and apt lists.
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv")
DEBIAN_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
)


class NoDockerEngine(DinoflowError):
    """No Docker API engine answered and none could be started; images cannot be built here."""


@dataclass(frozen=True)
class ImagePlan:
    """One image to build: which Dockerfile, under which reference."""

    name: str
    dockerfile: str
    repository: str  # e.g. ghcr.io/acme/dinoflow
    tag: str  # the CUDA image's tag ends in -cuda (dinoflow.kfp.GPU_IMAGE)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


def default_tag() -> str:
    """The package version: an immutable tag (a moving ``:latest`` gives stale KFP cache hits)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dinoflow")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0-dev"


def plan_images(
    only: Sequence[str] | None = None,
    registry: str | None = None,
    tag: str | None = None,
    root: Path = REPO_ROOT,
) -> list[ImagePlan]:
    """The images to build, in order; fails early on an unknown name or a missing Dockerfile."""
    names = list(only) if only else list(IMAGES)
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        raise DinoflowError(f"unknown image {', '.join(unknown)}; choose from {', '.join(IMAGES)}")
    tag = tag or default_tag()
    if not tag or any(c in tag for c in " /:@"):
        raise DinoflowError(f"image tag {tag!r} is not valid: use letters, digits, '.', '_' or '-'")
    prefix = (registry.rstrip("/") + "/") if registry else ""
    plans = []
    for n in names:
        dockerfile = IMAGES[n][0]
        if not (root / dockerfile).is_file():
            raise DinoflowError(f"{dockerfile} not found under {root}: run from a dinoflow checkout")
        # One repository, flavour in the tag: the names the compiled pipelines use (dinoflow.kfp.IMAGE)
        plans.append(ImagePlan(n, dockerfile, f"{prefix}dinoflow", tag if n == "cpu" else f"{tag}-{n}"))
    return plans


def cache_dir() -> Path:
    """Where the base tarball, the wheelhouses and podman's storage live between runs."""
    if os.environ.get("DINOFLOW_CACHE_DIR"):
        return Path(os.environ["DINOFLOW_CACHE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/dinoflow")
    return Path.home() / ".cache" / "dinoflow"


# -- the engine --------------------------------------------------------------------------------------
def _ping(host: str, timeout_s: int) -> Any | None:
    import docker
    from docker.errors import DockerException

    try:
        client = docker.DockerClient(base_url=host, timeout=timeout_s)
        client.ping()
    except (DockerException, OSError):
        return None
    return client


def docker_client(timeout_s: int = 600) -> Any:
    """A docker SDK client whose engine answered a ping, or ``NoDockerEngine`` naming where it looked."""
    try:
        import docker  # noqa: F401
    except ImportError as e:  # pragma: no cover - docker is a declared dependency
        raise NoDockerEngine("the 'docker' Python package is not installed: pip install docker") from e
    where = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    client = _ping(where, timeout_s)
    if client is None:
        raise NoDockerEngine(
            f"no Docker engine answers at {where}: start Docker (or set DOCKER_HOST, or install "
            "podman) to build images; the Dockerfiles are still linted by the tests (hadolint)"
        )
    return client


@dataclass
class Engine:
    """A Docker API endpoint that answered: its URL, what serves it, and a client."""

    host: str
    kind: str  # "docker" (found) or "podman" (started here)
    client: Any


def podman_storage_driver() -> str:
    """overlay where the kernel has it (no copy of every layer), else vfs; DINOFLOW_PODMAN_STORAGE_DRIVER wins."""
    if os.environ.get("DINOFLOW_PODMAN_STORAGE_DRIVER"):
        return os.environ["DINOFLOW_PODMAN_STORAGE_DRIVER"]
    try:
        return "overlay" if "\toverlay\n" in Path("/proc/filesystems").read_text() else "vfs"
    except OSError:
        return "vfs"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL
    (a killed test run), so that no service outlives its build."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def service_tmpdir(home: Path) -> Path:
    """The service's own TMPDIR under the cache, where buildah stages each committed layer as a blob
    (6.2 GB for the CPU image's venv layer; /var/tmp otherwise). A killed build leaves it behind: the
    folders of services whose starting process is gone go first. (containers/storage stages a second
    copy in /var/tmp/storage* whatever TMPDIR or image_copy_tmp_dir say; podman removes it after the
    commit, a killed build does not.)"""
    root = home / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("pid-*"):
        try:
            os.kill(int(old.name.removeprefix("pid-")), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass
    mine = root / f"pid-{os.getpid()}"
    mine.mkdir(exist_ok=True)
    return mine


@contextlib.contextmanager
def podman_service(cache: Path, timeout_s: int = 3600, echo: Callable[[str], None] = print) -> Iterator[str]:
    """Run ``podman system service`` on a private socket while the block runs; yields its URL."""
    podman = shutil.which("podman")
    if podman is None:
        raise NoDockerEngine(
            f"no Docker engine answers at {os.environ.get('DOCKER_HOST') or DEFAULT_SOCKET} and podman "
            "is not installed: start Docker, set DOCKER_HOST, or install podman (apt-get install podman runc)"
        )
    driver = podman_storage_driver()
    home = cache / "podman"
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "containers.conf"
    if not conf.exists() or conf.read_text() != PODMAN_CONF:
        conf.write_text(PODMAN_CONF)
    sock_dir = Path(tempfile.mkdtemp(prefix="dinoflow-podman-"))
    url = f"unix://{sock_dir / 'podman.sock'}"
    log_path = sock_dir / "service.log"
    cmd = [
        podman,
        "--root", str(home / f"storage-{driver}"),
        "--runroot", str(home / f"run-{driver}"),
        "--storage-driver", driver,
        "system", "service", "--time=0", url,
    ]  # fmt: skip
    tmp = service_tmpdir(home)
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "TMPDIR": str(tmp)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches this process, which then stops the service
            preexec_fn=_die_with_parent,
        )
    try:
        deadline = time.monotonic() + 60
        while _ping(url, timeout_s) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise NoDockerEngine(f"podman system service did not start ({driver} storage): {tail[0]}")
            time.sleep(0.3)
        echo(f"container engine: podman {driver} storage under {home}, Docker API at {url}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def container_engine(
    cache: Path | None = None, timeout_s: int = 3600, echo: Callable[[str], None] = print
) -> Iterator[Engine]:
    """A Docker API engine for the block: a running Docker (DOCKER_HOST or the default socket), else
    a podman service started here and stopped afterwards; ``NoDockerEngine`` in one line otherwise."""
    try:
        import docker  # noqa: F401
    except ImportError as e:  # pragma: no cover - docker is a declared dependency
        raise NoDockerEngine("the 'docker' Python package is not installed: pip install docker") from e
    where = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    client = _ping(where, timeout_s)
    if client is not None:
        yield Engine(where, "docker", client)
        return
    if os.environ.get("DOCKER_HOST"):  # an explicit choice that does not answer is an error, not a hint
        raise NoDockerEngine(f"no Docker engine answers at DOCKER_HOST={where}")
    with podman_service(cache or cache_dir(), timeout_s, echo) as url:
        client = _ping(url, timeout_s)
        try:
            yield Engine(url, "podman", client)
        finally:
            client.close()


# -- base image and wheels ---------------------------------------------------------------------------
def _reachable(url: str, timeout_s: float = 5.0) -> bool:
    """True when ``url`` answers at all (any HTTP status): DNS, route and TLS work."""
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _image_exists(client: Any, ref: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(ref)
    except ImageNotFound:
        return False
    return True


def _unmount_under(path: Path) -> None:
    root = str(path.resolve())
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m == root or m.startswith(root + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


def debootstrap_rootfs(dest: Path, mirror: str, echo: Callable[[str], None] = print) -> None:
    """A minimal Debian rootfs with Python 3.11 (needs root and the debootstrap package)."""
    if shutil.which("debootstrap") is None:
        raise DinoflowError(
            "debootstrap is not installed: apt-get install debootstrap (or pass --base IMAGE)"
        )
    if os.geteuid() != 0:
        raise DinoflowError("debootstrap needs root: run as root, or pass --base IMAGE / --base public")
    echo(f"debootstrap {DEBIAN_SUITE} ({', '.join(DEBIAN_PACKAGES)}) from {mirror}")
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}"]
    try:
        r = subprocess.run([*cmd, DEBIAN_SUITE, str(dest), mirror], capture_output=True, text=True)
    finally:  # debootstrap mounts proc and sys inside the target; never leave them for a cleanup
        _unmount_under(dest)
    if r.returncode != 0:
        last = (r.stdout + r.stderr).strip().splitlines()[-1:] or ["no output"]
        raise DinoflowError(f"debootstrap failed ({r.returncode}): {last[0]}")
    for rel in DEBIAN_TRIM:
        shutil.rmtree(dest / rel, ignore_errors=True)


def debootstrap_base(client: Any, cache: Path, echo: Callable[[str], None] = print) -> str:
    """``localhost/dinoflow-base:bookworm-<key>`` in the engine: imported from the cached rootfs
    tarball, which debootstrap makes on the first run."""
    mirror = os.environ.get("DINOFLOW_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    key = _key(DEBIAN_SUITE, DEBIAN_PACKAGES, DEBIAN_TRIM, mirror)
    repo, tag = "localhost/dinoflow-base", f"{DEBIAN_SUITE}-{key}"
    ref = f"{repo}:{tag}"
    if _image_exists(client, ref):
        return ref
    tar_path = cache / "base" / f"{tag}.tar"
    if not tar_path.exists():
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tar_path.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            debootstrap_rootfs(rootfs, mirror, echo)
            partial = Path(tmp) / "rootfs.tar"
            with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tf:
                for entry in sorted(rootfs.iterdir()):
                    tf.add(entry, arcname=entry.name)
            partial.replace(tar_path)
    echo(f"importing {tar_path.name} as {ref}")
    out = client.api.import_image_from_file(
        str(tar_path), repository=repo, tag=tag, changes=["ENV LANG=C.UTF-8", 'CMD ["python3"]']
    )
    image_id = json.loads(out.strip().splitlines()[-1])["status"]
    client.api.tag(image_id, repo, tag)  # podman's import ignores the tag it was given
    return ref


def _dockerfile_arg(dockerfile: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", dockerfile.read_text(), flags=re.M)
    if not m:
        raise DinoflowError(f"{dockerfile.name} has no ARG {name}=...")
    return m.group(1).strip('"')


def image_requirements(name: str, root: Path = REPO_ROOT) -> list[str]:
    """What the image's deps stage installs (its RUN computes the same list from pyproject.toml):
    the [project] dependencies and the build requirements; the CUDA image swaps faiss-cpu for
    its FAISS_GPU_PACKAGE."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    deps = list(project["project"]["dependencies"])
    if name == "cuda":
        gpu = _dockerfile_arg(root / IMAGES["cuda"][0], "FAISS_GPU_PACKAGE")
        deps = [d for d in deps if not d.startswith("faiss-cpu")] + [gpu]
    return deps + build_requirements(root)


def build_requirements(root: Path = REPO_ROOT) -> list[str]:
    """pyproject.toml's [build-system] requires: the deps stage installs them so that the package
    builds without an index (``--no-build-isolation``); the runtime drops ``wheel`` (and pip)."""
    return list(tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"])


def _link_duplicates(src: Path, dst: Path) -> None:
    """Hard-link the files of ``dst`` that ``src`` holds byte for byte (the wheelhouses share torch)."""
    for f in dst.iterdir():
        twin = src / f.name
        if twin.is_file() and not f.samefile(twin) and filecmp.cmp(f, twin, shallow=False):
            f.unlink()
            os.link(twin, f)


def wheelhouse(
    name: str, cache: Path, root: Path = REPO_ROOT, echo: Callable[[str], None] = print
) -> tuple[Path, bool]:
    """The wheels image ``name`` installs, made on the host by ``pip wheel`` under constraints.txt
    and cached by its inputs; returns (folder, whether it was already there)."""
    if sys.version_info[:2] != (3, 11) or not sys.platform.startswith("linux"):
        raise DinoflowError(
            "a wheelhouse is built with the host's Python, which must be Linux CPython 3.11 like the "
            "images'; use --wheels index"
        )
    torch_index = None
    if name == "cpu":
        if _reachable(f"{TORCH_CPU_INDEX}/"):
            torch_index = TORCH_CPU_INDEX
        else:
            echo(
                f"note: {TORCH_CPU_INDEX} does not answer: the CPU image gets PyPI's torch, which "
                "carries the CUDA libraries (nvidia-*, triton)"
            )
    reqs = image_requirements(name, root)
    constraints = (root / "constraints.txt").read_text()
    key = _key(name, reqs, constraints, torch_index, sys.version_info[:2], os.uname().machine)
    home = cache / "wheels"
    folder = home / f"{name}-{key}"
    if (folder / ".complete").exists():
        return folder, True
    partial = home / f"{name}-{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    echo(f"wheelhouse {folder.name}: pip wheel {len(reqs)} requirements under constraints.txt")
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "-c", str(root / "constraints.txt")]
    cmd += ["-w", str(partial), *(["--extra-index-url", torch_index] if torch_index else []), *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("ERROR")] or r.stderr.splitlines()[
            -1:
        ]
        raise DinoflowError(f"pip wheel for the {name} image failed: {err[0] if err else r.returncode}")
    for other in home.glob("*-*"):  # share identical wheels with the other flavours' folders
        if other.is_dir() and (other / ".complete").exists():
            _link_duplicates(other, partial)
    (partial / ".complete").write_text(json.dumps({"requirements": reqs, "torch_index": torch_index}))
    partial.rename(folder)
    return folder, False


@contextlib.contextmanager
def serve_folder(folder: Path, port: int = WHEELHOUSE_PORT) -> Iterator[str]:
    """Serve ``folder`` read-only on 127.0.0.1:port (pip's --find-links reads the listing); yields
    the URL. The port is fixed so that the build argument, and with it the layer cache, is stable."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    try:
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", port), functools.partial(Quiet, directory=str(folder))
        )
    except OSError as e:
        raise DinoflowError(
            f"cannot serve the wheelhouse on 127.0.0.1:{port} ({e.strerror}): set DINOFLOW_WHEELHOUSE_PORT"
        ) from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def build_lock(cache: Path, echo: Callable[[str], None] = print) -> Iterator[None]:
    """One image build at a time per machine: two 6 GB installs on 2 cores help nobody, and the
    wheelhouse port is fixed."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo("waiting for another dinoflow image build on this machine")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- build, measure, push ----------------------------------------------------------------------------
_STEP_ID = re.compile(r"^-+> (?:Using cache )?([0-9a-f]{11,64})\s*$", flags=re.M)


def _stream_errors(lines: Iterator[dict], what: str, echo) -> set[str]:
    """Echo a build or push stream, fail on its first error; returns the step image ids it named."""
    ids: set[str] = set()
    for chunk in lines:
        if "error" in chunk or "errorDetail" in chunk:
            msg = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "unknown error")
            raise DinoflowError(f"{what} failed: {msg.strip().splitlines()[-1]}")
        text = chunk.get("stream") or chunk.get("status")
        if text and text.strip():
            ids.update(_STEP_ID.findall(text))
            echo(text.rstrip())
    return ids


def build_image(
    client: Any,
    plan: ImagePlan,
    root: Path = REPO_ROOT,
    echo=print,
    buildargs: dict[str, str] | None = None,
    network_mode: str | None = None,
    step_ids: set[str] | None = None,
) -> str:
    """Build one image from the repository root (the context ``.dockerignore`` trims); returns its id.
    The base is pulled only when the engine lacks it (the Dockerfiles pin it by digest). The ids of
    the build's step images are added to ``step_ids``."""
    lines = client.api.build(
        path=str(root),
        dockerfile=plan.dockerfile,
        tag=plan.ref,
        rm=True,
        forcerm=True,
        decode=True,
        pull=False,
        buildargs=buildargs or {},
        network_mode=network_mode,
    )
    ids = _stream_errors(lines, f"building {plan.ref}", echo)
    if step_ids is not None:
        step_ids |= ids
    return client.images.get(plan.ref).id


def prune_stale(client: Any, keep: set[str]) -> int:
    """Remove the untagged images (earlier builds' steps and replaced images) that none of ``keep``
    (step ids of this run, full or short) names; images with children or in use stay. Only for the
    private podman storage, where every image is one of ours; returns how many went."""
    from docker.errors import APIError

    removed, progress = 0, True
    while progress:
        progress = False
        for image in client.images.list(all=True):
            digest = image.id.split(":")[-1]
            if image.tags or any(digest.startswith(k) for k in keep):
                continue
            try:
                client.images.remove(image.id)
            except APIError:  # a parent of a kept image, or used by a container
                continue
            removed, progress = removed + 1, True
    return removed


# what an image's size is made of: the biggest folders of its venv, the package, the rest
_SIZE_SCRIPT = (
    "cd /opt/venv/lib/python3*/site-packages && du -sk * | sort -rn | head -8; "
    "du -sk /opt/venv | sed 's|/opt/venv|(venv)|'; du -sk /opt/dinoflow | sed 's|/opt/dinoflow|(dinoflow)|'"
)


def run_output(client: Any, ref: str, command: Any = None, **kwargs: Any) -> bytes:
    """A container's whole stdout once it has exited (status 0, else ``DinoflowError``), the
    container removed. Detached, then wait and logs: podman's API answers a non-detached
    ``containers.run(remove=True)`` with its output cut short at times (3 of 6 short runs here)."""
    container = client.containers.run(ref, command, detach=True, **kwargs)
    try:
        status = container.wait()
        out = container.logs(stdout=True, stderr=False)
        if status.get("StatusCode") != 0:
            err = container.logs(stdout=False, stderr=True).decode(errors="replace").strip().splitlines()
            raise DinoflowError(f"{ref} exited {status.get('StatusCode')}: {err[-1] if err else 'no output'}")
    finally:
        container.remove(force=True)
    return out


def image_sizes(client: Any, ref: str) -> dict[str, float]:
    """Size of an image in GB, with its largest parts (site-packages folders, the venv, the package)."""
    size = client.images.get(ref).attrs["Size"]
    out = run_output(client, ref, [_SIZE_SCRIPT], entrypoint=["sh", "-c"], network_mode="host")
    parts = {"image": round(size / 1e9, 3)}
    for line in out.decode().splitlines():
        kb, _, name = line.partition("\t")
        parts[name.strip()] = round(int(kb) * 1024 / 1e9, 3)
    parts["(base and the rest)"] = round(
        parts["image"] - parts.get("(venv)", 0) - parts.get("(dinoflow)", 0), 3
    )
    return parts


def push_image(client: Any, plan: ImagePlan, echo=print) -> None:
    """Push one image with the engine's stored registry login."""
    lines = client.api.push(plan.repository, tag=plan.tag, stream=True, decode=True)
    _stream_errors(lines, f"pushing {plan.ref}", echo)


@dataclass
class BuildSource:
    """Where a build takes its base and its wheels from."""

    base: str | None  # None: the Dockerfile's default (public) base
    wheelhouse: bool


def resolve_source(base: str, wheels: str, echo=print) -> BuildSource:
    """``auto``: the Dockerfiles' defaults where Docker Hub answers, else debootstrap + wheelhouse."""
    offline = None
    if "auto" in (base, wheels):
        offline = not _reachable(REGISTRY_PROBE)
        if offline:
            echo("Docker Hub does not answer: debootstrap base and a host wheelhouse (air-gapped build)")
    use_base = {"public": None, "debootstrap": "debootstrap"}.get(base, base)
    if base == "auto":
        use_base = "debootstrap" if offline else None
    use_wheels = wheels == "wheelhouse" or (wheels == "auto" and bool(offline))
    return BuildSource(use_base, use_wheels)


def build_images(
    engine: Engine,
    plans: Sequence[ImagePlan],
    source: BuildSource,
    root: Path = REPO_ROOT,
    cache: Path | None = None,
    echo=print,
) -> dict[str, dict[str, Any]]:
    """Build ``plans`` on ``engine`` from ``source``; returns per image its id, build seconds and sizes."""
    cache = cache or cache_dir()
    figures: dict[str, dict[str, Any]] = {}
    step_ids: set[str] = set()
    used_wheels: set[Path] = set()
    ours = engine.kind == "podman"  # the private podman storage, where every image is one of ours

    def recorded(name: str) -> Path:
        return cache / "podman" / f"steps-{name}.json"

    with build_lock(cache, echo):
        args: dict[str, str] = {}
        if source.base == "debootstrap":
            t0 = time.perf_counter()
            args["BASE_IMAGE"] = debootstrap_base(engine.client, cache, echo)
            figures["base"] = {"ref": args["BASE_IMAGE"], "seconds": round(time.perf_counter() - t0, 1)}
        elif source.base:
            args["BASE_IMAGE"] = source.base
        for plan in plans:
            t0 = time.perf_counter()
            plan_args = dict(args)
            with contextlib.ExitStack() as stack:
                if source.wheelhouse:
                    folder, cached = wheelhouse(plan.name, cache, root, echo)
                    used_wheels.add(folder)
                    figures[f"wheels-{plan.name}"] = {
                        "cached": cached,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                    if ours and not cached:  # new dependencies: drop the old image's ~12 GB first
                        others = [recorded(n) for n in IMAGES if n != plan.name and recorded(n).exists()]
                        keep = step_ids.union(*(json.loads(f.read_text()) for f in others))
                        with contextlib.suppress(Exception):
                            engine.client.images.remove(plan.ref)
                        prune_stale(engine.client, keep)
                    url = stack.enter_context(serve_folder(folder.parent))
                    plan_args |= {
                        "PIP_NO_INDEX": "1",
                        "PIP_FIND_LINKS": f"{url}{folder.name}/",
                        "PIP_INDEX_URL": "",
                        "PIP_EXTRA_INDEX_URL": "",
                    }
                echo(f"building {plan.ref} from {plan.dockerfile} ({IMAGES[plan.name][1]})")
                t1 = time.perf_counter()
                plan_ids: set[str] = set()
                image_id = build_image(
                    engine.client,
                    plan,
                    root,
                    echo,
                    buildargs=plan_args,
                    network_mode="host" if source.wheelhouse else None,
                    step_ids=plan_ids,
                )
                step_ids |= plan_ids
                if ours:
                    recorded(plan.name).write_text(json.dumps(sorted(plan_ids)))
            sizes = image_sizes(engine.client, plan.ref)
            figures[plan.name] = {
                "ref": plan.ref,
                "id": image_id,
                "build_seconds": round(time.perf_counter() - t1, 1),
                "size_gb": sizes["image"],
                "parts_gb": {k: v for k, v in sizes.items() if k != "image"},
            }
            echo(
                f"built {plan.ref} {image_id[:19]} in {figures[plan.name]['build_seconds']} s: {sizes['image']} GB"
            )
            for part, gb in sorted(figures[plan.name]["parts_gb"].items(), key=lambda kv: -kv[1]):
                echo(f"    {gb:7.3f} GB  {part}")
        # podman keeps every earlier build's layers: without this, each dependency change adds ~12 GB
        if ours and {p.name for p in plans} == set(IMAGES):
            n = prune_stale(engine.client, step_ids)
            if n:
                echo(f"removed {n} stale images of earlier builds")
            if used_wheels:
                for old in (cache / "wheels").iterdir():
                    if old not in used_wheels:
                        shutil.rmtree(old, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m dinoflow_tools.images",
        description="Build (and push) dinoflow's images; then run COMMAND against the same engine.",
        epilog="After '--': a command to run with DOCKER_HOST set to the engine (e.g. dinoflow demo --containers).",
    )
    p.add_argument(
        "--only", action="append", choices=sorted(IMAGES), help="build only this image (repeatable)"
    )
    p.add_argument(
        "--registry",
        default=os.environ.get("DINOFLOW_IMAGE_REGISTRY", "ghcr.io/dinoflow"),
        help="e.g. ghcr.io/acme",
    )
    p.add_argument("--tag", default=None, help="image tag (default: the package version)")
    p.add_argument("--push", action="store_true", help="push after building (needs --registry)")
    p.add_argument(
        "--base",
        default=os.environ.get("DINOFLOW_IMAGE_BASE", "auto"),
        help="auto | public (the Dockerfiles' pinned python image) | debootstrap | an image reference",
    )
    p.add_argument(
        "--wheels",
        default=os.environ.get("DINOFLOW_IMAGE_WHEELS", "auto"),
        choices=["auto", "index", "wheelhouse"],
        help="index: pip in the build reaches the package index; wheelhouse: wheels made on the host",
    )
    args = p.parse_args(argv)
    rc = 0
    try:
        if args.push and not args.registry:
            raise DinoflowError("--push needs --registry (or DINOFLOW_IMAGE_REGISTRY), e.g. ghcr.io/acme")
        plans = plan_images(args.only, args.registry, args.tag)
        with container_engine() as engine:
            source = resolve_source(args.base, args.wheels)
            t0 = time.perf_counter()
            figures = build_images(engine, plans, source)
            if args.push:
                for plan in plans:
                    push_image(engine.client, plan)
                    print(f"pushed {plan.ref}")
            total = round(time.perf_counter() - t0, 1)
            if command:
                print(f"running {' '.join(command)} with DOCKER_HOST={engine.host}", flush=True)
                rc = subprocess.call(command, env={**os.environ, "DOCKER_HOST": engine.host})
    except DinoflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"engine": engine.kind, "seconds": total, **figures}, sort_keys=True))
    return rc


if __name__ == "__main__":
    sys.exit(main())
