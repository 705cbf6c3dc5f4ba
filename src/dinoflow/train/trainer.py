"""The shared trainer: one loop for every method, 1 process or many (torchrun; DDP or FSDP2).

Data comes as an in-memory uint8 tensor ``[N, C, H, W]`` (every rank holds it; each rank takes its
slice of every global batch) and is augmented on the device by the method's ``prepare``. The
position in the data is a pure function of the step (per-epoch permutation seeded by
``seed + epoch``), and every step reseeds its random generators from ``(seed, step, rank)``, so a run
resumed from a checkpoint replays the interrupted run exactly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dinoflow import metrics
from dinoflow.errors import SpecError
from dinoflow.losses.schedules import cosine
from dinoflow.methods import method_class
from dinoflow.methods.base import BatchView, Method, StepState, merge_groups
from dinoflow.models import create_backbone, export_backbone, load_backbone
from dinoflow.storage.client import ObjectStore, join_uri
from dinoflow.train import checkpoint as ckpt
from dinoflow.train.config import TrainConfig
from dinoflow.train.dist import DistContext

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    steps: int
    final_loss: float
    curves: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0
    backbone_uri: str | None = None
    checkpoint_uri: str | None = None
    curves_uri: str | None = None
    method: Method | None = None


def build_method(cfg: TrainConfig, store: ObjectStore | None = None) -> Method:
    bb = create_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate)
    if cfg.init_backbone_uri:
        if store is None:
            raise SpecError("init_backbone_uri needs an object store")
        init = load_backbone(store, cfg.init_backbone_uri)
        if init.timm_model != bb.timm_model or init.embed_dim != bb.embed_dim:
            raise SpecError(
                f"init_backbone_uri {cfg.init_backbone_uri} holds {init.name} (dim {init.embed_dim}); "
                f"the spec trains {cfg.backbone} (dim {bb.embed_dim})"
            )
        bb.model.load_state_dict(init.model.state_dict())
        bb.mask_token.data.copy_(init.mask_token.data)
    cls = method_class(cfg.method)
    if cfg.method == "dinov2":
        return cls(bb, cfg.dinov2, cfg.crops)
    return cls.from_config(bb, cfg)  # other methods: a classmethod taking the TrainConfig


def _wrap(method: Method, cfg: TrainConfig, ctx: DistContext) -> nn.Module:
    """The module whose forward the loop calls (DDP wrapper, or the FSDP2-sharded method)."""
    if cfg.compile:
        for name, mod in method.named_modules():
            if name.endswith("blocks") and isinstance(mod, nn.Sequential | nn.ModuleList):
                for blk in mod:
                    blk.compile()
    if not ctx.enabled:
        return method
    if cfg.distributed == "fsdp2":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for part in ("student", "teacher"):
            tree = getattr(method, part, None)
            if not isinstance(tree, nn.ModuleDict):
                continue
            for child in tree.values():
                for mod in child.modules():
                    if type(mod).__name__ in ("Block", "XCABlock", "ClassAttentionBlock"):
                        fully_shard(mod)
                fully_shard(child)
                if hasattr(child, "encode"):
                    register_fsdp_forward_method(child, "encode")  # backbones run through encode()
        fully_shard(method)
        return method
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(method, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def make_optimizer(method: Method, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over few merged groups (one per (lr_mult, wd_mult)), with the fused kernel where it runs
    (plain/DDP parameters on CPU or CUDA) and the multi-tensor ``foreach`` path otherwise (FSDP2)."""
    groups = merge_groups(method.param_groups(cfg.optim.layer_decay, cfg.optim.patch_embed_lr_mult))
    sharded = cfg.distributed == "fsdp2" and torch.distributed.is_initialized()
    impl = {"foreach": True} if sharded or device.type not in ("cpu", "cuda") else {"fused": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2), **impl)


def student_modules(method: Method) -> list[nn.Module]:
    """The modules whose gradients are clipped separately (official DINOv2: each student part)."""
    student = getattr(method, "student", None)
    return list(student.values()) if isinstance(student, nn.ModuleDict) else [method]


