"""KFP component: the dedup stage (near-duplicates and evaluation-set copies removed)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from dinoflow.kfp import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def dedup(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Dataset],
    metrics: Output[Metrics],
    output_name: str = "dedup",
    overrides_json: str = "{}",
    phase: str = "",
    part: int = 0,
    parts: int = 0,
    pool: Input[Artifact] = None,
    eval_set: Input[Artifact] = None,
    reference: Input[Artifact] = None,
):
    """Deduplicate the pool; drop copies of the eval set and of the reference (already curated) set.

    phase ("plan" or "part" number ``part``) runs one fan-out phase of the stage; without it the
    stage runs and collects its parts (any not run yet run here). parts > 0 sets the spec's part count.
    """
    from dinoflow.kfp import runtime

    runtime.component_main("dedup", locals(), inputs=("pool", "eval_set", "reference"))
