"""What an installation changes in the compiled pipelines before they are uploaded: its images (a
user's registry and tag), image pull secrets and pull policy on every task, the CPU and GPU pools'
placement and pod sizes, and the defaults of the pipelines' parameters (bucket, Secret, GPU pool,
stage specs), so that a run submitted from the KFP UI with its defaults runs on that cluster.

The settings come from the chart's ConfigMap (``dinoflow.yaml``: ``dinoflow publish|schedule|submit
--config``) or from options (``dinoflow compile --image``). The checked-in YAMLs keep the code's
defaults; a customised copy is written elsewhere (or to a temporary file for an upload).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from dinoflow.errors import DinoflowError
from dinoflow.kfp import GPU_IMAGE, IMAGE

_RESOURCE_KEYS = {  # pod resources -> the pipeline spec's container resource fields
    ("requests", "cpu"): "resourceCpuRequest",
    ("limits", "cpu"): "resourceCpuLimit",
    ("requests", "memory"): "resourceMemoryRequest",
    ("limits", "memory"): "resourceMemoryLimit",
}
_LEGACY_KEYS = ("cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit")  # numeric twins of the above


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Images(_Model):
    cpu: str = ""
    cuda: str = ""
    pull_policy: str = Field("", alias="pullPolicy")
    pull_secrets: list[str] = Field(default_factory=list, alias="pullSecrets")


class Pool(_Model):
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    resources: dict[str, dict[str, str]] = Field(default_factory=dict)


class GpuPool(Pool):
    resource_name: str = Field("", alias="resourceName")
    shm_size: str = Field("", alias="shmSize")


class Deployment(_Model):
    """The installation's settings (the chart's ConfigMap ``dinoflow.yaml`` has these keys)."""

    images: Images = Field(default_factory=Images)
    run_parameters: dict[str, Any] = Field(default_factory=dict, alias="runParameters")
    stage_defaults: dict[str, dict[str, Any]] = Field(default_factory=dict, alias="stageDefaults")
    cpu_pool: Pool = Field(default_factory=Pool, alias="cpuPool")
    gpu_pool: GpuPool = Field(default_factory=GpuPool, alias="gpuPool")

    def is_empty(self) -> bool:
        return self == Deployment()


def load(path: str | Path | None = None, **options: Any) -> Deployment:
    """The settings of ``path`` (the chart's ConfigMap file), with the options given on top:
    ``image`` (the CPU image; the CUDA one defaults to ``<image>-cuda``, the chart's convention),
    ``gpu_image``, ``pull_secrets``."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise DinoflowError(f"--config {path} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise DinoflowError(f"--config {path} must hold a mapping (the chart's dinoflow.yaml)")
    d = Deployment.model_validate(data)
    image, gpu_image = options.get("image"), options.get("gpu_image")
    for ref in (image, gpu_image):
        if ref and (":" not in ref.rsplit("/", 1)[-1] or ref.endswith(":latest")):
            raise DinoflowError(
                f"image {ref!r} needs an immutable tag (REGISTRY/NAME:TAG, not latest): KFP caches on it"
            )
    if image:
        d.images.cpu = image
        d.images.cuda = gpu_image or f"{image}-cuda"
    elif gpu_image:
        d.images.cuda = gpu_image
    if options.get("pull_secrets"):
        d.images.pull_secrets = list(options["pull_secrets"])
    return d


def _resources(container: dict[str, Any], resources: dict[str, dict[str, str]]) -> None:
    res = container.setdefault("resources", {})
    given = {key: resources.get(kind, {}).get(r) for (kind, r), key in _RESOURCE_KEYS.items()}
    if not any(given.values()):
        return
    for key in _LEGACY_KEYS:
        res.pop(key, None)
    for key, value in given.items():
        if value:
            res[key] = str(value)


def _executor_kind(container: dict[str, Any], platform: dict[str, Any]) -> str:
    if "accelerator" in container.get("resources", {}):
        return "gpu"
    if platform.get("configMapAsEnv"):  # a multi-node launcher: small, it only waits on its job
        return "launcher"
    return "cpu"


def _pipeline(spec: dict[str, Any], platform: dict[str, Any] | None, d: Deployment) -> None:
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    k8s = (platform or {}).get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
    k8s_executors = k8s.setdefault("executors", {}) if platform is not None else {}
    for label, ex in executors.items():
        container = ex.get("container")
        if container is None:
            continue
        image = container.get("image")
        if image == IMAGE and d.images.cpu:
            container["image"] = d.images.cpu
        elif image == GPU_IMAGE and d.images.cuda:
            container["image"] = d.images.cuda
        plat = k8s_executors.setdefault(label, {}) if platform is not None else {}
        kind = _executor_kind(container, plat)
        if kind == "gpu":
            _resources(container, d.gpu_pool.resources)
            if d.gpu_pool.resource_name:
                container["resources"]["accelerator"]["resourceType"] = d.gpu_pool.resource_name
            for mount in plat.get("emptyDirMounts", []):
                if mount.get("mountPath") == "/dev/shm" and d.gpu_pool.shm_size:
                    mount["sizeLimit"] = d.gpu_pool.shm_size
        elif kind == "cpu":
            _resources(container, d.cpu_pool.resources)
        if platform is None:
            continue
        if kind != "gpu":  # the GPU tasks take the GPU pool's placement from run parameters
            if d.cpu_pool.node_selector:
                plat["nodeSelector"] = {"labels": dict(d.cpu_pool.node_selector)}
            if d.cpu_pool.tolerations:
                plat["tolerations"] = copy.deepcopy(d.cpu_pool.tolerations)
        if d.images.pull_secrets:
            plat["imagePullSecret"] = [
                {"secretName": s, "secretNameParameter": {"runtimeValue": {"constant": s}}}
                for s in d.images.pull_secrets
            ]
        if d.images.pull_policy:
            plat["imagePullPolicy"] = d.images.pull_policy


def _defaults(spec: dict[str, Any], d: Deployment) -> None:
    """Parameter defaults: run parameters the pipeline declares; stage defaults under ``<stage>_spec``."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    for name, value in d.run_parameters.items():
        if name in declared:
            declared[name]["defaultValue"] = value
            declared[name]["isOptional"] = True
    for stage, fields in d.stage_defaults.items():
        param = declared.get(f"{stage}_spec")
        if param is None or "defaultValue" not in param:
            continue
        merged = {**json.loads(param["defaultValue"] or "{}"), **fields}  # the installation's win
        param["defaultValue"] = json.dumps(merged, sort_keys=True)


def customise(text: str, d: Deployment) -> str:
    """A compiled pipeline or component YAML with the installation's settings applied."""
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    if not docs or "deploymentSpec" not in docs[0]:
        raise DinoflowError("not a compiled KFP pipeline or component YAML (no deploymentSpec)")
    spec = docs[0]
    if "dag" not in spec.get("root", {}):  # a component: only its image (pods are set per task)
        for ex in spec["deploymentSpec"].get("executors", {}).values():
            image = ex.get("container", {}).get("image")
            new = {IMAGE: d.images.cpu, GPU_IMAGE: d.images.cuda}.get(image or "")
            if new:
                ex["container"]["image"] = new
        return yaml.safe_dump_all(docs, sort_keys=True)
    if len(docs) == 1:
        docs.append({"platforms": {"kubernetes": {"deploymentSpec": {"executors": {}}}}})
    _pipeline(spec, docs[1], d)
    _defaults(spec, d)
    return yaml.safe_dump_all(docs, sort_keys=True)


def write(source: Path, dest: Path, d: Deployment) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(customise(source.read_text(), d))
    return dest
