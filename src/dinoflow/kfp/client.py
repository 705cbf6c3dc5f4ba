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
PUBLISHED = ("full", "small_data", "retrain")  # and every stage-only pipeline


def pipeline_yaml(name: str) -> Path:
    """The compiled YAML of pipeline ``name`` (``full``, ``retrain``, ``small_data``, ``stage-embed``...)."""
    from dinoflow.kfp.compile import default_dirs, pipelines

    path = default_dirs()[1] / f"{name.replace('-', '_') if name == 'small-data' else name}.yaml"
    if not path.exists():
        raise DinoflowError(
            f"unknown pipeline {name!r}; choose one of: {', '.join(pipelines())} (or run `dinoflow compile`)"
        )
    return path


def package(name: str, deployment: Any = None) -> Path:
    """The YAML to send for pipeline ``name``: the compiled one, or a copy customised for this
    installation (``dinoflow.kfp.deploy``; written to a temporary folder)."""
    import tempfile

    path = pipeline_yaml(name)
    if deployment is None or deployment.is_empty():
        return path
    from dinoflow.kfp import deploy

    return deploy.write(path, Path(tempfile.mkdtemp(prefix="dinoflow-")) / path.name, deployment)


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


def _package(
    host: str,
    pipeline: str,
    params: list[str] | None,
    token: str | None,
    namespace: str | None,
    deployment: Any = None,
):
    """The pipeline's YAML (customised for the installation), its typed arguments and a client (all
    checked before any call)."""
    path = package(pipeline, deployment)
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
    deployment: Any = None,
) -> str:
    """Start one run of ``pipeline``; returns its run id."""
    path, args, client = _package(host, pipeline, params, token, namespace, deployment)
    with talking_to(host):
        run = client.create_run_from_pipeline_package(
            str(path), arguments=args, run_name=run_name, experiment_name=experiment, namespace=namespace
        )
    return run.run_id


SCHEDULE_TAG = "dinoflow-schedule"  # recurring-run descriptions start with it, then the settings' hash


def _all(list_fn: Any, field: str, **kw: Any) -> list[Any]:
    """Every item of a paged KFP list call."""
    out: list[Any] = []
    token = ""
    while True:
        resp = list_fn(page_token=token, page_size=100, **kw)
        out += getattr(resp, field) or []
        token = getattr(resp, "next_page_token", "") or ""
        if not token:
            return out


def upload(client: Any, path: Path, name: str, namespace: str | None = None) -> tuple[str, str]:
    """The pipeline ``name`` (uploaded if new) and a version named after the compiled YAML's content
    (uploaded if new): an unchanged package reuses its version. Returns (pipeline id, version id)."""
    import hashlib

    from dinoflow import __version__

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    version_name = f"{name}-{__version__}-{digest}"
    pid = client.get_pipeline_id(name)
    if pid is None:
        pid = client.upload_pipeline(str(path), pipeline_name=name, namespace=namespace).pipeline_id
    for v in _all(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pid):
        if v.display_name == version_name:
            return pid, v.pipeline_version_id
    version = client.upload_pipeline_version(str(path), version_name, pipeline_id=pid)
    return pid, version.pipeline_version_id


def publish(
    host: str,
    names: list[str] | None = None,
    *,
    token: str | None = None,
    namespace: str | None = None,
    client: Any = None,
    deployment: Any = None,
) -> list[tuple[str, str]]:
    """Upload pipelines (default: full, small_data, retrain and every stage-only one) under their own
    names (``dinoflow-full``...), each with a version named after its content, customised for the
    installation: a run submitted from the UI with the defaults runs there. Returns (name, version)."""
    from dinoflow.kfp.compile import pipelines

    names = names or [*PUBLISHED, *sorted(n for n in pipelines() if n.startswith("stage-"))]
    paths = {n: package(n, deployment) for n in names}  # every YAML checked before any call
    client = client or connect(host, token, namespace)
    out = []
    with talking_to(host):
        for path in paths.values():
            spec = next(yaml.safe_load_all(path.read_text()))
            display = spec["pipelineInfo"]["name"]
            _, vid = upload(client, path, display, namespace)
            out.append((display, vid))
    return out


