"""Pieces the pipelines share: one GPU of the pool, and evaluate-then-promote (the curation subgraph
is in ``curation.py``)."""

from typing import Any

from dinoflow.components.evaluate import evaluate
from dinoflow.components.promote import promote
from dinoflow.kfp.gpu import cpu_task, gpu_task


def one_gpu(gpu: dict[str, Any]) -> dict[str, Any]:
    """The GPU pool's placement with one GPU: embed and evaluate run one device each."""
    return {**gpu, "gpus": 1}


def evaluate_only(
    backbone: Any,
    evaluate_spec: Any,
    secret: Any,
    common: dict[str, Any],
    gpu: dict[str, Any],
    name: str | None = None,
    **args: Any,
) -> Any:
    """Evaluate ``backbone`` on one GPU of the pool; ``name``: its own output name and display name
    (the full run scores its pretrained teacher this way beside the distilled student it promotes)."""
    named = {"output_name": name} if name else {}
    return gpu_task(
        evaluate(spec_json=evaluate_spec, backbone=backbone, **named, **args, **common),
        secret,
        display_name=name,
        **one_gpu(gpu),
    )


def evaluate_and_promote(
    backbone: Any,
    evaluate_spec: Any,
    promote_spec: Any,
    secret: Any,
    common: dict[str, Any],
    gpu: dict[str, Any],
    registry: dict[str, Any] | None = None,
    **evaluate_args: Any,
) -> Any:
    """Evaluate ``backbone`` (a pretrain or distill result) on one GPU of the pool, then promote it if
    it beats the champion (``registry``: the model_name and registry_uri inputs of promote)."""
    ev = evaluate_only(backbone, evaluate_spec, secret, common, gpu, **evaluate_args)
    cpu_task(
        promote(
            spec_json=promote_spec,
            backbone=backbone,
            evaluation=ev.outputs["result"],
            **(registry or {}),
            **common,
        ),
        secret,
    )
    return ev
