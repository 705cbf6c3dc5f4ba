"""KFP component: the ingest stage (raw images -> shards + per-split manifests)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output, OutputPath

from dinoflow.kfp import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Dataset],
    metrics: Output[Metrics],
    images: OutputPath(int),
    version: OutputPath(str),
    output_name: str = "ingest",
    overrides_json: str = "{}",
    source_uri: str = "",
    source_kind: str = "",
    schedule_time: str = "",
    run_id: str = "",
    publish_uri: str = "",
):
    """Ingest raw images; spec_json is an IngestSpec (dinoflow schema ingest).

    source_uri and source_kind are the spec's source_uri and kind unless spec_json names its inputs.
    An empty data_version is taken from schedule_time (a scheduled run), else run_id; the version
    output passes it on. images: how many images this run ingested (0: nothing new). publish_uri:
    the result is also written there (the evaluation set a retrain reads).
    """
    from dinoflow.kfp import runtime

    runtime.component_main("ingest", locals())
