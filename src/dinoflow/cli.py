"""The ``dinoflow`` command line: the verbs a newcomer needs.

dinoflow store up|down|status        the embedded S3 store
dinoflow schema STAGE                a stage's JSON schema
dinoflow stage STAGE --spec F.json   run one stage
dinoflow upload [PATH] --to s3://...  put a dataset where the pipelines ingest it
dinoflow bench NAME [ARGS...]        benchmarks (last output line is JSON)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from dinoflow.errors import DinoflowError
from dinoflow.kfp import DATA_PREFIX

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="dinoflow: self-supervised vision backbones on Kubeflow."
)
store_app = typer.Typer(
    no_args_is_help=True, help="The embedded SeaweedFS S3 store (used when no endpoint is configured)."
)
app.add_typer(store_app, name="store")


def _store():
    from dinoflow.storage import open_store

    return open_store()


@store_app.command("up")
def store_up(home: Annotated[Path | None, typer.Option(help="state directory")] = None) -> None:
    """Start the embedded store (idempotent) and print its endpoint."""
    from dinoflow.storage.embedded import EmbeddedStore

    st = EmbeddedStore(home).up()
    typer.echo(f"embedded S3 store up at http://{st.endpoint} (pid {st.pid}, data {st.data_dir})")


@store_app.command("down")
def store_down(home: Annotated[Path | None, typer.Option(help="state directory")] = None) -> None:
    """Stop the embedded store started by `store up`."""
    from dinoflow.storage.embedded import EmbeddedStore

    typer.echo("stopped" if EmbeddedStore(home).down() else "not running")


@store_app.command("status")
def store_status(home: Annotated[Path | None, typer.Option(help="state directory")] = None) -> None:
    """Say whether the embedded store runs, and where."""
    from dinoflow.storage.embedded import EmbeddedStore

    st = EmbeddedStore(home).status()
    if st is None:
        typer.echo("not running")
        raise typer.Exit(1)
    typer.echo(f"running at http://{st.endpoint} (pid {st.pid}, data {st.data_dir})")


@app.command()
def schema(stage: str) -> None:
    """Print the JSON schema of STAGE's spec and result."""
    from dinoflow.stages import get_stage

    s = get_stage(stage)
    out = {"spec": s.spec_cls.model_json_schema(), "result": s.result_cls.model_json_schema()}
    typer.echo(json.dumps(out, indent=2))


@app.command()
def stage(
    name: str,
    spec: Annotated[Path, typer.Option("--spec", help="JSON file with the stage spec", exists=False)],
    embedded: Annotated[bool, typer.Option(help="start the embedded store when no endpoint is set")] = True,
) -> None:
    """Run one stage from a JSON spec; print its result as JSON."""
    from dinoflow.stages import get_stage
    from dinoflow.stages.base import read_spec_text

    s = get_stage(name)
    parsed = s.parse_spec(read_spec_text(spec))  # fails before any work is done
    store = _ensure_store(embedded)
    result = s.run(parsed, store)
    typer.echo(result.model_dump_json(indent=2))


@app.command()
def upload(
    path: Annotated[
        Path | None, typer.Argument(help="a dataset folder laid out as {split}/{class}/{image}")
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="s3:// prefix of the datasets (the chart's data prefix)")
    ] = DATA_PREFIX,
    name: Annotated[
        str | None, typer.Option(help="dataset folder name (default: fashion-mnist / PATH's)")
    ] = None,
    fashion_mnist: Annotated[
        Path | None,
        typer.Option(help="folder with Fashion-MNIST's 4 IDX .gz files (default: the Debian package's)"),
    ] = None,
) -> None:
    """Put a dataset under TO/NAME for the pipelines to ingest: Fashion-MNIST (without PATH) or any
    folder. Objects already there are kept; nothing stored is overwritten."""
    from dinoflow.data import sources
    from dinoflow.data.idx import FASHION_MNIST_CLASSES
    from dinoflow.storage import open_store
    from dinoflow.storage.client import join_uri

    if path is None:
        files = sources.fashion_mnist_files(str(fashion_mnist) if fashion_mnist else None)
        name = name or "fashion-mnist"
        info = {"source": "fashion-mnist", "label_names": FASHION_MNIST_CLASSES}
    else:
        files = sources.folder_files(path)
        name = name or path.resolve().name
        info = {"source": name}
    store = open_store()  # the configured endpoint (DINOFLOW_S3_*), else a running embedded store
    done = sources.upload_dataset(store, files, join_uri(to, name), info)
    typer.echo(
        f"{done.dataset_uri}: {done.uploaded} object(s) uploaded ({done.bytes_uploaded / 1e6:.1f} MB), "
        f"{done.already_there} already there"
    )
    typer.echo(f"ingest it with the pipeline parameter source_uri={done.dataset_uri}")


