"""The retrain pipeline for schedules: ingest only the new data, dedup it against what is already
curated (and the evaluation set), re-curate around the curated set, continue pretraining from the
champion, evaluate, and promote when the challenger wins.

The champion is both the embedder and the starting point, so each generation curates with the last.
"""

from kfp import dsl

from dinoflow.components.curate import curate
from dinoflow.components.dedup import dedup
from dinoflow.components.ingest import ingest
from dinoflow.components.pretrain import pretrain
from dinoflow.kfp.gpu import cpu_task, training_task
from dinoflow.pipelines import params as P
from dinoflow.pipelines.parts import embed_task, evaluate_and_promote


@dsl.pipeline(
    name="dinoflow-retrain",
    description="Scheduled retrain: new data -> dedup vs curated -> re-curate -> continue from champion -> promote.",
)
def retrain(
    champion_uri: str,
    curated_manifest_uri: str,
    eval_train_manifest_uri: str,
    eval_test_manifest_uri: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    ingest_spec: str = P.INGEST,
    embed_spec: str = P.EMBED,
    dedup_spec: str = P.DEDUP,
    curate_spec: str = P.CURATE,
    pretrain_spec: str = P.PRETRAIN,
    evaluate_spec: str = P.EVALUATE,
    promote_spec: str = P.PROMOTE,
    pool_split: str = "train",
    gpus: int = P.GPUS,
    nodes: int = P.NODES,
    trainjob_config_map: str = P.TRAINJOB_CONFIG_MAP,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
    s3_secret_name: str = P.SECRET,
):
    """Retrain on new data, starting from the champion.

    Args:
        champion_uri: backbone prefix of the current champion (the registry's champion pointer).
        curated_manifest_uri: manifest of what is already curated; new copies of it are dropped.
        eval_train_manifest_uri: labelled train manifest of the evaluation set (probes, k-NN bank).
        eval_test_manifest_uri: labelled test manifest of the evaluation set (scored, decontaminated).
        output_root: s3:// prefix; each task writes under {output_root}/{data_version}/{task}/{spec hash}.
        data_version: name of the new data's version; the cache keys on it, so bump it for new data.
        ingest_spec: IngestSpec JSON listing only the new data.
        embed_spec: EmbedSpec JSON (the champion is the embedder).
        dedup_spec: DedupSpec JSON.
        curate_spec: CurateSpec JSON.
        pretrain_spec: PretrainSpec JSON (continues from the champion).
        evaluate_spec: EvaluateSpec JSON.
        promote_spec: PromoteSpec JSON.
        pool_split: ingest split holding the new images.
        gpus: GPUs per GPU task; pretraining's nproc.
        nodes: nodes per training job; > 1 pretrains as a Kubeflow TrainJob (nodes x gpus) from a CPU launcher.
        trainjob_config_map: ConfigMap with the TrainJob settings (the chart's <release>-trainjob; optional).
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    common = {"output_root": output_root, "data_version": data_version}
    gpu = {"gpus": gpus, "node_selector": gpu_node_selector, "tolerations": gpu_tolerations}
    champion = f'{{"backbone_uri": "{champion_uri}"}}'

    ing = cpu_task(ingest(spec_json=ingest_spec, **common), s3_secret_name)
    new = embed_task(
        "embed-new",
        embed_spec,
        s3_secret_name,
        gpu,
        split=pool_split,
        overrides_json=champion,
        manifest=ing.outputs["result"],
        **common,
    )
    cur = embed_task(
        "embed-curated",
        embed_spec,
        s3_secret_name,
        gpu,
        overrides_json=f'{{"backbone_uri": "{champion_uri}", "manifest_uri": "{curated_manifest_uri}"}}',
        **common,
    )
    evs = embed_task(
        "embed-eval",
        embed_spec,
        s3_secret_name,
        gpu,
        overrides_json=f'{{"backbone_uri": "{champion_uri}", "manifest_uri": "{eval_test_manifest_uri}"}}',
        **common,
    )
    dd = cpu_task(
        dedup(
            spec_json=dedup_spec,
            pool=new.outputs["result"],
            eval_set=evs.outputs["result"],
            reference=cur.outputs["result"],
            **common,
        ),
        s3_secret_name,
    )
    cu = cpu_task(
        curate(spec_json=curate_spec, pool=dd.outputs["result"], seed=cur.outputs["result"], **common),
        s3_secret_name,
    )
    pt = training_task(
        pretrain,
        {
            "spec_json": pretrain_spec,
            "overrides_json": f'{{"@init": "{champion_uri}"}}',
            "manifest": cu.outputs["result"],
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
        overrides_json=(
            f'{{"train_manifest_uri": "{eval_train_manifest_uri}", '
            f'"test_manifest_uri": "{eval_test_manifest_uri}"}}'
        ),
    )
