"""The tiny full pipeline in dinoflow's images beside the same run in-process.

    python -m dinoflow_tools.containers [--out DIR]

(``make bench-containers`` builds the images and runs this with ``DOCKER_HOST`` set to the engine.)
Both runs use the configuration of the in-process end-to-end test (``dinoflow.kfp.configs.tiny_arguments``),
each against its own embedded store but under the same output root, so they write the same URIs and
their stage results compare key for key, less the timings. The containerised run is kfp.local's
DockerRunner set up as ``dinoflow demo --containers`` sets it (``dinoflow.demo.docker_runner``).
Prints the stage seconds side by side and ends with one JSON line of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dinoflow.errors import DinoflowError

RUNS = ("in-process", "containers")
# what differs between two runs of one configuration by design: timings, and promote's decision
# record, named by the time it was made
VOLATILE = ("seconds", "decision_uri")


def stable(value: Any) -> Any:
    """A stage result without what differs by design (``VOLATILE``, ``*_per_second``): what both runs
    must agree on."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_per_second")}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def run_both(workdir: Path, output_root: str = "s3://tiny-containers/runs") -> dict[str, Any]:
    """Run the tiny full pipeline in-process, then in the images; returns the two ``LocalRun``s.

    The images must be in the engine that ``DOCKER_HOST`` names (``make images``)."""
    from dinoflow.data.idx import fashion_mnist_paths
    from dinoflow.demo import docker_runner, input_dirs, require_images
    from dinoflow.kfp import GPU_IMAGE, IMAGE
    from dinoflow.kfp.configs import tiny_arguments
    from dinoflow.kfp.local import run_pipeline
    from dinoflow.pipelines.full import full
    from dinoflow.storage.embedded import EmbeddedStore

    require_images([IMAGE, GPU_IMAGE])
    args = tiny_arguments(fashion_mnist_paths(), output_root, data_version="c1")
    runs: dict[str, Any] = {}
    for name in RUNS:
        home = workdir / name
        home.mkdir(parents=True, exist_ok=False)
        root = home / "kfp"
        runner = None
        if name == "containers":
            root.mkdir()
            root.chmod(0o777)  # the tasks write their outputs there as uid 10001
            runner = docker_runner(input_dirs(args))
        store = EmbeddedStore(home / "store")
        settings = store.up().settings()
        try:
            runs[name] = run_pipeline(full, args, root, settings, caching=False, runner=runner)
        finally:
            store.down()
    return runs


def stage_seconds(runs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per run, each task's seconds (a fanned-out stage: its plan, parts and collect phases together)."""
    seconds: dict[str, dict[str, float]] = {name: {} for name in runs}
    for name, r in runs.items():
        for e in r.events:
            seconds[name][e["task"]] = round(seconds[name].get(e["task"], 0.0) + e["seconds"], 3)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dinoflow_tools.containers", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    workdir = args.out or Path(tempfile.mkdtemp(prefix="dinoflow-containers-"))
    try:
        t0 = time.perf_counter()
        runs = run_both(workdir / f"run-{int(time.time())}")
    except DinoflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.out is None:  # stores and task outputs; the containers' files are uid 10001's
            shutil.rmtree(workdir, ignore_errors=True)
    inproc, cont = runs["in-process"], runs["containers"]
    seconds = stage_seconds(runs)
    print(f"\n{'stage':<14} {'in-process s':>12} {'containers s':>12}")
    for task in seconds["in-process"]:
        print(
            f"{task:<14} {seconds['in-process'][task]:12.1f} {seconds['containers'].get(task, float('nan')):12.1f}"
        )
    print(f"{'(wall)':<14} {inproc.wall_seconds:12.1f} {cont.wall_seconds:12.1f}")
    differ = [t for t in inproc.executed if stable(inproc.result(t)) != stable(cont.result(t))]
    print(f"stage results equal: {not differ}" + (f" (differ: {', '.join(differ)})" if differ else ""))
    figures = {
        "stage_seconds": seconds,
        "wall_seconds": {name: r.wall_seconds for name, r in runs.items()},
        "results_equal": not differ,
        "seconds": round(time.perf_counter() - t0, 1),
        "docker_host": os.environ.get("DOCKER_HOST", ""),
    }
    print(json.dumps(figures, sort_keys=True))
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
