"""A validation sweep of the DEMO training preset on one GPU, several runs at once: it chooses
hyper-parameters only, every figure the README reports is measured on the CPU afterwards.

Each run pretrains on Fashion-MNIST train[:50k] and scores the teacher's weighted k-NN (k=20,
T=0.07, CLS) of train[50k:] against train[:50k]: the split of `dinoflow bench cpu-recipe --eval-on
val`; the test images are never read. fp32 with TF32 off, the trainer's own loop (`train`), so a run
follows the CPU's arithmetic up to summation order.

    PYTHONPATH=src:tools python scripts/gpu_sweep.py first  LANES BUDGET_S   # the one-factor sweep
    PYTHONPATH=src:tools python scripts/gpu_sweep.py second LANES BUDGET_S   # seeds and combinations
    PYTHONPATH=src:tools python scripts/gpu_sweep.py third  LANES BUDGET_S   # the 12-epoch CPU recipe
    PYTHONPATH=src:tools python scripts/gpu_sweep.py one NAME PRESET STEPS [KEY=VALUE ...]

``first`` then ``second`` is what chose the DEMO preset's teacher temperature (README, "The demo
preset at a shorter budget"); six lanes on one H100 (MPS on) ran a 1,800-step run in ~2 min. Rows go
to $OUT/results.jsonl as they finish; runs still going at BUDGET_S are killed, and the last line
is JSON with every finished run. Fashion-MNIST is read from $DINOFLOW_FASHION_MNIST_DIR (or the
Debian package's folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT", "/tmp/gpu_sweep")
RES = os.path.join(OUT, "results.jsonl")
LOGS = os.path.join(OUT, "logs")

Run = tuple[str, str, int, list[str]]  # name, preset, steps (0: the preset's), --set overrides
TT04 = ["dinov2.teacher_temp_end=0.04"]  # both presets' value now; kept so the rows read as run
RISE = ["dinov2.teacher_temp_end=0.07"]  # the presets as they were: DINOv2's rise to 0.07
SOFT = ["crops.solarize_p=0", "crops.global_scale_min=0.8"]
SWEEPS: dict[str, list[Run]] = {
    # one factor at a time from the DEMO preset (as it was: teacher temperature 0.04 -> 0.07 over
    # 0.7 epochs), in order of expected use; two seeds of the preset for the spread
    "first": [
        (name, preset, steps, RISE + sets)
        for name, preset, steps, sets in [
            ("cpu_base", "fashion-mnist-cpu", 0, []),
            ("base", "demo", 1800, []),
            ("base_s1", "demo", 1800, ["seed=1"]),
            ("base_3600", "demo", 3600, []),
            ("weak_aug", "demo", 1800, SOFT + ["crops.blur_p_global1=0.5", "crops.blur_p_local=0.2"]),
            ("nosolar", "demo", 1800, ["crops.solarize_p=0"]),
            (
                "noblur",
                "demo",
                1800,
                ["crops.blur_p_global1=0", "crops.blur_p_global2=0", "crops.blur_p_local=0"],
            ),
            ("gscale08", "demo", 1800, ["crops.global_scale_min=0.8"]),
            ("gscale04", "demo", 1800, ["crops.global_scale_min=0.4"]),
            ("lscale_25_50", "demo", 1800, ["crops.local_scale_min=0.25", "crops.local_scale_max=0.5"]),
            ("no_ibot", "demo", 1800, ["dinov2.ibot_loss_weight=0", "dinov2.mask_sample_p=0"]),
            ("koleo0", "demo", 1800, ["dinov2.koleo_loss_weight=0"]),
            ("mom099", "demo", 1800, ["dinov2.momentum_start=0.99"]),
            ("mom098", "demo", 1800, ["dinov2.momentum_start=0.98"]),
            ("tt_const04", "demo", 1800, TT04),
            ("tt_warm03", "demo", 1800, ["dinov2.teacher_temp_warmup_epochs=0.3"]),
            ("bs32_3600", "demo", 3600, ["batch_size=32"]),
            ("bs128_900", "demo", 900, ["batch_size=128"]),
            ("local2", "demo", 1800, ["crops.local_crops_number=2"]),
            ("local4", "demo", 1800, ["crops.local_crops_number=4"]),
        ]
    ],
    # the first sweep's leader (teacher temperature held at 0.04) on more seeds, longer, combined
    "second": [
        ("tt04_s1", "demo", 1800, TT04 + ["seed=1"]),
        ("tt04_s2", "demo", 1800, TT04 + ["seed=2"]),
        ("tt04_soft", "demo", 1800, TT04 + SOFT),
        ("tt04_soft_s1", "demo", 1800, TT04 + SOFT + ["seed=1"]),
        ("tt04_3600", "demo", 3600, TT04),
        ("base_s2", "demo", 1800, RISE + ["seed=2"]),
        ("tt03", "demo", 1800, ["dinov2.teacher_temp_start=0.03", "dinov2.teacher_temp_end=0.03"]),
        ("tt04_local4", "demo", 1800, TT04 + ["crops.local_crops_number=4"]),
        ("tt04_soft_s2", "demo", 1800, TT04 + SOFT + ["seed=2"]),
        ("tt04_lscale", "demo", 1800, TT04 + ["crops.local_scale_min=0.25", "crops.local_scale_max=0.5"]),
        ("tt04_nosolar", "demo", 1800, TT04 + ["crops.solarize_p=0"]),
    ],
    # the CPU recipe at its full length (12 epochs: 9,375 steps on train[:50k]): does the demo's
    # teacher temperature carry over to the long schedule? two seeds of each, and 0.03 once
    "third": [
        ("cpu_rise", "fashion-mnist-cpu", 0, RISE),
        ("cpu_tt04", "fashion-mnist-cpu", 0, TT04),
        ("cpu_rise_s1", "fashion-mnist-cpu", 0, RISE + ["seed=1"]),
        ("cpu_tt04_s1", "fashion-mnist-cpu", 0, TT04 + ["seed=1"]),
        (
            "cpu_tt03",
            "fashion-mnist-cpu",
            0,
            ["dinov2.teacher_temp_start=0.03", "dinov2.teacher_temp_end=0.03"],
        ),
    ],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one(name: str, preset: str, steps: int, sets: list[str]) -> None:
    """One run: pretrain, then the validation k-NN; appends its row to $OUT/results.jsonl."""
    import torch

    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow.train.dist import DistContext
    from dinoflow.train.presets import get_preset
    from dinoflow.train.trainer import train
    from dinoflow_tools.bench.cpu_recipe import VAL_SPLIT, apply_overrides, knn_top1

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(1)
    over = {"steps": steps, "epochs": None} if steps else {}
    cfg = apply_overrides(get_preset(preset, **over), [*sets, "data.workers=2"])
    xtr, ytr = load_fashion_mnist("train")
    x, y = torch.from_numpy(xtr.copy()).unsqueeze(1), torch.from_numpy(ytr.copy())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    out = train(cfg, x[:VAL_SPLIT], None, "", ctx=DistContext(device=dev), progress=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    teacher = out.method.export_backbone().eval()
    acc = knn_top1(teacher, x[:VAL_SPLIT], y[:VAL_SPLIT], x[VAL_SPLIT:], y[VAL_SPLIT:])
    row = {
        "name": name,
        "preset": preset,
        "steps": out.steps,
        "sets": sets,
        "knn_val": round(acc, 4),
        "final_loss": round(out.final_loss, 4),
        "train_seconds": round(train_s, 1),
        "device": dev.type,
    }
    print(json.dumps(row), flush=True)
    with open(RES, "a") as f:
        f.write(json.dumps(row) + "\n")


def schedule(runs: list[Run], lanes: int, budget: float) -> None:
    """``lanes`` runs at a time, each in its own process; none starts in the budget's last minute."""
    os.makedirs(LOGS, exist_ok=True)
    t_end = time.time() + budget
    queue, running = list(runs), {}
    while queue or running:
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                log(f"{name} exit {proc.returncode} after {time.time() - t0:.0f} s")
        while queue and len(running) < lanes and time.time() < t_end - 60:
            name, preset, steps, sets = queue.pop(0)
            cmd = [sys.executable, __file__, "one", name, preset, str(steps), *sets]
            with open(os.path.join(LOGS, f"{name}.log"), "w") as logf:
                running[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), time.time())
            log(f"start {name}")
        if time.time() > t_end or (not running and time.time() >= t_end - 60):
            break
        time.sleep(2)
    for name, (proc, _) in running.items():
        proc.kill()
        log(f"killed {name} at the budget")
    rows = [json.loads(line) for line in open(RES)] if os.path.exists(RES) else []
    rows.sort(key=lambda r: -r["knn_val"])
    for r in rows:
        print(f"{r['name']:<16}{r['steps']:>6}{r['knn_val']:>8.4f}  {' '.join(r['sets'])}")
    print(json.dumps({"runs": [{k: r[k] for k in ("name", "steps", "sets", "knn_val")} for r in rows]}))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    if len(sys.argv) >= 5 and sys.argv[1] == "one":
        one(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
    elif len(sys.argv) == 4 and sys.argv[1] in SWEEPS:
        schedule(SWEEPS[sys.argv[1]], int(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.exit(__doc__)
