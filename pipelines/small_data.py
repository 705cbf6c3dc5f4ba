"""Small-data mode (the second seed): pretrain on the target data alone with a denoising
autoencoder (MAE or SplitMask), no curation; evaluate on the target's own splits; promote."""

import json

from kfp import dsl

from dinoflow.components.ingest import ingest
from dinoflow.components.pretrain import pretrain
from dinoflow.kfp.gpu import cpu_task, training_task
from dinoflow.pipelines import params as P
from dinoflow.pipelines.parts import evaluate_and_promote

PRETRAIN = json.dumps(
    {"method": "splitmask", "target_only": True, "steps": 10000, "batch_size": 256, "precision": "bf16"},
    sort_keys=True,
)


@dsl.pipeline(
    name="dinoflow-small-data",
    description="Target-only pretraining (MAE / SplitMask), no curation: ingest -> pretrain -> evaluate -> promote.",
)
def small_data(
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    ingest_spec: str = P.INGEST,
    pretrain_spec: str = PRETRAIN,
    evaluate_spec: str = P.EVALUATE,
    promote_spec: str = P.PROMOTE,
    train_split: str = "train",
    test_split: str = "test",
    gpus: int = P.GPUS,
    nodes: int = P.NODES,
    trainjob_config_map: str = P.TRAINJOB_CONFIG_MAP,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
    s3_secret_name: str = P.SECRET,
):
    """Pretrain on the target data only.

    Args:
        output_root: s3:// prefix; each task writes under {output_root}/{data_version}/{task}/{spec hash}.
        data_version: name of the target data's version; the cache keys on it.
        ingest_spec: IngestSpec JSON of the target dataset (train and test splits).
        pretrain_spec: PretrainSpec JSON; method mae or splitmask (denoising autoencoders suit small data).
        evaluate_spec: EvaluateSpec JSON.
        promote_spec: PromoteSpec JSON.
        train_split: ingest split pretrained on (labels unused) and used to fit the probes.
        test_split: ingest split scored.
        gpus: GPUs for pretraining (its nproc).
        nodes: nodes; > 1 pretrains as a Kubeflow TrainJob (nodes x gpus) from a CPU launcher.
        trainjob_config_map: ConfigMap with the TrainJob settings (the chart's <release>-trainjob; optional).
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    common = {"output_root": output_root, "data_version": data_version}
    ing = cpu_task(ingest(spec_json=ingest_spec, **common), s3_secret_name)
    gpu = {"gpus": gpus, "node_selector": gpu_node_selector, "tolerations": gpu_tolerations}
    pt = training_task(
        pretrain,
        {"spec_json": pretrain_spec, "split": train_split, "manifest": ing.outputs["result"], **common},
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
        split=train_split,
        test_split=test_split,
        dataset=ing.outputs["result"],
    )
