"""KFP component: the ingest stage (raw images -> shards + per-split manifests)."""

from kfp import dsl
from kfp.dsl import Artifact, Metrics, Output

from dinoflow.kfp import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Artifact],
    metrics: Output[Metrics],
    output_name: str = "ingest",
    overrides_json: str = "{}",
):
    """Ingest raw images; spec_json is an IngestSpec (dinoflow schema ingest)."""
    from dinoflow.kfp import runtime

    runtime.component_main("ingest", locals())
