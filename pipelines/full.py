"""The full run: ingest -> embed (bootstrap when no embedder) -> dedup (+ decontamination against
the evaluation set) -> curate -> pretrain -> distill -> evaluate -> promote.

Submitted from the KFP UI with its defaults it trains on what ``dinoflow upload`` puts in the object
store (Fashion-MNIST); it publishes the evaluation set and the curated set beside its outputs for the
scheduled retrain, which also starts from the champion that promote records in the registry.
"""

from kfp import dsl

from dinoflow.components.distill import distill
from dinoflow.components.ingest import ingest
from dinoflow.components.pretrain import pretrain
from dinoflow.kfp.gpu import cpu_task, training_task
from dinoflow.pipelines import params as P
from dinoflow.pipelines.curation import PARALLELISM, curation
from dinoflow.pipelines.parts import evaluate_and_promote, evaluate_only


@dsl.pipeline(
    name="dinoflow-full",
    description="DINOv2 recipe end to end: curate a raw pool, pretrain, distill, evaluate, promote.",
)
def full(
    source_uri: str = P.SOURCE_URI,
    source_kind: str = P.SOURCE_KIND,
    backbone: str = P.BACKBONE,
    steps: int = P.STEPS,
    batch_size: int = P.BATCH_SIZE,
    students: str = P.STUDENTS,
    gpus: int = P.GPUS,
    nodes: int = P.NODES,
    parallelism: int = PARALLELISM,
    model_name: str = P.MODEL_NAME,
    output_root: str = P.OUTPUT_ROOT,
    registry_uri: str = P.REGISTRY_URI,
    data_version: str = P.DATA_VERSION,
    ingest_spec: str = P.INGEST,
    embed_spec: str = P.EMBED,
    dedup_spec: str = P.DEDUP,
    curate_spec: str = P.CURATE,
    pretrain_spec: str = P.PRETRAIN,
    distill_spec: str = P.DISTILL,
    evaluate_spec: str = P.EVALUATE,
    promote_spec: str = P.PROMOTE,
    pool_split: str = "train",
    seed_split: str = "train",
    eval_split: str = "test",
    probe_split: str = "train",
    trainjob_config_map: str = P.TRAINJOB_CONFIG_MAP,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
    s3_secret_name: str = P.SECRET,
):
    """Run the whole factory.

    Args:
        source_uri: the dataset folder to ingest ({split}/... under it; `dinoflow upload` writes one).
        source_kind: auto (by file name: IDX pairs, .tar shards, class folders of images), idx,
            folder, shards or files.
        backbone: the backbone to pretrain (a dinoflow backbone name, e.g. vit_tiny_p4_28, vit_small_p14).
        steps: optimizer steps of pretraining and of distillation.
        batch_size: global batch size of pretraining and of distillation.
        students: backbones to distill into, comma-separated; the first is evaluated and promoted.
        gpus: GPUs per node of pretraining and distillation (their torchrun nproc); embed and evaluate
            run on one GPU of the same pool.
        nodes: nodes per training job; > 1 runs pretrain/distill as a Kubeflow TrainJob (nodes x gpus)
            from a CPU launcher.
        parallelism: parallel tasks of embed (one GPU each), dedup and curate (pool partitions).
        model_name: the registry entry the student is promoted under.
        output_root: s3:// prefix; each task writes under {output_root}/{data_version}/{task}/{spec hash}.
        registry_uri: s3:// prefix of the model registry (champion pointer, versions, decision log).
        data_version: name of the input data's version; the cache keys on it, so bump it when inputs change.
        ingest_spec: IngestSpec JSON over the typed parameters (e.g. splits instead of source_uri).
        embed_spec: EmbedSpec JSON; leave backbone_uri out to bootstrap an embedder on the pool.
        dedup_spec: DedupSpec JSON (k, thresholds).
        curate_spec: CurateSpec JSON (strategy, target_size).
        pretrain_spec: PretrainSpec JSON over the typed parameters (method, crops, optimizer...).
        distill_spec: DistillSpec JSON over the typed parameters.
        evaluate_spec: EvaluateSpec JSON (k-NN k and temperature).
        promote_spec: PromoteSpec JSON (metric, margin).
        pool_split: ingest split holding the raw pool.
        seed_split: ingest split whose images seed retrieval curation.
        eval_split: ingest split that is evaluated on and decontaminated against.
        probe_split: labelled ingest split the evaluation's k-NN and linear probes train on.
        trainjob_config_map: ConfigMap with the TrainJob settings (the chart's <release>-trainjob; optional).
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    common = {"output_root": output_root, "data_version": data_version}
    gpu = {"gpus": gpus, "node_selector": gpu_node_selector, "tolerations": gpu_tolerations}
    to = P.pointers(output_root, registry_uri, model_name)

    ing = cpu_task(
        ingest(
            spec_json=ingest_spec,
            source_uri=source_uri,
            source_kind=source_kind,
            overrides_json=f'{{"seen_uri": "{to["seen"]}"}}',
            publish_uri=to["eval_set"],
            **common,
        ),
        s3_secret_name,
    )
    manifest = ing.outputs["result"]
    cur = curation(
        embed_spec=embed_spec,
        dedup_spec=dedup_spec,
        curate_spec=curate_spec,
        secret=s3_secret_name,
        gpu=gpu,
        common=common,
        parallelism=parallelism,
        pool={"name": "embed-pool", "split": pool_split, "manifest": manifest},
        eval_set={"name": "embed-eval", "split": eval_split, "manifest": manifest},
        seed={"name": "embed-seed", "split": seed_split, "manifest": manifest},
        share_embedder=True,
        curate_args={"publish_uri": to["curated"]},
    )
    cu = cur["curate"]
    train = {
        "secret_name": s3_secret_name,
        "gpu": gpu,
        "nodes": nodes,
        "trainjob_config_map": trainjob_config_map,
    }
    sizes = {"steps": steps, "batch_size": batch_size}
    curated = cu.outputs["result"]
    pt = training_task(
        pretrain,
        {"spec_json": pretrain_spec, "manifest": curated, "arch": backbone, **sizes, **common},
        name="pretrain",
        **train,
    )
    ds = training_task(
        distill,
        {
            "spec_json": distill_spec,
            "manifest": curated,
            "teacher": pt,
            "students": students,
            **sizes,
            **common,
        },
        name="distill",
        **train,
    )
    # the teacher is the run's headline model; the distilled student is what promote ships
    evaluate_only(
        pt,
        evaluate_spec,
        s3_secret_name,
        common,
        gpu,
        "evaluate-teacher",
        split=probe_split,
        test_split=eval_split,
        dataset=manifest,
    )
    evaluate_and_promote(
        ds,
        evaluate_spec,
        promote_spec,
        s3_secret_name,
        common,
        gpu,
        registry={"model_name": model_name, "registry_uri": registry_uri},
        split=probe_split,
        test_split=eval_split,
        dataset=manifest,
    )
