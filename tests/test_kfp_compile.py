"""Compiled YAMLs: up to date, GPU stages carry their pod settings, no credential value anywhere."""

from __future__ import annotations

import pytest
import yaml

from dinoflow.kfp import GPU_IMAGE, IMAGE, S3_SECRET_KEYS, TRAINJOB_ENV_KEYS
from dinoflow.kfp.compile import default_dirs, stale


def _docs(path):
    return list(yaml.safe_load_all(path.read_text()))


def test_checked_in_yamls_are_up_to_date():
    assert stale() == [], "run `dinoflow compile` and commit the YAMLs"


def _all_tasks(spec):
    """(name, task) of every task in the pipeline, nested condition DAGs included."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return [(n, t) for dag in dags for n, t in dag["tasks"].items() if not n.startswith("condition")]


def test_gpu_stages_request_gpus_pool_shm_and_secret_and_cpu_stages_do_not():
    _, pdir = default_dirs()
    spec, platform = _docs(pdir / "full.yaml")
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # pretrain/distill: the one-node branch on the GPU pool; "pretrain"/"distill" are the launchers
    gpu_tasks = {"embed", "embed-2", "embed-3", "pretrain-2", "distill-2"}
    launchers = {"pretrain", "distill"}
    tasks = dict(_all_tasks(spec))
    for name, task in tasks.items():
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = executors[label]["container"]
        plat = k8s[label]
        # credentials: from the Secret named by a pipeline parameter, every key mapped to its env var
        (sec,) = plat["secretAsEnv"]
        assert sec["secretNameParameter"]["componentInputParameter"].endswith("s3_secret_name")
        assert {m["secretKey"]: m["envVar"] for m in sec["keyToEnv"]} == S3_SECRET_KEYS
        assert task["cachingOptions"].get("enableCache") is True
        if name in gpu_tasks:
            assert container["image"] == GPU_IMAGE
            acc = container["resources"]["accelerator"]
            assert acc["resourceType"] == "nvidia.com/gpu"
            assert acc["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
            assert (
                container["resources"]["resourceCpuRequest"]
                and container["resources"]["resourceMemoryRequest"]
            )
            assert plat["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith(
                "gpu_node_selector"
            )
            assert plat["tolerations"][0]["tolerationJson"]["componentInputParameter"].endswith(
                "gpu_tolerations"
            )
            (shm,) = plat["emptyDirMounts"]
            assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
            assert task["retryPolicy"]["maxRetryCount"] >= 1 and task["retryPolicy"]["backoffDuration"]
        elif name in launchers:
            assert "accelerator" not in container.get("resources", {})
            assert "nodeSelector" not in plat and "emptyDirMounts" not in plat
        else:
            assert container["image"] == IMAGE
            assert "accelerator" not in container.get("resources", {})
            assert "nodeSelector" not in plat and "emptyDirMounts" not in plat
    assert gpu_tasks | launchers <= set(tasks)


@pytest.mark.parametrize("pipeline", ["full", "retrain", "small_data", "stage-pretrain", "stage-distill"])
def test_multi_node_training_runs_from_a_cpu_launcher_with_the_trainjob_settings(pipeline):
    """nodes > 1: a small CPU task (no GPU) with the chart's TrainJob ConfigMap as optional env, its own
    pod name/uid/namespace from the downward API and the run id; nodes <= 1: the GPU task. One of
    the two results feeds the next step (dsl.OneOf)."""
    _, pdir = default_dirs()
    spec, platform = _docs(pdir / f"{pipeline}.yaml")
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    branches = [c for n, c in spec["components"].items() if n.startswith("comp-condition-branches")]
    stages = {"full": 2}.get(pipeline, 1)
    assert len(branches) == stages
    for br in branches:
        conds = {
            t["triggerPolicy"]["condition"]: t["componentRef"]["name"] for t in br["dag"]["tasks"].values()
        }
        multi = conds["int(inputs.parameter_values['pipelinechannel--nodes']) > 1"]
        one = conds["!(int(inputs.parameter_values['pipelinechannel--nodes']) > 1)"]
        if not pipeline.startswith("stage-"):  # the OneOf of both results feeds the next step
            assert len(br["outputDefinitions"]["artifacts"]) == 1
        for comp, is_launcher in ((multi, True), (one, False)):
            ((tname, task),) = spec["components"][comp]["dag"]["tasks"].items()
            label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
            res = executors[label]["container"].get("resources", {})
            plat = k8s[label]
            params = task["inputs"]["parameters"]
            assert params["gpus"]["componentInputParameter"].endswith("gpus")
            if is_launcher:
                assert "accelerator" not in res and res["resourceMemoryRequest"] == "1G"
                (cm,) = plat["configMapAsEnv"]
                assert cm["optional"] is True
                assert cm["configMapNameParameter"]["componentInputParameter"].endswith("trainjob_config_map")
                assert [k["configMapKey"] for k in cm["keyToEnv"]] == list(TRAINJOB_ENV_KEYS)
                fields = {f["name"]: f["fieldPath"] for f in plat["fieldPathAsEnv"]}
                assert fields == {
                    "DINOFLOW_POD_NAME": "metadata.name",
                    "DINOFLOW_POD_UID": "metadata.uid",
                    "DINOFLOW_NAMESPACE": "metadata.namespace",
                }
                assert params["nnodes"]["componentInputParameter"].endswith("nodes")
                assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
                assert task["retryPolicy"]["maxRetryCount"] >= 1
            else:
                assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
                assert "configMapAsEnv" not in plat and "run_id" not in params


def test_no_credential_values_in_any_yaml(store):
    """The session store's real keys must appear in no compiled YAML, nor any DINOFLOW_S3_* literal."""
    cdir, pdir = default_dirs()
    secrets = [store.settings.access_key.get_secret_value(), store.settings.secret_key.get_secret_value()]
    paths = list(pdir.glob("*.yaml")) + list(cdir.glob("*/component.yaml"))
    assert len(paths) == 8 + 3 + 8
    for path in paths:
        text = path.read_text()
        assert not any(s in text for s in secrets), path
        for spec in _docs(path):
            for ex in (spec or {}).get("deploymentSpec", {}).get("executors", {}).values():
                env = {e["name"] for e in ex.get("container", {}).get("env", [])}
                assert not env & set(S3_SECRET_KEYS.values()), path


