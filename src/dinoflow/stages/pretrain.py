"""pretrain: self-supervised pretraining of a backbone on a manifest (DINOv2; MAE / SplitMask plug in
as methods).

Writes under ``output_uri``: ``checkpoints/step-XXXXXXXX.pt`` (student, teacher, heads, optimizer,
schedule position, RNG states, data position; newest ``keep_checkpoints`` kept), ``backbone/`` (the
final TEACHER in the shared export format, plus ``heads.safetensors`` with the teacher's DINO/iBOT
heads for distillation) and ``curves.jsonl`` (one JSON object per step). A rerun after a crash
resumes from the newest checkpoint. ``nproc > 1`` re-launches under
``torchrun --standalone --nproc_per_node=N -m dinoflow.stages._worker``; under a launched world (a
TrainJob/PyTorchJob node's torchrun, ``nnodes > 1``) each process trains its share
(``dinoflow.stages._worker.launch_mode``).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from dinoflow.errors import DinoflowError
from dinoflow.stages._worker import check_divisible, launch_local, launch_mode
from dinoflow.stages.base import StageResult, StageSpec
from dinoflow.train.config import TrainConfig


class PretrainSpec(TrainConfig, StageSpec):
    manifest_uri: str = Field(..., description="Parquet manifest of the training images (s3://)")
    split: str | None = Field(None, description="keep only manifest rows of this split (e.g. 'train')")
    image_px: int | None = Field(
        None, ge=4, description="squash images to this square before cropping (default: crop the originals)"
    )
    nproc: int = Field(1, ge=1, description="processes (torchrun) on this node")
    nnodes: int = Field(1, ge=1, description="nodes; > 1 runs as a Kubeflow TrainJob/PyTorchJob")
    target_only: bool = Field(
        False,
        description="small-data mode (SplitMask paper): pretrain on a labelled target dataset's own "
        "train split, no curation; requires a labelled manifest and uses split 'train' unless set",
    )

    @model_validator(mode="after")
    def _target_only(self) -> PretrainSpec:
        if self.target_only and self.split is None:
            self.split = "train"
        return self


class PretrainResult(StageResult):
    backbone_uri: str = Field(..., description="exported teacher backbone prefix")
    heads_uri: str = Field("", description="teacher DINO/iBOT heads (safetensors)")
    checkpoint_uri: str = Field(..., description="newest checkpoint")
    curves_uri: str = Field(..., description="JSON lines, one per step")
    steps: int
    final_loss: float
    n_images: int = 0
    resumed_from_step: int = 0


def load_training_images(spec: PretrainSpec, store):
    """The training images as a stream source over the manifest's shards (nothing decoded here; the
    index holds runs of rows per shard, not a row per image: ``dinoflow.data.stream.ManifestSource``)."""
    from dinoflow.data.stream import ManifestSource

    return ManifestSource(
        store.settings, spec.manifest_uri, spec.image_px, split=spec.split, require_labels=spec.target_only
    )


def train_from_spec(spec: PretrainSpec, store) -> PretrainResult:
    """The in-process body (also what each torchrun worker runs)."""
    from dinoflow.models.export import export_backbone, export_heads, heads_uri
    from dinoflow.models.registry import get_entry
    from dinoflow.storage.client import join_uri
    from dinoflow.train.dist import init_distributed, shutdown
    from dinoflow.train.trainer import train

    get_entry(spec.backbone)
    images = load_training_images(spec, store)
    cfg = TrainConfig.model_validate(spec.model_dump(include=set(TrainConfig.model_fields)))
    ctx = init_distributed()
    try:
        out = train(cfg, images, store, spec.output_uri, ctx)
    finally:
        shutdown(ctx)
    backbone_uri = heads = ""
    if out.finished:
        backbone_uri = join_uri(spec.output_uri, "backbone")
        heads = heads_uri(backbone_uri) if cfg.method == "dinov2" else ""
        if ctx.is_main:
            if out.method is None:
                raise DinoflowError("the trainer returned no trained method on rank 0")
            meta = {"method": cfg.method, "steps": out.total_steps}
            export_backbone(store, backbone_uri, out.method.export_backbone(), meta)
            if heads:
                export_heads(store, backbone_uri, out.method.head_state())
    return PretrainResult(
        output_uri=spec.output_uri,
        backbone_uri=backbone_uri,
        heads_uri=heads,
        checkpoint_uri=out.checkpoint_uri or "",
        curves_uri=out.curves_uri or "",
        steps=out.steps,
        final_loss=out.final_loss,
        n_images=len(images),
        resumed_from_step=out.resumed_from_step,
    )


def _check(spec: PretrainSpec) -> None:
    from dinoflow.methods import method_class
    from dinoflow.models.registry import get_entry

    get_entry(spec.backbone)
    method_class(spec.method)
    check_divisible(spec)


def run(spec: PretrainSpec, store) -> PretrainResult:
    _check(spec)
    if launch_mode(spec) == "torchrun":
        return launch_local("pretrain", spec, store, PretrainResult)
    return train_from_spec(spec, store)  # one process, or this process's share of a launched world
