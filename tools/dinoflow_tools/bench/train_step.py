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
prototypes) is used and images/s, peak memory and model-FLOPs utilisation (MFU) are printed: model
FLOPs of one full step are counted with ``torch.utils.flop_counter`` (attention through the math
kernel so that it is counted), divided by the step time and the GPU's dense bf16 peak.

On a CPU shared with other busy processes, ``--threads 1`` gives steadier figures: with 2 OpenMP
threads the many small ops of the full step (augmentation, AdamW, EMA) stall on preempted threads.

Last output line: one JSON object (``train_step_seconds``, ``backbone_seconds``,
``train_step_ratio``, ``flops_ratio``, ``images_per_second``, ``mfu``, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

# Dense bf16 peak FLOP/s (NVIDIA datasheets; the sparse figures are twice these).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
TINY_HEAD = "fashion-mnist-cpu"  # preset whose small DINO head the tiny (<= 32 px) backbones use


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
        dinov2=dinov2,
        crops=crops,
        checkpoint_every_steps=10**9,
    )


def main(argv: list[str]) -> None:
    import torch

    from dinoflow.errors import SpecError
    from dinoflow.methods.base import BatchView, StepState
    from dinoflow.train.trainer import build_method, make_optimizer, train_step

    p = argparse.ArgumentParser(prog="dinoflow bench train-step", description=__doc__)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast (CUDA)")
    p.add_argument("--backbone", default="vit_small_p7_28", help="a dinoflow backbone name")
    p.add_argument("--global-px", type=int, default=None, help="global crop size (28 tiny, 224 else)")
    p.add_argument("--local-px", type=int, default=None, help="local crop size (14 tiny, 98 else)")
    p.add_argument("--local-crops", type=int, default=None, help="local crops per image (6 tiny, 8 else)")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--head-prototypes", type=int, default=None, help="override the head's prototypes")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone blocks")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    p.add_argument("--flops-batch", type=int, default=16, help="sub-batch the FLOPs are counted on")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 peak")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the step")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda but torch sees no CUDA device")
    autocast = a.precision == "bf16" and dev.type == "cuda"
    if a.precision == "bf16" and not autocast:
        raise SpecError("--precision bf16 runs on CUDA only (the trainer's autocast is CUDA-only)")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = step_config(
        a.backbone, a.batch, a.precision, a.global_px, a.local_px, a.local_crops, a.head_prototypes, a.compile
    )
    torch.manual_seed(0)
    method = build_method(cfg).to(dev)
    if cfg.compile:
        from dinoflow.train.dist import DistContext
        from dinoflow.train.trainer import _wrap

        _wrap(method, cfg, DistContext(device=dev))
    method.train()
    opt = make_optimizer(method, cfg, dev)
    for g in opt.param_groups:  # a mid-run LR / weight decay (values do not change the cost)
        g["lr"] = 1e-4 * g["lr_mult"]
        g["weight_decay"] = 0.04 * g["wd_mult"]
    bb = method.student["backbone"]
    tb = method.teacher["backbone"]
    src_px = max(bb.img_size, cfg.crops.global_crop_px)
    images = torch.randint(0, 256, (cfg.batch_size, bb.in_chans, src_px, src_px), dtype=torch.uint8)
    images = images.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step_no = [0]

    def full_step(x: torch.Tensor = images) -> None:
        st = StepState(step_no[0], 1000, steps_per_epoch=100)
        view = BatchView(torch.Generator().manual_seed(step_no[0]), 0, x.shape[0])
        train_step(method, method, opt, x, view, st, autocast, cfg.optim.clip_grad)
        step_no[0] += 1

    fixed = method.prepare(images, BatchView(torch.Generator().manual_seed(0), 0, cfg.batch_size))
    glob, loc, masks = fixed["global"], fixed["local"], fixed["masks"]

    def backbone_step(n: int = cfg.batch_size) -> None:
        # crop-major layout: crop c of sample i is row c * batch + i; keep the first n samples
        g = glob.view(-1, cfg.batch_size, *glob.shape[1:])[:, :n].flatten(0, 1)
        m = (
            masks.view(-1, cfg.batch_size, masks.shape[-1])[:, :n].flatten(0, 1)
            if masks is not None
            else None
        )
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                tb.encode(g)
            out = bb.encode(g, m)
            loss = out["cls"].float().square().mean() + out["patch"].float().square().mean()
            if loc is not None:
                lc = loc.view(-1, cfg.batch_size, *loc.shape[1:])[:, :n].flatten(0, 1)
                loss = loss + bb.encode(lc)["cls"].float().square().mean()
        bb.zero_grad(set_to_none=True)
        loss.backward()

    flops = backbone_flops = None
    if not a.no_flops:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        # Counted on a sub-batch and scaled: FLOPs are linear in the batch (KoLeo's B x B similarity
        # aside, < 0.1 %), and the math attention kernel (counted, unlike the fused ones) stores
        # the full attention maps, too big for the whole batch of a large model.
        fb = min(cfg.batch_size, a.flops_batch)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            full_step(images[:fb])
        flops = fc.get_total_flops() * cfg.batch_size // fb
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fcb:
            backbone_step(fb)
        backbone_flops = fcb.get_total_flops() * cfg.batch_size // fb

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(a.warmup):
        full_step()
        backbone_step()
    sync()
    t_full, t_bb = [], []
    for _ in range(a.reps):
        for fn, acc in ((full_step, t_full), (backbone_step, t_bb)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    full_s, bb_s = statistics.median(t_full), statistics.median(t_bb)
    ratio = full_s / bb_s

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            full_step()
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))

    n_params = sum(p.numel() for p in method.student.parameters())
    head_params = n_params - sum(p.numel() for p in bb.parameters())
    row: dict[str, Any] = {
        "backbone": a.backbone,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": a.precision,
        "batch": cfg.batch_size,
        "global_crops": f"{cfg.crops.global_crops_number}x{cfg.crops.global_crop_px}px",
        "local_crops": f"{cfg.crops.local_crops_number}x{cfg.crops.local_crop_px}px",
        "head_prototypes": cfg.dinov2.head_prototypes,
        "student_backbone_params": n_params - head_params,
        "student_head_params": head_params,
        "train_step_seconds": round(full_s, 5),
        "backbone_seconds": round(bb_s, 5),
        "train_step_ratio": round(ratio, 3),
        "target_ratio": 1.15,
        "images_per_second": round(cfg.batch_size / full_s, 1),
        "reps": a.reps,
        "threads": a.threads if dev.type == "cpu" else None,
    }
    if flops is not None and backbone_flops is not None:
        row["step_model_flops"] = flops
        row["backbone_model_flops"] = backbone_flops
        row["flops_ratio"] = round(flops / backbone_flops, 3)  # the ratio's noise-free floor (heads)
        row["step_tflops_per_second"] = round(flops / full_s / 1e12, 3)
    if dev.type == "cuda":
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        peak = a.peak_tflops * 1e12 if a.peak_tflops else peak_flops(row["device"])
        row["peak_bf16_flops"] = peak
        if flops is not None and backbone_flops is not None and peak:
            row["mfu"] = round(flops / full_s / peak, 4)
            row["backbone_mfu"] = round(backbone_flops / bb_s / peak, 4)

    print("full step = augment + masks + student fwd/bwd (all crops) + teacher fwd (global) + heads")
    print("            + Sinkhorn-Knopp + DINO/iBOT/KoLeo losses + clip + fused AdamW + EMA")
    print("backbone  = student backbone fwd/bwd (same crops, masks) + teacher backbone fwd (global)")
    for k, v in row.items():
        print(f"{k:<28}{v}")
    print(json.dumps(row))


if __name__ == "__main__":  # python -m dinoflow_tools.bench.train_step (where the CLI is not installed)
    import sys

    main(sys.argv[1:])
