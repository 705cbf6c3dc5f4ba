"""``dinoflow bench xcit-scaling``: the third seed's claim, measured.

XCiT replaces token-token attention (cost quadratic in the number of tokens N) by cross-covariance
attention over channels (a d_h x d_h map per head, cost linear in N). This benchmark runs one
forward+backward pass of an XCiT and a ViT of similar size (timm ``xcit_tiny_12_p16`` 6.7 M params,
``vit_tiny_patch16`` 5.7 M params, both patch 16, width 192, 12 blocks) as the input grows
224 -> 448 -> 896 px (196 -> 784 -> 3,136 tokens) and reports time and peak memory side by side.

Each (model, resolution) runs in a fresh Python subprocess so that the process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that configuration alone; the figure we
report is the growth of that high-water mark during the timed steps over the resident set right
before them (model, optimizer-free weights, input), i.e. the activations and gradients of one step.
On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

ViT runs twice by default: with PyTorch's fused ``scaled_dot_product_attention`` (timm's default;
its CPU kernel never materialises the N x N map, so its *memory* stays linear while its *time* is
still quadratic) and with the plain ("eager") attention that stores the N x N softmax for backward.

The last output line is one JSON object: ``{"rows": [one object per (model, resolution)], ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

# name shown in the table -> (timm model, fused attention or not)
MODELS = {
    "xcit_tiny_12_p16": ("xcit_tiny_12_p16_224", True),
    "vit_tiny_p16": ("vit_tiny_patch16_224", True),
    "vit_tiny_p16_eager": ("vit_tiny_patch16_224", False),
}


def _child(cfg: dict) -> dict:
    """One configuration, measured inside a fresh process."""
    import resource

    if not cfg["fused_attn"]:
        os.environ["TIMM_FUSED_ATTN"] = "0"  # read by timm at import time
    import timm
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    dev = torch.device(cfg["device"])
    kwargs = {"img_size": cfg["img_px"], "num_classes": 0}
    model = timm.create_model(cfg["timm_model"], pretrained=False, **kwargs).to(dev)
    model.train()
    x = torch.randn(cfg["batch"], 3, cfg["img_px"], cfg["img_px"], device=dev)
    n_params = sum(p.numel() for p in model.parameters())

    def step() -> None:
        out = model(x)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step()  # warm-up (allocator, kernels); its peak counts, it is the same step
    sync()
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    times.sort()
    return {
        "params_m": round(n_params / 1e6, 3),
        # the minimum: on a shared machine other processes only ever add time
        "step_seconds": round(times[0], 4),
        "step_seconds_median": round(times[len(times) // 2], 4),
        "peak_step_memory_mib": round(peak_mib, 1),
    }


def _run_config(cfg: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "dinoflow_tools.bench.xcit_scaling", "--child", json.dumps(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {p.returncode}: {tail[0][:200]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _slope(rows: list[dict], key: str) -> float | None:
    """Least-squares exponent of ``key`` against the number of tokens (1 = linear, 2 = quadratic)."""
    pts = [(math.log(r["tokens"]), math.log(r[key])) for r in rows if r.get(key, 0) and r[key] > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench xcit-scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--sizes-px", nargs="+", type=int, default=[224, 448, 896])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed steps after one warm-up step (the fastest is reported)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--timeout-s", type=float, default=900, help="per configuration")
    ap.add_argument("--out", help="also write the table and JSON to this file")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    for s in args.sizes_px:
        if s % 16:
            raise SystemExit(f"error: --sizes-px {s} is not a multiple of the patch size 16")

    rows = []
    header = f"{'model':<20} {'px':>5} {'tokens':>7} {'params M':>9} {'step s':>9} {'peak MiB':>9} {'t/t0':>6} {'m/m0':>6}"
    lines = [f"xcit-scaling: fwd+bwd, batch {args.batch}, {args.device}, {args.threads} threads", header]
    print("\n".join(lines), flush=True)
    for name in args.models:
        timm_model, fused = MODELS[name]
        first = None
        for px in sorted(args.sizes_px):
            cfg = {
                "timm_model": timm_model,
                "fused_attn": fused,
                "img_px": px,
                "batch": args.batch,
                "repeats": args.repeats,
                "threads": args.threads,
                "device": args.device,
            }
            res = _run_config(cfg, args.timeout_s)
            row = {
                "model": name,
                "timm_model": timm_model,
                "fused_attn": fused,
                "img_px": px,
                "tokens": (px // 16) ** 2,
                "batch": args.batch,
                "device": args.device,
                **res,
            }
            rows.append(row)
            if "error" in res:
                line = f"{name:<20} {px:>5} {row['tokens']:>7} {res['error']}"
            else:
                first = first or row
                t_ratio = row["step_seconds"] / first["step_seconds"]
                m_ratio = row["peak_step_memory_mib"] / max(first["peak_step_memory_mib"], 1e-9)
                line = (
                    f"{name:<20} {px:>5} {row['tokens']:>7} {row['params_m']:>9.2f} {row['step_seconds']:>9.3f} "
                    f"{row['peak_step_memory_mib']:>9.1f} {t_ratio:>6.1f} {m_ratio:>6.1f}"
                )
            lines.append(line)
            print(line, flush=True)

    exps = {}
    for name in args.models:
        mine = [r for r in rows if r["model"] == name and "error" not in r]
        exps[name] = {
            "time_exponent": _slope(mine, "step_seconds"),
            "memory_exponent": _slope(mine, "peak_step_memory_mib"),
        }
    lines.append("growth exponent vs tokens (1 = linear, 2 = quadratic):")
    for name, e in exps.items():
        lines.append(f"  {name:<20} time {e['time_exponent']}  memory {e['memory_exponent']}")
    print("\n".join(lines[-1 - len(exps) :]))
    summary = {"rows": rows, "exponents_vs_tokens": exps}
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n" + json.dumps(summary) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
