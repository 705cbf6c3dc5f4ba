"""Multi-node training for real: the container command of a rendered TrainJob (and PyTorchJob) runs
twice on this machine with the environment the Trainer's torch plugin (or the Training Operator)
injects into node 0 and node 1: a real 2-node torchrun (gloo on 127.0.0.1). Its exported backbone
equals a single-node 2-process run of the same training spec."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from test_train_distributed import _make_manifest, _spec

from dinoflow.errors import SpecError
from dinoflow.kfp.trainjob import MultiNodeJob, build_manifest
from dinoflow.stages import get_stage

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def manifest(store):
    return _make_manifest(store, f"s3://test-{uuid.uuid4().hex[:12]}/data", 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _container(m: dict) -> tuple[list[str], list[dict]]:
    if m["kind"] == "TrainJob":
        t = m["spec"]["trainer"]
        return t["command"], t["env"]
    c = m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return c["command"], c["env"]


def _node_env(env: list[dict], s3_env: dict[str, str], secret: str) -> dict[str, str]:
    """The container's env as the kubelet would set it: values, and the Secret's keys for refs."""
    keys = {"endpoint": "DINOFLOW_S3_ENDPOINT", "access_key": "DINOFLOW_S3_ACCESS_KEY"}
    keys["secret_key"] = "DINOFLOW_S3_SECRET_KEY"
    out = {}
    for e in env:
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret
            out[e["name"]] = s3_env[keys[ref["key"]]]
    return out


def _run_nodes(m: dict, s3_env: dict[str, str], per_node: list[dict[str, str]], tmp: Path) -> None:
    command, env = _container(m)
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DINOFLOW_S3", "RANK", "WORLD_SIZE"))},
        **_node_env(env, s3_env, "dinoflow-s3"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # torchrun of this venv
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TMPDIR": str(tmp),
    }
    procs = []
    for i, extra in enumerate(per_node):
        log = open(tmp / f"node{i}.log", "w")
        procs.append((subprocess.Popen(command, env={**base, **extra}, stdout=log, stderr=log), log))
    try:
        codes = [p.wait(timeout=400) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = "\n".join((tmp / f"node{i}.log").read_text()[-3000:] for i in range(len(per_node)))
    assert codes == [0] * len(per_node), logs


def _backbone(store, uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(store.get_bytes(uri + "/backbone.safetensors"))


@pytest.fixture(scope="module")
def reference(store, manifest):
    """The same training on one node with 2 processes (``nproc=2``, ``torchrun --standalone``)."""
    out = f"s3://test-{uuid.uuid4().hex[:12]}/ref"
    stage = get_stage("pretrain")
    return stage.run(stage.parse_spec(_spec(out, manifest, nproc=2)), store)


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_two_nodes_equal_one_node_with_two_processes(store, s3_env, manifest, reference, kind, tmp_path):
    stage = get_stage("pretrain")
    out = f"s3://test-{uuid.uuid4().hex[:12]}/{kind.lower()}"
    spec = stage.parse_spec(_spec(out, manifest, nnodes=2, nproc=1))
    job = MultiNodeJob(
        stage="pretrain", spec_json=spec.model_dump_json(), nnodes=2, gpus_per_node=1, kind=kind
    )
    m = build_manifest(job)
    port = str(_free_port())
    if kind == "TrainJob":  # what the Trainer's torch plugin injects into each node's pod
        nodes = [
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "1",
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": port,
            }
            for rank in (0, 1)
        ]
    else:  # the Training Operator v1: Master is rank 0, Worker-0 rank 1
        nodes = [
            {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"}
            for rank in (0, 1)
        ]
    _run_nodes(m, s3_env, nodes, tmp_path)

    marker = store.read_success(out)
    assert marker is not None and marker["spec_hash"] == spec.spec_hash()
    result = marker["result"]
    assert result["steps"] == reference.steps == 3
    a, b = _backbone(store, result["backbone_uri"]), _backbone(store, reference.backbone_uri)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    assert abs(result["final_loss"] - reference.final_loss) < 1e-4


def test_launched_world_must_match_the_spec(store, manifest, monkeypatch):
    """Each node's processes accept an ``nnodes > 1`` spec in a world of nproc*nnodes ranks (the
    former refusal); anything else is refused in one line, before any work."""
    from dinoflow.stages import _worker, pretrain

    spec = pretrain.PretrainSpec.model_validate(_spec("s3://b/x", manifest, nnodes=2, nproc=8, batch_size=16))
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert _worker.launch_mode(spec) == "worker"
    monkeypatch.setattr(pretrain, "train_from_spec", lambda s, st: "trained its share")
    assert pretrain.run(spec, store) == "trained its share"
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SpecError, match="WORLD_SIZE=8 .* nproc\\*nnodes = 8\\*2 = 16"):
        pretrain.run(spec, store)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SpecError, match="nnodes=2 runs as a Kubeflow TrainJob/PyTorchJob"):
        pretrain.run(spec, store)


def test_distill_places_processes_like_pretrain(monkeypatch):
    from dinoflow.stages import _worker
    from dinoflow.stages.distill import DistillSpec

    spec = DistillSpec(
        output_uri="s3://b/d", manifest_uri="s3://b/m", teacher_uri="s3://b/t", students=["vit_test_p4_28"]
    )
    assert (spec.nproc, spec.nnodes) == (1, 1) and _worker.launch_mode(spec) == "inline"
    spec = spec.model_copy(update={"nnodes": 2, "nproc": 4, "batch_size": 8})
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert _worker.launch_mode(spec) == "worker"
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SpecError, match="nnodes=2"):
        _worker.launch_mode(spec)
