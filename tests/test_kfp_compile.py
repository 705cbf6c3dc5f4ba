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
    """(name, task) of every task in the pipeline, nested condition and loop DAGs included (not the
    sub-DAG tasks themselves)."""
    comps = spec["components"]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in comps.values() if "dag" in c]
    return [
        (n, t)
        for dag in dags
        for n, t in dag["tasks"].items()
        if "dag" not in comps[t["componentRef"]["name"]]
    ]


def test_gpu_stages_request_gpus_pool_shm_and_secret_and_cpu_stages_do_not():
    _, pdir = default_dirs()
    spec, platform = _docs(pdir / "full.yaml")
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # pretrain/distill: the one-node branch on the GPU pool with `gpus` GPUs ("pretrain"/"distill" are
    # the launchers); embed's plan and parts and evaluate: one GPU of the same pool (embed's collecting
    # task only lists the parts' shards: a CPU pod, in embed's image)
    training = {"pretrain-2", "distill-2"}
    tasks = dict(_all_tasks(spec))
    embeds = {n for n, t in tasks.items() if t["componentRef"]["name"].startswith("comp-embed")}

    def phase(task):
        return task["inputs"]["parameters"].get("phase", {}).get("runtimeValue", {}).get("constant", "")

    # evaluate: the teacher; evaluate-2: the distilled student
    one_gpu = {n for n in embeds if phase(tasks[n])} | {"evaluate", "evaluate-2"}
    assert len(one_gpu) == 8  # plan + part of the pool, evaluation and seed sets
    launchers = {"pretrain", "distill"}
    for name, task in tasks.items():
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = executors[label]["container"]
        plat = k8s[label]
        # credentials: from the Secret named by a pipeline parameter, every key mapped to its env var
        (sec,) = plat["secretAsEnv"]
        assert sec["secretNameParameter"]["componentInputParameter"].endswith("s3_secret_name")
        assert {m["secretKey"]: m["envVar"] for m in sec["keyToEnv"]} == S3_SECRET_KEYS
        assert task["cachingOptions"].get("enableCache") is True
        if name in training | one_gpu:
            assert container["image"] == GPU_IMAGE
            acc = container["resources"]["accelerator"]
            assert acc["resourceType"] == "nvidia.com/gpu"
            want = "{{$.inputs.parameters['pipelinechannel--gpus']}}" if name in training else "1"
            assert acc["resourceCount"] == want, name
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
            assert container["image"] == (GPU_IMAGE if name in embeds else IMAGE)
            assert "accelerator" not in container.get("resources", {})
            assert "nodeSelector" not in plat and "emptyDirMounts" not in plat
    assert training | one_gpu | launchers <= set(tasks)


@pytest.mark.parametrize("pipeline", ["full", "retrain", "small_data"])
def test_typed_parameters_reach_the_training_specs(pipeline):
    """The UI's typed parameters are wired to the components' typed inputs, which the runtime maps onto
    spec fields under the spec JSON: gpus -> nproc (each training branch), nodes -> nnodes, backbone,
    steps, batch size, students (distill), source (ingest), model name and registry (promote)."""
    _, pdir = default_dirs()
    spec = _docs(pdir / f"{pipeline}.yaml")[0]
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert {"source_uri", "source_kind", "backbone", "steps", "batch_size", "gpus", "nodes"} <= set(declared)
    tasks = dict(_all_tasks(spec))

    def wired(task, arg, param):
        got = task["inputs"]["parameters"][arg]["componentInputParameter"]
        assert got.endswith(param), (arg, got)

    trainers = [n for n in tasks if n.startswith("pretrain") or n.startswith("distill")]
    assert len(trainers) == {"full": 4}.get(pipeline, 2)
    for n in trainers:
        wired(tasks[n], "gpus", "gpus")
        wired(tasks[n], "steps", "steps")
        wired(tasks[n], "batch_size", "batch_size")
        wired(
            tasks[n],
            "students" if n.startswith("distill") else "arch",
            "students" if n.startswith("distill") else "backbone",
        )
    wired(tasks["ingest"], "source_uri", "source_uri")
    wired(tasks["ingest"], "source_kind", "source_kind")
    wired(tasks["promote"], "model_name", "model_name")
    wired(tasks["promote"], "registry_uri", "registry_uri")
    from dinoflow.kfp.runtime import typed_defaults

    assert typed_defaults(
        {"gpus": 4, "nnodes": 2, "arch": "vit_small_p14", "students": "a, b", "steps": 0}
    ) == {
        "nproc": 4,
        "nnodes": 2,
        "backbone": "vit_small_p14",
        "students": ["a", "b"],
    }


