"""Multi-node manifests validate against the real CRD schemas; the waiter streams and fails right."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from dinoflow.errors import DinoflowError, SpecError
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
    assert c["name"] == "pytorch" and "--nnodes=3 --nproc_per_node=8 --node_rank=$RANK" in c["command"][-1]


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
