"""Backbones: encode() outputs, mask-token path, dynamic size, export -> plain timm reproduces features."""

from __future__ import annotations

import pytest
import torch

from dinoflow.errors import SpecError
from dinoflow.models import create_backbone, export_backbone, load_backbone
from dinoflow.models.registry import BACKBONES

torch.set_num_threads(2)


@pytest.mark.parametrize("name", ["vit_test_p4_28", "vit_test_p4_28_reg2", "xcit_test_p8_28"])
def test_encode_shapes_and_masks(name):
    torch.manual_seed(0)
    bb = create_backbone(name).eval()
    for px in (28, 12):
        x = torch.randn(2, 1, px, px)
        gh, gw = bb.patch_grid(px, px)
        out = bb.encode(x, n_last_blocks=2)
        assert out["cls"].shape == (2, bb.embed_dim)
        assert out["patch"].shape == (2, gh * gw, bb.embed_dim)
        assert len(out["cls_blocks"]) == 2 and torch.equal(out["cls_blocks"][-1], out["cls"])
    # Masking every patch of sample 0 changes sample 0 only; the mask token is what it sees.
    x = torch.randn(2, 1, 28, 28)
    n = bb.patch_grid(28, 28)[0] * bb.patch_grid(28, 28)[1]
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[0] = True
    with torch.no_grad():
        bb.mask_token.fill_(0.5)
        a, b = bb.encode(x)["cls"], bb.encode(x, masks)["cls"]
        other = x.clone()
        other[0] = torch.randn(1, 28, 28)
        c = bb.encode(other, masks)["cls"]
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
    assert torch.allclose(b[0], c[0], atol=1e-4) or name.startswith(
        "xcit"
    )  # XCiT: BatchNorm in eval is per-sample too
    with pytest.raises(SpecError, match="masks must be"):
        bb.encode(x, masks[:, :3])


def test_registry_has_dinov2_shapes():
    import timm

    g = BACKBONES["vit_giant2_p14"]
    # Build on the meta device: giant2 = dim 1536, 40 layers, 24 heads, SwiGLU (DINOv2 paper).
    with torch.device("meta"):
        m = timm.create_model(g.timm_model, pretrained=False, num_classes=0, **g.model_args)
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (1536, 40, 24)
    mlp = m.blocks[0].mlp  # timm's packed SwiGLU: a gated MLP with SiLU, hidden 4096 as in giant2
    assert type(mlp.act).__name__ == "SiLU" and mlp.fc2.in_features == 4096
    assert m.patch_embed.patch_size == (14, 14)
    with pytest.raises(SpecError, match="unknown backbone"):
        create_backbone("vit_nonexistent")


@pytest.mark.parametrize("name", ["vit_test_p4_28_reg2", "xcit_test_p8_28"])
def test_export_reloads_in_plain_timm(store, bucket_uri, name):
    import timm
    from safetensors.torch import load

    torch.manual_seed(1)
    bb = create_backbone(name, drop_path_rate=0.2).eval()
    with torch.no_grad():
        bb.mask_token.normal_()
    export_backbone(store, bucket_uri + "/bb", bb)
    meta = store.get_json(bucket_uri + "/bb/backbone.json")
    plain = timm.create_model(meta["timm_model"], pretrained=False, **meta["model_args"]).eval()
    plain.load_state_dict(load(store.get_bytes(bucket_uri + "/bb/backbone.safetensors")))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ours = bb.encode(x)["cls"]
        theirs = plain.forward_features(x)[:, 0]
        again = load_backbone(store, bucket_uri + "/bb")
        torch.testing.assert_close(again.encode(x)["cls"], ours)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again.mask_token, bb.mask_token)
    assert meta["embed_dim"] == bb.embed_dim and meta["in_chans"] == 1


def _grads(bb, x, masks, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss on encode()'s outputs, and how many times block 0's forward started (a
    recomputation stops once it has what the backward needs, so a forward *pre*-hook counts it)."""
    bb.activation_checkpointing = checkpointing
    calls = []
    hook = bb.model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    bb.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # drop path draws: the recomputation must replay them
    out = bb.encode(x, masks, n_last_blocks=2)
    loss = out["cls"].square().sum() + out["patch"].pow(3).mean() + out["cls_blocks"][0].abs().sum()
    loss.backward()
    hook.remove()
    return {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}, len(calls)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    bb = create_backbone("vit_test_p4_28", drop_path_rate=0.3).train()
    x = torch.randn(4, 1, 28, 28)
    masks = torch.rand(4, 49) < 0.4
    plain, runs_plain = _grads(bb, x, masks, checkpointing=False)
    ckpt, runs_ckpt = _grads(bb, x, masks, checkpointing=True)
    # Checkpointing really recomputes (each block runs again in the backward) ...
    assert (runs_plain, runs_ckpt) == (1, 2)
    # ... and changes nothing: every gradient is equal, the mask token's and the drop-path blocks' too.
    assert plain.keys() == ckpt.keys() and "mask_token" in plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-7, msg=k)
    # Without a gradient (the teacher) nothing is recomputed; the blocks stay plain modules.
    with torch.no_grad():
        calls = []
        hook = bb.model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        bb.encode(x)
        hook.remove()
    assert len(calls) == 1
    assert bb.block_modules() == list(bb.model.blocks)
    assert all(k.startswith(("model.", "mask_token")) for k in bb.state_dict())


def test_activation_checkpointing_is_vit_only():
    bb = create_backbone("xcit_test_p8_28")
    with pytest.raises(SpecError, match="ViT"):
        bb.activation_checkpointing = True
    assert not bb.activation_checkpointing
