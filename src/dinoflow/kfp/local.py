"""Run a pipeline on this machine through ``kfp.local`` (the SubprocessRunner in the current venv).

The S3 settings travel to the task subprocesses as ``DINOFLOW_S3_*`` env vars (the embedded store
or any endpoint); on a cluster the same variables come from the Kubernetes Secret. Each executed
task appends one line to an events file (task, stage, seconds, result), which is how a caller sees
what ran and what a cache hit skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinoflow.errors import DinoflowError
from dinoflow.kfp.runtime import EVENTS_ENV

log = logging.getLogger(__name__)


@dataclass
class LocalRun:
    """What one local pipeline run did."""

    wall_seconds: float
    events: list[dict[str, Any]] = field(default_factory=list)
    pipeline_root: str = ""

    @property
    def executed(self) -> list[str]:
        """Tasks (by output name) that ran a stage in this run; cache hits are absent (fan-out phase
        tasks are in ``phases``)."""
        return [e["task"] for e in self.events if not e.get("phase")]

    @property
    def phases(self) -> list[str]:
        """The fan-out phase tasks that ran, as ``task:phase`` (``embed-pool:plan``, ``dedup:part-2``)."""
        return [f"{e['task']}:{e['phase']}" for e in self.events if e.get("phase")]

    def result(self, task: str) -> dict[str, Any]:
        for e in self.events:
            if e["task"] == task and not e.get("phase"):
                return e["result"]
        raise KeyError(f"task {task!r} did not execute in this run (ran: {', '.join(self.executed)})")


@contextlib.contextmanager
def _no_retries(pipeline_fn: Any) -> Iterator[None]:
    """Locally a failing stage should fail at once: lift the cluster's retry policies for this run.

    The DAG is built when ``@dsl.pipeline`` decorates the function, so the policies are taken off the
    built spec and put back afterwards (the compiled YAMLs keep them).
    """
    graph = getattr(getattr(pipeline_fn, "component_spec", None), "implementation", None)
    graph = getattr(graph, "graph", None)
    if graph is None:
        yield
        return
    dags = [graph.root.dag] + [c.dag for c in graph.components.values() if c.HasField("dag")]
    saved = []  # (dag, task name, policy): condition branches hold tasks of their own
    for dag in dags:
        for name, task in dag.tasks.items():
            if task.HasField("retry_policy"):
                policy = type(task.retry_policy)()
                policy.CopyFrom(task.retry_policy)
                saved.append((dag, name, policy))
                task.ClearField("retry_policy")
    try:
        yield
    finally:
        for dag, name, policy in saved:
            dag.tasks[name].retry_policy.CopyFrom(policy)


@contextlib.contextmanager
def _oneof_artifacts() -> Iterator[None]:
    """kfp.local (2.17) resolves ``dsl.OneOf`` over parameters but refuses it over artifacts
    ("Expected 1 artifact in ArtifactSelectorSpec"), which the pipelines use to join the one-node and
    multi-node branches of a training step. For this run, a DAG output with several artifact
    selectors takes the one whose producer ran, as kfp.local already does for parameters and as the
    KFP backend does on a cluster."""
    from kfp.local.orchestrator import orchestrator_utils as ou

    cls = ou.OrchestratorUtils
    original = cls.__dict__["get_dag_output_artifacts"]

    def get_dag_output_artifacts(_cls: Any, dag_outputs_spec: Any, io_store: Any) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for sel in spec.artifact_selectors:
                try:
                    found.append(io_store.get_task_output(sel.producer_subtask, sel.output_artifact_key))
                except (KeyError, ValueError):
                    continue  # the branch that did not run
            if len(found) != 1:
                raise ValueError(f"DAG output {key!r}: {len(found)} of its branches produced it, want 1")
            outputs[key] = found[0]
        return outputs

    cls.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
    try:
        yield
    finally:
        cls.get_dag_output_artifacts = original


@contextlib.contextmanager
def _condition_outputs() -> Iterator[None]:
    """kfp.local (2.17) evaluates a ``dsl.If`` on an upstream task's output parameter as false: it
    looks ``pipelinechannel--<task>-<output>`` up as a parent input only. For this run, a channel it
    cannot find is also tried as ``<task>`` + ``<output>`` at each hyphen, as the KFP backend resolves
    it through the condition task's inputs (the retrain's "something new?" branch needs it)."""
    from kfp.local.orchestrator import enhanced_dag_orchestrator as edo

    cls = edo.ConditionEvaluator
    original = cls.__dict__["_resolve_pipeline_channel"]

    def resolve(channel_ref: str, io_store: Any) -> Any:
        value = original.__func__(channel_ref, io_store)
        ref = channel_ref.replace("pipelinechannel--", "")
        for i in [i for i, ch in enumerate(ref) if ch == "-"] if value is None else []:
            try:
                return io_store.get_task_output(ref[:i], ref[i + 1 :])
            except (KeyError, ValueError):
                continue
        return value

    cls._resolve_pipeline_channel = staticmethod(resolve)
    try:
        yield
    finally:
        cls._resolve_pipeline_channel = original


@contextlib.contextmanager
def _job_times() -> Iterator[None]:
    """kfp.local (2.17) fills no pipeline-job time placeholders (it fails on them). The KFP backend
    gives a one-off run its creation time for both the create and the schedule time; so does this."""
    import datetime

    from kfp import dsl
    from kfp.local import placeholder_utils as pu

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    times = (dsl.PIPELINE_JOB_CREATE_TIME_UTC_PLACEHOLDER, dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER)
    original = pu.resolve_individual_placeholder

    def resolve(element: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(element, str):
            for placeholder in times:
                element = element.replace(placeholder, now)
        return original(element, *args, **kwargs)

    pu.resolve_individual_placeholder = resolve
    try:
        yield
    finally:
        pu.resolve_individual_placeholder = original


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_env(settings: Any) -> dict[str, str]:
    """``DINOFLOW_S3_*`` env vars for an ``S3Settings`` (the task subprocesses inherit them)."""
    if not settings.endpoint or settings.access_key is None or settings.secret_key is None:
        raise DinoflowError("local runs need an object store: set DINOFLOW_S3_* or start `dinoflow store up`")
    return {
        "DINOFLOW_S3_ENDPOINT": settings.endpoint,
        "DINOFLOW_S3_ACCESS_KEY": settings.access_key.get_secret_value(),
        "DINOFLOW_S3_SECRET_KEY": settings.secret_key.get_secret_value(),
    }


def run_pipeline(
    pipeline_fn: Any,
    arguments: dict[str, Any],
    pipeline_root: str | os.PathLike[str],
    settings: Any,
    *,
    caching: bool = True,
    cache_root: str | os.PathLike[str] | None = None,
    runner: Callable[[dict[str, str]], Any] | None = None,
) -> LocalRun:
    """Run ``pipeline_fn(**arguments)`` through ``kfp.local``; raise ``DinoflowError`` if a task fails.

    With ``caching`` on, a task whose inputs (parameters, upstream artifacts, data_version) match an
    earlier run is skipped; entries live under ``cache_root`` (default ``{pipeline_root}/.kfp_cache``).
    ``runner`` makes the kfp.local runner from the env the tasks need (``dinoflow demo --containers``:
    a DockerRunner); by default the tasks run as subprocesses of this venv.
    """
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    events_file = root / f"events-{time.time_ns()}.jsonl"
    env = {**s3_env(settings), EVENTS_ENV: str(events_file)}
    local.init(
        runner=runner(env) if runner else local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=caching,
        cache_root=str(cache_root) if cache_root else None,
    )
    t0 = time.perf_counter()
    with _env(env), _no_retries(pipeline_fn), _oneof_artifacts(), _job_times(), _condition_outputs():
        try:
            pipeline_fn(**arguments)
        except RuntimeError as e:  # kfp.local: "Pipeline '...' finished with status FAILURE ..."
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])  # drop kfp's terminal colours
            raise DinoflowError(f"local pipeline run failed: {first}") from None
    wall = time.perf_counter() - t0
    events = (
        [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    )
    return LocalRun(wall_seconds=round(wall, 3), events=events, pipeline_root=str(root))
