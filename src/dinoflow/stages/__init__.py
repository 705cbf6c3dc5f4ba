"""Stages: one module per stage, each with ``<Name>Spec``, ``<Name>Result`` and ``run(spec, store)``.

A stage never imports KFP: the same stage runs from the CLI, from a KFP component and from a test.
Modules are imported lazily so that ``dinoflow schema`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from dinoflow.errors import SpecError
from dinoflow.stages.base import StageResult, StageSpec, run_with_marker

STAGES = ("ingest", "embed", "dedup", "curate", "pretrain", "distill", "evaluate", "promote")
TRAINING_STAGES = ("pretrain", "distill")  # run under torchrun; nnodes > 1 runs as a TrainJob
FANOUT_STAGES = ("embed", "dedup", "curate")  # plan + parts in parallel tasks, then the stage collects


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType

    @property
    def spec_cls(self) -> type[StageSpec]:
        return getattr(self.module, f"{self.name.capitalize()}Spec")

    @property
    def result_cls(self) -> type[StageResult]:
        return getattr(self.module, f"{self.name.capitalize()}Result")

    def parse_spec(self, data: str | bytes | dict[str, Any]) -> StageSpec:
        """Validate a spec; the first problem becomes one line naming the field."""
        try:
            if isinstance(data, dict):
                return self.spec_cls.model_validate(data)
            return self.spec_cls.model_validate_json(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "<spec>"
            more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise SpecError(f"{self.name} spec: field '{where}': {err['msg']}{more}") from None

    def run(self, spec: StageSpec, store: Any) -> StageResult:
        if not isinstance(spec, self.spec_cls):
            spec = self.parse_spec(spec.model_dump() if isinstance(spec, StageSpec) else spec)
        return run_with_marker(self.name, spec, store, self.module.run, self.result_cls)

    def run_phase(self, spec: StageSpec, store: Any, phase: str, part: int = 0) -> dict[str, Any]:
        """One fan-out phase (``plan``, or ``part`` number ``part``) of a stage in ``FANOUT_STAGES``;
        its result is recorded beside the stage's output and reused by the stage run that collects."""
        if self.name not in FANOUT_STAGES:
            raise SpecError(
                f"stage {self.name} has no fan-out phases (those that do: {', '.join(FANOUT_STAGES)})"
            )
        if not isinstance(spec, self.spec_cls):
            spec = self.parse_spec(spec.model_dump() if isinstance(spec, StageSpec) else spec)
        return self.module.run_phase(spec, store, phase, part)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise SpecError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    return Stage(name, importlib.import_module(f"dinoflow.stages.{name}"))


__all__ = ["FANOUT_STAGES", "STAGES", "TRAINING_STAGES", "Stage", "StageResult", "StageSpec", "get_stage"]
