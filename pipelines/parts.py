"""Pieces the pipelines share: a named embed task on the GPU pool, and evaluate-then-promote."""

from typing import Any

from dinoflow.components.embed import embed
from dinoflow.components.evaluate import evaluate
from dinoflow.components.promote import promote
from dinoflow.kfp.gpu import cpu_task, gpu_task


def embed_task(name: str, spec_json: Any, secret: Any, gpu: dict[str, Any], **args: Any) -> Any:
    """An embed task shown as ``name`` (several run in one pipeline: pool, seed, eval...)."""
    return gpu_task(embed(spec_json=spec_json, output_name=name, **args), secret, display_name=name, **gpu)


def evaluate_and_promote(
    backbone: Any,
    evaluate_spec: Any,
    promote_spec: Any,
    secret: Any,
    common: dict[str, Any],
    **evaluate_args: Any,
) -> Any:
    """Evaluate ``backbone`` (a pretrain or distill result), then promote it if it beats the champion."""
    ev = cpu_task(evaluate(spec_json=evaluate_spec, backbone=backbone, **evaluate_args, **common), secret)
    cpu_task(
        promote(spec_json=promote_spec, backbone=backbone, evaluation=ev.outputs["result"], **common), secret
    )
    return ev
