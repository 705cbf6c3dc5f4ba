"""Plain kustomize manifests: every overlay renders with `kubectl kustomize`, validates offline, and
holds exactly the resources the chart renders with the overlay's values (no drift between the two)."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
import yaml
from _deploy import ROOT, pod_specs, tools_bin, validate

OVERLAYS = sorted(p.name for p in (ROOT / "manifests" / "overlays").iterdir() if p.is_dir())


def _render_script():
    spec = importlib.util.spec_from_file_location(
        "render_manifests", ROOT / "scripts" / "render-manifests.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kustomize(path) -> list[dict]:
    r = subprocess.run(
        [str(tools_bin() / "kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _canon(docs):
    return sorted(yaml.safe_dump(d, sort_keys=True) for d in docs)


def test_overlays_exist():
    assert {"gpu-pool", "monitoring", "minio"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_kustomize_renders_valid_hardened_resources(overlay):
    path = ROOT / "manifests" / ("base" if overlay == "base" else f"overlays/{overlay}")
    docs = _kustomize(path)
    assert set(validate(docs)) <= {"ServiceMonitor", "PodMonitor"}
    assert all(d["metadata"].get("namespace") == "dinoflow" for d in docs)
    for owner, spec in pod_specs(docs):
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, owner
            assert c["resources"]["limits"], owner
    assert not [d for d in docs if d["kind"] == "Secret"], "credentials are never committed in manifests/"


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_manifests_match_the_chart(overlay):
    mod = _render_script()
    values = {} if overlay == "base" else mod.OVERLAYS[overlay]
    chart = mod.render(values, helm_exe=str(tools_bin() / "helm"))
    path = ROOT / "manifests" / ("base" if overlay == "base" else f"overlays/{overlay}")
    assert _canon(_kustomize(path)) == _canon(chart), (
        f"manifests/{overlay} drifted from the chart: run scripts/render-manifests.py"
    )