def train_step(
    method: Method,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    view: BatchView,
    state: StepState,
    autocast: bool = False,
    clip_grad: float = 0.0,
    clip_modules: list[nn.Module] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step on this rank's uint8 images ``x``: augment (``prepare``), forward, backward,
    clip, AdamW, EMA (``after_step``). ``model`` is ``method`` or its DDP/FSDP2 wrapper. The trainer
    and ``dinoflow bench train-step`` both run exactly this."""
    batch = method.prepare(x, view)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss, logs = model(batch, state)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(state)
    if clip_grad > 0:
        for mod in clip_modules if clip_modules is not None else [method]:
            params = [p for p in mod.parameters() if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
    opt.step()
    method.after_step(state)
    return loss, logs


def global_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    spe = n // batch
    epoch, i = divmod(step, spe)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[i * batch : (i + 1) * batch]


def train(
    cfg: TrainConfig,
    images: torch.Tensor,
    store: ObjectStore | None,
    output_uri: str,
    ctx: DistContext | None = None,
    progress: bool = True,
    max_steps_this_run: int | None = None,
    method_factory: Callable[[], Method] | None = None,
) -> TrainOutcome:
    """Train ``cfg.method`` on ``images`` (uint8 ``[N, C, H, W]``); checkpoints, curves and the final
    backbone go under ``output_uri``. Resumes from the newest checkpoint found there.
    ``store=None`` persists nothing (no resume, no checkpoint, no export; the trained method is in the
    outcome): for benchmarks and device smoke checks that have no object store.
    ``method_factory`` builds the method when it needs more than ``cfg`` (distillation: a teacher)."""
    ctx = ctx or DistContext()
    n = images.shape[0]
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise SpecError(
            f"training images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if cfg.batch_size % ctx.world_size:
        raise SpecError(f"batch_size {cfg.batch_size} must be divisible by the {ctx.world_size} processes")
    if n < cfg.batch_size:
        raise SpecError(f"{n} images is fewer than one batch of {cfg.batch_size}")
    local_b = cfg.batch_size // ctx.world_size
    spe = n // cfg.batch_size
    total = cfg.total_steps(n)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    make = method_factory or (lambda: build_method(cfg, store))
    method = make().to(ctx.device)
    if images.shape[1] != method.export_backbone().in_chans:
        raise SpecError(
            f"images have {images.shape[1]} channels but {cfg.backbone} wants {method.export_backbone().in_chans}"
        )
    fit_data = getattr(method, "fit_data", None)
    if fit_data is not None:  # e.g. SplitMask's k-means tokenizer; deterministic, so equal on every rank
        fit_data(images, seed=cfg.seed)
    model = _wrap(method, cfg, ctx)
    opt = make_optimizer(method, cfg, ctx.device)

    start, curves = 0, []
    found = ckpt.list_checkpoints(store, output_uri) if store is not None else []
    if found:
        step0, uri = found[-1]
        state = ckpt.load_checkpoint(store, uri)
        ckpt.load_full_state(method, opt, state["model"], state["optimizer"])
        ckpt.set_rng_state(state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0])
        start, curves = state["step"], state["curves"]
        if ctx.is_main:
            log.info("resumed from %s (step %d of %d)", uri, start, total)

    if ctx.is_main and cfg.metrics_port:
        metrics.serve_metrics(cfg.metrics_port)
    autocast = cfg.precision == "bf16" and ctx.device.type == "cuda"
    peak_lr = cfg.peak_lr()
    clip_modules = student_modules(method)
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{cfg.method} {cfg.backbone}", unit="step")
    stop = total if max_steps_this_run is None else min(total, start + max_steps_this_run)
    last_ckpt_uri = found[-1][1] if found else None
    loss_val = float("nan")
    method.train()
    for step in range(start, stop):
        t0 = time.perf_counter()
        state = StepState(step, total, spe, ctx.world_size, ctx.rank)
        lr = cosine(step, total, peak_lr, cfg.optim.min_lr, cfg.optim.warmup_steps)
        wd = cosine(step, total, cfg.optim.weight_decay_start, cfg.optim.weight_decay_end)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
            g["weight_decay"] = wd * g["wd_mult"]
        torch.manual_seed(cfg.seed * 7919 + step * 131 + ctx.rank)  # drop path etc.: replayable
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # shared by all ranks
        idx = global_indices(step, n, cfg.batch_size, cfg.seed)[ctx.rank * local_b : (ctx.rank + 1) * local_b]
        x = images[idx].to(ctx.device, non_blocking=True)
        view = BatchView(gen, ctx.rank * local_b, cfg.batch_size)
        loss, logs = train_step(
            method, model, opt, x, view, state, autocast, cfg.optim.clip_grad, clip_modules
        )
        if ctx.enabled:  # log the global-batch mean, not rank 0's half
            keys = sorted(k for k in logs if k.endswith("loss"))
            vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(vals)
            logs.update({k: float(v) / ctx.world_size for k, v in zip(keys, vals, strict=True)})
        loss_val = float(logs.get("loss", float(loss.detach())))
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "lr": lr, "wd": wd, "step_seconds": dt, **logs}
        curves.append(row)
        metrics.TRAIN_STEP_SECONDS.labels(cfg.method).observe(dt)
        metrics.TRAIN_IMAGES_PER_SECOND.labels(cfg.method).set(cfg.batch_size / dt)
        metrics.TRAIN_STEP.labels(cfg.method).set(step + 1)
        for k, v in logs.items():
            if k.endswith("loss"):
                metrics.TRAIN_LOSS.labels(cfg.method, k).set(v)
        if bar is not None:
            bar.update(1)
            if (step + 1) % cfg.log_every_steps == 0:
                bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}")
        if store is not None and ((step + 1) % cfg.checkpoint_every_steps == 0 or step + 1 == total):
            last_ckpt_uri = _save(store, output_uri, cfg, method, opt, step + 1, curves, ctx)
    if bar is not None:
        bar.close()

    out = TrainOutcome(stop, loss_val, curves, start, checkpoint_uri=last_ckpt_uri, method=method)
    if stop == total and store is not None:
        out.curves_uri = join_uri(output_uri, "curves.jsonl")
        out.backbone_uri = join_uri(output_uri, "backbone")
        if ctx.is_main:
            _write_curves(store, out.curves_uri, curves)
            sharded = cfg.distributed == "fsdp2" and ctx.enabled
            full = _unsharded_copy(method, make, ctx) if sharded else method
            assert full is not None
            export_backbone(
                store, out.backbone_uri, full.export_backbone(), {"method": cfg.method, "steps": total}
            )
            heads = full.head_state()
            if heads:
                from safetensors.torch import save

                store.put_bytes(join_uri(out.backbone_uri, "heads.safetensors"), save(heads))
        elif cfg.distributed == "fsdp2" and ctx.enabled:
            _unsharded_copy(method, make, ctx)
        ctx.barrier()
    if curves:
        out.final_loss = float(curves[-1]["loss"])
    return out


def _unsharded_copy(method: Method, make: Callable[[], Method], ctx: DistContext) -> Method | None:
    """Gather FSDP2 shards into a plain copy of the method on rank 0 (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    plain = make()
    plain.load_state_dict(sd)
    return plain


def _save(store, output_uri, cfg, method, opt, step, curves, ctx) -> str | None:
    msd, osd = ckpt.full_state(method, opt)
    rng = ckpt.rng_state()
    rngs: list[Any] = [rng]
    if ctx.enabled:
        import torch.distributed as dist

        rngs = [None] * ctx.world_size
        dist.all_gather_object(rngs, rng)
    uri = None
    if ctx.is_main:
        payload = {
            "model": msd,
            "optimizer": osd,
            "step": step,
            "rng": rngs,
            "data_position": {"step": step, "samples_seen": step * cfg.batch_size},
            "curves": curves,
            "config": cfg.model_dump(mode="json"),
        }
        uri = ckpt.save_checkpoint(store, output_uri, step, payload, cfg.keep_checkpoints)
        _write_curves(store, join_uri(output_uri, "curves.jsonl"), curves)
    ctx.barrier()
    return uri


def _write_curves(store: ObjectStore, uri: str, curves: list[dict[str, float]]) -> None:
    store.put_bytes(uri, "".join(json.dumps(r) + "\n" for r in curves).encode(), "application/x-ndjson")
