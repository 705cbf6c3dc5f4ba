"""Build, tag and push dinoflow's container images through the Docker engine's API.

    python -m dinoflow_tools.images [--only cpu|cuda] [--registry REG] [--tag TAG] [--push]

(``make images`` runs this.) It talks to the engine with the ``docker`` Python SDK; where no engine
answers (CI, these machines), it says so in one line and exits 2 instead of failing deep inside the
SDK. Registry credentials come from the engine's own login (``docker login`` / ``~/.docker/config.json``)
and are never read, printed or passed here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinoflow.errors import DinoflowError

REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (Dockerfile relative to the repo root, what runs in it)
IMAGES: dict[str, tuple[str, str]] = {
    "cpu": ("images/Dockerfile.cpu", "ingest, dedup, curate, evaluate, promote, KFP components"),
    "cuda": ("images/Dockerfile.cuda", "pretrain, distill, embed on NVIDIA GPUs"),
}


class NoDockerEngine(DinoflowError):
    """No Docker engine answered; images cannot be built on this machine."""


@dataclass(frozen=True)
class ImagePlan:
    """One image to build: which Dockerfile, under which reference."""

    name: str
    dockerfile: str
    repository: str  # e.g. ghcr.io/acme/dinoflow
    tag: str  # the CUDA image's tag ends in -cuda (dinoflow.kfp.GPU_IMAGE)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


def default_tag() -> str:
    """The package version: an immutable tag (a moving ``:latest`` gives stale KFP cache hits)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dinoflow")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0-dev"


def plan_images(
    only: Sequence[str] | None = None,
    registry: str | None = None,
    tag: str | None = None,
    root: Path = REPO_ROOT,
) -> list[ImagePlan]:
    """The images to build, in order; fails early on an unknown name or a missing Dockerfile."""
    names = list(only) if only else list(IMAGES)
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        raise DinoflowError(f"unknown image {', '.join(unknown)}; choose from {', '.join(IMAGES)}")
    tag = tag or default_tag()
    if not tag or any(c in tag for c in " /:@"):
        raise DinoflowError(f"image tag {tag!r} is not valid: use letters, digits, '.', '_' or '-'")
    prefix = (registry.rstrip("/") + "/") if registry else ""
    plans = []
    for n in names:
        dockerfile = IMAGES[n][0]
        if not (root / dockerfile).is_file():
            raise DinoflowError(f"{dockerfile} not found under {root}: run from a dinoflow checkout")
        # One repository, flavour in the tag: the names the compiled pipelines use (dinoflow.kfp.IMAGE)
        plans.append(ImagePlan(n, dockerfile, f"{prefix}dinoflow", tag if n == "cpu" else f"{tag}-{n}"))
    return plans


def docker_client(timeout_s: int = 600) -> Any:
    """A docker SDK client whose engine answered a ping, or ``NoDockerEngine`` naming where it looked."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError as e:  # pragma: no cover - docker is a declared dependency
        raise NoDockerEngine("the 'docker' Python package is not installed: pip install docker") from e
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except (DockerException, OSError) as e:
        raise NoDockerEngine(
            f"no Docker engine answers at {where}: start Docker (or set DOCKER_HOST) to build images; "
            "the Dockerfiles are still linted by the tests (hadolint)"
        ) from e
    return client


def _stream_errors(lines: Iterator[dict], what: str, echo) -> None:
    for chunk in lines:
        if "error" in chunk or "errorDetail" in chunk:
            msg = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "unknown error")
            raise DinoflowError(f"{what} failed: {msg.strip()}")
        text = chunk.get("stream") or chunk.get("status")
        if text and text.strip():
            echo(text.rstrip())


def build_image(client: Any, plan: ImagePlan, root: Path = REPO_ROOT, echo=print) -> str:
    """Build one image from the repository root (the context ``.dockerignore`` trims); returns its id."""
    lines = client.api.build(
        path=str(root),
        dockerfile=plan.dockerfile,
        tag=plan.ref,
        rm=True,
        forcerm=True,
        decode=True,
        pull=True,
    )
    _stream_errors(lines, f"building {plan.ref}", echo)
    return client.images.get(plan.ref).id


def push_image(client: Any, plan: ImagePlan, echo=print) -> None:
    """Push one image with the engine's stored registry login."""
    lines = client.api.push(plan.repository, tag=plan.tag, stream=True, decode=True)
    _stream_errors(lines, f"pushing {plan.ref}", echo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dinoflow_tools.images", description="Build (and push) dinoflow's images."
    )
    p.add_argument(
        "--only", action="append", choices=sorted(IMAGES), help="build only this image (repeatable)"
    )
    p.add_argument(
        "--registry",
        default=os.environ.get("DINOFLOW_IMAGE_REGISTRY", "ghcr.io/dinoflow"),
        help="e.g. ghcr.io/acme",
    )
    p.add_argument("--tag", default=None, help="image tag (default: the package version)")
    p.add_argument("--push", action="store_true", help="push after building (needs --registry)")
    args = p.parse_args(argv)
    try:
        if args.push and not args.registry:
            raise DinoflowError("--push needs --registry (or DINOFLOW_IMAGE_REGISTRY), e.g. ghcr.io/acme")
        plans = plan_images(args.only, args.registry, args.tag)
        client = docker_client()
        for plan in plans:
            print(f"building {plan.ref} from {plan.dockerfile} ({IMAGES[plan.name][1]})")
            image_id = build_image(client, plan)
            print(f"built {plan.ref} {image_id}")
            if args.push:
                push_image(client, plan)
                print(f"pushed {plan.ref}")
    except DinoflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
