"""A Markdown model card: data, method, budget, metrics, limits (plus how to load the weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CardData:
    model_name: str
    backbone_uri: str
    backbone: dict[str, Any]  # backbone.json
    train_manifest_uri: str
    test_manifest_uri: str
    num_train: int
    num_test: int
    class_names: list[str]
    metrics: dict[str, float]
    baseline: dict[str, float]
    selection: dict[str, Any] = field(default_factory=dict)  # chosen probe / C, held-out size
    training: dict[str, Any] = field(default_factory=dict)  # stage, method, steps, batch, seconds, data
    report_uri: str | None = None


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def render_card(c: CardData) -> str:
    bb = c.backbone
    lines = [
        f"# Model card: {c.model_name}",
        "",
        f"A self-supervised vision backbone made by dinoflow, stored at `{c.backbone_uri}`.",
        "",
        "## Model",
        f"- Architecture: `{bb.get('dinoflow_backbone')}` = timm `{bb.get('timm_model')}` "
        f"(width {bb.get('embed_dim')}, patch {bb.get('patch_size')}, input {bb.get('img_size')} px, "
        f"{bb.get('in_chans')} channel(s))",
        f"- Input normalisation: mean {bb.get('mean')}, std {bb.get('std')} (pixels scaled to [0, 1] first)",
        "- Output: the CLS token of the last block (normalised), width "
        f"{bb.get('embed_dim')}; patch tokens are available through `forward_features`.",
        "",
        "## Method and budget",
    ]
    if c.training:
        for k, v in c.training.items():
            lines.append(f"- {k}: {v}")
    else:
        lines.append("- Not recorded: the evaluation was not given the training run (training_uri).")
    lines += [
        "",
        "## Evaluation data",
        f"- Train (features for k-NN and probes): `{c.train_manifest_uri}`, {c.num_train} images",
        f"- Test: `{c.test_manifest_uri}`, {c.num_test} images",
        f"- Classes ({len(c.class_names)}): {', '.join(c.class_names)}",
        "",
        "## Metrics (top-1 %, test split)",
        "",
        "| protocol | this backbone | raw pixels |",
        "|---|---:|---:|",
    ]
    for name in sorted(set(c.metrics) | set(c.baseline)):
        lines.append(f"| {name} | {_pct(c.metrics.get(name))} | {_pct(c.baseline.get(name))} |")
    lines += [
        "",
        "Protocols (DINOv2): weighted k-NN on the cosine similarity of CLS features, T = 0.07; linear probes",
        "over learning rate x {CLS, CLS + mean-pooled patches} x {last block, last 4 blocks}; L2 logistic",
        "regression. Every choice is made on a held-out part of the train split, never on test.",
    ]
    if c.selection:
        lines.append("")
        for k, v in c.selection.items():
            lines.append(f"- {k}: {v}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import json, timm, safetensors.torch as st  # files from the backbone prefix above",
        'meta = json.load(open("backbone.json"))',
        'model = timm.create_model(meta["timm_model"], pretrained=False, **meta["model_args"]).eval()',
        'model.load_state_dict(st.load_file("backbone.safetensors"))  # model(x) -> CLS features',
        "```",
        "",
        "## Limits",
        "- Scores hold for the evaluation data above only; a different domain, resolution or label set",
        "  needs its own evaluation.",
        "- Self-supervised features inherit the biases of the pretraining images; no fairness or",
        "  robustness evaluation was run.",
        "- Small CPU runs (tiny models, few steps) show that the pipeline works, not state-of-the-art",
        "  quality; compare with the raw-pixel baseline above before using the features.",
    ]
    if c.report_uri:
        lines += ["", f"Full report (curves, confusion matrix, retrieval, PCA): `{c.report_uri}`"]
    return "\n".join(lines) + "\n"
