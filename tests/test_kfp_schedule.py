"""`dinoflow schedule`: upload + version, one recurring run per name (created, kept or replaced), and
list/pause/resume/delete, against a fake with kfp.Client's own method signatures."""

from __future__ import annotations

import inspect
import itertools
from typing import Optional  # noqa: UP035 (the fake's signatures must equal kfp.Client's)

import kfp
import pytest
from kfp_server_api import models as m
from typer.testing import CliRunner

from dinoflow.errors import DinoflowError
from dinoflow.kfp import client

REQUIRED = ["model_name=fmnist", "source_uri=s3://r/raw/fashion-mnist"]  # run parameters a chart sets


class FakeKfp:
    """The slice of kfp.Client that `schedule` uses, in memory, returning kfp_server_api models."""

    def __init__(self):
        self.ids = (f"id-{i}" for i in itertools.count())
        self.experiments: dict[str, m.V2beta1Experiment] = {}
        self.pipelines: dict[str, str] = {}
        self.versions: list[m.V2beta1PipelineVersion] = []
        self.runs: dict[str, m.V2beta1RecurringRun] = {}
        self.calls: list[str] = []

    def create_experiment(self, name: str, description: str = None, namespace: str = None):  # noqa: RUF013
        self.calls.append("create_experiment")
        if name not in self.experiments:
            self.experiments[name] = m.V2beta1Experiment(experiment_id=next(self.ids), display_name=name)
        return self.experiments[name]

    def get_experiment(
        self,
        experiment_id: Optional[str] = None,  # noqa: UP045
        experiment_name: Optional[str] = None,  # noqa: UP045
        namespace: Optional[str] = None,  # noqa: UP045
    ):
        return self.experiments[experiment_name]

    def get_pipeline_id(self, name: str) -> Optional[str]:  # noqa: UP045
        return self.pipelines.get(name)

    def upload_pipeline(
        self,
        pipeline_package_path: str,
        pipeline_name: Optional[str] = None,  # noqa: UP045
        description: Optional[str] = None,  # noqa: UP045
        namespace: Optional[str] = None,  # noqa: UP045
    ):
        self.calls.append("upload_pipeline")
        pid = self.pipelines[pipeline_name] = next(self.ids)
        self.upload_pipeline_version(pipeline_package_path, pipeline_name, pipeline_id=pid)
        return m.V2beta1Pipeline(pipeline_id=pid, display_name=pipeline_name)

    def list_pipeline_versions(
        self,
        pipeline_id: str,
        page_token: str = "",
        page_size: int = 10,
        sort_by: str = "",
        filter: Optional[str] = None,  # noqa: A002, UP045
    ):
        mine = [v for v in self.versions if v.pipeline_id == pipeline_id]
        start = int(page_token or 0)
        page = mine[start : start + page_size]
        nxt = str(start + page_size) if start + page_size < len(mine) else ""
        return m.V2beta1ListPipelineVersionsResponse(pipeline_versions=page, next_page_token=nxt)

    def upload_pipeline_version(
        self,
        pipeline_package_path: str,
        pipeline_version_name: str,
        pipeline_id: Optional[str] = None,  # noqa: UP045
        pipeline_name: Optional[str] = None,  # noqa: UP045
        description: Optional[str] = None,  # noqa: UP045
    ):
        self.calls.append("upload_pipeline_version")
        v = m.V2beta1PipelineVersion(
            pipeline_id=pipeline_id, pipeline_version_id=next(self.ids), display_name=pipeline_version_name
        )
        self.versions.append(v)
        return v

    def list_recurring_runs(
        self,
        page_token: str = "",
        page_size: int = 10,
        sort_by: str = "",
        experiment_id: Optional[str] = None,  # noqa: UP045
        namespace: Optional[str] = None,  # noqa: UP045
        filter: Optional[str] = None,  # noqa: A002, UP045
    ):
        mine = [r for r in self.runs.values() if experiment_id in (None, r.experiment_id)]
        start = int(page_token or 0)
        nxt = str(start + page_size) if start + page_size < len(mine) else ""
        return m.V2beta1ListRecurringRunsResponse(
            recurring_runs=mine[start : start + page_size], next_page_token=nxt
        )

    def create_recurring_run(
        self,
        experiment_id: str,
        job_name: str,
        description: Optional[str] = None,  # noqa: UP045
        start_time: Optional[str] = None,  # noqa: UP045
        end_time: Optional[str] = None,  # noqa: UP045
        interval_second: Optional[int] = None,  # noqa: UP045
        cron_expression: Optional[str] = None,  # noqa: UP045
        max_concurrency: Optional[int] = 1,  # noqa: UP045
        no_catchup: Optional[bool] = None,  # noqa: UP045
        params: Optional[dict] = None,  # noqa: UP045
        pipeline_package_path: Optional[str] = None,  # noqa: UP045
        pipeline_id: Optional[str] = None,  # noqa: UP045
        version_id: Optional[str] = None,  # noqa: UP045
        enabled: bool = True,
        pipeline_root: Optional[str] = None,  # noqa: UP045
        enable_caching: Optional[bool] = None,  # noqa: UP045
        cache_key: Optional[str] = None,  # noqa: UP045
        service_account: Optional[str] = None,  # noqa: UP045
    ):
        self.calls.append("create_recurring_run")
        assert pipeline_package_path is None, "the recurring run must point at an uploaded version"
        r = m.V2beta1RecurringRun(
            recurring_run_id=next(self.ids),
            display_name=job_name,
            description=description,
            experiment_id=experiment_id,
            pipeline_version_reference=m.V2beta1PipelineVersionReference(
                pipeline_id=pipeline_id, pipeline_version_id=version_id
            ),
            runtime_config=m.V2beta1RuntimeConfig(parameters=params),
            trigger=m.V2beta1Trigger(cron_schedule=m.V2beta1CronSchedule(cron=cron_expression)),
            max_concurrency=str(max_concurrency),
            no_catchup=no_catchup,
            service_account=service_account,
            mode="ENABLE" if enabled else "DISABLE",
        )
        self.runs[r.recurring_run_id] = r
        return r

    def disable_recurring_run(self, recurring_run_id: str) -> dict:
        self.runs[recurring_run_id].mode = "DISABLE"
        return {}

    def enable_recurring_run(self, recurring_run_id: str) -> dict:
        self.runs[recurring_run_id].mode = "ENABLE"
        return {}

    def delete_recurring_run(self, recurring_run_id: str) -> dict:
        self.calls.append("delete_recurring_run")
        del self.runs[recurring_run_id]
        return {}


