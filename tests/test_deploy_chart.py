"""The Helm chart: lint, render under several value sets, validate every manifest offline, hardening,
least-privilege RBAC, the values schema, and the config map's contract with the pipelines/stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _deploy import CHART, crd_schema, helm, pod_specs, render, validate

CI = CHART / "ci"
VALUE_SETS = {
    "default": [],
    "gpu-pool": [CI / "gpu-pool-values.yaml"],
    "external-s3": [CI / "external-s3-values.yaml"],
    "minio": [CI / "minio-values.yaml"],
}


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request):
    return request.param, render(VALUE_SETS[request.param])


def _by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _config(docs) -> dict:
    (cm,) = [d for d in _by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    return yaml.safe_load(cm["data"]["dinoflow.yaml"])


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint(name):
    args = ["lint", "--strict", str(CHART)]
    for f in VALUE_SETS[name]:
        args += ["-f", str(f)]
    r = helm(*args, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_manifest_validates(rendered):
    name, docs = rendered
    unchecked = validate(docs)
    # prometheus-operator CRDs are not available offline; only they may go unchecked
    assert set(unchecked) <= {"ServiceMonitor", "PodMonitor"}, unchecked
    kinds = {d["kind"] for d in docs}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= kinds
    expected = {
        "default": set(),
        "gpu-pool": {"TrainingRuntime"},
        "external-s3": {"Secret", "Deployment", "ServiceMonitor", "PodMonitor"},
        "minio": {"Secret", "Deployment", "PersistentVolumeClaim", "Service"},
    }[name]
    assert expected <= kinds, expected - kinds


def test_pods_are_hardened(rendered):
    _, docs = rendered
    for owner, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, owner
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", owner
        assert spec.get("automountServiceAccountToken") is False, f"{owner} needs no Kubernetes API token"
        mounts_tmp = set()
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], owner
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, owner
            res = c["resources"]
            for k in ("cpu", "memory"):
                assert k in res["requests"] and k in res["limits"], (
                    f"{owner}/{c['name']}: {k} requests+limits"
                )
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
            mounts_tmp |= {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts_tmp, f"{owner}: a writable /tmp emptyDir next to the read-only root"


def test_rbac_is_least_privilege(rendered):
    _, docs = rendered
    (role,) = _by_kind(docs, "Role")
    assert not _by_kind(docs, "ClusterRole") and not _by_kind(docs, "ClusterRoleBinding")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    verbs = ["create", "get", "list", "watch", "patch", "delete"]  # patch: a retry adopts its job
    assert rules[(("trainer.kubeflow.org",), ("trainjobs",))]["verbs"] == verbs
    assert rules[(("kubeflow.org",), ("pytorchjobs",))]["verbs"] == verbs
    secret_rule = rules[(("",), ("secrets",))]
    assert secret_rule["verbs"] == ["get"] and secret_rule["resourceNames"] == [
        _config(docs)["objectStore"]["secretName"]
    ]
    for r in role["rules"]:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
        if r["resources"] in (["secrets"], ["configmaps"]):
            assert r.get("resourceNames"), "Secrets/ConfigMaps only by name"
    (rb,) = _by_kind(docs, "RoleBinding")
    (sa,) = _by_kind(docs, "ServiceAccount")
    assert (
        rb["subjects"][0]["name"] == sa["metadata"]["name"]
        and rb["roleRef"]["name"] == role["metadata"]["name"]
    )


def test_hook_job_uploads_and_schedules(rendered):
    name, docs = rendered
    hooks = [d for d in _by_kind(docs, "Job") if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    cfg = _config(docs)
    if not cfg["schedule"]["enabled"]:
        assert hooks == [], "schedule.enabled=false: the hook does not (re)create the recurring run"
        return
    (job,) = hooks
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"][:5] == ["schedule", "--host", cfg["kfp"]["host"], "--cron", cfg["schedule"]["cron"]]
    env = {e["name"]: e for e in c["env"]}
    for k in ("DINOFLOW_S3_ENDPOINT", "DINOFLOW_S3_ACCESS_KEY", "DINOFLOW_S3_SECRET_KEY"):
        assert env[k]["valueFrom"]["secretKeyRef"]["name"] == cfg["objectStore"]["secretName"]
    assert env["DINOFLOW_CONFIG"]["value"] == "/etc/dinoflow/dinoflow.yaml"
    # every --param is typed by the real CLI parser against the compiled retrain pipeline
    pairs = [c["args"][i + 1] for i, a in enumerate(c["args"]) if a == "--param"]
    compiled = Path(CHART).parents[1] / "pipelines" / "retrain.yaml"
    from dinoflow.kfp import client

    assert compiled.exists(), "pipelines/retrain.yaml is not compiled (`make compile`)"
    parsed = client.parse_params(compiled, pairs)  # every retrain input has a default
    assert {k: parsed[k] for k in cfg["runParameters"]} == cfg["runParameters"]


def test_gpu_pool_settings_reach_config_and_runtime():
    docs = render(VALUE_SETS["gpu-pool"])
    cfg = _config(docs)
    values = yaml.safe_load((CI / "gpu-pool-values.yaml").read_text())["gpuPool"]
    assert cfg["runParameters"]["gpu_node_selector"] == values["nodeSelector"]
    assert cfg["runParameters"]["gpu_tolerations"] == values["tolerations"]
    assert cfg["runParameters"]["gpus"] == 8
    (rt,) = _by_kind(docs, "TrainingRuntime")
    assert rt["spec"]["mlPolicy"] == {"numNodes": 2, "torch": {"numProcPerNode": 8}}
    pod = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"] and pod["tolerations"] == values["tolerations"]
    assert pod["priorityClassName"] == "dinoflow-training"
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["image"].endswith("-cuda")
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]


def test_run_parameters_are_pipeline_parameters():
    """The config map's runParameters are named after the compiled retrain pipeline's inputs."""
    compiled = Path(CHART).parents[1] / "pipelines" / "retrain.yaml"
    if not compiled.exists():
        pytest.skip("pipelines/retrain.yaml is not compiled yet (`make compile`)")
    spec = next(d for d in yaml.safe_load_all(compiled.read_text()) if d and "root" in d)
    params = spec["root"]["inputDefinitions"]["parameters"]
    run_params = _config(render())["runParameters"]
    assert set(run_params) <= set(params), set(run_params) - set(params)


def test_stage_defaults_are_stage_spec_fields():
    from pydantic import TypeAdapter

    from dinoflow.stages import get_stage

    for stage, defaults in _config(render())["stageDefaults"].items():
        fields = get_stage(stage).spec_cls.model_fields
        assert set(defaults) <= set(fields), f"stageDefaults.{stage}: unknown {set(defaults) - set(fields)}"
        for k, v in defaults.items():
            TypeAdapter(fields[k].annotation).validate_python(v)


def test_minio_uses_the_object_store_secret():
    docs = render(VALUE_SETS["minio"])
    (secret,) = _by_kind(docs, "Secret")
    assert set(secret["data"]) == {"endpoint", "access_key", "secret_key"}
    dep = next(d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-minio"))
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert env["MINIO_ROOT_USER"] == {"name": secret["metadata"]["name"], "key": "access_key"}
    import base64

    assert base64.b64decode(secret["data"]["endpoint"]).decode() == "http://rel-dinoflow-minio.ml.svc:9000"


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"gpuPool": {"gpusPerNode": "eight"}},
            "gpuPool.gpusPerNode: Invalid type. Expected: integer, given: string",
        ),
        ({"schedule": {"cron": "0 3 * * *"}}, "schedule.cron: Does not match pattern"),
        ({"schedule": {"enabled": "yes"}}, "schedule.enabled: Invalid type. Expected: boolean"),
        ({"hook": {"resources": {"limits": None}}}, "hook.resources: limits is required"),
        ({"securityContext": {"allowPrivilegeEscalation": True}}, "securityContext.allowPrivilegeEscalation"),
        ({"gpuPool": {"numNodez": 2}}, "Additional property numNodez is not allowed"),
        ({"kfp": {"host": "ml-pipeline:8888"}}, "kfp.host: Does not match pattern"),
        ({"stageDefaults": {"pretrian": {}}}, "pretrian"),
        (
            {"objectStore": {"existingSecret": ""}},
            "objectStore: set existingSecret, or both accessKey and secretKey",
        ),
        ({"image": {"cpu": {"repository": "reg/dinoflow", "tag": "latest"}}}, "image tags must be immutable"),
    ],
)
def test_bad_values_fail_with_a_clear_message(values, message):
    r = helm("template", "rel", str(CHART), values=values, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_values_yaml_is_documented_line_by_line():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("- ") or ":" not in s:
            continue
        prev = lines[i - 1].strip()
        assert prev.startswith("#") or "#" in line or _parent_documented(lines, i), (
            f"values.yaml:{i + 1} {s!r} undocumented"
        )


def _parent_documented(lines, i) -> bool:
    """Leaves inside a flow/struct block (e.g. securityContext fields) count as documented when the
    block's own key carries a comment."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for j in range(i - 1, -1, -1):
        s = lines[j]
        if s.strip() and not s.strip().startswith("#") and len(s) - len(s.lstrip()) < indent:
            return lines[j - 1].strip().startswith("#")
    return False


