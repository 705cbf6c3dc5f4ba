"""KFP components, one folder per stage: ``components/<stage>/__init__.py`` holds the component
function and ``components/<stage>/component.yaml`` its compiled form (load it in any pipeline with
``kfp.components.load_component_from_file``).

Every component takes the stage spec as one JSON string (``dinoflow schema <stage>`` shows it),
``output_root`` and ``data_version`` (outputs go to ``{output_root}/{data_version}/{output_name}/
{spec hash}``; the data version is also what KFP's cache keys on), ``overrides_json`` (fields from
pipeline parameters layered over the spec) and upstream stage results as artifacts. It writes the
stage result JSON as a typed artifact (``result``: a KFP ``Model`` for pretrain, distill and promote's
champion, a ``Dataset`` for ingest, embed, dedup and curate; the object's s3:// URI and key facts in
its metadata) and a KFP ``Metrics`` artifact; evaluate also writes a confusion matrix, the HTML report
and the model card.
"""

from __future__ import annotations

import importlib
from typing import Any

from dinoflow.stages import STAGES as STAGE_NAMES


def get_component(stage: str) -> Any:
    """The component function of ``stage``."""
    if stage not in STAGE_NAMES:
        raise KeyError(f"no component for {stage!r}; stages: {', '.join(STAGE_NAMES)}")
    return getattr(importlib.import_module(f"dinoflow.components.{stage}"), stage)
