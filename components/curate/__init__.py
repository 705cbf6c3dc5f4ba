"""KFP component: the curate stage (retrieval or k-means sampling of the pool)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from dinoflow.kfp import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def curate(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Dataset],
    metrics: Output[Metrics],
    output_name: str = "curate",
    overrides_json: str = "{}",
    phase: str = "",
    part: int = 0,
    parts: int = 0,
    publish_uri: str = "",
    pool: Input[Artifact] = None,
    seed: Input[Artifact] = None,
):
    """Curate the (deduplicated) pool around the seed-set embeddings; publish_uri: the result is also
    written there (the curated set the next retrain grows).

    phase ("plan" or "part" number ``part``) runs one fan-out phase of the stage; without it the
    stage runs and collects its parts (any not run yet run here). parts > 0 sets the spec's part count.
    """
    from dinoflow.kfp import runtime

    runtime.component_main("curate", locals(), inputs=("pool", "seed"))