def _ensure_store(embedded: bool = True):
    from dinoflow.storage import open_store

    return open_store(start_embedded=embedded)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def bench(ctx: typer.Context, name: str) -> None:
    """Run benchmark NAME (e.g. train-step, cpu-recipe, dedup); extra args go to it."""
    from importlib.metadata import entry_points

    found = entry_points(group="dinoflow.tools", name="bench")
    if not found:
        raise DinoflowError(
            "the benchmarks are not installed: they live beside the library in a source checkout "
            "(pip install -e tools, which `make venv` does)"
        )
    next(iter(found)).load()(name, list(ctx.args))


# -- the Kubeflow layer -------------------------------------------------------------------------
HostOpt = Annotated[
    str, typer.Option("--host", envvar="KFP_HOST", help="KFP API URL, e.g. http://localhost:8080")
]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="KF_PIPELINES_TOKEN", help="bearer token")]
NsOpt = Annotated[str | None, typer.Option("--namespace", help="Kubeflow profile namespace (multi-user)")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", help="pipeline parameter k=v (repeatable)")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="the chart's dinoflow.yaml: images, pull secrets, pools, parameter defaults"
    ),
]
ImageOpt = Annotated[
    str | None, typer.Option("--image", help="REGISTRY/NAME:TAG of every CPU component (GPU: TAG-cuda)")
]
GpuImageOpt = Annotated[
    str | None, typer.Option("--gpu-image", help="REGISTRY/NAME:TAG of the GPU components")
]
PullSecretOpt = Annotated[
    list[str] | None, typer.Option("--pull-secret", help="image pull Secret on every task (repeatable)")
]


def _deployment(config: Path | None, image: str | None, gpu_image: str | None, pull_secret: list[str] | None):
    """The installation's settings for the compiled pipelines (dinoflow.kfp.deploy)."""
    from dinoflow.kfp import deploy

    return deploy.load(config, image=image, gpu_image=gpu_image, pull_secrets=pull_secret or [])


@app.command("compile")
def compile_cmd(
    check: Annotated[bool, typer.Option("--check", help="only report YAMLs that are out of date")] = False,
    image: ImageOpt = None,
    gpu_image: GpuImageOpt = None,
    pull_secret: PullSecretOpt = None,
    config: ConfigOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="folder for customised YAMLs (components/ and pipelines/ in it)")
    ] = None,
) -> None:
    """Compile every component and pipeline to components/*/component.yaml and pipelines/*.yaml; with
    --image/--pull-secret/--config, customised copies go to --out (the checked-in YAMLs keep the
    default image)."""
    from dinoflow.kfp import compile as kc

    deployment = _deployment(config, image, gpu_image, pull_secret)
    if not deployment.is_empty():
        if out is None:
            raise DinoflowError("--image/--pull-secret/--config write customised YAMLs: give --out DIR")
        for path in kc.compile_all(out / "components", out / "pipelines", deployment):
            typer.echo(str(path))
        return
    if check:
        stale = kc.stale()
        if stale:
            raise DinoflowError(f"out of date: {', '.join(stale)} (run `dinoflow compile`)")
        typer.echo("all compiled YAMLs are up to date")
        return
    for path in kc.compile_all():
        typer.echo(str(path))


