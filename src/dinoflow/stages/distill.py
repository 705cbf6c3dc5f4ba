"""distill: a frozen pretrained teacher -> smaller students (DINOv2 Sec. 5), on the shared trainer:
one process, ``nproc`` processes (torchrun) or ``nnodes`` nodes (a Kubeflow TrainJob/PyTorchJob),
placed like pretrain's (``dinoflow.stages._worker``).

Writes under ``output_uri``: the trainer's checkpoints and ``curves.jsonl``, ``backbone/`` (the first
student's EMA) and ``students/{name}/`` for every student's EMA, each in the shared export format
(``backbone.safetensors`` + ``backbone.json``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dinoflow.methods.distill import default_crops
from dinoflow.stages._worker import check_divisible, launch_local, launch_mode
from dinoflow.stages.base import StageResult, StageSpec
from dinoflow.train.config import DistillTrainConfig

__all__ = ["DistillResult", "DistillSpec", "build", "default_crops", "run"]


class DistillSpec(DistillTrainConfig, StageSpec):
    manifest_uri: str = Field(..., description="images to distill on (labels unused)")
    image_px: int | None = Field(
        None, ge=4, description="squash images to this square before cropping (default: crop the originals)"
    )
    max_images: int | None = Field(None, ge=1, description="seeded random subset of the manifest")
    nproc: int = Field(1, ge=1, description="processes (torchrun) on this node")
    nnodes: int = Field(1, ge=1, description="nodes; > 1 runs as a Kubeflow TrainJob/PyTorchJob")


class DistillResult(StageResult):
    backbone_uris: dict[str, str] = Field(..., description="student name -> its EMA backbone prefix")
    curves_uri: str
    checkpoint_uri: str | None = None
    teacher_uri: str
    steps: int
    final_loss: float


def build(spec: DistillSpec, store: Any) -> Any:
    """A method factory for the trainer, after every check that needs no training: the first call
    returns the instance built (and checked) here, before any image is loaded."""
    import torch

    from dinoflow.methods.distill import Distill

    torch.manual_seed(spec.seed)  # the trainer's initial weights: it seeds so before make(), too late here
    first = [Distill.from_config(spec, store)]

    def factory() -> Distill:
        return first.pop() if first else Distill.from_config(spec, store)

    return factory


def run(spec: DistillSpec, store: Any) -> DistillResult:
    check_divisible(spec)
    if launch_mode(spec) == "torchrun":
        build(spec, store)()  # refuse an impossible teacher/student pair before launching processes
        return launch_local("distill", spec, store, DistillResult)
    return train_from_spec(spec, store)  # one process, or this process's share of a launched world


def train_from_spec(spec: DistillSpec, store: Any) -> DistillResult:
    """The in-process body (also what each torchrun worker runs); rank 0 exports."""
    import numpy as np
    import torch

    from dinoflow.data.manifest import read_manifest
    from dinoflow.data.stream import ManifestSource
    from dinoflow.errors import DinoflowError
    from dinoflow.models import export_backbone
    from dinoflow.storage.client import join_uri
    from dinoflow.train.dist import init_distributed, shutdown
    from dinoflow.train.trainer import train

    make = build(spec, store)
    table = read_manifest(store, spec.manifest_uri)
    if spec.max_images is not None and table.num_rows > spec.max_images:
        idx = np.sort(np.random.default_rng(spec.seed).choice(table.num_rows, spec.max_images, replace=False))
        table = table.take(idx)
    images = ManifestSource(store.settings, table, resize_px=spec.image_px)
    torch.manual_seed(spec.seed)
    ctx = init_distributed()
    try:
        out = train(spec, images, store, spec.output_uri, ctx, progress=True, method_factory=make)
    finally:
        shutdown(ctx)
    if out.method is None and ctx.is_main:
        raise DinoflowError("the trainer returned no trained method")
    meta = {"method": "distill", "teacher_uri": spec.teacher_uri, "steps": out.steps}
    uris: dict[str, str] = {}
    if out.finished:
        for name in spec.students:
            uris[name] = join_uri(spec.output_uri, "students", name)
        if ctx.is_main:
            export_backbone(store, join_uri(spec.output_uri, "backbone"), out.method.export_backbone(), meta)
            for name, ema in out.method.export_students().items():
                uris[name] = export_backbone(store, uris[name], ema, meta)
    return DistillResult(
        output_uri=spec.output_uri,
        backbone_uris=uris,
        curves_uri=out.curves_uri or join_uri(spec.output_uri, "curves.jsonl"),
        checkpoint_uri=out.checkpoint_uri,
        teacher_uri=spec.teacher_uri,
        steps=out.steps,
        final_loss=out.final_loss,
    )