def test_pipeline_parameters_are_typed_and_documented():
    _, pdir = default_dirs()
    for name in ("full", "retrain", "small_data", "stage-pretrain"):
        params = _docs(pdir / f"{name}.yaml")[0]["root"]["inputDefinitions"]["parameters"]
        assert "data_version" in params and "output_root" in params
        for pname, p in params.items():
            assert p["parameterType"] in {"STRING", "NUMBER_INTEGER", "STRUCT", "LIST"}, (name, pname)
            assert p.get("description"), f"{name}: parameter {pname} has no description"


def test_retrain_continues_from_champion_and_dedups_against_curated():
    _, pdir = default_dirs()
    spec = _docs(pdir / "retrain.yaml")[0]
    tasks = dict(_all_tasks(spec))
    dedup_inputs = tasks["dedup"]["inputs"]["artifacts"]
    assert {"pool", "eval_set", "reference"} <= set(dedup_inputs)
    for name in ("pretrain", "pretrain-2"):  # the multi-node launcher and the one-node GPU task
        over = tasks[name]["inputs"]["parameters"]["overrides_json"]["runtimeValue"]["constant"]
        assert '"@init"' in over and "champion_uri" in over


def test_local_runs_lift_retries_and_put_them_back():
    from dinoflow.kfp.local import _no_retries
    from dinoflow.pipelines.full import full

    spec = full.pipeline_spec
    dags = lambda: [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]  # noqa: E731
    retried = lambda: {n for d in dags() for n, t in d.tasks.items() if t.HasField("retry_policy")}  # noqa: E731
    before = retried()
    assert {"pretrain", "pretrain-2", "distill", "distill-2"} <= before  # nested in condition branches
    with _no_retries(full):
        assert retried() == set()
    assert retried() == before
