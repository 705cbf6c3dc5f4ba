"""Multi-node manifests validate against the real CRD schemas; the waiter streams and fails right."""

from __future__ import annotations

import inspect
import os
import signal
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiException, CustomObjectsApi

from dinoflow.errors import DinoflowError, SpecError
from dinoflow.kfp import trainjob as tj
from dinoflow.kfp.trainjob import MultiNodeJob, build_manifest, job_state, wait

CRDS = Path(__file__).resolve().parents[2] / "shared" / "crds"


def crd_schema(file: str, version: str) -> dict:
    path = CRDS / file
    if not path.exists():
        pytest.skip(f"{path} not present")
    crd = yaml.safe_load(path.read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def job(kind: str, nnodes: int = 2) -> MultiNodeJob:
    return MultiNodeJob(
        stage="pretrain",
        spec_json='{"output_uri": "s3://b/p", "manifest_uri": "s3://b/m", "nnodes": 2}',
        nnodes=nnodes,
        gpus_per_node=8,
        name="Dinoflow_Pretrain.Test",
        namespace="ml",
        kind=kind,  # type: ignore[arg-type]
        node_selector={"pool": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )


def test_trainjob_validates_against_trainer_v2_crd():
    m = build_manifest(job("TrainJob"))
    jsonschema.validate(m, crd_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"))
    t = m["spec"]["trainer"]
    assert m["metadata"]["name"] == "dinoflow-pretrain-test"
    assert m["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 8
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert "torchrun -m dinoflow.cli stage pretrain" in t["command"][-1]
    env = {e["name"]: e for e in t["env"]}
    assert env["DINOFLOW_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "dinoflow-s3",
        "key": "secret_key",
        "optional": True,  # workload identity: a Secret with the endpoint only
    }
    assert "value" not in env["DINOFLOW_S3_ACCESS_KEY"]
    pod = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"
    ]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"


def test_pytorchjob_validates_against_training_operator_v1_crd():
    m = build_manifest(job("PyTorchJob", nnodes=3))
    jsonschema.validate(m, crd_schema("kubeflow.org_pytorchjobs.yaml", "v1"))
    reps = m["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 2
    c = reps["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and '--nnodes=3 --nproc_per_node=8 --node_rank="$RANK"' in c["command"][-1]


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_node_pods_serve_metrics_on_the_pod_address_under_the_training_policy(kind):
    """Whatever runtime a job runs on (a ClusterTrainingRuntime the chart does not own included),
    every node gets DINOFLOW_METRICS_ADDR=0.0.0.0, as the chart's TrainingRuntime sets it, and the
    labels that put it under the chart's training NetworkPolicy and PodMonitor."""
    m = build_manifest(job(kind))
    if kind == "TrainJob":
        jsonschema.validate(m, crd_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"))
        envs = [m["spec"]["trainer"]["env"]]
        rj = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        templates = [rj["template"]["spec"]["template"]]
    else:
        jsonschema.validate(m, crd_schema("kubeflow.org_pytorchjobs.yaml", "v1"))
        templates = [r["template"] for r in m["spec"]["pytorchReplicaSpecs"].values()]
        envs = [t["spec"]["containers"][0]["env"] for t in templates]
    for env in envs:
        addr = [e for e in env if e["name"] == "DINOFLOW_METRICS_ADDR"]
        assert addr == [{"name": "DINOFLOW_METRICS_ADDR", "value": "0.0.0.0"}]
    for t in templates:
        assert t["metadata"]["labels"]["dinoflow.io/metrics"] == "true"
    # a job's own env still wins (one entry, its value)
    own = build_manifest(MultiNodeJob(**{**job(kind).__dict__, "env": {"DINOFLOW_METRICS_ADDR": "10.0.0.1"}}))
    text = str(own)
    assert text.count("DINOFLOW_METRICS_ADDR") == (1 if kind == "TrainJob" else 2) and "10.0.0.1" in text


def test_schema_catches_a_broken_manifest():
    m = build_manifest(job("TrainJob"))
    m["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, crd_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"))


def test_bad_job_fails_early():
    with pytest.raises(SpecError, match="gpus_per_node"):
        MultiNodeJob(stage="pretrain", spec_json="{}", nnodes=2, gpus_per_node=0)


class ScriptedApi:
    """Stands in for a cluster's CustomObjectsApi: returns the given statuses in order."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.calls = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append((group, version, namespace, plural, name))
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}


def cond(t, reason="", message=""):
    return {"conditions": [{"type": t, "status": "True", "reason": reason, "message": message}]}


def test_wait_streams_changes_and_returns_on_complete():
    api = ScriptedApi([{}, cond("Created"), cond("Created"), cond("Complete", message="done")])
    seen = []
    wait(
        "j",
        "ml",
        "TrainJob",
        api,
        timeout_seconds=60,
        poll_seconds=0,
        on_status=lambda s, m: seen.append(s),
        sleep=lambda s: None,
    )
    assert seen == ["Pending", "Created", "done"]
    assert api.calls[0] == ("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", "j")


def test_wait_fails_with_the_jobs_reason():
    api = ScriptedApi([cond("Created"), cond("Failed", "BackoffLimitExceeded", "node-1 OOMKilled")])
    with pytest.raises(DinoflowError, match="failed: BackoffLimitExceeded: node-1 OOMKilled"):
        wait("j", "ml", "PyTorchJob", api, timeout_seconds=60, poll_seconds=0, sleep=lambda s: None)


def test_wait_times_out():
    now = iter(range(0, 1000, 10))
    api = ScriptedApi([cond("Running")])
    with pytest.raises(DinoflowError, match="did not finish within 30s"):
        wait(
            "j",
            "ml",
            "PyTorchJob",
            api,
            timeout_seconds=30,
            poll_seconds=0,
            clock=lambda: next(now),
            sleep=lambda s: None,
        )
    assert job_state({"status": cond("Succeeded")}, "PyTorchJob")[0] == "done"


# -- the managed job: name, placement settings, ownership, lifecycle ---------------------------------


SPEC = '{"output_uri": "s3://b/runs/v1/pretrain/abc", "nnodes": 2, "nproc": 8}'
ENV = {
    "DINOFLOW_RUN_ID": "7f3c2a10-aaaa-bbbb-cccc-0123456789ab",
    "KFP_POD_NAME": "full-abc12-system-container-impl-123",
    "KFP_POD_UID": "0b5e-uid",
    "DINOFLOW_TRAINJOB_RUNTIME_KIND": "TrainingRuntime",
    "DINOFLOW_TRAINJOB_RUNTIME": "rel-dinoflow-torch",
    "DINOFLOW_TRAINJOB_IMAGE": "registry.example/dinoflow:1.2.3-cuda",
    "DINOFLOW_TRAINJOB_IMAGE_PULL_SECRETS": "regcred, other",
    "DINOFLOW_S3_SECRET": "team-s3",
    "DINOFLOW_TRAINJOB_SERVICE_ACCOUNT": "rel-dinoflow",
    "DINOFLOW_TRAINJOB_QUEUE": "team-a",
    "DINOFLOW_TRAINJOB_PRIORITY_CLASS": "training-high",
    "DINOFLOW_TRAINJOB_NODE_SELECTOR": '{"pool": "h100"}',
}


class _Spec:
    nnodes, nproc = 2, 8

    def model_dump_json(self):
        return SPEC


def test_name_is_deterministic_short_and_a_dns_label():
    a = tj.job_name("pretrain", SPEC, ENV["DINOFLOW_RUN_ID"])
    assert a == tj.job_name("pretrain", SPEC, ENV["DINOFLOW_RUN_ID"])  # a retry finds it
    assert a.startswith("dinoflow-pretrain-7f3c2a10-") and len(a) <= tj.MAX_NAME
    assert a != tj.job_name("pretrain", SPEC, "another-run")
    assert a != tj.job_name("pretrain", SPEC.replace("abc", "abd"), ENV["DINOFLOW_RUN_ID"])
    assert a != tj.job_name("distill", SPEC, ENV["DINOFLOW_RUN_ID"])
    import re

    for name in (a, tj.job_name("pretrain", SPEC), MultiNodeJob("9x", "{}", 1, 1, name="9" * 80).name):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= tj.MAX_NAME, name


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_settings_from_env_reach_the_manifest(kind, monkeypatch):
    monkeypatch.setenv("DINOFLOW_NAMESPACE", "ml")
    job = tj.job_from_env("pretrain", _Spec(), {**ENV, "DINOFLOW_TRAINJOB_KIND": kind})
    m = build_manifest(job)
    file, version = (
        ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")
        if kind == "TrainJob"
        else ("kubeflow.org_pytorchjobs.yaml", "v1")
    )
    jsonschema.validate(m, crd_schema(file, version))
    _validate_object_meta(m["metadata"])
    meta = m["metadata"]
    assert meta["name"] == tj.job_name("pretrain", SPEC, ENV["DINOFLOW_RUN_ID"])
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": ENV["KFP_POD_NAME"], "uid": ENV["KFP_POD_UID"]}
    ]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    if kind == "TrainJob":
        assert m["spec"]["runtimeRef"] == {
            "name": "rel-dinoflow-torch",
            "kind": "TrainingRuntime",
            "apiGroup": "trainer.kubeflow.org",
        }
        assert meta["labels"]["kueue.x-k8s.io/priority-class"] == "training-high"
        t = m["spec"]["trainer"]
        image, env = t["image"], t["env"]
        pod = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"
        ]["spec"]["template"]["spec"]
    else:
        pod = m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        image, env = pod["containers"][0]["image"], pod["containers"][0]["env"]
        assert pod["priorityClassName"] == "training-high"
        assert m["spec"]["runPolicy"]["schedulingPolicy"] == {
            "queue": "team-a",
            "priorityClass": "training-high",
        }
    assert image == "registry.example/dinoflow:1.2.3-cuda"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    assert pod["serviceAccountName"] == "rel-dinoflow" and pod["nodeSelector"] == {"pool": "h100"}
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
    assert refs == {"team-s3"}


def _validate_object_meta(meta: dict) -> None:
    """ObjectMeta (ownerReferences included) against Kubernetes' own schema: the CRDs leave it open."""
    import kubernetes_validate

    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    for v in ("1.27.0", "1.33.0"):
        kubernetes_validate.validate(cm, v, strict=True)


def test_bad_runtime_kind_and_env_fail_early():
    with pytest.raises(SpecError, match="runtime kind"):
        MultiNodeJob("pretrain", "{}", 2, 1, runtime_kind="Runtime")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="DINOFLOW_TRAINJOB_TOLERATIONS"):
        tj.job_from_env("pretrain", _Spec(), {"DINOFLOW_TRAINJOB_TOLERATIONS": "[{"})


class FakeCustomObjectsApi:
    """The API server's side of CustomObjectsApi for one resource kind: objects by name, 409 on a
    duplicate create, 404 on a missing one; statuses scripted per poll. Same method signatures as
    kubernetes.client.CustomObjectsApi (checked below)."""

    def __init__(self, statuses=(), on_get=None):
        self.objects: dict[str, dict] = {}
        self.statuses = list(statuses)
        self.on_get = on_get
        self.calls: list[tuple] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self.calls.append(("create", body["metadata"]["name"]))
        if body["metadata"]["name"] in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[body["metadata"]["name"]] = {**body, "status": {}}
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append(("get", name))
        if self.on_get:
            self.on_get(self)
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        obj = self.objects[name]
        if self.statuses:
            obj["status"] = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return obj

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kwargs):
        self.calls.append(("patch", name))
        self.objects[name]["metadata"].update(body["metadata"])
        return self.objects[name]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append(("delete", name, kwargs.get("propagation_policy")))
        if self.objects.pop(name, None) is None:
            raise ApiException(status=404, reason="NotFound")
        return {}


def test_fake_api_has_the_kubernetes_clients_signatures():
    for m in ("create", "get", "patch", "delete"):
        name = f"{m}_namespaced_custom_object"
        assert inspect.signature(getattr(FakeCustomObjectsApi, name)) == inspect.signature(
            getattr(CustomObjectsApi, name)
        ), name


def _manifest(owner_uid="pod-1"):
    job = tj.job_from_env(
        "pretrain", _Spec(), {**ENV, "KFP_POD_UID": owner_uid, "KFP_POD_NAME": f"launcher-{owner_uid}"}
    )
    return build_manifest(job)


class _Store:
    def __init__(self, result=None):
        self.result = result

    def read_success(self, uri):
        return None if self.result is None else {"result": self.result}


def test_a_retry_adopts_the_running_job_and_waits_on_it(monkeypatch):
    api = FakeCustomObjectsApi(statuses=[{}])
    first = _manifest("pod-1")
    assert tj.submit(first, api) == "created"
    # the launcher pod died without cleanup (OOM, node lost); KFP's retry runs a new pod
    second = _manifest("pod-2")
    assert second["metadata"]["name"] == first["metadata"]["name"]
    assert tj.submit(second, api) == "adopted"
    owners = api.objects[first["metadata"]["name"]]["metadata"]["ownerReferences"]
    assert [o["uid"] for o in owners] == ["pod-1", "pod-2"]
    assert [c[0] for c in api.calls] == ["create", "create", "get", "patch"]
    # a job of that name running another spec is never adopted
    other = _manifest("pod-3")
    other["metadata"]["labels"][tj.SPEC_HASH_LABEL] = "0" * 16
    with pytest.raises(DinoflowError, match="different spec"):
        tj.submit(other, api)


def test_a_job_being_deleted_is_waited_out_then_created_anew():
    api = FakeCustomObjectsApi()
    m = _manifest()
    api.objects[m["metadata"]["name"]] = {
        "metadata": {**m["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "status": {},
    }
    sleeps = []

    def sleep(s):  # the garbage collector finishes while we wait
        sleeps.append(s)
        api.objects.clear()

    assert tj.submit(m, api, sleep=sleep) == "created" and sleeps == [5.0]


def test_completed_run_returns_the_marker_and_keeps_the_job(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    api = FakeCustomObjectsApi(statuses=[{}, cond("Created"), cond("Complete")])

    class Store(_Store):
        calls = 0

        def read_success(self, uri):
            self.calls += 1
            return None if self.calls == 1 else {"result": {"steps": 3}}

    res = tj.run_multinode("pretrain", _SpecUri(), Store(), api=api, poll_seconds=0, sleep=lambda s: None)
    assert res == {"steps": 3}
    assert not any(c[0] == "delete" for c in api.calls) and len(api.objects) == 1


class _SpecUri(_Spec):
    output_uri = "s3://b/runs/v1/pretrain/abc"


def test_a_failed_job_is_deleted_and_the_launcher_fails(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    api = FakeCustomObjectsApi(
        statuses=[cond("Created"), cond("Failed", "BackoffLimitExceeded", "node-1 OOM")]
    )
    with pytest.raises(DinoflowError, match="BackoffLimitExceeded: node-1 OOM"):
        tj.run_multinode("pretrain", _SpecUri(), _Store(), api=api, poll_seconds=0, sleep=lambda s: None)
    assert api.calls[-1][0] == "delete" and api.calls[-1][2] == "Background" and not api.objects


def test_sigterm_deletes_the_job_and_exits_143(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    polls = []

    def cancel_on_second_poll(api):  # the run is cancelled: the kubelet sends SIGTERM
        polls.append(1)
        if len(polls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    api = FakeCustomObjectsApi(statuses=[cond("Created")], on_get=cancel_on_second_poll)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        tj.run_multinode("pretrain", _SpecUri(), _Store(), api=api, poll_seconds=0, sleep=lambda s: None)
    assert e.value.code == 143
    assert ("delete", _manifest()["metadata"]["name"], "Background") in api.calls and not api.objects
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored


def test_a_job_deleted_under_the_launcher_fails_it():
    api = FakeCustomObjectsApi()
    with pytest.raises(DinoflowError, match="was deleted while running"):
        wait("gone", "ml", "TrainJob", api, timeout_seconds=10, poll_seconds=0, sleep=lambda s: None)
