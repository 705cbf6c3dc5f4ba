#!/usr/bin/env python3
"""Regenerate manifests/ (plain kustomize base + overlays) from the Helm chart, so both stay the same
resources. Run after changing charts/dinoflow:  .venv/bin/python scripts/render-manifests.py

tests/test_deploy_manifests.py checks that `kubectl kustomize manifests/overlays/<name>` equals
`helm template` of the chart with that overlay's values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from dinoflow.kfp import GPU_NODE_SELECTOR, GPU_TOLERATIONS

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dinoflow"
OUT = ROOT / "manifests"
RELEASE, NAMESPACE = "dinoflow", "dinoflow"
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
HELM_ONLY_ANNOTATIONS = (
    "helm.sh/hook",
    "helm.sh/hook-weight",
    "helm.sh/hook-delete-policy",
    "helm.sh/resource-policy",
)

# overlay -> chart values (the kustomize user edits the overlay's files instead)
OVERLAYS: dict[str, dict] = {
    "gpu-pool": {
        "gpuPool": {
            "nodeSelector": GPU_NODE_SELECTOR,
            "tolerations": GPU_TOLERATIONS,
            "gpusPerNode": 8,
            "numNodes": 2,
            "priorityClassName": "dinoflow-training",
        },
        "trainingRuntime": {"enabled": True},
    },
    "monitoring": {
        "metrics": {
            "pushgateway": {"enabled": True},
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        }
    },
    "minio": {
        "objectStore": {"endpoint": "http://dinoflow-minio.dinoflow.svc:9000"},
        # MinIO's root Secret (keys root_user, root_password) is created by hand, like dinoflow-s3
        "minio": {"enabled": True, "existingRootSecret": "dinoflow-minio-root"},
    },
}


def helm() -> str:
    exe = ROOT / ".tools" / "bin" / "helm"
    if not exe.exists():
        subprocess.run([str(ROOT / "scripts" / "install-tools.sh")], check=True)
    return str(exe)


def render(values: dict | None = None, helm_exe: str | None = None) -> list[dict]:
    """`helm template` of the chart with ``values``, as plain objects without Helm-only metadata."""
    cmd = [helm_exe or helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", "-"]
    out = subprocess.run(
        cmd, input=yaml.safe_dump(values or {}), capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for d in docs:
        md = d.setdefault("metadata", {})
        for k in HELM_ONLY_LABELS:
            md.get("labels", {}).pop(k, None)
        for k in HELM_ONLY_ANNOTATIONS:
            md.get("annotations", {}).pop(k, None)
        if "annotations" in md and not md["annotations"]:
            del md["annotations"]
    return docs


def key(d: dict) -> tuple[str, str]:
    return d["kind"], d["metadata"]["name"]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config file in the ConfigMap) as readable literal blocks."""


_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def _dump(path: Path, docs: list[dict], header: str) -> None:
    path.write_text(header + "".join("---\n" + yaml.dump(d, Dumper=_Dumper, sort_keys=False) for d in docs))


HEADER = "# Generated from charts/dinoflow by scripts/render-manifests.py; edit the chart, then re-run it.\n"


def main() -> int:
    base = render()
    (OUT / "base").mkdir(parents=True, exist_ok=True)
    _dump(OUT / "base" / "resources.yaml", base, HEADER)
    (OUT / "base" / "kustomization.yaml").write_text(
        HEADER
        + "# The object-store Secret is not here: create it (keys endpoint, access_key, secret_key) with\n"
        + "#   kubectl -n dinoflow create secret generic dinoflow-s3 --from-literal=endpoint=... \\\n"
        + "#     --from-literal=access_key=... --from-literal=secret_key=...\n"
        + yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": ["resources.yaml"],
            },
            sort_keys=False,
        )
    )
    by_key = {key(d): d for d in base}
    for name, values in OVERLAYS.items():
        d_out = OUT / "overlays" / name
        d_out.mkdir(parents=True, exist_ok=True)
        docs = render(values)
        added = [d for d in docs if key(d) not in by_key]
        changed = [d for d in docs if key(d) in by_key and d != by_key[key(d)]]
        kust: dict = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../base"],
        }
        if added:
            _dump(d_out / "resources.yaml", added, HEADER)
            kust["resources"].append("resources.yaml")
        if changed:  # one strategic-merge patch file per changed resource (the whole resource)
            kust["patches"] = []
            for d in changed:
                fname = f"patch-{d['kind'].lower()}-{d['metadata']['name']}.yaml"
                _dump(d_out / fname, [d], HEADER)
                kust["patches"].append({"path": fname})
        (d_out / "kustomization.yaml").write_text(
            HEADER + f"# Chart values: {json.dumps(values)}\n" + yaml.safe_dump(kust, sort_keys=False)
        )
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
