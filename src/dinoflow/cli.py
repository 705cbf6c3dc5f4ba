"""The ``dinoflow`` command line: the verbs a newcomer needs.

dinoflow store up|down|status        the embedded S3 store
dinoflow schema STAGE                a stage's JSON schema
dinoflow stage STAGE --spec F.json   run one stage
dinoflow bench NAME [ARGS...]        benchmarks (last output line is JSON)
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from dinoflow.errors import DinoflowError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="dinoflow: self-supervised vision backbones on Kubeflow."
)
store_app = typer.Typer(
    no_args_is_help=True, help="The embedded SeaweedFS S3 store (used when no endpoint is configured)."
)
app.add_typer(store_app, name="store")


def _store():
    from dinoflow.storage import ObjectStore

    return ObjectStore.from_env()


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

    s = get_stage(name)
    if not spec.exists():
        raise DinoflowError(f"spec file {spec} does not exist")
    parsed = s.parse_spec(spec.read_text())  # fails before any work is done
    store = _ensure_store(embedded)
    result = s.run(parsed, store)
    typer.echo(result.model_dump_json(indent=2))


def _ensure_store(embedded: bool = True):
    from dinoflow.settings import S3Settings
    from dinoflow.storage import ObjectStore
    from dinoflow.storage.embedded import EmbeddedStore

    if S3Settings().endpoint or not embedded:
        return ObjectStore.from_env()
    return ObjectStore(EmbeddedStore().up().settings())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str) -> None:
    """Run benchmark NAME (e.g. train-step, cpu-recipe, dedup); extra args go to it."""
    mod_name = "dinoflow.bench." + name.replace("-", "_")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name != mod_name:
            raise
        import pkgutil

        import dinoflow.bench as b

        names = sorted(
            m.name.replace("_", "-") for m in pkgutil.iter_modules(b.__path__) if not m.name.startswith("_")
        )
        raise DinoflowError(f"unknown benchmark {name!r}; available: {', '.join(names)}") from None
    mod.main(list(ctx.args))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except DinoflowError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
