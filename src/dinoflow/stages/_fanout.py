"""Fan-out phases of the curation stages (embed, dedup, curate): ``plan`` once, then ``part`` i of
``spec.parts`` (each in its own task on a cluster), then the stage itself, which collects.

Every phase writes under the stage's own ``output_uri`` (``plan/``, ``parts/part-NNNNN/``) and
records its result in a ``_SUCCESS`` marker there, keyed by the spec hash like a stage's: a phase
that finds its marker returns the recorded result, so the collecting stage run computes only what
no earlier task did (everything, when it runs alone), and a retried task does no work twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dinoflow.errors import SpecError

log = logging.getLogger(__name__)

PHASES = ("plan", "part")


def phase_uri(spec: Any, phase: str, part: int = 0) -> str:
    if phase == "plan":
        return spec.out("plan")
    if phase == "part":
        return spec.out("parts", f"part-{part:05d}")
    raise SpecError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")


def check_part(spec: Any, part: int) -> None:
    if not 0 <= part < spec.parts:
        raise SpecError(f"part {part} is not one of the spec's {spec.parts} parts (0..{spec.parts - 1})")


def recorded(store: Any, spec: Any, phase: str, part: int = 0) -> dict[str, Any] | None:
    """The result a phase recorded for this spec, or None when it has not run."""
    marker = store.read_success(phase_uri(spec, phase, part))
    if marker is None:
        return None
    if marker.get("spec_hash") != spec.spec_hash():
        raise SpecError(
            f"{phase_uri(spec, phase, part)} holds a {phase} phase of another spec "
            f"(hash {marker.get('spec_hash')} != {spec.spec_hash()}); choose a new output_uri"
        )
    return marker["result"]


def once(
    name: str, store: Any, spec: Any, phase: str, part: int, fn: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``fn()``'s result for this phase of this spec: recorded, or computed now and recorded."""
    got = recorded(store, spec, phase, part)
    if got is not None:
        return got
    finished = store.read_success(spec.output_uri)
    if finished is not None and finished.get("spec_hash") != spec.spec_hash():
        raise SpecError(
            f"{spec.output_uri} holds a finished '{finished.get('stage')}' run of another spec: "
            f"its {phase} phase cannot run there; choose a new output_uri"
        )
    t0 = time.perf_counter()
    result = {**fn(), "seconds": 0.0}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    where = phase_uri(spec, phase, part)
    store.write_success(where, {"stage": f"{name}:{phase}", "spec_hash": spec.spec_hash(), "result": result})
    log.info("%s: %s%s done in %.1fs", name, phase, f" {part}" if phase == "part" else "", result["seconds"])
    return result


def discard(store: Any, spec: Any) -> None:
    """Remove the phases' outputs (a refused run leaves nothing behind)."""
    for phase in ("plan", "parts"):
        store.delete_prefix(spec.out(phase) + "/")


def run_phase(name: str, spec: Any, store: Any, phase: str, part: int, plan_fn, part_fn) -> dict[str, Any]:
    """Phase ``phase`` of a stage: ``plan_fn(spec, store)`` once, then (``part``)
    ``part_fn(spec, store, part, planned)``, each recorded (see :func:`once`)."""
    planned = once(name, store, spec, "plan", 0, lambda: plan_fn(spec, store))
    if phase == "plan":
        return {"output_uri": spec.output_uri, **planned}
    check_part(spec, part)
    done = once(name, store, spec, "part", part, lambda: part_fn(spec, store, part, planned))
    return {"output_uri": spec.output_uri, "part": part, **done}


def coarse_plan(spec: Any, store: Any, planned: dict[str, Any]):
    """The index every part builds, from the plan's record (and ``plan/centroids.npy`` for IVF)."""
    from dinoflow.curation.partition import CoarsePlan
    from dinoflow.data.embeddings import get_npy

    cents = get_npy(store, spec.out("plan", "centroids.npy")) if planned["kind"] == "ivf" else None
    return CoarsePlan(
        planned["kind"], planned["dim"], planned["reason"], planned["nlist"], planned["nprobe"], cents
    )
