"""The pipeline in its images: kfp.local's DockerRunner runs every component's own container command in
dinoflow's CPU and CUDA images, as uid 10001 on a read-only root filesystem with /tmp writable (a pod as
the chart runs it), against an embedded store on the host, and each stage's result equals that of the
same tiny run in-process.

Marker ``containers``, its own CI step (``make test-containers``): the module first builds both images
through ``dinoflow_tools.images`` (base, wheelhouse and layers cached under DINOFLOW_CACHE_DIR, so only
a dependency change rebuilds the heavy layers). Where no container engine can start, it skips with the
reason in one line.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import time

import pytest

from dinoflow_tools import containers, images

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

REGISTRY = "ghcr.io/dinoflow"  # the references the compiled pipelines run (dinoflow.kfp.IMAGE)
POD = {"read_only": True, "tmpfs": {"/tmp": "rw,size=64m,mode=1777"}, "network_mode": "host"}


def _report(config, figures: dict) -> None:
    """One JSON line of figures on the terminal, past pytest's capture (CI's log keeps them)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line(json.dumps(figures, sort_keys=True), flush=True)


# A cold build of both images peaks at ~40 GB free space (committing a venv layer briefly takes about
# four times its size; measured on a fresh clone, README "In the images"); with less, podman fails
# mid-commit and may fill the disk other work shares.
COLD_BUILD_FREE_GIB = 45


def _enough_disk_for_a_build(eng, plans) -> None:
    """Skip in one line, before building, when the images are not all built yet and the disk under the
    build cache has less room than a cold build needs (a machine too small to build them, like one
    with no engine: never a build that fails halfway)."""
    import shutil

    try:
        have = {t for image in eng.client.images.list() for t in image.tags}
    except Exception:  # noqa: BLE001 (an engine that cannot list images will fail the build itself)
        have = set()
    if all(p.ref in have for p in plans):  # a warm cache: layers to rebuild at most, not a cold build
        return
    folder = images.cache_dir()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**30
    if free < COLD_BUILD_FREE_GIB:
        pytest.skip(
            f"{free:.0f} GiB free under {images.cache_dir()}; building the images needs about "
            f"{COLD_BUILD_FREE_GIB} GiB (set DINOFLOW_CACHE_DIR to a larger disk)"
        )


@pytest.fixture(scope="module")
def engine(pytestconfig):
    with contextlib.ExitStack() as stack:
        try:
            eng = stack.enter_context(images.container_engine())
        except images.NoDockerEngine as e:
            pytest.skip(f"no container engine can start here: {e}")
        plans = images.plan_images(registry=REGISTRY)
        _enough_disk_for_a_build(eng, plans)
        t0 = time.perf_counter()
        # a build that fails raises here and fails every test of the module: never a skip
        figures = images.build_images(eng, plans, images.resolve_source("auto", "auto"))
        _report(pytestconfig, {"build_seconds": round(time.perf_counter() - t0, 1), **figures})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DOCKER_HOST", eng.host)  # kfp.local's DockerRunner finds the engine here
            yield eng


@pytest.fixture(scope="module")
def runs(engine, tmp_path_factory, pytestconfig):
    both = containers.run_both(tmp_path_factory.mktemp("containers"))
    _report(
        pytestconfig,
        {
            "stage_seconds": containers.stage_seconds(both),
            "wall_seconds": {name: r.wall_seconds for name, r in both.items()},
        },
    )
    return both


def _refs() -> list[str]:
    return [p.ref for p in images.plan_images(registry=REGISTRY)]


def test_every_stage_ran_in_the_images_as_uid_10001(runs):
    inproc, cont = runs["in-process"], runs["containers"]
    assert cont.executed == inproc.executed and "promote" in cont.executed
    # the outputs kfp.local collected were written inside the containers, by the images' user
    outputs = [p for p in os.scandir(cont.pipeline_root) if p.is_dir()]
    assert outputs and {os.stat(p.path).st_uid for p in outputs} == {10001}


def test_stage_results_equal_the_in_process_run(runs):
    inproc, cont = runs["in-process"], runs["containers"]
    for task in inproc.executed:
        assert containers.stable(cont.result(task)) == containers.stable(inproc.result(task)), task


@pytest.mark.parametrize("ref", _refs())
def test_entrypoint_user_and_read_only_root(engine, ref):
    from dinoflow.stages import get_stage

    # the image's own ENTRYPOINT (dinoflow) and USER, on a read-only root with /tmp writable
    out = images.run_output(engine.client, ref, ["schema", "ingest"], **POD)
    s = get_stage("ingest")
    assert json.loads(out) == {
        "spec": s.spec_cls.model_json_schema(),
        "result": s.result_cls.model_json_schema(),
    }
    probe = (
        "id -u; touch /tmp/w && echo tmp-writable; touch /opt/venv/w 2>/dev/null || echo venv-read-only; "
        "python3 -c 'import dinoflow; print(dinoflow.__file__)'; test -e /opt/venv/bin/pip || echo no-pip"
    )
    out = images.run_output(engine.client, ref, [probe], entrypoint=["sh", "-c"], **POD)
    assert out.decode().split() == [
        "10001",
        "tmp-writable",
        "venv-read-only",
        "/opt/dinoflow/dinoflow/__init__.py",
        "no-pip",
    ]


@pytest.mark.parametrize("ref", _refs())
def test_image_packages_are_the_venvs(engine, ref):
    """Every distribution in the image has the venv's version (the same resolution under
    constraints.txt), except the CUDA image's faiss-gpu and the CUDA 12 runtime it brings; every
    dependency pyproject.toml names is there."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = images.run_output(engine.client, ref, [script], entrypoint=["python3", "-c"], **POD)
    image = {canonicalize_name(n): v for n, v in json.loads(out).items()}
    venv = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    extra = {n for n in image if n not in venv}
    cuda = ref.endswith("-cuda")
    if cuda:
        assert "faiss-cpu" not in image and any(n.startswith("faiss-gpu") for n in image)
        extra = {n for n in extra if not (n.startswith("faiss-gpu") or n.endswith("-cu12"))}
    assert not extra, f"{ref} holds packages the venv does not: {sorted(extra)}"
    differ = {n: (v, venv[n]) for n, v in image.items() if n in venv and venv[n] != v}
    assert not differ, f"{ref} vs the venv (image, venv): {differ}"
    build = {canonicalize_name(Requirement(r).name) for r in images.build_requirements()}
    for req in images.image_requirements("cuda" if cuda else "cpu"):
        name = canonicalize_name(Requirement(req).name)
        assert name in image or name in build - {"setuptools"}, f"{ref} lacks {name}"


def test_a_killed_services_temporary_blobs_go_at_the_next_start(tmp_path):
    """podman stages each committed layer in the service's TMPDIR (gigabytes for the venv layers); a
    killed run leaves its folder behind, and the next service removes it, never a live one's."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    root = tmp_path / "podman" / "tmp"
    dead, live = root / f"pid-{gone.pid}", root / f"pid-{os.getppid()}"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "blob").write_bytes(b"layer")
    mine = images.service_tmpdir(tmp_path / "podman")
    assert not dead.exists() and (live / "blob").exists()
    assert mine == root / f"pid-{os.getpid()}" and mine.is_dir()
