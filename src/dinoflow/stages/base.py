"""What every stage shares: the spec/result base models, the spec hash, and the runner that makes
a stage idempotent (a stage that finds its own ``_SUCCESS`` with the same spec hash returns the
recorded result; a different spec under the same output prefix is refused, never overwritten) and
records every run that does work in the stage metrics (``dinoflow.metrics.stage_run``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dinoflow import metrics
from dinoflow.errors import SpecError
from dinoflow.storage.client import ObjectStore, join_uri

log = logging.getLogger(__name__)


class StageSpec(BaseModel):
    """Inputs and parameters of a stage. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    output_uri: str = Field(..., description="s3:// prefix this stage writes under (its own folder)")

    @field_validator("output_uri")
    @classmethod
    def _s3(cls, v: str) -> str:
        if not v.startswith("s3://") or len(v.rstrip("/")) <= len("s3://"):
            raise ValueError(f"must be an s3://bucket/prefix URI, got {v!r}")
        return v.rstrip("/")

    def spec_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def out(self, *parts: str) -> str:
        return join_uri(self.output_uri, *parts)


class StageResult(BaseModel):
    """Outputs and counts of a stage."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    output_uri: str = Field(..., description="the prefix the stage wrote under")
    seconds: float = Field(0.0, description="wall time of the run that produced this result")


def run_with_marker(
    name: str, spec: StageSpec, store: ObjectStore, run_fn: Any, result_cls: type[StageResult]
) -> StageResult:
    """Run ``run_fn(spec, store)`` unless its ``_SUCCESS`` marker already records this spec.

    Under torchrun (a TrainJob node, or ``torchrun ... dinoflow stage``) every rank runs the stage and
    only rank 0 writes the marker, after its own export: another rank's marker could come first.

    A run that does work is timed and counted by outcome (``metrics.stage_run``, pushed when a
    Pushgateway is configured); a reused result is not a run."""
    marker = store.read_success(spec.output_uri)
    h = spec.spec_hash()
    if marker is not None:
        if marker.get("stage") == name and marker.get("spec_hash") == h:
            log.info("%s: %s already complete for this spec (hash %s); reusing it", name, spec.output_uri, h)
            return result_cls.model_validate(marker["result"])
        raise SpecError(
            f"{spec.output_uri} already holds a finished '{marker.get('stage')}' run with a different "
            f"spec (hash {marker.get('spec_hash')} != {h}); choose a new output_uri"
        )
    with metrics.stage_run(name):
        t0 = time.perf_counter()
        result = run_fn(spec, store)
        result = result.model_copy(update={"seconds": round(time.perf_counter() - t0, 3)})
        if int(os.environ.get("RANK", "0")) != 0:
            return result  # one rank of a torchrun world: rank 0 writes the marker after its export
        store.write_success(
            spec.output_uri,
            {
                "stage": name,
                "spec_hash": h,
                "spec": spec.model_dump(mode="json"),
                "result": result.model_dump(mode="json"),
            },
        )
    return result
