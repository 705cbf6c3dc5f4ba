"""Probes of training's resume path: a checkpoint planted in the bucket never runs code and is never
resumed from, a changed checkpoint is refused, and a run never resumes under another config."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch

from dinoflow.errors import SpecError
from dinoflow.train import checkpoint as ckpt
from dinoflow.train import trainer
from dinoflow.train.presets import get_preset


def _cfg(**kw):
    cfg = get_preset("demo", batch_size=8, log_every_steps=1, checkpoint_every_steps=1, **kw)
    return cfg.model_copy(
        update={
            "backbone": "vit_test_p4_28",
            "crops": cfg.crops.model_copy(update={"local_crops_number": 2, "local_crop_px": 12}),
            "data": cfg.data.model_copy(update={"workers": 0}),
        }
    )


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=g)


class _Planted:
    """A pickle that, when unpickled by a permissive loader, creates a file: proof of code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _planted_bytes(marker) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": _Planted(str(marker)), "step": 99}, buf, _use_new_zipfile_serialization=True)
    return buf.getvalue()


def test_a_planted_pickle_never_runs_and_is_never_resumed(store, bucket_uri, images, tmp_path):
    marker = tmp_path / "pwned"
    planted = _planted_bytes(marker)
    # the probe: a pickle put at the newest step of the folder a pretrain resumes from
    store.put_bytes(ckpt.checkpoint_uri(bucket_uri, 99), planted)
    out = trainer.train(_cfg(steps=2), images, store, bucket_uri, progress=False)
    assert out.resumed_from_step == 0 and out.steps == 2  # trained afresh: no record, not ours
    assert not marker.exists()
    # with a forged record that vouches for its bytes, it is still only ever read weights-only
    forged = bucket_uri + "/forged"
    uri = ckpt.checkpoint_uri(forged, 5)
    store.put_bytes(uri, planted)
    import hashlib

    record = {
        "step": 5,
        "sha256": hashlib.sha256(planted).hexdigest(),
        "size": len(planted),
        "config_hash": "x",
    }
    store.put_json(ckpt.record_uri(uri), record)
    with pytest.raises(ckpt.CheckpointError) as e:
        trainer.train(_cfg(steps=8), images, store, forged, progress=False)
    assert "\n" not in str(e.value) and "more than tensors" in str(e.value)
    assert not marker.exists()
    # a plain pickle (not even a torch file) is refused the same way
    store.put_bytes(uri, pickle.dumps(_Planted(str(marker))))
    record.update(sha256=hashlib.sha256(store.get_bytes(uri)).hexdigest(), size=len(store.get_bytes(uri)))
    store.put_json(ckpt.record_uri(uri), record)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(store, uri)
    assert not marker.exists()


def test_a_checkpoint_whose_bytes_changed_is_refused(store, bucket_uri, images):
    trainer.train(_cfg(steps=4), images, store, bucket_uri, progress=False, max_steps_this_run=2)
    (step, uri), *_ = reversed(ckpt.list_checkpoints(store, bucket_uri))
    assert step == 2
    state = ckpt.load_checkpoint(store, uri)
    assert state["config_hash"] == store.get_json(ckpt.record_uri(uri))["config_hash"]
    # a valid weights-only file, but not the one that was recorded: e.g. weights swapped in the bucket
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    store.put_bytes(uri, buf.getvalue())
    with pytest.raises(ckpt.CheckpointError, match="does not match the digest"):
        trainer.train(_cfg(steps=4), images, store, bucket_uri, progress=False)


def test_a_run_never_resumes_under_another_config(store, bucket_uri, images):
    """The issue's probe: killed at step 3 of 6, rerun with steps 2, it 'resumed from step 3 of 2'."""
    first = trainer.train(_cfg(steps=6), images, store, bucket_uri, progress=False, max_steps_this_run=3)
    assert first.steps == 3 and not first.finished
    with pytest.raises(SpecError, match=r"another training config \(steps: 6 -> 2\)"):
        trainer.train(_cfg(steps=2), images, store, bucket_uri, progress=False)
    with pytest.raises(SpecError, match="optim.lr_per_1024"):
        cfg = _cfg(steps=6)
        trainer.train(
            cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr_per_1024": 0.5})}),
            images,
            store,
            bucket_uri,
            progress=False,
        )
    # runtime settings are not the trajectory: the same run resumes with other logging/worker values
    cfg = _cfg(steps=6)
    cfg = cfg.model_copy(update={"log_every_steps": 2, "data": cfg.data.model_copy(update={"workers": 1})})
    done = trainer.train(cfg, images, store, bucket_uri, progress=False)
    assert done.resumed_from_step == 3 and done.finished


def test_checkpoints_load_weights_only_and_carry_their_hash(store, bucket_uri, images, monkeypatch):
    seen = []
    real = torch.load

    def spy(*a, **k):
        seen.append(k.get("weights_only"))
        return real(*a, **k)

    # killed after step 1, while DINO's prototypes are frozen and have no optimizer state yet
    trainer.train(_cfg(steps=4), images, store, bucket_uri, progress=False, max_steps_this_run=1)
    monkeypatch.setattr(torch, "load", spy)
    out = trainer.train(_cfg(steps=4), images, store, bucket_uri, progress=False)
    assert out.resumed_from_step == 1 and out.finished and seen == [True]
    _, uri = ckpt.list_checkpoints(store, bucket_uri)[-1]
    record = store.get_json(ckpt.record_uri(uri))
    assert record["config_hash"] == ckpt.config_hash(_cfg(steps=4).model_dump(mode="json"))
    assert set(record) == {"step", "sha256", "size", "config_hash"}
    assert json.dumps(record)  # plain JSON, beside the checkpoint
    # no local temporary file of this process outlives the save
    from dinoflow.storage.client import local_tmp_dir

    assert not [f for f in local_tmp_dir().iterdir() if f.name.startswith(f"{os.getpid()}-")]
