"""Cluster verbs through ``kfp.Client``: submit a run, schedule the retrain pipeline, list runs.

Every failure to reach or be admitted by the KFP API becomes one ``DinoflowError`` line naming the
host and what to check; parameters are checked against the compiled pipeline before anything is sent.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from dinoflow.errors import DinoflowError

DEFAULT_EXPERIMENT = "dinoflow"


def pipeline_yaml(name: str) -> Path:
    """The compiled YAML of pipeline ``name`` (``full``, ``retrain``, ``small_data``, ``stage-embed``...)."""
    from dinoflow.kfp.compile import default_dirs, pipelines

    path = default_dirs()[1] / f"{name.replace('-', '_') if name == 'small-data' else name}.yaml"
    if not path.exists():
        raise DinoflowError(
            f"unknown pipeline {name!r}; choose one of: {', '.join(pipelines())} (or run `dinoflow compile`)"
        )
    return path


_TYPES = {
    "STRING": str,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": float,
    "BOOLEAN": bool,
    "STRUCT": dict,
    "LIST": list,
}


def parse_params(path: Path, pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs typed by the pipeline's declared parameters (JSON for numbers, dicts, lists)."""
    spec = next(yaml.safe_load_all(path.read_text()))  # 2nd document: platform (k8s) config
    declared = spec["root"]["inputDefinitions"].get("parameters", {})
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise DinoflowError(f"--param {pair!r}: expected key=value")
        if key not in declared:
            raise DinoflowError(
                f"--param {key}: {path.stem} has no such parameter; it has: {', '.join(sorted(declared))}"
            )
        want = _TYPES.get(declared[key]["parameterType"], str)
        if want is str:
            out[key] = raw
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise DinoflowError(f"--param {key}: {raw!r} is not valid JSON for a {want.__name__}") from None
        if want is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise DinoflowError(f"--param {key}: expected a {want.__name__}, got {raw!r}")
        out[key] = value
    missing = [
        k for k, d in declared.items() if not d.get("isOptional") and "defaultValue" not in d and k not in out
    ]
    if missing:
        raise DinoflowError(f"{path.stem} needs --param for: {', '.join(missing)}")
    return out


_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,#LW-]+$")


def check_cron(cron: str) -> str:
    """KFP's recurring runs take 6 fields, seconds first (``0 0 3 * * *`` = daily at 03:00)."""
    fields = cron.split()
    if len(fields) != 6 or not all(_CRON_FIELD.match(f) for f in fields):
        raise DinoflowError(
            f"cron {cron!r} has {len(fields)} field(s); KFP needs 6, seconds first, e.g. '0 0 3 * * *'"
        )
    return " ".join(fields)


def explain(host: str, e: BaseException) -> DinoflowError:
    """One line for any failure to talk to the KFP API."""
    status = getattr(e, "status", None)
    if status in (401, 403):
        return DinoflowError(
            f"KFP at {host} refused the request ({status} {getattr(e, 'reason', '')}): "
            "pass --token (or set KF_PIPELINES_TOKEN) for an authenticated endpoint"
        )
    if status == 404:
        return DinoflowError(
            f"KFP at {host} answered 404: is this the KFP API URL (e.g. http://host/pipeline)?"
        )
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for needle, why in (
        ("refused", "connection refused"),
        ("Name or service", "unknown host name"),
        ("Temporary failure in name", "unknown host name"),
        ("timed out", "timed out"),
        ("Max retries", "no answer"),
        ("Errno", "network error"),
    ):
        if needle in text:
            return DinoflowError(
                f"KFP at {host} is unreachable ({why}); check --host and that the KFP API is up"
            )
    return DinoflowError(f"KFP at {host} failed: {type(e).__name__}: {text[:200]}")


@contextlib.contextmanager
def talking_to(host: str) -> Iterator[None]:
    """Turn any failure of a KFP API call (transport, auth, API errors) into one line."""
    try:
        yield
    except DinoflowError:
        raise
    except Exception as e:
        raise explain(host, e) from None


def _package(host: str, pipeline: str, params: list[str] | None, token: str | None, namespace: str | None):
    """The compiled pipeline's path, its typed arguments and a client (all checked before any call)."""
    path = pipeline_yaml(pipeline)
    return path, parse_params(path, params or []), connect(host, token, namespace)


def connect(host: str, token: str | None = None, namespace: str | None = None) -> Any:
    import kfp

    if not re.match(r"^https?://", host or ""):
        raise DinoflowError(f"--host must be an http(s):// URL of the KFP API, got {host!r}")
    with talking_to(host):  # no request is made here; the first call reports an unreachable host
        return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


def submit(
    host: str,
    pipeline: str = "full",
    params: list[str] | None = None,
    *,
    token: str | None = None,
    namespace: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
) -> str:
    """Start one run of ``pipeline``; returns its run id."""
    path, args, client = _package(host, pipeline, params, token, namespace)
    with talking_to(host):
        run = client.create_run_from_pipeline_package(
            str(path), arguments=args, run_name=run_name, experiment_name=experiment, namespace=namespace
        )
    return run.run_id


def schedule(
    host: str,
    cron: str,
    params: list[str] | None = None,
    *,
    pipeline: str = "retrain",
    token: str | None = None,
    namespace: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    name: str = "dinoflow-retrain",
) -> str:
    """A recurring run of the retrain pipeline, one at a time (``max_concurrency=1``)."""
    cron = check_cron(cron)
    path, args, client = _package(host, pipeline, params, token, namespace)
    with talking_to(host):
        exp = client.create_experiment(experiment, namespace=namespace)  # get or create
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=name,
            cron_expression=cron,
            max_concurrency=1,
            pipeline_package_path=str(path),
            params=args,
            enabled=True,
        )
    return job.recurring_run_id


def list_runs(
    host: str, limit: int = 20, *, token: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    client = connect(host, token, namespace)
    with talking_to(host):
        resp = client.list_runs(page_size=limit, sort_by="created_at desc", namespace=namespace)
    return [
        {
            "run_id": r.run_id,
            "name": r.display_name,
            "state": r.state,
            "created_at": str(r.created_at),
            "finished_at": str(r.finished_at),
        }
        for r in (resp.runs or [])
    ]
