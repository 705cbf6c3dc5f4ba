"""The export format: plain timm rebuilds an exported backbone and gives dinoflow's exact features."""

from __future__ import annotations

import json

import pytest
import torch

from dinoflow.data.idx import load_fashion_mnist
from dinoflow.models import create_backbone, export_backbone, load_backbone


@pytest.mark.parametrize("name", ["vit_test_p4_28", "vit_test_p4_28_reg2", "xcit_test_p8_28"])
def test_plain_timm_loads_export_and_gives_identical_features(store, bucket_uri, tmp_path, name):
    torch.manual_seed(0)
    bb = create_backbone(name)
    with torch.no_grad():  # move LayerScale etc. off their init so a wrong mapping would show
        for p in bb.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export_backbone(store, bucket_uri, bb)
    for f in ("backbone.json", "backbone.safetensors"):
        store.get_file(f"{bucket_uri}/{f}", tmp_path / f)

    # The README snippet, verbatim in spirit: three lines, only timm + safetensors + json.
    import safetensors.torch as st
    import timm

    meta = json.load(open(tmp_path / "backbone.json"))
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["model_args"]).eval()
    model.load_state_dict(st.load_file(tmp_path / "backbone.safetensors"))

    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(images[:8].copy())[:, None].float() / 255.0
    x = (x - torch.tensor(meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(meta["std"]).view(1, -1, 1, 1)
    ours = load_backbone(store, bucket_uri).encode(x)
    with torch.no_grad():
        theirs_cls = model(x)
        tokens = model.forward_features(x)
    prefix = getattr(model, "num_prefix_tokens", 1)
    assert theirs_cls.shape == ours["cls"].shape == (8, meta["embed_dim"])
    torch.testing.assert_close(theirs_cls, ours["cls"], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, prefix:], ours["patch"], rtol=0, atol=1e-5)
    assert not torch.allclose(ours["cls"][0], ours["cls"][1])  # features depend on the image
