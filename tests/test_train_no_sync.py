"""Between logging intervals a training step reads no number back from its tensors: logs stay
tensors until the trainer's logging point (on a GPU each read would stall the step)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from dinoflow import metrics
from dinoflow.train import trainer
from dinoflow.train.presets import get_preset


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_tensor_reads_between_logging_intervals(monkeypatch, checkpointing):
    cfg = get_preset("demo", steps=6, batch_size=8, log_every_steps=3, activation_checkpointing=checkpointing)
    cfg = cfg.model_copy(update={"crops": cfg.crops.model_copy(update={"local_crops_number": 2})})
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    steps_done, reads, recorded = [0], [], []
    inside = [False]

    def counting(name, orig):
        def wrapper(self, *a, **k):
            f = sys._getframe(1)
            host_draw = (
                f"{os.sep}dinoflow{os.sep}data{os.sep}" in f.f_code.co_filename
                and self.device.type == "cpu"
                and self.grad_fn is None
                and not self.requires_grad
            )
            if not host_draw:
                reads.append((name, steps_done[0], inside[0], f"{f.f_code.co_filename}:{f.f_lineno}"))
            return orig(self, *a, **k)

        return wrapper

    for name in ("item", "__float__", "tolist", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    real_step = trainer.train_step

    def step(*a, **k):
        inside[0] = True
        try:
            return real_step(*a, **k)
        finally:
            inside[0] = False
            steps_done[0] += 1

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(metrics, "record_train_step", lambda *a, **k: recorded.append(k["step"]))
    out = trainer.train(cfg, images, None, "", progress=False)
    assert out.steps == 6 and len(out.curves) == 6
    # The only reads allowed inside a step are the augmentation's host-side random draws (CPU tensors
    # from the step's CPU generator, in dinoflow.data); every log is read after steps 3 and 6 only.
    between = [r for r in reads if r[2] or r[1] % cfg.log_every_steps != 0]
    assert not between, sorted({(r[0], r[3]) for r in between})
    assert {r[1] for r in reads if r[1] > 0} == {3, 6}  # (step 0: building the model)
    assert recorded == [3, 6]