def test_full_defaults_ingest_what_dinoflow_upload_writes():
    from dinoflow.kfp import DATA_PREFIX, DATASET

    _, pdir = default_dirs()
    params = _docs(pdir / "full.yaml")[0]["root"]["inputDefinitions"]["parameters"]
    assert params["source_uri"]["defaultValue"] == f"{DATA_PREFIX}/{DATASET}"
    assert params["ingest_spec"]["defaultValue"] == "{}"


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
    """The retrain ingests only new data with a per-run data version (its schedule time), then, only
    when something is new, dedups it against the curated set, grows that set, continues from the
    champion (read from the registry when the task runs) and evaluates on the champion's test set."""
    _, pdir = default_dirs()
    spec = _docs(pdir / "retrain.yaml")[0]
    tasks = dict(_all_tasks(spec))
    ing = tasks["ingest"]
    assert ing["cachingOptions"] == {}  # caching off: it looks at the source on every run
    params = ing["inputs"]["parameters"]
    assert params["schedule_time"]["runtimeValue"]["constant"] == "{{$.pipeline_job_schedule_time_utc}}"
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert spec["root"]["inputDefinitions"]["parameters"]["data_version"]["defaultValue"] == ""
    (cond,) = [t for n, t in spec["root"]["dag"]["tasks"].items() if n.startswith("condition")]
    assert "pipelinechannel--ingest-images" in cond["triggerPolicy"]["condition"]
    assert "> 0" in cond["triggerPolicy"]["condition"]
    dedup_inputs = tasks["dedup"]["inputs"]["artifacts"]
    assert {"pool", "eval_set", "reference"} <= set(dedup_inputs)
    for name in ("pretrain", "pretrain-2", "evaluate", "promote"):  # every step after ingest
        version = tasks[name]["inputs"]["parameters"]["data_version"]["componentInputParameter"]
        assert version == "pipelinechannel--ingest-version", (name, version)
    text = (pdir / "retrain.yaml").read_text()
    assert "@init" in text and "champion.json" in text and "curated.json" in text


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


def test_compile_image_sets_every_components_image_and_pull_secrets_on_every_task(tmp_path):
    """`dinoflow compile --image REG/NAME:TAG --pull-secret S --out DIR`: every component of every YAML
    runs the user's image (GPU ones TAG-cuda), every task of every pipeline pulls with the Secret; the
    checked-in YAMLs keep the default image."""
    from typer.testing import CliRunner

    from dinoflow.cli import app

    r = CliRunner().invoke(
        app,
        [
            "compile",
            "--image",
            "reg.example.com/ml/dino:2.0.1",
            "--pull-secret",
            "regcred",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    paths = list((tmp_path / "pipelines").glob("*.yaml")) + list(
        (tmp_path / "components").glob("*/component.yaml")
    )
    assert len(paths) == 8 + 3 + 8
    for path in paths:
        docs = _docs(path)
        images = {ex["container"]["image"] for ex in docs[0]["deploymentSpec"]["executors"].values()}
        assert images <= {"reg.example.com/ml/dino:2.0.1", "reg.example.com/ml/dino:2.0.1-cuda"}, path
        if path.parent.name == "pipelines":
            k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
            assert set(k8s) == set(docs[0]["deploymentSpec"]["executors"])
            assert all(p["imagePullSecret"][0]["secretName"] == "regcred" for p in k8s.values()), path
    cdir, pdir = default_dirs()
    assert (
        GPU_IMAGE in (pdir / "full.yaml").read_text()
        and IMAGE in (cdir / "ingest" / "component.yaml").read_text()
    )
    bad = CliRunner().invoke(
        app, ["compile", "--image", "reg.example.com/ml/dino:latest", "--out", str(tmp_path)]
    )
    assert bad.exit_code != 0 and "immutable tag" in str(bad.exception)
    no_out = CliRunner().invoke(app, ["compile", "--image", "reg.example.com/ml/dino:2.0.1"])
    assert no_out.exit_code != 0 and "give --out" in str(no_out.exception)
