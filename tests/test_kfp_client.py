"""submit / schedule / runs: clear one-line errors, checked before or without a cluster."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from dinoflow.errors import DinoflowError
from dinoflow.kfp import client

RETRAIN_REQUIRED = ["model_name=fmnist", "source_uri=s3://r/raw/fashion-mnist"]  # all have defaults


@pytest.fixture
def closed_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_submit_and_runs_against_unreachable_host(closed_url):
    with pytest.raises(
        DinoflowError, match=r"^KFP at http://127\.0\.0\.1:\d+ is unreachable \(connection refused\)"
    ):
        client.submit(closed_url, "full", ["data_version=v2"])
    with pytest.raises(DinoflowError, match="unreachable"):
        client.list_runs(closed_url)


def test_schedule_against_unreachable_host_via_cli(closed_url):
    from dinoflow.cli import app

    r = CliRunner().invoke(
        app,
        [
            "schedule",
            "--host",
            closed_url,
            "--cron",
            "0 0 3 * * *",
            *[a for p in RETRAIN_REQUIRED for a in ("--param", p)],
        ],
    )
    assert r.exit_code != 0
    assert isinstance(r.exception, DinoflowError) and "unreachable" in str(r.exception)
    assert "\n" not in str(r.exception)


def test_cron_must_have_six_fields():
    assert client.check_cron("0 0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(DinoflowError, match="5 field.*6, seconds first"):
        client.check_cron("0 3 * * *")


def test_params_typed_by_the_compiled_pipeline():
    path = client.pipeline_yaml("full")
    p = client.parse_params(
        path,
        ["gpus=4", "data_version=7", 'gpu_node_selector={"pool": "a100"}', 'embed_spec={"batch_size": 64}'],
    )
    assert p == {
        "gpus": 4,
        "data_version": "7",
        "gpu_node_selector": {"pool": "a100"},
        "embed_spec": '{"batch_size": 64}',
    }
    with pytest.raises(DinoflowError, match="no such parameter"):
        client.parse_params(path, ["gpu=1"])
    with pytest.raises(DinoflowError, match="expected a int"):
        client.parse_params(path, ["gpus=1.5"])
    with pytest.raises(DinoflowError, match="needs --param for: spec_json"):
        client.parse_params(client.pipeline_yaml("stage-evaluate"), [])
    assert client.parse_params(client.pipeline_yaml("retrain"), []) == {}  # schedulable as it is
    with pytest.raises(DinoflowError, match="unknown pipeline"):
        client.pipeline_yaml("nope")
    with pytest.raises(DinoflowError, match="http"):
        client.connect("localhost:8080")
