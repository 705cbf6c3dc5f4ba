"""Compile every component and pipeline to the YAMLs kept in the repository.

``components/<stage>/component.yaml`` (reusable in any pipeline) and ``pipelines/<name>.yaml`` (for
upload in the KFP UI or ``dinoflow submit``). ``stale()`` compiles to a temporary folder and lists
the checked-in files that differ, which is what the up-to-date test asserts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pipelines() -> dict[str, Any]:
    """Pipeline name (YAML file stem) -> pipeline function."""
    from dinoflow.pipelines.full import full
    from dinoflow.pipelines.retrain import retrain
    from dinoflow.pipelines.small_data import small_data
    from dinoflow.pipelines.stages import PIPELINES

    out: dict[str, Any] = {"full": full, "retrain": retrain, "small_data": small_data}
    out.update({f"stage-{name}": fn for name, fn in PIPELINES.items()})
    return out


def components() -> dict[str, Any]:
    from dinoflow.components import STAGE_NAMES, get_component

    return {name: get_component(name) for name in STAGE_NAMES}


def default_dirs() -> tuple[Path, Path]:
    import dinoflow.components as c
    import dinoflow.pipelines as p

    return Path(c.__file__).parent, Path(p.__file__).parent


def compile_all(
    components_dir: str | os.PathLike[str] | None = None,
    pipelines_dir: str | os.PathLike[str] | None = None,
    deployment: Any = None,
) -> list[Path]:
    """Write every YAML; returns the paths written. ``deployment`` (``dinoflow.kfp.deploy``): the
    installation's images, pull secrets, pools and defaults applied to each."""
    from kfp import compiler

    cdir, pdir = default_dirs()
    cdir = Path(components_dir) if components_dir else cdir
    pdir = Path(pipelines_dir) if pipelines_dir else pdir
    written: list[Path] = []
    for name, comp in components().items():
        path = cdir / name / "component.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(comp, str(path))
        written.append(path)
    pdir.mkdir(parents=True, exist_ok=True)
    for name, fn in pipelines().items():
        path = pdir / f"{name}.yaml"
        compiler.Compiler().compile(fn, str(path))
        written.append(path)
    if deployment is not None and not deployment.is_empty():
        from dinoflow.kfp import deploy

        for path in written:
            deploy.write(path, path, deployment)
    return written


def _normalise(text: str) -> str:
    # The '#' header repeats the parameters for people; kfp 2.17 prints dict defaults there in whatever
    # key order its compiler left them in (it reorders them in place), so only the spec body is compared.
    lines = text.replace("\r\n", "\n").rstrip().split("\n")
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


def stale(read: Callable[[Path], str] = lambda p: p.read_text()) -> list[str]:
    """Checked-in YAMLs that differ from a fresh compile (or are missing)."""
    cdir, pdir = default_dirs()
    out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_all(Path(tmp) / "components", Path(tmp) / "pipelines")
        for path in fresh:
            rel = path.relative_to(tmp)
            kept = (cdir.parent if rel.parts[0] == "components" else pdir.parent) / rel
            if not kept.exists() or _normalise(read(kept)) != _normalise(path.read_text()):
                out.append(str(rel))
    return out