def test_schema_is_valid_json_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


@pytest.mark.parametrize("name", ["default", "gpu-pool"])
def test_trainjob_config_map_reaches_the_launchers_job(name, monkeypatch):
    """The <release>-trainjob ConfigMap holds exactly the keys the compiled launchers load as env;
    those values, read by job_from_env, make a job that validates against the CRD and references
    the chart's namespaced TrainingRuntime when it is enabled (else the cluster runtime)."""
    import jsonschema

    from dinoflow.kfp import TRAINJOB_ENV_KEYS
    from dinoflow.kfp.trainjob import build_manifest, job_from_env
    from dinoflow.stages import get_stage

    docs = render(VALUE_SETS[name])
    cfg = _config(docs)
    (cm,) = [d for d in _by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-trainjob")]
    assert cm["metadata"]["name"] == cfg["runParameters"]["trainjob_config_map"]
    assert sorted(cm["data"]) == sorted(TRAINJOB_ENV_KEYS)
    env = {**cm["data"], "DINOFLOW_POD_NAME": "launcher-abc", "DINOFLOW_POD_UID": "uid-1"}
    env["DINOFLOW_RUN_ID"] = "8d1c7e0b-2f0a-4c3e-9a55-1f2e3d4c5b6a"
    monkeypatch.setenv("DINOFLOW_NAMESPACE", "ml")
    spec = get_stage("pretrain").parse_spec(
        {"output_uri": "s3://d/p", "manifest_uri": "s3://d/m.parquet", "nnodes": 2, "nproc": 8}
    )
    m = build_manifest(job_from_env("pretrain", spec, env))
    jsonschema.validate(m, crd_schema("trainer.kubeflow.org_trainjobs.yaml"))
    ref = m["spec"]["runtimeRef"]
    runtimes = _by_kind(docs, "TrainingRuntime")
    if runtimes:
        (rt,) = runtimes
        assert ref["kind"] == "TrainingRuntime" and ref["name"] == rt["metadata"]["name"]
        assert m["metadata"]["namespace"] == rt["metadata"]["namespace"] == "ml"
    else:
        assert ref == {
            "kind": "ClusterTrainingRuntime",
            "name": "torch-distributed",
            "apiGroup": "trainer.kubeflow.org",
        }
    assert m["spec"]["trainer"]["image"] == cfg["images"]["cuda"]
    assert m["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "launcher-abc", "uid": "uid-1"}
    ]
    assert m["metadata"]["name"].startswith("dinoflow-pretrain-8d1c7e0b-")
    pod = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == cfg["serviceAccount"]
    assert pod.get("nodeSelector", {}) == cfg["gpuPool"]["nodeSelector"]
