"""The trainer's CUDA path, a few steps: ``dinoflow.train.trainer.train`` exactly as the pretrain stage
calls it (single process; bf16 autocast; fused AdamW; EMA teacher), on random uint8 images, with no
object store (``store=None``: no checkpoint, no export). Checks that every loss is finite, that the
teacher moved away from its initialisation, and prints step times, images/s and peak GPU memory.

    PYTHONPATH=src python scripts/gpu_check_train.py --device cuda --precision bf16 \\
        --backbone vit_small_p14 --batch 32 --steps 4

Last output line: JSON. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time


def main(argv: list[str]) -> int:
    import torch

    from dinoflow.train.dist import init_distributed
    from dinoflow.train.trainer import build_method, train
    from dinoflow_tools.bench.train_step import step_config

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--backbone", default="vit_small_p7_28")
    p.add_argument("--global-px", type=int, default=None)
    p.add_argument("--local-px", type=int, default=None)
    p.add_argument("--local-crops", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone blocks")
    p.add_argument("--compile-heads", action="store_true", help="also the DINO heads and losses")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    cfg = step_config(
        a.backbone,
        a.batch,
        a.precision,
        a.global_px,
        a.local_px,
        a.local_crops,
        compile=a.compile,
        steps=a.steps,
        compile_heads=a.compile_heads,
        activation_checkpointing=a.activation_checkpointing,
    ).model_copy(update={"log_every_steps": 1})
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"warmup_steps": 1})})
    ctx = init_distributed(a.device)
    torch.manual_seed(cfg.seed)
    init = build_method(cfg).export_backbone().state_dict()  # the trainer builds the same weights
    chans = init["model.patch_embed.proj.weight"].shape[1]
    from dinoflow.models.registry import get_entry

    px = max(get_entry(a.backbone).img_size, cfg.crops.global_crop_px)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * cfg.batch_size, chans, px, px), dtype=torch.uint8, generator=g)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    out = train(cfg, images, None, "", ctx=ctx, progress=False)
    wall = time.perf_counter() - t0
    assert out.method is not None
    teacher = out.method.export_backbone().state_dict()
    moved = max(float((teacher[k].float().cpu() - v.float()).abs().max()) for k, v in init.items())
    losses = [r["loss"] for r in out.curves]
    steps_s = [r["step_seconds"] for r in out.curves]
    later = steps_s[1:] or steps_s  # the first step holds CUDA/cuBLAS start-up
    row = {
        "backbone": a.backbone,
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "precision": cfg.precision,
        "compile": cfg.compile,
        "compile_heads": cfg.compile_heads,
        "activation_checkpointing": cfg.activation_checkpointing,
        "batch": cfg.batch_size,
        "crops": f"{cfg.crops.global_crops_number}x{cfg.crops.global_crop_px}px + "
        f"{cfg.crops.local_crops_number}x{cfg.crops.local_crop_px}px",
        "head_prototypes": cfg.dinov2.head_prototypes,
        "steps": out.steps,
        "losses": [round(x, 4) for x in losses],
        "step_seconds": [round(x, 4) for x in steps_s],
        "median_step_seconds_after_first": round(statistics.median(later), 4),
        "images_per_second": round(cfg.batch_size / statistics.median(later), 1),
        "wall_seconds": round(wall, 1),
        "teacher_max_abs_change": moved,
        "checkpoint_uri": out.checkpoint_uri,
    }
    if ctx.device.type == "cuda":
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 2)
    ok = all(math.isfinite(x) for x in losses) and moved > 0 and out.steps == a.steps
    ok = ok and out.checkpoint_uri is None  # no store: nothing written
    row["ok"] = ok
    for k, v in row.items():
        print(f"{k:<32}{v}")
    print(json.dumps(row))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
