"""How the training stages (pretrain, distill) place their processes.

A training spec says ``nproc`` (processes per node) and ``nnodes``. ``launch_mode`` decides what the
process that called ``run(spec, store)`` does:

- ``"worker"``: it is one rank of an already launched world (torchrun set ``WORLD_SIZE``: a local
  ``torchrun``, or one node of a Kubeflow TrainJob / PyTorchJob). Its world must be exactly
  ``nproc * nnodes`` processes; it trains its share, and rank 0 exports and writes the marker.
- ``"inline"``: one process, no process group.
- ``"torchrun"``: ``nproc > 1`` on this machine: re-launch under ``torchrun --standalone`` with
  :func:`launch_local`, each process running ``python -m dinoflow.stages._worker``.

``nnodes > 1`` outside a launched world is refused: those runs start from the pipeline component
(``dinoflow.kfp.trainjob``), whose job runs ``torchrun ... -m dinoflow.cli stage <stage>`` on every
node with the Trainer's ``PET_*`` (or the Training Operator's ``MASTER_*``/``RANK``) environment.

Worker command line: ``torchrun --nproc_per_node=N -m dinoflow.stages._worker --stage pretrain
--spec F [--result R]``. Object-store settings come from the ``DINOFLOW_S3_*`` environment.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any, Literal

from dinoflow.errors import DinoflowError, SpecError
from dinoflow.stages import TRAINING_STAGES


def launch_mode(spec: Any) -> Literal["worker", "inline", "torchrun"]:
    """What ``run`` does with this spec in this process (see the module docstring)."""
    nproc, nnodes = int(spec.nproc), int(spec.nnodes)
    world = os.environ.get("WORLD_SIZE")
    if world is not None:
        if int(world) != nproc * nnodes:
            raise SpecError(
                f"this process is one of WORLD_SIZE={world} processes, but the spec asks for "
                f"nproc*nnodes = {nproc}*{nnodes} = {nproc * nnodes}"
            )
        return "worker"
    if nnodes > 1:
        raise SpecError(
            f"nnodes={nnodes} runs as a Kubeflow TrainJob/PyTorchJob (the pipeline component submits it), "
            f"or by hand: `torchrun --nnodes={nnodes} --nproc_per_node={nproc} --node_rank=R "
            "--master_addr=A --master_port=P -m dinoflow.cli stage <stage> --spec F` on every node"
        )
    return "inline" if nproc == 1 else "torchrun"


def check_divisible(spec: Any) -> None:
    procs = int(spec.nproc) * int(spec.nnodes)
    if spec.batch_size % procs:
        raise SpecError(f"batch_size {spec.batch_size} must be divisible by nproc*nnodes = {procs}")


def launch_local(stage: str, spec: Any, store: Any, result_cls: type) -> Any:
    """Run ``stage`` under ``torchrun --standalone --nproc_per_node=spec.nproc``; rank 0's result."""
    s = store.settings
    env = dict(os.environ)
    env.update(
        DINOFLOW_S3_ENDPOINT=s.endpoint,
        DINOFLOW_S3_ACCESS_KEY=s.access_key.get_secret_value(),
        DINOFLOW_S3_SECRET_KEY=s.secret_key.get_secret_value(),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            f.write(spec.model_dump_json())
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={spec.nproc}",
            "-m",
            "dinoflow.stages._worker",
            "--stage",
            stage,
            "--spec",
            spec_path,
            "--result",
            result_path,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(result_path):
            lines = (proc.stderr + proc.stdout).splitlines()
            errors = [ln for ln in lines if "Error" in ln and "elastic" not in ln][-3:]
            tail = errors or lines[-15:]
            raise DinoflowError(f"torchrun {stage} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        with open(result_path) as f:
            return result_cls.model_validate(json.load(f))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dinoflow.stages._worker")
    p.add_argument("--stage", default="pretrain", choices=TRAINING_STAGES)
    p.add_argument("--spec", required=True, help="stage spec JSON file")
    p.add_argument("--result", default=None, help="where rank 0 writes the result JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from dinoflow.stages import get_stage
    from dinoflow.storage import open_store

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    stage = get_stage(a.stage)
    with open(a.spec) as f:
        spec = stage.parse_spec(f.read())
    result = importlib.import_module(f"dinoflow.stages.{a.stage}").train_from_spec(spec, open_store())
    if a.result and int(os.environ.get("RANK", "0")) == 0:
        tmp = a.result + ".tmp"
        with open(tmp, "w") as f:
            f.write(result.model_dump_json())
        os.replace(tmp, a.result)


if __name__ == "__main__":
    main()
