"""The shared trainer: one loop for every method, 1 process or many (torchrun; DDP or FSDP2).

Data streams (``dinoflow.data.stream``): an ``ImageSource`` (a manifest's shards, or an in-memory
uint8 tensor ``[N, C, H, W]`` for tests and benches) is read by DataLoader workers that decode each
image and cut the method's random-resized crops from it at its own size and aspect; each rank gets
its slice of every global batch, and the method's ``prepare`` finishes the augmentation on the
device. The stream's position is a pure function of the step (recorded in the checkpoint as
``data_position``), and every step reseeds its random generators from ``(seed, step, rank)``, so a
run resumed from a checkpoint replays the interrupted run exactly.

The trainer writes what training needs to resume and to be followed (``checkpoints/`` and
``curves.jsonl`` under the ``output_uri`` the caller gives); exporting the trained method is the
caller's business (``TrainOutcome.method`` is the full, unsharded method on rank 0).

Logs stay on the device as tensors between logging intervals; every ``log_every_steps`` steps they
are read back in one transfer, all-reduced across ranks, appended to the curves and recorded in the
Prometheus metrics, so the steps in between never wait for the device.
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
from dinoflow.data.stream import Batches, ImageSource, StreamPlan, TensorSource, TrainStream
from dinoflow.errors import SpecError
from dinoflow.losses.schedules import cosine
from dinoflow.methods import build_method
from dinoflow.methods.base import BatchView, Logs, Method, StepState, merge_groups
from dinoflow.storage.client import ObjectStore, join_uri
from dinoflow.train import checkpoint as ckpt
from dinoflow.train.config import TrainConfig
from dinoflow.train.dist import DistContext

log = logging.getLogger(__name__)

FIT_IMAGES = 10_000  # images a method's fit_data sees (e.g. SplitMask's k-means tokenizer)


@dataclass
class TrainOutcome:
    steps: int
    final_loss: float
    curves: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0
    total_steps: int = 0
    checkpoint_uri: str | None = None
    curves_uri: str | None = None
    method: Method | None = None  # the trained method; None on ranks > 0 of a sharded (FSDP2) run

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


__all__ = [
    "TrainOutcome",
    "bf16_autocast",
    "build_method",
    "fast_bf16",
    "make_optimizer",
    "speed_up",
    "stream_plan",
    "train",
    "train_step",
]


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU with bf16 (Ampere or newer), or
    a CPU with AMX tiles (Intel Sapphire Rapids or newer), where oneDNN runs bf16 matmuls ~4-5x faster
    than float32 ones (README, *pretrain*, "bf16 on the CPU")."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe is not None and probe())
    return False


def bf16_autocast(precision: str, device: torch.device) -> bool:
    """Whether the step runs under bf16 autocast: ``bf16`` asks for it (an error where the device has
    no bf16 matrix units: it would run slower than float32), ``auto`` takes it where it is fast."""
    if precision == "fp32":
        return False
    fast = fast_bf16(device)
    if precision == "bf16" and not fast:
        raise SpecError(
            f"precision bf16 on {device.type}: this device has no bf16 matrix units (a CUDA GPU from Ampere "
            "on, or a CPU with AMX); use precision fp32, or auto to choose per device"
        )
    return fast


def speed_up(method: Method, cfg: TrainConfig, device: torch.device | None = None) -> Method:
    """Apply the config's speed/memory settings in place, before any sharding: activation
    checkpointing of every backbone that trains, ``torch.compile`` of each transformer block
    (``compile``; one graph per input shape and grad mode, shared by all the blocks of that shape)
    and of the DINO heads and loss modules (``compile_heads``; dynamic in the iBOT patch count).
    Module names and parameters are unchanged, so optimizer groups, checkpoints and FSDP2 units are
    the same with and without them. Under bf16 autocast on the CPU (``device``), attention runs as
    explicit matmuls instead of the fused kernel (``Backbone.set_fused_attention``); ``fp32_heads``
    runs the DINO heads in float32 under autocast."""
    from dinoflow.losses import DINOHead, DINOLoss, IBOTPatchLoss, KoLeoLoss
    from dinoflow.models.backbone import Backbone

    if cfg.activation_checkpointing:
        trained = [m for m in method.modules() if isinstance(m, Backbone) and _trains(m)]
        if not trained:
            raise SpecError("activation_checkpointing is on but no backbone of the method trains")
        for bb in trained:
            bb.activation_checkpointing = True
    if device is not None and device.type == "cpu" and bf16_autocast(cfg.precision, device):
        for bb in (m for m in method.modules() if isinstance(m, Backbone)):
            bb.set_fused_attention(False)
    for head in (m for m in method.modules() if isinstance(m, DINOHead)):
        head.float32 = cfg.fp32_heads
    for name, mod in method.named_modules():
        if cfg.compile and name.endswith("blocks") and isinstance(mod, nn.Sequential | nn.ModuleList):
            for blk in mod:  # static shapes: one graph per crop size (global, local), specialised kernels
                blk.compile(dynamic=False)
        if cfg.compile_heads and isinstance(mod, DINOHead | DINOLoss | IBOTPatchLoss | KoLeoLoss):
            mod.compile()
    return method


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _wrap(method: Method, cfg: TrainConfig, ctx: DistContext) -> nn.Module:
    """The module whose forward the loop calls (DDP wrapper, or the FSDP2-sharded method)."""
    speed_up(method, cfg, ctx.device)
    if not ctx.enabled:
        return method
    if cfg.distributed == "fsdp2":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from dinoflow.models.backbone import Backbone

        for unit in method.fsdp_units():
            fully_shard(unit)
            if isinstance(unit, Backbone):
                register_fsdp_forward_method(unit, "encode")  # backbones run through encode()
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


def train_step(
    method: Method,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor | list[torch.Tensor],
    view: BatchView,
    state: StepState,
    autocast: bool = False,
    clip_grad: float = 0.0,
) -> tuple[torch.Tensor, Logs]:
    """One optimizer step on this rank's share of the batch ``x`` (the workers' uint8 crops, or
    uint8 images the method crops itself): augment (``prepare``), forward, backward,
    clip (each of ``method.clip_groups()`` on its own norm), AdamW, EMA (``after_step``). ``model`` is
    ``method`` or its DDP/FSDP2 wrapper. Returns the loss and the logs as device tensors (nothing
    here waits for the device). The trainer and ``dinoflow bench train-step`` both run exactly this."""
    batch = method.prepare(x, view)
    device_type = next(method.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        loss, logs = model(batch, state)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(state)
    if clip_grad > 0:
        for mod in method.clip_groups():
            params = [p for p in mod.parameters() if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
    opt.step()
    method.after_step(state)
    return loss, logs


def stream_plan(cfg: TrainConfig, n_images: int) -> StreamPlan:
    """How the global batch is drawn from the data: fixed by the config, not by the world size."""
    return StreamPlan(
        n_images, cfg.batch_size, cfg.data.streams or cfg.batch_size, cfg.seed, cfg.data.shuffle_buffer
    )


def _check_position(saved: dict[str, Any], plan: StreamPlan, uri: str) -> None:
    want = {
        "n_images": plan.n_rows,
        "streams": plan.streams,
        "shuffle_buffer": plan.buffer,
        "seed": plan.seed,
    }
    got = {k: saved.get(k) for k in want}
    if "streams" in saved and got != want:
        raise SpecError(
            f"{uri} was written reading the data as {got}; this run reads it as {want}: the resumed run "
            "would not see the same images (keep the manifest and the data settings, or start afresh)"
        )


def train(
    cfg: TrainConfig,
    images: torch.Tensor | ImageSource,
    store: ObjectStore | None,
    output_uri: str,
    ctx: DistContext | None = None,
    progress: bool = True,
    max_steps_this_run: int | None = None,
    method_factory: Callable[[], Method] | None = None,
) -> TrainOutcome:
    """Train ``cfg.method`` on ``images`` (an ``ImageSource``, e.g. a manifest's shards, or uint8
    ``[N, C, H, W]``); checkpoints and curves go under ``output_uri``. Resumes from the newest
    checkpoint found there.
    ``store=None`` persists nothing (no resume, no checkpoint): for benchmarks, tests and device
    smoke checks that have no object store. ``method_factory`` builds the method instead of
    ``build_method(cfg, store)`` (e.g. to reuse an instance the caller already validated)."""
    ctx = ctx or DistContext()
    source = TensorSource(images) if isinstance(images, torch.Tensor) else images
    n = len(source)
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
    bb = method.export_backbone()
    in_chans = bb.in_chans
    if isinstance(source, TensorSource) and source.channels != in_chans:
        raise SpecError(f"images have {source.channels} channels but {cfg.backbone} wants {in_chans}")
    if type(method).fit_data is not Method.fit_data:  # deterministic for a seed: equal on every rank
        method.fit_data(source.sample_images(FIT_IMAGES, bb.img_size, in_chans), seed=cfg.seed)
    plan = stream_plan(cfg, n)
    plan.streams_of(ctx.rank, ctx.world_size)  # fails early on a world size that does not divide it
    model = _wrap(method, cfg, ctx)
    opt = make_optimizer(method, cfg, ctx.device)

    start, curves = 0, []
    found = ckpt.list_checkpoints(store, output_uri) if store is not None else []
    if found:
        step0, uri = found[-1]
        state = ckpt.load_checkpoint(store, uri, cfg.model_dump(mode="json"))  # same config, same bytes
        ckpt.load_full_state(method, opt, state["model"], state["optimizer"])
        ckpt.set_rng_state(state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0])
        start, curves = state["step"], state["curves"]
        _check_position(state.get("data_position", {}), plan, uri)
        if ctx.is_main:
            log.info("resumed from %s (step %d of %d)", uri, start, total)

    if ctx.is_main and cfg.metrics_port:
        metrics.serve_metrics(cfg.metrics_port)
    autocast = bf16_autocast(cfg.precision, ctx.device)
    if ctx.is_main and cfg.precision != "fp32":
        log.info(
            "precision %s on %s: %s", cfg.precision, ctx.device.type, "bf16 autocast" if autocast else "fp32"
        )
    peak_lr = cfg.peak_lr()
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{cfg.method} {cfg.backbone}", unit="step")
    stop = total if max_steps_this_run is None else min(total, start + max_steps_this_run)
    last_ckpt_uri = found[-1][1] if found else None
    pending = _PendingLogs(cfg, ctx)
    stream = TrainStream(
        source, plan, method.crop_groups(), in_chans, ctx.rank, ctx.world_size, start, stop, cfg.data.workers
    )
    batches = iter(Batches(stream, pin_memory=ctx.device.type == "cuda", prefetch=cfg.data.prefetch_batches))
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
        x = [c.to(ctx.device, non_blocking=True) for c in next(batches)["crops"]]
        view = BatchView(gen, ctx.rank * local_b, cfg.batch_size)
        _, logs = train_step(method, model, opt, x, view, state, autocast, cfg.optim.clip_grad)
        pending.add(step + 1, lr, wd, time.perf_counter() - t0, logs)
        done = step + 1
        save = store is not None and (done % cfg.checkpoint_every_steps == 0 or done == total)
        if done % cfg.log_every_steps == 0 or done == stop or save:
            rows = pending.flush()  # the only point where the step's numbers leave the device
            curves += rows
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(loss=f"{rows[-1].get('loss', float('nan')):.3f}", lr=f"{lr:.2e}")
        if save:
            last_ckpt_uri = _save(store, output_uri, cfg, method, opt, done, curves, ctx, plan)
    if bar is not None:
        bar.close()

    out = TrainOutcome(stop, float("nan"), curves, start, total, checkpoint_uri=last_ckpt_uri, method=method)
    if stop == total:
        if store is not None:
            out.curves_uri = join_uri(output_uri, "curves.jsonl")
            if ctx.is_main:
                _write_curves(store, out.curves_uri, curves)
        if cfg.distributed == "fsdp2" and ctx.enabled:
            out.method = _unsharded_copy(method, make, ctx)  # every rank gathers; rank 0 keeps it
        ctx.barrier()
    if curves:
        out.final_loss = float(curves[-1]["loss"])
    return out


class _PendingLogs:
    """The steps since the last logging point, their logs still device tensors."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.rows: list[tuple[int, float, float, float, Logs]] = []
        self.t_last = time.perf_counter()

    def add(self, step: int, lr: float, wd: float, seconds: float, logs: Logs) -> None:
        self.rows.append((step, lr, wd, seconds, logs))

    def flush(self) -> list[dict[str, float]]:
        """One device-to-host transfer for every log of the pending steps; loss terms are averaged
        over the ranks (the global batch's mean, not rank 0's share)."""
        if not self.rows:
            return []
        keys = sorted(self.rows[0][4])
        dev = self.rows[0][4][keys[0]].device if keys else self.ctx.device
        vals = torch.stack(
            [torch.stack([r[4][k].to(dev, torch.float64) for k in keys]) for r in self.rows]
        )  # [steps, keys]
        if self.ctx.enabled:
            losses = [i for i, k in enumerate(keys) if k.endswith("loss")]
            if losses:
                part = vals[:, losses]
                torch.distributed.all_reduce(part)
                vals[:, losses] = part / self.ctx.world_size
        table = vals.cpu().tolist()
        now = time.perf_counter()
        wall, self.t_last = now - self.t_last, now
        out = [
            {"step": step, "lr": lr, "wd": wd, "step_seconds": dt, **dict(zip(keys, row, strict=True))}
            for (step, lr, wd, dt, _), row in zip(self.rows, table, strict=True)
        ]
        if self.ctx.is_main:
            last = out[-1]
            dev_type = self.ctx.device.type
            metrics.record_train_step(
                self.cfg.method,
                step=int(last["step"]),
                step_seconds=wall / len(out),
                images=self.cfg.batch_size * len(out),
                losses={k: v for k, v in last.items() if k.endswith("loss")},
                learning_rate=last["lr"],
                gpu_memory_peak_bytes=torch.cuda.max_memory_allocated(self.ctx.device)
                if dev_type == "cuda"
                else None,
                rank=self.ctx.rank,
            )
        self.rows = []
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


def _save(store, output_uri, cfg, method, opt, step, curves, ctx, plan: StreamPlan) -> str | None:
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
            "data_position": {
                "step": step,
                "samples_seen": step * cfg.batch_size,
                "n_images": plan.n_rows,
                "streams": plan.streams,
                "shuffle_buffer": plan.buffer,
                "seed": plan.seed,
                "epoch_offset": plan.positions(step),  # int64 [streams, 2]: each stream's (epoch, offset)
            },
            "curves": curves,
            "config": cfg.model_dump(mode="json"),
        }
        uri = ckpt.save_checkpoint(store, output_uri, step, payload, cfg.keep_checkpoints)
        _write_curves(store, join_uri(output_uri, "curves.jsonl"), curves)
    ctx.barrier()
    return uri


def _write_curves(store: ObjectStore, uri: str, curves: list[dict[str, float]]) -> None:
    store.put_bytes(uri, "".join(json.dumps(r) + "\n" for r in curves).encode(), "application/x-ndjson")
