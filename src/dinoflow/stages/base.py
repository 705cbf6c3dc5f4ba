"""What every stage shares: the spec/result base models, the spec hash, and the runner that makes
a stage idempotent and keeps finished outputs safe.

``run_with_marker`` returns the recorded result when the stage's own ``_SUCCESS`` already holds the
same spec hash. Otherwise the stage may run only where it cannot replace anything finished or
foreign: its ``output_uri`` must not lie inside a finished run's folder, and must be empty, or hold
the unfinished outputs of a run of the same stage and spec (a crashed run being retried: its
``_STARTED`` claim, written before any output, says so). Anything else is refused in one line,
before any work, and nothing is written. Each run also removes what killed runs left behind
(``_tmp/`` keys in its bucket, local temporary files of exited processes), and is recorded in the
stage metrics (``dinoflow.metrics.stage_run``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from dinoflow import metrics
from dinoflow.errors import SpecError, StorageError
from dinoflow.storage.client import (
    SUCCESS,
    ObjectStore,
    join_uri,
    key_problem,
    parse_uri,
    read_local_bytes,
    sweep_local_tmp,
)

log = logging.getLogger(__name__)

STARTED = "_STARTED"
MAX_SIDE_PX = 8192  # no image side beyond this (data.images.MAX_PIXELS is 64 Mpx, 8000 x 8000)
MAX_SPEC_BYTES = 16 << 20


def read_spec_text(path: str | os.PathLike[str]) -> str:
    """A spec file's text; a missing file, a directory, or bytes that are not UTF-8 are one-line errors."""
    p = Path(path)
    data = read_local_bytes(p, "spec file", MAX_SPEC_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"spec file {p} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); save it as UTF-8 JSON"
        ) from None


def segment_problem(name: str, what: str = "name") -> str | None:
    """Why ``name`` cannot be one folder of an object key (empty, '/', '.', '..'), or None."""
    if not name or "/" in name or name in (".", "..") or name != name.strip():
        return f"{what} {name!r} cannot name a folder (empty, '/' inside, '.', '..' or edge spaces)"
    return None


def check_segment(name: str, what: str = "name") -> str:
    """``name`` as one folder of an object key, else a ``SpecError``."""
    problem = segment_problem(name, what)
    if problem:
        raise SpecError(problem)
    return name


def _px_problem(value: Any, where: str) -> str | None:
    """A ``*_px`` value (in ``value`` or the models inside it) beyond ``MAX_SIDE_PX``, said in words."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            problem = _px_problem(getattr(value, name), f"{where}.{name}")
            if problem:
                return problem
    elif where.endswith("_px") and isinstance(value, int) and not isinstance(value, bool):
        if value > MAX_SIDE_PX:
            return f"{where} = {value} px is beyond {MAX_SIDE_PX} px"
    return None


class StageSpec(BaseModel):
    """Inputs and parameters of a stage. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    output_uri: str = Field(..., description="s3:// prefix this stage writes under (its own folder)")

    @field_validator("output_uri")
    @classmethod
    def _s3(cls, v: str) -> str:
        if not v.startswith("s3://") or len(v.rstrip("/")) <= len("s3://"):
            raise ValueError(f"must be an s3://bucket/prefix URI, got {v!r}")
        problem = key_problem(v)
        if problem:
            raise ValueError(problem)
        return v.rstrip("/")

    @field_validator("*")
    @classmethod
    def _sizes(cls, v: Any, info: ValidationInfo) -> Any:
        problem = _px_problem(v, info.field_name or "")
        if problem:
            raise ValueError(problem)
        return v

    def spec_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def out(self, *parts: str) -> str:
        """A key under ``output_uri``; every part must be a clean key path (a split named '' or
        'train/' would write into the stage's own root or beside 'train')."""
        for part in parts:
            for seg in part.split("/"):
                check_segment(seg, "output path part")
        return join_uri(self.output_uri, *parts)


class StageResult(BaseModel):
    """Outputs and counts of a stage."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    output_uri: str = Field(..., description="the prefix the stage wrote under")
    seconds: float = Field(0.0, description="wall time of the run that produced this result")


def _ancestors(uri: str) -> list[str]:
    """``s3://b/x/y/z`` -> ``[s3://b, s3://b/x, s3://b/x/y]``."""
    bucket, key = parse_uri(uri)
    parts = [p for p in key.split("/") if p]
    return [join_uri(f"s3://{bucket}", *parts[:i]) for i in range(len(parts))]


def check_output(name: str, spec: StageSpec, store: ObjectStore) -> None:
    """Refuse (``SpecError``, nothing written) an ``output_uri`` where this run could replace a
    finished or foreign output; see the module docstring."""
    out, h = spec.output_uri, spec.spec_hash()
    for parent in _ancestors(out):
        marker = store.read_success(parent)
        if marker is not None:
            raise SpecError(
                f"output_uri {out} lies inside {parent}, which holds a finished '{marker.get('stage')}' run: "
                "writing there could replace its outputs; choose an output_uri outside it"
            )
    held = store.list(out + "/")
    if not held:
        return
    claim_uri = join_uri(out, STARTED)
    if claim_uri in held:
        claim = store.get_json(claim_uri)
        if claim.get("stage") == name and claim.get("spec_hash") == h:
            log.info("%s: %s holds an unfinished run of this spec; continuing it", name, out)
            return
        if held == [claim_uri]:
            return  # a run that failed before writing anything (e.g. a spec its inputs refused)
        raise SpecError(
            f"{out} holds the unfinished outputs of a '{claim.get('stage')}' run with another spec "
            f"(hash {claim.get('spec_hash')} != {h}), e.g. a crashed run: choose a new output_uri, or "
            f"delete {out}/ to discard them"
        )
    markers = [u for u in held if u.endswith("/" + SUCCESS)]
    # the fan-out phases of this very spec record markers of its hash under its output
    if any(store.get_json(u).get("spec_hash") == h for u in markers[:8]):
        return
    raise SpecError(
        f"{out} already holds {len(held)} object(s) that no run of this spec wrote (e.g. {held[0]}): "
        "choose an empty output_uri"
    )


def _clean_leftovers(spec: StageSpec, store: ObjectStore) -> None:
    """Remove what killed runs left: stale ``_tmp/`` keys in the output bucket, local temporary
    files of exited processes. Never fails the stage."""
    try:
        store.clean_stale_tmp(parse_uri(spec.output_uri)[0])
    except StorageError as e:
        log.warning("could not clean stale temporary objects: %s", e)
    try:
        sweep_local_tmp()
    except OSError as e:
        log.warning("could not clean local temporary files: %s", e)


def run_with_marker(
    name: str, spec: StageSpec, store: ObjectStore, run_fn: Any, result_cls: type[StageResult]
) -> StageResult:
    """Run ``run_fn(spec, store)`` unless its ``_SUCCESS`` marker already records this spec.

    Under torchrun (a TrainJob node, or ``torchrun ... dinoflow stage``) every rank runs the stage and
    only rank 0 writes the claim and the marker, after its own export: another rank's marker could
    come first.

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
    check_output(name, spec, store)
    _clean_leftovers(spec, store)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with metrics.stage_run(name):
        if rank0:
            store.put_json(spec.out(STARTED), {"stage": name, "spec_hash": h, "started": time.time()})
        t0 = time.perf_counter()
        result = run_fn(spec, store)
        result = result.model_copy(update={"seconds": round(time.perf_counter() - t0, 3)})
        if not rank0:
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
