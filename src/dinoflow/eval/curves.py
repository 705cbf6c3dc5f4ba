"""Training curves as the trainer writes them: ``curves.jsonl``, one JSON object per optimizer step
(``step`` plus losses and schedule values)."""

from __future__ import annotations

import json

from dinoflow.errors import SpecError

# Schedule and timing columns: not curves of how training went.
NOT_CURVES = frozenset(
    {"step", "time", "seconds", "step_seconds", "epoch", "lr", "wd", "teacher_temp", "ema_momentum"}
)


def parse_curves(data: bytes, where: str = "curves") -> dict[str, tuple[list[float], list[float]]]:
    """Curve name -> (steps, values) from JSON Lines; every numeric column but the schedule's."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise SpecError(f"{where}: not UTF-8 text; expected JSON Lines, one object per step") from None
    out: dict[str, tuple[list[float], list[float]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError(
                f"{where} line {n}: not JSON ({e.msg}); expected one JSON object per step"
            ) from None
        if not isinstance(row, dict):
            raise SpecError(f"{where} line {n}: expected a JSON object per step, got {type(row).__name__}")
        step = float(row.get("step", n))
        for k, v in row.items():
            if k in NOT_CURVES or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(step)
            ys.append(float(v))
    return out