def find_schedules(
    client: Any, name: str | None, experiment_id: str | None, namespace: str | None
) -> list[Any]:
    """Recurring runs called ``name`` (all when None) in the experiment."""
    runs = _all(
        client.list_recurring_runs, "recurring_runs", experiment_id=experiment_id, namespace=namespace
    )
    return [r for r in runs if name is None or r.display_name == name]


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
    pipeline_name: str | None = None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    service_account: str | None = None,
    client: Any = None,
    deployment: Any = None,
) -> tuple[str, str]:
    """Create or update the recurring run ``name``: upload the pipeline and a version of it, then
    keep one recurring run of that name with these settings. Unchanged settings keep the existing
    run (``unchanged``); changed ones create the new run first, then delete the old ones
    (``updated``), so a failed call never leaves no schedule. Returns (recurring run id, outcome)."""
    import hashlib

    cron = check_cron(cron)
    if max_concurrency < 1:
        raise DinoflowError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    path = package(pipeline, deployment)
    args = parse_params(path, params or [])
    client = client or connect(host, token, namespace)
    with talking_to(host):
        exp = client.create_experiment(experiment, namespace=namespace)  # get or create
        pid, vid = upload(client, path, pipeline_name or name, namespace)
        settings = {
            "version": vid,
            "cron": cron,
            "params": args,
            "max_concurrency": max_concurrency,
            "no_catchup": no_catchup,
            "service_account": service_account or "",
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        description = f"{SCHEDULE_TAG} {digest}: {pipeline} pipeline, cron '{cron}'"
        old = find_schedules(client, name, exp.experiment_id, namespace)
        same = [r for r in old if (r.description or "").startswith(f"{SCHEDULE_TAG} {digest}")]
        if len(old) == 1 and same:
            return old[0].recurring_run_id, "unchanged"
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=name,
            description=description,
            cron_expression=cron,
            max_concurrency=max_concurrency,
            no_catchup=no_catchup,
            params=args,
            pipeline_id=pid,
            version_id=vid,
            enabled=True,
            service_account=service_account or None,
        )
        for r in old:
            client.delete_recurring_run(r.recurring_run_id)
    return job.recurring_run_id, "updated" if old else "created"


def manage_schedules(
    host: str,
    action: str,
    name: str | None = None,
    *,
    token: str | None = None,
    namespace: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    client: Any = None,
) -> list[dict[str, Any]]:
    """``list`` the recurring runs (of ``name``, or all in the experiment), or ``pause``, ``resume``
    or ``delete`` the ones called ``name``. Returns the rows acted on."""
    if action not in ("list", "pause", "resume", "delete"):
        raise DinoflowError(f"unknown schedule action {action!r}; choose set, list, pause, resume or delete")
    if action != "list" and not name:
        raise DinoflowError(f"schedule {action} needs --name")
    client = client or connect(host, token, namespace)
    with talking_to(host):
        exp = client.get_experiment(experiment_name=experiment, namespace=namespace)
        found = find_schedules(client, name, exp.experiment_id, namespace)
        if action != "list" and not found:
            raise DinoflowError(f"no recurring run called {name!r} in experiment {experiment!r}")
        act = {
            "pause": client.disable_recurring_run,
            "resume": client.enable_recurring_run,
            "delete": client.delete_recurring_run,
        }.get(action)
        for r in found:
            if act:
                act(r.recurring_run_id)
    return [
        {
            "recurring_run_id": r.recurring_run_id,
            "name": r.display_name,
            "mode": {"pause": "DISABLE", "resume": "ENABLE", "delete": "DELETED"}.get(action, r.mode),
            "cron": getattr(getattr(r.trigger, "cron_schedule", None), "cron", "") if r.trigger else "",
            "max_concurrency": r.max_concurrency,
            "no_catchup": r.no_catchup,
        }
        for r in found
    ]


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