def _sig(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_fake_has_kfp_clients_signatures():
    for name, fn in inspect.getmembers(FakeKfp, inspect.isfunction):
        if not name.startswith("_"):
            assert _sig(fn) == _sig(getattr(kfp.Client, name)), name


def _set(fake, cron="0 0 3 * * *", params=(), **kw):
    return client.schedule("http://kfp", cron, [*REQUIRED, *params], client=fake, **kw)


def test_schedule_uploads_a_version_and_keeps_one_recurring_run_per_name():
    fake = FakeKfp()
    rid, outcome = _set(fake, max_concurrency=2, service_account="dinoflow-runner")
    assert outcome == "created"
    (run,) = fake.runs.values()
    assert run.display_name == "dinoflow-retrain" and run.mode == "ENABLE"
    assert run.no_catchup is True and run.max_concurrency == "2"
    assert run.service_account == "dinoflow-runner"
    assert run.trigger.cron_schedule.cron == "0 0 3 * * *"
    assert run.runtime_config.parameters["model_name"] == "fmnist"
    version_ids = {v.pipeline_version_id for v in fake.versions}
    assert run.pipeline_version_reference.pipeline_version_id in version_ids
    assert fake.pipelines == {"dinoflow-retrain": run.pipeline_version_reference.pipeline_id}

    # helm upgrade with the same values: nothing new, no duplicate
    n_versions = len(fake.versions)
    assert _set(fake, max_concurrency=2, service_account="dinoflow-runner") == (rid, "unchanged")
    assert len(fake.runs) == 1 and len(fake.versions) == n_versions

    # changed values: a new run replaces the old one (created first, then the old deleted)
    rid2, outcome = _set(fake, cron="0 30 2 * * 0", params=["gpus=4"], service_account="dinoflow-runner")
    assert outcome == "updated" and rid2 != rid
    (run,) = fake.runs.values()
    assert run.trigger.cron_schedule.cron == "0 30 2 * * 0" and run.runtime_config.parameters["gpus"] == 4
    assert fake.calls[-2:] == ["create_recurring_run", "delete_recurring_run"]
    assert len(fake.versions) == n_versions  # the same compiled package keeps its version


def test_list_pause_resume_delete():
    fake = FakeKfp()
    _set(fake)
    _set(fake, name="nightly-b")
    rows = client.manage_schedules("http://kfp", "list", client=fake)
    assert sorted(r["name"] for r in rows) == ["dinoflow-retrain", "nightly-b"]
    client.manage_schedules("http://kfp", "pause", "nightly-b", client=fake)
    modes = {r.display_name: r.mode for r in fake.runs.values()}
    assert modes == {"dinoflow-retrain": "ENABLE", "nightly-b": "DISABLE"}
    client.manage_schedules("http://kfp", "resume", "nightly-b", client=fake)
    assert all(r.mode == "ENABLE" for r in fake.runs.values())
    client.manage_schedules("http://kfp", "delete", "nightly-b", client=fake)
    assert [r.display_name for r in fake.runs.values()] == ["dinoflow-retrain"]
    with pytest.raises(DinoflowError, match="no recurring run called 'nightly-b'"):
        client.manage_schedules("http://kfp", "pause", "nightly-b", client=fake)
    with pytest.raises(DinoflowError, match="needs --name"):
        client.manage_schedules("http://kfp", "delete", client=fake)


def test_cli_schedule_actions_are_wired(monkeypatch):
    from dinoflow.cli import app

    fake = FakeKfp()
    monkeypatch.setattr(client, "connect", lambda *a, **k: fake)
    args = ["--host", "http://kfp"]
    params = [a for p in REQUIRED for a in ("--param", p)]
    r = CliRunner().invoke(
        app,
        [
            "schedule",
            *args,
            "--cron",
            "0 0 3 * * *",
            "--max-concurrency",
            "3",
            "--service-account",
            "sa",
            *params,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "created" in r.output
    (run,) = fake.runs.values()
    assert run.max_concurrency == "3" and run.no_catchup is True and run.service_account == "sa"
    r = CliRunner().invoke(app, ["schedule", "pause", *args, "--name", "dinoflow-retrain"])
    assert r.exit_code == 0 and "DISABLE" in r.output
    r = CliRunner().invoke(app, ["schedule", "list", *args])
    assert r.exit_code == 0 and "dinoflow-retrain" in r.output and "0 0 3 * * *" in r.output
    r = CliRunner().invoke(app, ["schedule", "delete", *args, "--name", "dinoflow-retrain"])
    assert r.exit_code == 0 and not fake.runs


def test_the_charts_hook_arguments_create_then_keep_one_schedule(monkeypatch, tmp_path):
    """The hook Job's containers, run through the real CLI against the fake: publish uploads every
    pipeline customised with the ConfigMap; schedule creates the recurring run on install (reusing the
    retrain version publish uploaded) and keeps it on an upgrade with the same values; concurrency,
    catch-up and service account from the values."""
    from _deploy import CHART, render

    from dinoflow.cli import app

    docs = render([CHART / "ci" / "gpu-pool-values.yaml"], values={"schedule": {"maxConcurrency": 2}})
    (job,) = [
        d for d in docs if d["kind"] == "Job" and "helm.sh/hook" in d["metadata"].get("annotations", {})
    ]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = tmp_path / "dinoflow.yaml"
    config.write_text(cm["data"]["dinoflow.yaml"])
    pod = job["spec"]["template"]["spec"]
    (publish,) = pod["initContainers"]
    (c,) = pod["containers"]
    args = {
        n: [str(config) if a == "/etc/dinoflow/dinoflow.yaml" else a for a in x["args"]]
        for n, x in (("publish", publish), ("schedule", c))
    }
    fake = FakeKfp()
    uploaded = {}
    real_upload = fake.upload_pipeline_version

    def upload_version(pipeline_package_path, pipeline_version_name, pipeline_id=None, **kw):
        uploaded[pipeline_version_name] = open(pipeline_package_path).read()
        return real_upload(pipeline_package_path, pipeline_version_name, pipeline_id=pipeline_id, **kw)

    monkeypatch.setattr(fake, "upload_pipeline_version", upload_version)
    monkeypatch.setattr(client, "connect", lambda *a, **k: fake)
    done = CliRunner().invoke(app, args["publish"])
    assert done.exit_code == 0, done.output
    assert {"dinoflow-full", "dinoflow-retrain", "dinoflow-small-data", "dinoflow-stage-embed"} <= set(
        fake.pipelines
    )
    assert all("registry.example.com/ml/dinoflow:0.1.0" in text for text in uploaded.values())
    n_versions = len(fake.versions)
    first = CliRunner().invoke(app, args["schedule"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, args["schedule"])
    assert "created" in first.output and "unchanged" in again.output
    assert len(fake.versions) == n_versions  # the schedule runs the retrain version publish uploaded
    (run,) = fake.runs.values()
    assert run.max_concurrency == "2" and run.no_catchup is True
    assert run.service_account == "rel-dinoflow"
    assert run.runtime_config.parameters["nodes"] == 2 and run.runtime_config.parameters["gpus"] == 8
