"""The retrain pipeline for schedules: each run ingests only what is new under the source folder,
dedups it against what is already curated (and the evaluation set), adds what survives to the
curated set, continues pretraining from the champion on it, evaluates, and promotes when the
challenger wins. A run with nothing new ends after ingest (the rest is a skipped branch) and succeeds.

Each run's data version comes from its schedule time (``PIPELINE_JOB_SCHEDULE_TIME_UTC``; a one-off
run's creation time, or its run id where the backend leaves the time unfilled), so no scheduled run is
a cache hit of an earlier one, while a retried run reuses what it already finished. What a run starts
from is read when it runs: the registry's champion pointer, and the curated set and evaluation set
that the full run (then each retrain) published under ``output_root``. The champion is both the
embedder and the starting point, so each generation curates with the last.
"""

from kfp import dsl

from dinoflow.components.ingest import ingest
from dinoflow.components.pretrain import pretrain
from dinoflow.kfp.gpu import cpu_task, training_task
from dinoflow.pipelines import params as P
from dinoflow.pipelines.curation import PARALLELISM, curation
from dinoflow.pipelines.parts import evaluate_and_promote


def _json(**fields: object) -> str:
    """A JSON object whose values may hold pipeline parameters (placed as text at run time)."""
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


@dsl.pipeline(
    name="dinoflow-retrain",
    description="Scheduled retrain: new data -> dedup vs curated -> merge -> continue from champion -> promote.",
)
def retrain(
    source_uri: str = P.SOURCE_URI,
    source_kind: str = P.SOURCE_KIND,
    backbone: str = P.STUDENTS,
    steps: int = P.RETRAIN_STEPS,
    batch_size: int = P.BATCH_SIZE,
    gpus: int = P.GPUS,
    nodes: int = P.NODES,
    parallelism: int = PARALLELISM,
    model_name: str = P.MODEL_NAME,
    output_root: str = P.OUTPUT_ROOT,
    registry_uri: str = P.REGISTRY_URI,
    data_version: str = "",
    ingest_spec: str = P.INGEST,
    embed_spec: str = P.EMBED,
    dedup_spec: str = P.DEDUP,
    curate_spec: str = P.RETRAIN_CURATE,
    pretrain_spec: str = P.PRETRAIN,
    evaluate_spec: str = P.EVALUATE,
    promote_spec: str = P.PROMOTE,
    pool_split: str = "train",
    seed_split: str = "train",
    eval_split: str = "test",
    trainjob_config_map: str = P.TRAINJOB_CONFIG_MAP,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
    s3_secret_name: str = P.SECRET,
):
    """Retrain on what is new under the source folder, starting from the champion.

    Args:
        source_uri: the dataset folder new images arrive in ({pool_split}/{class}/{image}, or IDX/tar
            files); objects an earlier ingest read (the ledger {output_root}/ingested) are skipped.
        source_kind: auto (by file name), idx, folder, shards or files.
        backbone: the champion's architecture (the full run's first student), continued from.
        steps: optimizer steps of each retrain.
        batch_size: global batch size of each retrain.
        gpus: GPUs per node of pretraining (its nproc); embed and evaluate run on one GPU of the pool.
        nodes: nodes per training job; > 1 pretrains as a Kubeflow TrainJob (nodes x gpus) from a CPU launcher.
        parallelism: parallel tasks of embed (one GPU each), dedup and curate (pool partitions).
        model_name: the registry entry whose champion is continued and challenged.
        output_root: s3:// prefix of the outputs and of what the full run published (curated.json,
            eval-set.json, the ingest ledger).
        registry_uri: s3:// prefix of the model registry.
        data_version: this run's data version; empty: from the schedule time (each scheduled run anew).
        ingest_spec: IngestSpec JSON over the typed parameters.
        embed_spec: EmbedSpec JSON (the champion is the embedder).
        dedup_spec: DedupSpec JSON.
        curate_spec: CurateSpec JSON (default: keep every new image that survives dedup).
        pretrain_spec: PretrainSpec JSON over the typed parameters (continues from the champion).
        evaluate_spec: EvaluateSpec JSON.
        promote_spec: PromoteSpec JSON (metric, margin).
        pool_split: the source split new images arrive in (the only one ingested).
        seed_split: evaluation-set split that trains the probes.
        eval_split: evaluation-set split scored (the champion's) and decontaminated against.
        trainjob_config_map: ConfigMap with the TrainJob settings (the chart's <release>-trainjob; optional).
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    gpu = {"gpus": gpus, "node_selector": gpu_node_selector, "tolerations": gpu_tolerations}
    to = P.pointers(output_root, registry_uri, model_name)
    champion = f'"{to["champion"]}"'

    ing = cpu_task(
        ingest(
            spec_json=ingest_spec,
            source_uri=source_uri,
            source_kind=source_kind,
            overrides_json=_json(
                seen_uri=f'"{to["seen"]}"', only_new="true", only_splits=f'["{pool_split}"]'
            ),
            output_root=output_root,
            data_version=data_version,
            schedule_time=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        s3_secret_name,
    )
    ing.set_caching_options(enable_caching=False)  # it must look at the source on every run
    common = {"output_root": output_root, "data_version": ing.outputs["version"]}

    with dsl.If(ing.outputs["images"] > 0, name="new-data"):
        cur = curation(
            embed_spec=embed_spec,
            dedup_spec=dedup_spec,
            curate_spec=curate_spec,
            secret=s3_secret_name,
            gpu=gpu,
            common=common,
            parallelism=parallelism,
            pool={
                "name": "embed-new",
                "split": pool_split,
                "overrides_json": _json(**{"@backbone": champion}),
                "manifest": ing.outputs["result"],
            },
            eval_set={
                "name": "embed-eval",
                "split": eval_split,
                "overrides_json": _json(**{"@backbone": champion, "@manifest": f'"{to["eval_set"]}"'}),
            },
            reference={
                "name": "embed-curated",
                "overrides_json": _json(**{"@backbone": champion, "@manifest": f'"{to["curated"]}"'}),
            },
            curate_args={"publish_uri": to["curated"]},
        )
        cu = cur["curate"]
        pt = training_task(
            pretrain,
            {
                "spec_json": pretrain_spec,
                "overrides_json": _json(**{"@init": champion}),
                "manifest": cu.outputs["result"],
                "arch": backbone,
                "steps": steps,
                "batch_size": batch_size,
                **common,
            },
            s3_secret_name,
            gpu,
            nodes,
            trainjob_config_map,
            name="pretrain",
        )
        evaluate_and_promote(
            pt,
            evaluate_spec,
            promote_spec,
            s3_secret_name,
            common,
            gpu,
            registry={"model_name": model_name, "registry_uri": registry_uri},
            overrides_json=_json(**{"@dataset": f'"{to["eval_set"]}"'}),
            split=seed_split,
            test_split=eval_split,
        )