@app.command()
def submit(
    host: HostOpt,
    pipeline: Annotated[str, typer.Option(help="full, retrain, small_data or stage-<stage>")] = "full",
    param: ParamOpt = None,
    token: TokenOpt = None,
    namespace: NsOpt = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = "dinoflow",
    image: ImageOpt = None,
    gpu_image: GpuImageOpt = None,
    pull_secret: PullSecretOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Start a run of a compiled pipeline on a KFP cluster."""
    from dinoflow.kfp import client

    run_id = client.submit(
        host,
        pipeline,
        param or [],
        token=token,
        namespace=namespace,
        experiment=experiment,
        deployment=_deployment(config, image, gpu_image, pull_secret),
    )
    typer.echo(f"submitted {pipeline}: run {run_id}")


@app.command()
def schedule(
    host: HostOpt,
    action: Annotated[
        str, typer.Argument(help="set (create or update; the default), list, pause, resume or delete")
    ] = "set",
    cron: Annotated[
        str | None, typer.Option(help="6 fields, seconds first: '0 0 3 * * *' = daily 03:00 (set)")
    ] = None,
    param: ParamOpt = None,
    token: TokenOpt = None,
    namespace: NsOpt = None,
    name: Annotated[str | None, typer.Option(help="recurring run name (default dinoflow-retrain)")] = None,
    pipeline_name: Annotated[
        str | None, typer.Option(help="name the pipeline is uploaded under (default: --name)")
    ] = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = "dinoflow",
    max_concurrency: Annotated[int, typer.Option(help="runs of the schedule at once")] = 1,
    catchup: Annotated[
        bool, typer.Option("--catchup/--no-catchup", help="run the intervals missed while paused")
    ] = False,
    service_account: Annotated[
        str | None, typer.Option(help="Kubernetes ServiceAccount the runs use")
    ] = None,
    image: ImageOpt = None,
    gpu_image: GpuImageOpt = None,
    pull_secret: PullSecretOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Keep one recurring run of the retrain pipeline per name: `set` uploads the pipeline and a
    version, then creates or updates the recurring run; `list`, `pause`, `resume`, `delete` manage it."""
    from dinoflow.errors import DinoflowError
    from dinoflow.kfp import client

    if action == "set":
        if not cron:
            raise DinoflowError("schedule set needs --cron (6 fields, seconds first, e.g. '0 0 3 * * *')")
        rid, outcome = client.schedule(
            host,
            cron,
            param or [],
            token=token,
            namespace=namespace,
            name=name or "dinoflow-retrain",
            pipeline_name=pipeline_name,
            experiment=experiment,
            max_concurrency=max_concurrency,
            no_catchup=not catchup,
            service_account=service_account,
            deployment=_deployment(config, image, gpu_image, pull_secret),
        )
        typer.echo(f"schedule '{name or 'dinoflow-retrain'}' at '{cron}' {outcome}: recurring run {rid}")
        return
    rows = client.manage_schedules(
        host, action, name, token=token, namespace=namespace, experiment=experiment
    )
    for r in rows:
        typer.echo(f"{r['mode'] or '':<8} {r['cron']:<16} {r['recurring_run_id']}  {r['name']}")
    if not rows:
        typer.echo("no recurring runs")


@app.command()
def publish(
    host: HostOpt,
    pipeline: Annotated[
        list[str] | None,
        typer.Option(help="full, retrain, small_data, stage-<stage> (repeatable; default: all of them)"),
    ] = None,
    token: TokenOpt = None,
    namespace: NsOpt = None,
    image: ImageOpt = None,
    gpu_image: GpuImageOpt = None,
    pull_secret: PullSecretOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Upload the pipelines to KFP (a version named after each one's content), customised for this
    installation, so that a run started from the UI with its defaults runs here."""
    from dinoflow.kfp import client

    done = client.publish(
        host,
        pipeline or None,
        token=token,
        namespace=namespace,
        deployment=_deployment(config, image, gpu_image, pull_secret),
    )
    for name, version in done:
        typer.echo(f"{name}: version {version}")


@app.command()
def runs(
    host: HostOpt,
    limit: Annotated[int, typer.Option(help="how many")] = 20,
    token: TokenOpt = None,
    namespace: NsOpt = None,
) -> None:
    """List recent runs."""
    from dinoflow.kfp import client

    rows = client.list_runs(host, limit, token=token, namespace=namespace)
    for r in rows:
        typer.echo(f"{r['created_at']:<26} {r['state'] or '':<10} {r['run_id']}  {r['name']}")
    if not rows:
        typer.echo("no runs")


@app.command()
def demo(
    out: Annotated[
        Path | None, typer.Option(help="output folder (default $DINOFLOW_DEMO_OUT or ./demo-out)")
    ] = None,
    containers: Annotated[
        bool, typer.Option(help="run each stage in the built images (kfp.local DockerRunner)")
    ] = False,
    pretrain_steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="pretraining steps instead of the DEMO preset's 1,800 (~3 steps/s on 2 cores)"
        ),
    ] = None,
) -> None:
    """Run the full pipeline locally (kfp.local, embedded store, CPU sizes); write summary.json."""
    from dinoflow.demo import run_demo

    run_demo(out, containers=containers, pretrain_steps=pretrain_steps)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except DinoflowError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
