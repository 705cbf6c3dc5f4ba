"""The chart's network exposure: every pod it runs accepts only the traffic it serves (MinIO's S3
port, the Pushgateway, training pods among themselves and to Prometheus), and a training pod's
/metrics binds the pod address only because the chart asks for it."""

from __future__ import annotations

import pytest
from _deploy import CHART, render, validate

FULL = {
    "minio": {"enabled": True},
    "objectStore": {"existingSecret": "", "accessKey": "a" * 16, "secretKey": "b" * 32, "endpoint": ""},
    "metrics": {"pushgateway": {"enabled": True}},
    "trainingRuntime": {"enabled": True},
    "networkPolicy": {"prometheusNamespaces": ["monitoring"]},
}


def _policies(docs):
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


def _pod_labels(docs) -> dict[str, dict[str, str]]:
    out = {}
    for d in docs:
        if d["kind"] in {"Deployment", "Job"}:
            out[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["metadata"]["labels"]
        elif d["kind"] == "TrainingRuntime":
            for rj in d["spec"]["template"]["spec"]["replicatedJobs"]:
                out[f"TrainingRuntime/{rj['name']}"] = rj["template"]["spec"]["template"]["metadata"][
                    "labels"
                ]
    return out


def _selects(spec: dict, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in spec["podSelector"].get("matchLabels", {}).items())


@pytest.fixture(scope="module")
def docs():
    return render(values=FULL)


def test_every_pod_of_the_chart_is_under_an_ingress_policy(docs):
    assert (CHART / "templates" / "networkpolicy.yaml").exists()
    policies = _policies(docs)
    assert validate([d for d in docs if d["kind"] == "NetworkPolicy"]) == []
    assert all(spec["policyTypes"] == ["Ingress"] for spec in policies.values())
    pods = _pod_labels(docs)
    assert {"minio", "pushgateway", "schedule-hook"} <= {
        labels.get("app.kubernetes.io/component") for labels in pods.values()
    }
    for owner, labels in pods.items():
        assert any(_selects(spec, labels) for spec in policies.values()), f"{owner} accepts any ingress"


def test_each_pod_accepts_only_what_it_serves(docs):
    policies = _policies(docs)
    pods = _pod_labels(docs)
    allowed: dict[str, set[object]] = {}
    for owner, labels in pods.items():
        rules = [r for spec in policies.values() if _selects(spec, labels) for r in spec.get("ingress", [])]
        allowed[owner] = {p["port"] for r in rules for p in r.get("ports", [{"port": "any"}])}
    by_component = {pods[o].get("app.kubernetes.io/component", o): ports for o, ports in allowed.items()}
    assert by_component["minio"] == {9000}  # the S3 port; not the console (9001)
    assert by_component["pushgateway"] == {9091}
    assert by_component["schedule-hook"] == set()  # it serves nothing
    training = [ports for owner, ports in allowed.items() if owner.startswith("TrainingRuntime/")]
    assert training and all(ports == {"any", 9400} for ports in training)
    # the "any port" rule of training pods admits only other training pods (rendezvous, collectives)
    (train_policy,) = [
        s for s in policies.values() if s["podSelector"]["matchLabels"] == {"dinoflow.io/metrics": "true"}
    ]
    peers = [r for r in train_policy["ingress"] if "ports" not in r]
    assert peers == [{"from": [{"podSelector": {"matchLabels": {"dinoflow.io/metrics": "true"}}}]}]
    # MinIO: this namespace's pods and the pipelines' namespace, nobody else
    (minio,) = [s for n, s in policies.items() if n.endswith("-minio")]
    assert minio["ingress"][0]["from"] == [
        {"podSelector": {}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}},
    ]


def test_training_pods_serve_metrics_on_their_address_because_the_chart_says_so(docs):
    (rt,) = [d for d in docs if d["kind"] == "TrainingRuntime"]
    for rj in rt["spec"]["template"]["spec"]["replicatedJobs"]:
        for c in rj["template"]["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["DINOFLOW_METRICS_ADDR"] == "0.0.0.0"


def test_policies_can_be_turned_off():
    assert _policies(render(values={**FULL, "networkPolicy": {"enabled": False}})) == {}
