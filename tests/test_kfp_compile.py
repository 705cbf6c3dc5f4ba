"""Compiled YAMLs: up to date, GPU stages carry their pod settings, no credential value anywhere."""

from __future__ import annotations

import yaml

from dinoflow.kfp import GPU_IMAGE, IMAGE, S3_SECRET_KEYS
from dinoflow.kfp.compile import default_dirs, stale


def _docs(path):
    return list(yaml.safe_load_all(path.read_text()))


def test_checked_in_yamls_are_up_to_date():
    assert stale() == [], "run `dinoflow compile` and commit the YAMLs"


def test_gpu_stages_request_gpus_pool_shm_and_secret_and_cpu_stages_do_not():
    _, pdir = default_dirs()
    spec, platform = _docs(pdir / "full.yaml")
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu_tasks = {"embed", "embed-2", "embed-3", "pretrain", "distill"}
    for name, task in tasks.items():
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = executors[label]["container"]
        plat = k8s[label]
        # credentials: from the Secret named by a pipeline parameter, every key mapped to its env var
        (sec,) = plat["secretAsEnv"]
        assert sec["secretNameParameter"] == {"componentInputParameter": "s3_secret_name"}
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
            assert plat["nodeSelector"]["nodeSelectorJson"] == {
                "componentInputParameter": "gpu_node_selector"
            }
            assert plat["tolerations"][0]["tolerationJson"] == {"componentInputParameter": "gpu_tolerations"}
            (shm,) = plat["emptyDirMounts"]
            assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
            assert task["retryPolicy"]["maxRetryCount"] >= 1 and task["retryPolicy"]["backoffDuration"]
        else:
            assert container["image"] == IMAGE
            assert "accelerator" not in container.get("resources", {})
            assert "nodeSelector" not in plat and "emptyDirMounts" not in plat
    assert gpu_tasks <= set(tasks)


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
    tasks = spec["root"]["dag"]["tasks"]
    dedup_inputs = tasks["dedup"]["inputs"]["artifacts"]
    assert {"pool", "eval_set", "reference"} <= set(dedup_inputs)
    over = tasks["pretrain"]["inputs"]["parameters"]["overrides_json"]["runtimeValue"]["constant"]
    assert '"@init"' in over and "champion_uri" in over


def test_local_runs_lift_retries_and_put_them_back():
    from dinoflow.kfp.local import _no_retries
    from dinoflow.pipelines.full import full

    tasks = lambda: full.pipeline_spec.root.dag.tasks  # noqa: E731
    assert tasks()["pretrain"].retry_policy.max_retry_count == 2
    with _no_retries(full):
        assert not any(t.HasField("retry_policy") for t in tasks().values())
    assert tasks()["pretrain"].retry_policy.max_retry_count == 2
