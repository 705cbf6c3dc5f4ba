"""The trainer's speed and memory settings change cost, never results: activation checkpointing gives
the same DINOv2 and MAE steps; the EMA teacher update is a fixed handful of multi-tensor calls;
local crops go through the student in one forward; under bf16 autocast the prototype matmuls run
in bf16 while every softmax and loss stays float32; torch.compile of the blocks, heads and losses
(slow: it compiles) gives the eager step's numbers."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinoflow.errors import SpecError
from dinoflow.methods.base import BatchView, StepState
from dinoflow.methods.dinov2 import DINOv2
from dinoflow.train.config import TrainConfig
from dinoflow.train.trainer import bf16_autocast, build_method, make_optimizer, speed_up, train_step

torch.set_num_threads(2)
HEAD = {
    "head_prototypes": 64,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
    "freeze_prototypes_epochs": 0,
}
CROPS = {"global_crop_px": 28, "local_crops_number": 2, "local_crop_px": 12}
MAE = {"decoder": {"dim": 32, "depth": 1, "heads": 2}}


def _cfg(**kw) -> TrainConfig:
    base = {"backbone": "vit_test_p4_28", "batch_size": 8, "dinov2": HEAD, "crops": CROPS, "mae": MAE}
    return TrainConfig(**{**base, **kw})


def _images(n: int = 8) -> torch.Tensor:
    from dinoflow.data.idx import load_fashion_mnist

    x, _ = load_fashion_mnist("test")
    return torch.from_numpy(x[:n].copy()).unsqueeze(1)


def _run(
    cfg: TrainConfig, steps: int = 2, device: torch.device | None = None, autocast: bool = False
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` trainer steps from seed 0 (the trainer's own ``train_step``; ``device`` as the trainer
    passes it to ``speed_up``, ``autocast`` its bf16 flag); losses and weights."""
    torch.manual_seed(0)
    method = speed_up(build_method(cfg), cfg, device)
    method.train()
    opt = make_optimizer(method, cfg, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 1e-3 * g["lr_mult"], 0.04 * g["wd_mult"]
    x, losses = _images(cfg.batch_size), []
    for step in range(steps):
        torch.manual_seed(100 + step)  # drop path: the trainer reseeds every step the same way
        view = BatchView(torch.Generator().manual_seed(step), 0, cfg.batch_size)
        loss, _ = train_step(
            method, method, opt, x, view, StepState(step, 10, 5), autocast, cfg.optim.clip_grad
        )
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_activation_checkpointing_changes_no_number(method):
    cfg = _cfg(method=method, drop_path_rate=0.2)
    ref_losses, ref = _run(cfg)
    losses, got = _run(cfg.model_copy(update={"activation_checkpointing": True}))
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_checkpointing_reaches_every_trained_backbone_and_only_those():
    cfg = _cfg(activation_checkpointing=True)
    m = speed_up(build_method(cfg), cfg)
    assert m.student["backbone"].activation_checkpointing
    assert not m.teacher["backbone"].activation_checkpointing  # never trains: nothing to recompute
    mae = speed_up(build_method(_cfg(method="mae", activation_checkpointing=True)), cfg)
    calls = []
    mae.backbone.model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    batch = mae.prepare(_images(), BatchView(torch.Generator().manual_seed(0), 0, 8))
    mae(batch, StepState(0, 10))[0].backward()  # MAE's visible-token pass: through forward_blocks
    assert len(calls) == 2  # forward + recomputation
    with pytest.raises(SpecError, match="ViT"):
        speed_up(build_method(_cfg(backbone="xcit_test_p8_28")), _cfg(activation_checkpointing=True))


class _Ops(TorchDispatchMode):
    """Records every aten op with its input and output dtypes and shapes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        meta = lambda xs: [(t.dtype, tuple(t.shape)) for t in xs if isinstance(t, torch.Tensor)]  # noqa: E731
        outs = out if isinstance(out, tuple | list) else [out]
        self.ops.append((str(func.overloadpacket.__name__), meta(args), meta(outs)))
        return out


def test_ema_is_a_fixed_handful_of_multi_tensor_calls():
    m = build_method(_cfg())
    n_params = sum(1 for _ in m.teacher.parameters())
    with _Ops() as rec:
        m.after_step(StepState(0, 10))
    names = [op for op, _, _ in rec.ops]
    # whatever the number of modules (here n_params tensors): one mul, one add, one buffer copy
    assert names.count("_foreach_mul_") == 1 and names.count("_foreach_add_") == 1, names
    assert names.count("_foreach_copy_") == 1 and "copy_" not in names and n_params > 20
    assert len(names) <= 4


def test_local_crops_are_one_student_forward():
    cfg = _cfg()
    m = build_method(cfg)
    assert isinstance(m, DINOv2)
    batch = m.prepare(_images(), BatchView(torch.Generator().manual_seed(0), 0, 8))
    assert batch["local"].shape == (2 * 8, 1, 12, 12)  # crop-major: all local crops in one tensor
    seen = []
    m.student["backbone"].model.patch_embed.register_forward_hook(
        lambda _m, inp, _o: seen.append(inp[0].shape)
    )
    m(batch, StepState(0, 10))
    assert seen == [(2 * 8, 1, 28, 28), (2 * 8, 1, 12, 12)]  # global crops, then all local crops


def test_bf16_prototype_matmuls_with_float32_softmax_and_losses():
    """Under autocast (CPU here, CUDA in training) the heads' matmuls run in bf16; the student
    log-softmax, the Sinkhorn-Knopp targets and every loss are float32."""
    cfg = _cfg()
    torch.manual_seed(0)
    m = build_method(cfg)
    batch = m.prepare(_images(), BatchView(torch.Generator().manual_seed(0), 0, 8))
    k = cfg.dinov2.head_prototypes
    with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as rec:
        loss, logs = m(batch, StepState(0, 10))
    proto = [o for op, _, o in rec.ops if op in ("mm", "addmm", "linear") and o and o[0][1][-1] == k]
    assert proto and all(o[0][0] == torch.bfloat16 for o in proto), proto
    softmaxes = [(op, i) for op, i, _ in rec.ops if op in ("_log_softmax", "_softmax", "exp") and i]
    assert softmaxes and all(i[0][0] == torch.float32 for _, i in softmaxes), softmaxes
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(v.dtype in (torch.float32, torch.float64) for v in logs.values())


def test_fp32_heads_run_the_prototypes_in_float32_under_autocast():
    """``fp32_heads``: the heads' matmuls leave autocast (float32) while the backbone's stay bf16."""
    cfg = _cfg(fp32_heads=True)
    torch.manual_seed(0)
    m = speed_up(build_method(cfg), cfg)
    batch = m.prepare(_images(), BatchView(torch.Generator().manual_seed(0), 0, 8))
    k = cfg.dinov2.head_prototypes
    with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as rec:
        loss, _ = m(batch, StepState(0, 10))
    mms = [o for op, _, o in rec.ops if op in ("mm", "addmm", "linear") and o]
    proto = [o for o in mms if o[0][1][-1] == k]
    assert proto and all(o[0][0] == torch.float32 for o in proto), proto
    assert any(o[0][0] == torch.bfloat16 for o in mms)  # the backbone's linear layers
    assert torch.isfinite(loss)


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_on_the_cpu_needs_its_matrix_units(monkeypatch, amx):
    """``bf16`` on a CPU without AMX is refused (it would run slower than float32); ``auto`` falls back."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bf16_autocast("fp32", cpu) is False
    assert bf16_autocast("auto", cpu) is amx
    if amx:
        assert bf16_autocast("bf16", cpu) is True
    else:
        with pytest.raises(SpecError, match="no bf16 matrix units"):
            bf16_autocast("bf16", cpu)


def _attention_modules(method) -> list[torch.nn.Module]:
    return [m for m in method.modules() if hasattr(m, "fused_attn")]


def test_explicit_attention_is_the_fused_kernels_maths():
    torch.manual_seed(0)
    bb = build_method(_cfg()).student["backbone"].eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        fused = bb.encode(x)
        bb.set_fused_attention(False)
        explicit = bb.encode(x)
    torch.testing.assert_close(explicit["cls"], fused["cls"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit["patch"], fused["patch"], rtol=1e-5, atol=1e-5)


def test_bf16_step_on_the_cpu_runs_explicit_attention_within_bf16_rounding(monkeypatch):
    """With bf16 on the CPU every backbone (student and teacher) drops the fused attention kernel,
    whose bf16 backward is slow there; a float32 config keeps it. The bf16 steps give finite losses
    within bf16 rounding of the float32 ones."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    cpu = torch.device("cpu")
    fp32 = speed_up(build_method(_cfg()), _cfg(), cpu)
    assert _attention_modules(fp32) and all(m.fused_attn for m in _attention_modules(fp32))
    cfg = _cfg(precision="bf16")
    method = speed_up(build_method(cfg), cfg, cpu)
    assert len(_attention_modules(method)) == len(_attention_modules(fp32))
    assert not any(m.fused_attn for m in _attention_modules(method))
    ref, _ = _run(_cfg(), steps=2)
    losses, _ = _run(cfg, steps=2, device=cpu, autocast=True)
    assert losses == pytest.approx(ref, rel=0.02)


@pytest.mark.slow
def test_compiled_blocks_heads_and_losses_match_eager():
    # KoLeo off: at initialisation the tiny model's CLS features nearly coincide (nearest-neighbour
    # distances ~1e-5 on the unit sphere), so -log(distance) amplifies rounding differences.
    cfg = _cfg(activation_checkpointing=True, dinov2={**HEAD, "koleo_loss_weight": 0.0})
    ref_losses, ref = _run(cfg, steps=3)
    losses, got = _run(cfg.model_copy(update={"compile": True, "compile_heads": True}), steps=3)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-4, msg=k)


def test_fsdp2_units_with_checkpointing_match_one_plain_process(store, bucket_uri):
    """2-process torchrun (gloo), FSDP2 sharding each block, activation checkpointing on: a sharded
    block re-gathers its weights for the recomputation, and the run equals 1 plain process."""
    from test_train_distributed import _make_manifest, _params, _spec

    from dinoflow.stages import get_stage

    manifest = _make_manifest(store, bucket_uri + "/data", 24)
    stage = get_stage("pretrain")
    one = stage.run(stage.parse_spec(_spec(bucket_uri + "/one", manifest, steps=2)), store)
    spec = _spec(
        bucket_uri + "/two", manifest, steps=2, nproc=2, distributed="fsdp2", activation_checkpointing=True
    )
    two = stage.run(stage.parse_spec(spec), store)
    p1, p2 = _params(store, one.checkpoint_uri), _params(store, two.checkpoint_uri)
    assert p1.keys() == p2.keys() and two.steps == 2
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-4, msg=k)
