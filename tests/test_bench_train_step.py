"""``dinoflow bench train-step`` and the GPU check's trainer script run on the CPU with tiny sizes
(so they cannot break unnoticed before a GPU run), and report what they claim to."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoflow_tools.bench import train_step

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "vit_test_p4_28", "--global-px", "28", "--local-px", "12", "--batch", "8"]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_bench_reports_both_times_and_counts_more_flops_in_the_full_step(capsys):
    train_step.main([*TINY, "--local-crops", "2", "--reps", "2", "--warmup", "0", "--threads", "2"])
    row = _last_json(capsys.readouterr().out)
    assert row["train_step_seconds"] > 0 and row["backbone_seconds"] > 0
    assert row["train_step_ratio"] == pytest.approx(
        row["train_step_seconds"] / row["backbone_seconds"], rel=1e-2
    )
    # The full step adds the DINO heads (and their backward) to the same backbone work.
    assert row["step_model_flops"] > row["backbone_model_flops"] > 0 and row["flops_ratio"] > 1
    assert row["global_crops"] == "2x28px" and row["local_crops"] == "2x12px"


def test_bench_rejects_bf16_on_cpu():
    from dinoflow.errors import SpecError

    with pytest.raises(SpecError, match="bf16"):
        train_step.main([*TINY, "--precision", "bf16"])


def test_peak_flops_table():
    assert train_step.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train_step.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert train_step.peak_flops("NVIDIA H200") == 989e12
    assert train_step.peak_flops("Some other card") is None


def test_gpu_check_trainer_script_runs_without_a_store(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check_train", ROOT / "scripts" / "gpu_check_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--device", "cpu", "--precision", "fp32", *TINY, "--local-crops", "2", "--steps", "2"])
    row = _last_json(capsys.readouterr().out)
    assert rc == 0 and row["ok"] and row["steps"] == 2 and row["checkpoint_uri"] is None
    assert row["teacher_max_abs_change"] > 0  # the EMA teacher moved


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all parts passed" in (tmp_path / "gpu_check.log").read_text()
    parts = [json.loads(x) for x in (tmp_path / "gpu_check_summary.jsonl").read_text().splitlines()]
    assert {p["part"] for p in parts} == {"train_tiny", "train_vits14", "bench_vits14", "bench_tiny"}
