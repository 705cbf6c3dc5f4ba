"""``dinoflow bench train-step``: what a full DINOv2 step costs over its backbone work.

Two measurements in ONE process, interleaved (A, B, A, B, ...; median of each) so machine noise hits
both alike:

* **full step** = ``dinoflow.train.trainer.train_step``, the trainer's own step: multi-crop
  augmentation + iBOT masks (``prepare``), student forward/backward on all crops, teacher forward on
  the global crops, DINO heads, Sinkhorn-Knopp, DINO + iBOT + KoLeo losses, gradient clipping, AdamW
  (fused) and the EMA teacher update;
* **backbone only** = the same crops and masks (made once, outside the timing) through the bare
  student backbone, forward + backward of a trivial loss on its CLS and patch tokens, plus the
  teacher backbone's forward on the global crops.

``train_step_ratio`` = full / backbone-only; the issue's target is <= 1.15. Default: the
``fashion-mnist-cpu`` preset's model (``vit_small_p7_28``, its 4,096-prototype head), 2 x 28 px
global + 6 x 14 px local crops, batch 128, on the CPU. On CUDA (``--device cuda --precision bf16
--backbone vit_small_p14 --global-px 224 --local-px 98``) the DINOv2 default head (65,536
prototypes) is used and images/s, peak memory and model-FLOPs utilisation (MFU) are printed.

MFU = model FLOPs of one step / step time / the GPU's dense bf16 peak. Model FLOPs are counted once,
eagerly, with ``torch.utils.flop_counter`` (matmuls and attention, forward and backward; attention
through the math kernel so that it is counted) on a sub-batch (``--flops-batch``) and scaled to the
batch; recomputation under ``--activation-checkpointing`` is not model work and is not counted.

``--variants eager,compile,compile+heads`` measures the eager step, then with the backbone blocks
compiled, then with the DINO heads and losses compiled too, in one process (compiling is
cumulative). ``--batch 64,32,16`` measures the first batch that fits in GPU memory (CUDA
out-of-memory is caught; ``batches_out_of_memory`` lists the ones that did not fit). ``--profile``
prints the top ops (CPU) or kernels (CUDA) of two full steps by self time, and puts them in the JSON.

On a CPU shared with other busy processes, ``--threads 1`` gives steadier figures: with 2 OpenMP
threads the many small ops of the full step (augmentation, AdamW, EMA) stall on preempted threads.

Output: one JSON line per variant as it is measured (so a run cut short keeps what it measured);
with several variants a last JSON line holds the last variant's figures and ``variants``, all of
them (``train_step_seconds``, ``backbone_seconds``, ``train_step_ratio``, ``images_per_second``,
``mfu``, ``backbone_mfu``, ``max_memory_allocated_gib``, ...).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

# Dense bf16 peak FLOP/s (NVIDIA datasheets; the sparse figures are twice these).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
TINY_HEAD = "fashion-mnist-cpu"  # preset whose small DINO head the tiny (<= 32 px) backbones use
VARIANTS = ("eager", "compile", "compile+heads")


def peak_flops(device_name: str) -> float | None:
    for key, val in PEAK_BF16_FLOPS.items():  # "H100 PCIe" before "H100"
        if key in device_name:
            return val
    return None


def step_config(
    backbone: str,
    batch: int,
    precision: str = "fp32",
    global_px: int | None = None,
    local_px: int | None = None,
    local_crops: int | None = None,
    head_prototypes: int | None = None,
    compile: bool = False,
    steps: int = 1000,
    compile_heads: bool = False,
    activation_checkpointing: bool = False,
    ibot_separate_head: bool = False,
    fp32_heads: bool = False,
    head_bottleneck_dim: int | None = None,
) -> Any:
    """The TrainConfig of the measured step: for tiny (<= 32 px) backbones the ``fashion-mnist-cpu``
    preset's crops and small head; otherwise DINOv2's defaults (2 x 224 + 8 x 98 px, 65,536
    prototypes). The prototype layer is trained from step 0, so its update is part of the cost."""
    from dinoflow.models.registry import get_entry
    from dinoflow.train.config import TrainConfig
    from dinoflow.train.presets import PRESETS

    tiny = get_entry(backbone).img_size <= 32
    dinov2: dict[str, Any] = dict(PRESETS[TINY_HEAD]["dinov2"]) if tiny else {}
    if head_prototypes:
        dinov2["head_prototypes"] = head_prototypes
    if head_bottleneck_dim:
        dinov2["head_bottleneck_dim"] = head_bottleneck_dim
    if ibot_separate_head:  # DINOv2 ViT-g: a separate iBOT head as wide as the DINO head
        dinov2["ibot_separate_head"] = True
        if "head_prototypes" in dinov2:
            dinov2["ibot_prototypes"] = dinov2["head_prototypes"]
    dinov2["freeze_prototypes_epochs"] = 0
    crops = {
        **(PRESETS[TINY_HEAD]["crops"] if tiny else {}),
        "global_crop_px": global_px or (28 if tiny else 224),
        "local_crop_px": local_px or (14 if tiny else 98),  # DINOv2: 98 px local crops for /14
        "local_crops_number": local_crops if local_crops is not None else (6 if tiny else 8),
    }
    return TrainConfig(
        method="dinov2",
        backbone=backbone,
        batch_size=batch,
        steps=steps,
        precision=precision,
        compile=compile,
        compile_heads=compile_heads,
        fp32_heads=fp32_heads,
        activation_checkpointing=activation_checkpointing,
        dinov2=dinov2,
        crops=crops,
        checkpoint_every_steps=10**9,
    )


def model_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``fn`` runs, forward and backward
    (``torch.utils.flop_counter``), attention through the math kernel so that it is counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def parse_batches(text: str) -> list[int]:
    """``"64,32,16"`` -> ``[64, 32, 16]``: the batches to try in turn (the first that fits is measured)."""
    from dinoflow.errors import SpecError

    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise SpecError(f"--batch wants a positive integer or a comma list of them (64,32,16), got {text!r}")
    return out


def parse_variants(text: str) -> list[str]:
    """``"eager,compile,compile+heads"``: measured in this order in one process; compiling is
    cumulative (a compiled block stays compiled), so the list must follow that order."""
    from dinoflow.errors import SpecError

    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in out if v not in VARIANTS]
    order = [VARIANTS.index(v) for v in out if v in VARIANTS]
    if not out or bad or order != sorted(set(order)):
        raise SpecError(f"--variants wants a subset of {','.join(VARIANTS)} in that order, got {text!r}")
    return out


def profile_steps(step: Callable[[], None], device: Any, rows: int, steps: int = 2) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step``; print the top ops (CPU) or kernels (CUDA) by self time
    and return them per step: ``{"by", "total_ms_per_step", "top": [{name, self_ms_per_step, share,
    calls_per_step}]}``."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # On CUDA an op and the kernels it launches both carry the kernels' time: rank the kernels alone.
    pool = [e for e in events if e.device_type == DeviceType.CUDA] if cuda else list(events)
    pool = [e for e in (pool or list(events)) if getattr(e, key) > 0]
    pool.sort(key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in pool)
    top = [
        {
            "name": e.key,
            "self_ms_per_step": round(getattr(e, key) / 1e3 / steps, 4),
            "share": round(getattr(e, key) / total_us, 4) if total_us else 0.0,
            "calls_per_step": round(e.count / steps, 2),
        }
        for e in pool[:rows]
    ]
    what = "kernels by self CUDA time" if cuda else "ops by self CPU time"
    print(
        f"--- profile: top {len(top)} {what}, per step (mean of {steps}); total {total_us / 1e3 / steps:.2f} ms"
    )
    print(f"{'self ms':>10} {'share':>7} {'calls':>7}  name")
    for r in top:
        print(
            f"{r['self_ms_per_step']:>10.3f} {100 * r['share']:>6.1f}% {r['calls_per_step']:>7g}  {r['name'][:100]}"
        )
    return {
        "by": "self_device_time" if cuda else "self_cpu_time",
        "total_ms_per_step": round(total_us / 1e3 / steps, 3),
        "top": top,
    }


def main(argv: list[str]) -> None:
    import torch

    from dinoflow.errors import SpecError
    from dinoflow.methods.base import BatchView, StepState
    from dinoflow.train.trainer import bf16_autocast, build_method, make_optimizer, speed_up, train_step

    p = argparse.ArgumentParser(prog="dinoflow bench train-step", description=__doc__)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16 autocast (CUDA, or a CPU with AMX)",
    )
    p.add_argument("--backbone", default="vit_small_p7_28", help="a dinoflow backbone name")
    p.add_argument("--global-px", type=int, default=None, help="global crop size (28 tiny, 224 else)")
    p.add_argument("--local-px", type=int, default=None, help="local crop size (14 tiny, 98 else)")
    p.add_argument("--local-crops", type=int, default=None, help="local crops per image (6 tiny, 8 else)")
    p.add_argument(
        "--batch",
        default="128",
        help="images per step; a comma list (64,32,16) tries each in turn and measures the first that "
        "fits in GPU memory",
    )
    p.add_argument("--head-prototypes", type=int, default=None, help="override the head's prototypes")
    p.add_argument("--head-bottleneck-dim", type=int, default=None, help="override the heads' bottleneck")
    p.add_argument("--fp32-heads", action="store_true", help="the DINO heads in float32 under bf16 autocast")
    p.add_argument(
        "--ibot-separate-head", action="store_true", help="a separate iBOT head (DINOv2 ViT-g recipe)"
    )
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (+2 when compiled)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument(
        "--variants",
        default=None,
        help=f"measured one after the other in this process, a subset of {','.join(VARIANTS)} in that "
        "order: eager; torch.compile of the backbone blocks; also of the DINO heads and losses",
    )
    p.add_argument("--compile", action="store_true", help="short for --variants compile")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in the backward"
    )
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        default=None,
        help="CUDA: use at most this much GPU memory (e.g. 78: what an 80 GB card offers, on a bigger one)",
    )
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    p.add_argument("--flops-batch", type=int, default=16, help="sub-batch the FLOPs are counted on")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 peak")
    p.add_argument("--profile", action="store_true", help="profile 2 steps: top ops/kernels by self time")
    p.add_argument("--profile-rows", type=int, default=15, help="rows of the profile table")
    a = p.parse_args(argv)
    batches = parse_batches(a.batch)
    variants = parse_variants(a.variants or ("compile" if a.compile else "eager"))

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda but torch sees no CUDA device")
    autocast = bf16_autocast(a.precision, dev)  # the trainer's rule: bf16 needs bf16 matrix units
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if a.memory_cap_gib:
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gib * 2**30 / total), dev)
    cfg = step_config(
        a.backbone,
        batches[0],
        a.precision,
        a.global_px,
        a.local_px,
        a.local_crops,
        a.head_prototypes,
        ibot_separate_head=a.ibot_separate_head,
        fp32_heads=a.fp32_heads,
        head_bottleneck_dim=a.head_bottleneck_dim,
    )
    torch.manual_seed(0)
    method = build_method(cfg).to(dev)
    method.train()
    opt = make_optimizer(method, cfg, dev)
    for g in opt.param_groups:  # a mid-run LR / weight decay (values do not change the cost)
        g["lr"] = 1e-4 * g["lr_mult"]
        g["weight_decay"] = 0.04 * g["wd_mult"]
    bb = method.student["backbone"]
    tb = method.teacher["backbone"]
    src_px = max(bb.img_size, cfg.crops.global_crop_px)
    images = torch.randint(0, 256, (max(batches), bb.in_chans, src_px, src_px), dtype=torch.uint8)
    images = images.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step_no = [0]

    def full_step(x: torch.Tensor) -> None:
        st = StepState(step_no[0], 1000, steps_per_epoch=100)
        view = BatchView(torch.Generator().manual_seed(step_no[0]), 0, x.shape[0])
        train_step(method, method, opt, x, view, st, autocast, cfg.optim.clip_grad)
        step_no[0] += 1

    def backbone_step_for(b: int) -> Callable[[], None]:
        """The bare backbones on the crops and masks of one step of batch ``b`` (made once here)."""
        fixed = method.prepare(images[:b], BatchView(torch.Generator().manual_seed(0), 0, b))
        glob, loc, masks = fixed["global"], fixed["local"], fixed["masks"]

        def backbone_step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                with torch.no_grad():
                    tb.encode(glob)
                out = bb.encode(glob, masks)
                loss = out["cls"].float().square().mean() + out["patch"].float().square().mean()
                if loc is not None:
                    loss = loss + bb.encode(loc)["cls"].float().square().mean()
            bb.zero_grad(set_to_none=True)
            loss.backward()

        return backbone_step

    flops_per_image = backbone_flops_per_image = None
    if not a.no_flops:
        # Counted eagerly before any compiling or checkpointing (a recomputation is not model work),
        # on a sub-batch and scaled: FLOPs are linear in the batch (KoLeo's B x B similarity aside,
        # < 0.1 %), and the math attention kernel stores the full attention maps, too big for the
        # whole batch of a large model.
        fb = min(batches[-1], a.flops_batch)
        flops_per_image = model_flops(lambda: full_step(images[:fb])) / fb
        backbone_flops_per_image = model_flops(backbone_step_for(fb)) / fb
        opt.zero_grad(set_to_none=True)

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = (
        (a.peak_tflops * 1e12 if a.peak_tflops else peak_flops(device_name)) if dev.type == "cuda" else None
    )

    def measure(b: int, variant: str) -> dict[str, Any]:
        x = images[:b]
        backbone_step = backbone_step_for(b)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # compiled: the first steps compile, then recompile once for the changing iBOT mask count
        for _ in range(a.warmup + (2 if variant != "eager" else 0)):
            full_step(x)
            backbone_step()
        sync()
        t_full, t_bb = [], []
        for _ in range(a.reps):
            for fn, acc in ((lambda: full_step(x), t_full), (backbone_step, t_bb)):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                acc.append(time.perf_counter() - t0)
        full_s, bb_s = statistics.median(t_full), statistics.median(t_bb)
        fig: dict[str, Any] = {
            "variant": variant,
            "batch": b,
            "train_step_seconds": round(full_s, 5),
            "backbone_seconds": round(bb_s, 5),
            "train_step_ratio": round(full_s / bb_s, 3),
            "images_per_second": round(b / full_s, 1),
        }
        if flops_per_image is not None and backbone_flops_per_image is not None:
            fig["step_model_flops"] = round(flops_per_image * b)
            fig["backbone_model_flops"] = round(backbone_flops_per_image * b)
            fig["step_tflops_per_second"] = round(flops_per_image * b / full_s / 1e12, 3)
            if peak:
                fig["mfu"] = round(flops_per_image * b / full_s / peak, 4)
                fig["backbone_mfu"] = round(backbone_flops_per_image * b / bb_s / peak, 4)
        if dev.type == "cuda":
            fig["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            fig["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / 2**30, 2)
        if a.profile:
            fig["profile"] = profile_steps(lambda: full_step(x), dev, a.profile_rows)
        return fig

    def release() -> None:
        opt.zero_grad(set_to_none=True)
        method.zero_grad(set_to_none=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    n_params = sum(p.numel() for p in method.student.parameters())
    head_params = n_params - sum(p.numel() for p in bb.parameters())
    row: dict[str, Any] = {
        "backbone": a.backbone,
        "device": device_name,
        "precision": a.precision,
        "fp32_heads": a.fp32_heads,
        "global_crops": f"{cfg.crops.global_crops_number}x{cfg.crops.global_crop_px}px",
        "local_crops": f"{cfg.crops.local_crops_number}x{cfg.crops.local_crop_px}px",
        "head_prototypes": cfg.dinov2.head_prototypes,
        "head_bottleneck_dim": cfg.dinov2.head_bottleneck_dim,
        "ibot_separate_head": cfg.dinov2.ibot_separate_head,
        "activation_checkpointing": a.activation_checkpointing,
        "student_backbone_params": n_params - head_params,
        "student_head_params": head_params,
        "target_ratio": 1.15,
        "reps": a.reps,
        "threads": a.threads if dev.type == "cpu" else None,
    }
    if flops_per_image is not None and backbone_flops_per_image is not None:
        row["step_model_flops_per_image"] = round(flops_per_image)
        row["backbone_model_flops_per_image"] = round(backbone_flops_per_image)
        row["flops_ratio"] = round(flops_per_image / backbone_flops_per_image, 3)  # the ratio's floor
    if dev.type == "cuda":
        row["peak_bf16_flops"] = peak
        row["memory_cap_gib"] = a.memory_cap_gib

    print("full step = augment + masks + student fwd/bwd (all crops) + teacher fwd (global) + heads")
    print("            + Sinkhorn-Knopp + DINO/iBOT/KoLeo losses + clip + fused AdamW + EMA")
    print("backbone  = student backbone fwd/bwd (same crops, masks) + teacher backbone fwd (global)")
    for k, v in row.items():
        print(f"{k:<32}{v}")

    applied = {"compile": False, "compile_heads": False}
    results: list[dict[str, Any]] = []
    out_of_memory: list[int] = []
    failed = False
    for i, variant in enumerate(variants):
        want = {"compile": variant != "eager", "compile_heads": variant == "compile+heads"}
        delta = {k: v and not applied[k] for k, v in want.items()}
        speed_up(
            method,
            cfg.model_copy(
                update={**delta, "activation_checkpointing": i == 0 and a.activation_checkpointing}
            ),
            dev,
        )
        applied = want
        fig: dict[str, Any] | None = None
        for b in batches if i == 0 else [results[0].get("batch", batches[-1])]:
            oom = False
            try:
                fig = measure(b, variant)
            except torch.cuda.OutOfMemoryError:
                oom = True
            if not oom:
                break
            release()  # after the except block: the traceback no longer holds the step's tensors
            out_of_memory.append(b)
            print(f"{variant}: batch {b} is out of GPU memory")
        if fig is None:
            failed = True
            fig = {"variant": variant, "error": f"out of memory at batches {out_of_memory}"}
        results.append(fig)
        print(f"=== {variant}")
        for k, v in fig.items():
            if k != "profile":
                print(f"{k:<32}{v}")
        print(json.dumps({**row, "batches_out_of_memory": out_of_memory, **fig}))
        if failed:
            break
    if len(results) > 1:  # one closing line: the last variant's figures on top, every variant below
        print(json.dumps({**row, "batches_out_of_memory": out_of_memory, **results[-1], "variants": results}))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":  # python -m dinoflow_tools.bench.train_step (where the CLI is not installed)
    import sys

    main(sys.argv[1:])
