"""The Helm chart: lint, render under several value sets, validate every manifest offline, hardening,
least-privilege RBAC, the values schema, and the config map's contract with the pipelines/stages."""

from __future__ import annotations

import json
import subprocess
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
    """The hook publishes every pipeline customised with the ConfigMap, then (schedule.enabled) sets the
    retrain's recurring run; both talk to KFP only."""
    name, docs = rendered
    hooks = [d for d in _by_kind(docs, "Job") if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    cfg = _config(docs)
    (job,) = [h for h in hooks if h["metadata"]["labels"]["app.kubernetes.io/component"] == "schedule-hook"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    pod = job["spec"]["template"]["spec"]
    config = ["--config", "/etc/dinoflow/dinoflow.yaml"]
    if not cfg["schedule"]["enabled"]:
        (c,) = pod["containers"]
        assert c["args"] == ["publish", "--host", cfg["kfp"]["host"], *config] and "initContainers" not in pod
        return
    (publish,) = pod["initContainers"]
    assert publish["args"] == ["publish", "--host", cfg["kfp"]["host"], *config]
    (c,) = pod["containers"]
    assert c["args"][:7] == [
        "schedule",
        "--host",
        cfg["kfp"]["host"],
        *config,
        "--cron",
        cfg["schedule"]["cron"],
    ]
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


def _minio_parts(docs) -> dict:
    """The in-cluster MinIO's resources by role: its Deployment, its root Secret (when the chart makes
    it), the object-store Secret, the setup hook's Job and ConfigMap."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    return {
        "deployment": by_name[("Deployment", "rel-dinoflow-minio")],
        "root": by_name.get(("Secret", "rel-dinoflow-minio-root")),
        "s3": by_name.get(("Secret", "rel-dinoflow-s3")),
        "job": by_name[("Job", "rel-dinoflow-minio-setup")],
        "setup": by_name[("ConfigMap", "rel-dinoflow-minio-setup")],
    }


def _secret_refs(container: dict) -> dict:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}


def test_minio_runs_with_its_own_root_user():
    """MinIO's root comes from a Secret of its own (random, kept on uninstall, read back on upgrade),
    never from the object-store Secret the pipelines use."""
    import base64

    values = yaml.safe_load(VALUE_SETS["minio"][0].read_text())
    docs = render(VALUE_SETS["minio"])
    parts = _minio_parts(docs)
    assert set(parts["s3"]["data"]) == {"endpoint", "access_key", "secret_key"}
    assert (
        base64.b64decode(parts["s3"]["data"]["endpoint"]).decode() == "http://rel-dinoflow-minio.ml.svc:9000"
    )
    root = parts["root"]
    assert set(root["data"]) == {"root_user", "root_password"}
    assert root["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    root_user = base64.b64decode(root["data"]["root_user"]).decode()
    root_password = base64.b64decode(root["data"]["root_password"]).decode()
    assert root_user != values["objectStore"]["accessKey"] and len(root_password) >= 32
    outside = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    assert root_user not in outside and root_password not in outside, "root credentials only in their Secret"
    refs = _secret_refs(parts["deployment"]["spec"]["template"]["spec"]["containers"][0])
    assert refs["MINIO_ROOT_USER"] == {"name": "rel-dinoflow-minio-root", "key": "root_user"}
    assert refs["MINIO_ROOT_PASSWORD"] == {"name": "rel-dinoflow-minio-root", "key": "root_password"}
    assert all(r["name"] != parts["s3"]["metadata"]["name"] for r in refs.values())
    # generated, not a constant of the chart: another install gets another root
    again = _minio_parts(render(VALUE_SETS["minio"]))["root"]["data"]
    assert again["root_user"] != root["data"]["root_user"]
    assert again["root_password"] != root["data"]["root_password"]
    # a root Secret of the user's: the chart makes none and MinIO reads that one
    own = render(VALUE_SETS["minio"], values={"minio": {"existingRootSecret": "my-minio-root"}})
    parts = _minio_parts(own)
    assert parts["root"] is None
    refs = _secret_refs(parts["deployment"]["spec"]["template"]["spec"]["containers"][0])
    assert {r["name"] for r in refs.values()} == {"my-minio-root"}


def test_minio_setup_hook_creates_the_pipelines_user():
    """A post-install/upgrade Job, before the schedule hook, logs in as root and creates the
    object-store Secret's user with the chart's policy; its script is valid sh."""
    parts = _minio_parts(render(VALUE_SETS["minio"]))
    job = parts["job"]
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "post-install,post-upgrade"
    sched = next(
        d for d in _by_kind(render(VALUE_SETS["minio"]), "Job") if d["metadata"]["name"].endswith("-schedule")
    )
    assert int(ann["helm.sh/hook-weight"]) < int(sched["metadata"]["annotations"]["helm.sh/hook-weight"])
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == yaml.safe_load((CHART / "values.yaml").read_text())["minio"]["mcImage"]
    assert c["image"].startswith("quay.io/minio/mc:RELEASE.")
    refs = _secret_refs(c)
    assert refs["MINIO_ROOT_USER"] == {"name": "rel-dinoflow-minio-root", "key": "root_user"}
    assert refs["ACCESS_KEY"] == {"name": "rel-dinoflow-s3", "key": "access_key"}
    assert refs["SECRET_KEY"] == {"name": "rel-dinoflow-s3", "key": "secret_key"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MINIO_URL"] == "http://rel-dinoflow-minio.ml.svc:9000" and env["BUCKETS"] == "dinoflow"
    (setup,) = [v for v in pod["volumes"] if v["name"] == "setup"]
    assert setup["configMap"]["name"] == parts["setup"]["metadata"]["name"]
    assert c["command"] == ["/bin/sh", "/etc/minio-setup/setup.sh"]
    script = parts["setup"]["data"]["setup.sh"]
    r = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for step in (
        "admin policy create root",
        "admin user add root",
        "admin policy attach root",
        "mb --ignore-existing",
    ):
        assert step in script, step


@pytest.mark.parametrize(
    "values, buckets",
    [
        ({}, ["dinoflow"]),
        ({"objectStore": {"bucket": "acme"}, "data": {"prefix": "s3://acme/raw"}}, ["acme"]),
        (
            {"objectStore": {"bucket": "acme"}, "data": {"prefix": "s3://datasets/fmnist"}},
            ["acme", "datasets"],
        ),
    ],
)
def test_minio_policy_names_only_the_charts_buckets(values, buckets):
    """The pipelines' policy: object access and listing in the buckets the chart's pipelines use
    (runs, registry, datasets), nothing else: no admin action, no wildcard resource or action."""
    parts = _minio_parts(render(VALUE_SETS["minio"], values=values))
    policy = json.loads(parts["setup"]["data"]["policy.json"])
    resources = sorted(r for st in policy["Statement"] for r in st["Resource"])
    assert resources == sorted(
        [f"arn:aws:s3:::{b}" for b in buckets] + [f"arn:aws:s3:::{b}/*" for b in buckets]
    )
    actions = [a for st in policy["Statement"] for a in st["Action"]]
    assert all(st["Effect"] == "Allow" for st in policy["Statement"])
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert not {"s3:DeleteBucket", "s3:PutBucketPolicy", "s3:CreateBucket"} & set(actions)
    (c,) = parts["job"]["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in c["env"]}["BUCKETS"].split() == buckets


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and not selector.get(
        "matchExpressions"
    )


def test_network_policies_let_the_setup_hook_reach_minio():
    """The default-deny ingress covers every pod of the release; MinIO's policy must still admit the
    hook (same namespace) on the S3 port, and nothing restricts the hook's egress."""
    docs = render(VALUE_SETS["minio"])
    parts = _minio_parts(docs)
    hook_labels = parts["job"]["spec"]["template"]["metadata"]["labels"]
    minio_labels = parts["deployment"]["spec"]["template"]["metadata"]["labels"]
    policies = _by_kind(docs, "NetworkPolicy")
    assert not [
        p
        for p in policies
        if _selects(p["spec"]["podSelector"], hook_labels) and "Egress" in p["spec"]["policyTypes"]
    ]
    on_minio = [p for p in policies if _selects(p["spec"]["podSelector"], minio_labels)]
    assert on_minio, "MinIO must be under a NetworkPolicy"
    admitted = [
        rule
        for p in on_minio
        for rule in p["spec"].get("ingress", [])
        if any(port["port"] in (9000, "s3") for port in rule.get("ports", [{"port": 9000}]))
        and any(
            "namespaceSelector" not in peer and _selects(peer.get("podSelector", {}), hook_labels)
            for peer in rule.get("from", [{}])
        )
    ]
    assert admitted, "no ingress rule admits the setup hook to MinIO's S3 port"


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
        ({"minio": {"mcImage": "quay.io/minio/mc"}}, "minio.mcImage: Does not match pattern"),
        (
            {"minio": {"existingRootSecret": "Root_Secret"}},
            "minio.existingRootSecret: Does not match pattern",
        ),
        ({"minio": {"setupResources": {"limits": None}}}, "minio.setupResources: limits is required"),
        (
            {"minio": {"enabled": True}, "objectStore": {"workloadIdentity": True}},
            "minio.enabled: the in-cluster MinIO needs the pipelines' keys",
        ),
        (
            {"minio": {"enabled": True, "existingRootSecret": "dinoflow-s3"}},
            "minio.existingRootSecret names the object-store Secret",
        ),
        (
            {
                "minio": {"enabled": True},
                "objectStore": {"existingSecret": "", "accessKey": "ak", "secretKey": "short"},
            },
            "objectStore.secretKey: MinIO needs at least 8 characters",
        ),
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
    labels = pod["template"]["spec"]["template"]["metadata"]["labels"]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == cfg["serviceAccount"]
    # its nodes serve /metrics like the chart's runtime's, under the chart's training NetworkPolicy
    (training,) = [p for p in _by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-training")]
    assert _selects(training["spec"]["podSelector"], labels)
    env = {e["name"]: e.get("value") for e in m["spec"]["trainer"]["env"]}
    assert env["DINOFLOW_METRICS_ADDR"] == "0.0.0.0"
    for rt in runtimes:
        node = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        rt_env = {e["name"]: e.get("value") for e in node["spec"]["containers"][0]["env"]}
        assert rt_env["DINOFLOW_METRICS_ADDR"] == env["DINOFLOW_METRICS_ADDR"]
    assert pod.get("nodeSelector", {}) == cfg["gpuPool"]["nodeSelector"]


# -- every value reaches something ------------------------------------------------------------------
# Everything turned on, so that a value's effect shows: in-cluster MinIO, metrics, a namespaced runtime.
_ALL_ON = {
    "objectStore": {"existingSecret": "", "accessKey": "ak-test", "secretKey": "sk-test-key"},
    "minio": {"enabled": True},
    "trainingRuntime": {"enabled": True},
    "metrics": {
        "pushgateway": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
}
# Values whose effect shows only in another setting than _ALL_ON (path -> values merged over it)
_CONTEXT = {
    "objectStore.existingSecret": {"objectStore": {"existingSecret": "x"}},
    "objectStore.endpoint": {},
    "objectStore.workloadIdentity": {
        "objectStore": {"existingSecret": "byo", "accessKey": "", "secretKey": ""},
        "minio": {"enabled": False},  # MinIO needs keys
    },
    "trainJob.clusterRuntime": {"trainingRuntime": {"enabled": False}},
    "trainingRuntime.enabled": {},
    "metrics.pushgateway.externalUrl": {},
    "serviceAccount.create": {"serviceAccount": {"name": "existing-sa"}},
    "minio.enabled": {"objectStore": {"endpoint": "https://s3.example.com"}},
}
_NEW = {  # values that must keep a pattern or an enum
    "image.cpu.repository": "reg.example.com/x/dinoflow",
    "image.cuda.repository": "reg.example.com/x/dinoflow",
    "image.cpu.tag": "9.9.9",
    "image.cuda.tag": "9.9.9-cuda",
    "image.pullPolicy": "Always",
    "objectStore.endpoint": "https://s3.example.com",
    "objectStore.bucket": "other-bucket",
    "objectStore.region": "eu-west-1",
    "data.prefix": "s3://other/datasets",
    "kfp.host": "http://kfp.example:8888",
    "schedule.cron": "0 0 4 * * *",
    "trainJob.kind": "PyTorchJob",
    "metrics.pushgateway.externalUrl": "http://pg.example:9091",
    "metrics.pushgateway.image": "quay.io/prometheus/pushgateway:v1.11.2",
    "minio.image": "quay.io/minio/minio:RELEASE.2025-05-24T17-08-30Z",
    "minio.mcImage": "quay.io/minio/mc:RELEASE.2025-05-21T01-59-54Z",
    "serviceAccount.name": "other-sa",
}


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and path not in ("securityContext.capabilities",):
            out.update(_leaves(v, path + "."))
        else:
            out[path] = v
    return out


def _changed(path: str, v):
    if path in _NEW:
        return _NEW[path]
    if isinstance(v, bool):
        return not v
    if isinstance(v, int | float):
        return v + 1 if isinstance(v, int) else round(v / 2, 3)
    if isinstance(v, str):
        if v and v[0].isdigit():  # quantities: "2", "8Gi", "100m"
            return "3" + v[1:] if v[0] != "3" else "4" + v[1:]
        return (v + "x") if v else "x"
    if isinstance(v, list):
        if path.endswith("tolerations"):
            return [{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}]
        return v[:1] if len(v) > 1 else ["--namespace", "x"] if path == "hook.extraArgs" else ["x"]
    if isinstance(v, dict):  # an empty map: labels, selectors, annotations, parameters
        return {"steps": 7} if path == "schedule.parameters" else {"example.com/a": "b"}
    raise AssertionError(f"no change for {path}={v!r}")


def _nest(path: str, value) -> dict:
    out = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _what_is_read(values: dict) -> list:
    """The rendered resources, with the ConfigMap's dinoflow.yaml cut to what dinoflow reads of it
    (dinoflow.kfp.deploy.Deployment) plus the schedule hook's arguments."""
    from dinoflow.kfp.deploy import Deployment

    docs = render(values=values)
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-minio-root"):
            d["data"] = sorted(d["data"])  # random on every render: only its keys say anything
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"):
            read = Deployment.model_validate(yaml.safe_load(d["data"]["dinoflow.yaml"]))
            d["data"] = read.model_dump(mode="json")
    return docs


def test_every_chart_value_is_read_by_something():
    """Each value of values.yaml, changed alone, changes a rendered resource or what dinoflow reads
    from the ConfigMap to customise the pipelines it uploads (documentation-only keys fail this)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    leaves = _leaves(values)
    baseline: dict = {}
    unread = []
    for path, v in leaves.items():
        if path in ("nameOverride", "fullnameOverride") or path.startswith(
            ("podSecurityContext.", "securityContext.")
        ):
            continue  # names and hardening: checked by test_pods_are_hardened and the lint
        ctx = _merge(_ALL_ON, _CONTEXT.get(path, {}))
        key = json.dumps(ctx, sort_keys=True)
        if key not in baseline:
            baseline[key] = _what_is_read(ctx)
        current = ctx
        for part in path.split("."):
            current = current.get(part, v) if isinstance(current, dict) else v
        try:
            changed = _what_is_read(_merge(ctx, _nest(path, _changed(path, current))))
        except subprocess.CalledProcessError as e:
            raise AssertionError(f"{path}: {e.stderr.strip()[-300:]}") from None
        if changed == baseline[key]:
            unread.append(path)
    assert unread == [], f"values that nothing reads: {unread}"


def test_the_configmap_customises_every_uploaded_pipeline(tmp_path):
    """What the hook does: the rendered ConfigMap, given to `dinoflow compile --config`, puts the
    chart's images, pull secrets, pools and defaults into every pipeline and leaves the checked-in
    YAMLs as they are."""
    from typer.testing import CliRunner

    from dinoflow.cli import app
    from dinoflow.kfp import GPU_IMAGE, IMAGE
    from dinoflow.kfp.compile import default_dirs

    docs = render(
        VALUE_SETS["gpu-pool"], values={"imagePullSecrets": ["regcred"], "objectStore": {"bucket": "acme"}}
    )
    (cm,) = [d for d in _by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    cfg_file = tmp_path / "dinoflow.yaml"
    cfg_file.write_text(cm["data"]["dinoflow.yaml"])
    cfg = yaml.safe_load(cfg_file.read_text())
    r = CliRunner().invoke(app, ["compile", "--config", str(cfg_file), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    spec, platform = list(yaml.safe_load_all((tmp_path / "out" / "pipelines" / "full.yaml").read_text()))
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert (
        images == {cfg["images"]["cpu"], cfg["images"]["cuda"]}
        and "registry.example.com" in cfg["images"]["cpu"]
    )
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["source_uri"]["defaultValue"] == "s3://acme/raw/fashion-mnist"
    assert params["output_root"]["defaultValue"] == "s3://acme/runs"
    assert params["gpus"]["defaultValue"] == 8 and params["nodes"]["defaultValue"] == 2
    assert params["trainjob_config_map"]["defaultValue"] == "rel-dinoflow-trainjob"
    assert json.loads(params["dedup_spec"]["defaultValue"])["threshold_cos"] == 0.6  # stageDefaults
    assert json.loads(params["pretrain_spec"]["defaultValue"])["metrics_port"] == 9400
    for label, plat in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        assert [p["secretName"] for p in plat["imagePullSecret"]] == ["regcred"], label
        assert plat["imagePullPolicy"] == "IfNotPresent"
        res = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        if "accelerator" in res:  # the GPU pool's pod size
            assert res["resourceMemoryLimit"] == cfg["gpuPool"]["resources"]["limits"]["memory"]
    kept = next(yaml.safe_load_all((default_dirs()[1] / "full.yaml").read_text()))
    assert {ex["container"]["image"] for ex in kept["deploymentSpec"]["executors"].values()} == {
        IMAGE,
        GPU_IMAGE,
    }


def test_workload_identity_needs_no_keys():
    docs = render(
        values={
            "objectStore": {
                "existingSecret": "",
                "endpoint": "https://s3.amazonaws.com",
                "workloadIdentity": True,
            }
        }
    )
    (secret,) = _by_kind(docs, "Secret")
    assert set(secret["data"]) == {"endpoint"}
    (job,) = _by_kind(docs, "Job")
    env = {e["name"] for c in job["spec"]["template"]["spec"]["containers"] for e in c["env"]}
    assert "DINOFLOW_S3_ENDPOINT" in env and "DINOFLOW_S3_ACCESS_KEY" not in env
    r = helm(
        "template",
        "rel",
        str(CHART),
        values={
            "objectStore": {
                "existingSecret": "",
                "workloadIdentity": True,
                "accessKey": "a",
                "secretKey": "b",
            }
        },
        check=False,
    )
    assert r.returncode != 0 and "workloadIdentity=true takes no accessKey" in r.stderr


def test_notes_name_the_upload_the_ui_run_and_the_schedule(tmp_path):
    """NOTES.txt (rendered through a copy of the chart, as `helm install` would print it) gives a new
    user the commands in order: upload to the data prefix, run `full` from the UI, manage the schedule."""
    import shutil

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "templates" / "notes.txt")
    out = helm(
        "template",
        "rel",
        str(chart),
        "--show-only",
        "templates/notes.txt",
        "--debug",
        values={"objectStore": {"bucket": "acme"}},
        check=False,
    ).stdout
    notes = out.split("# Source: dinoflow/templates/notes.txt", 1)[1]
    assert "dinoflow upload --to s3://acme/raw" in notes
    assert 'pipeline "dinoflow-full" -> Create run' in notes and "s3://acme/raw/fashion-mnist" in notes
    assert "dinoflow schedule list|pause|resume|delete" in notes
    assert notes.index("dinoflow upload") < notes.index("dinoflow-full") < notes.index("dinoflow schedule")
