"""Small-data mode (the second seed): pretrain on the target data alone with a denoising
autoencoder (MAE or SplitMask), no curation; evaluate on the target's own splits; promote."""

import json

from kfp import dsl

from dinoflow.components.ingest import ingest
from dinoflow.components.pretrain import pretrain
from dinoflow.kfp.gpu import cpu_task, training_task
from dinoflow.pipelines import params as P
from dinoflow.pipelines.parts import evaluate_and_promote

PRETRAIN = json.dumps({"method": "splitmask", "target_only": True, "precision": "bf16"}, sort_keys=True)
BATCH_SIZE = 256


@dsl.pipeline(
    name="dinoflow-small-data",
    description="Target-only pretraining (MAE / SplitMask), no curation: ingest -> pretrain -> evaluate -> promote.",
)
def small_data(
    source_uri: str = P.SOURCE_URI,
    source_kind: str = P.SOURCE_KIND,
    backbone: str = P.BACKBONE,
    steps: int = P.STEPS,
    batch_size: int = BATCH_SIZE,
    gpus: int = P.GPUS,
    nodes: int = P.NODES,
    model_name: str = P.MODEL_NAME,
    output_root: str = P.OUTPUT_ROOT,
    registry_uri: str = P.REGISTRY_URI,
    data_version: str = P.DATA_VERSION,
    ingest_spec: str = P.INGEST,
    pretrain_spec: str = PRETRAIN,
    evaluate_spec: str = P.EVALUATE,
    promote_spec: str = P.PROMOTE,
    train_split: str = "train",
    test_split: str = "test",
    trainjob_config_map: str = P.TRAINJOB_CONFIG_MAP,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
    s3_secret_name: str = P.SECRET,
):
    """Pretrain on the target data only.

    Args:
        source_uri: the target dataset's folder ({split}/... under it; `dinoflow upload` writes one).
        source_kind: auto (by file name), idx, folder, shards or files.
        backbone: the backbone to pretrain (a dinoflow backbone name).
        steps: optimizer steps of pretraining.
        batch_size: global batch size of pretraining.
        gpus: GPUs per node for pretraining (its nproc); evaluate runs on one GPU of the same pool.
        nodes: nodes; > 1 pretrains as a Kubeflow TrainJob (nodes x gpus) from a CPU launcher.
        model_name: the registry entry the backbone is promoted under.
        output_root: s3:// prefix; each task writes under {output_root}/{data_version}/{task}/{spec hash}.
        registry_uri: s3:// prefix of the model registry.
        data_version: name of the target data's version; the cache keys on it.
        ingest_spec: IngestSpec JSON over the typed parameters (e.g. splits instead of source_uri).
        pretrain_spec: PretrainSpec JSON over the typed parameters; method mae or splitmask (denoising
            autoencoders suit small data).
        evaluate_spec: EvaluateSpec JSON.
        promote_spec: PromoteSpec JSON.
        train_split: ingest split pretrained on (labels unused) and used to fit the probes.
        test_split: ingest split scored.
        trainjob_config_map: ConfigMap with the TrainJob settings (the chart's <release>-trainjob; optional).
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    common = {"output_root": output_root, "data_version": data_version}
    ing = cpu_task(
        ingest(spec_json=ingest_spec, source_uri=source_uri, source_kind=source_kind, **common),
        s3_secret_name,
    )
    gpu = {"gpus": gpus, "node_selector": gpu_node_selector, "tolerations": gpu_tolerations}
    pt = training_task(
        pretrain,
        {
            "spec_json": pretrain_spec,
            "split": train_split,
            "manifest": ing.outputs["result"],
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
        split=train_split,
        test_split=test_split,
        dataset=ing.outputs["result"],
    )
