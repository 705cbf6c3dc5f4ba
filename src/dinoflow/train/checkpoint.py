"""Checkpoints in object storage: ``{out}/checkpoints/step-00000100.pt``, one file per save.

``ObjectStore.put_file`` is atomic (temporary key, then copy), so a checkpoint key that exists is
complete; resume picks the highest step. Full (unsharded) state dicts are gathered on rank 0 through
``torch.distributed.checkpoint.state_dict``, which treats plain, DDP and FSDP2 modules alike.
"""

from __future__ import annotations

import io
import os
import random
import re
import tempfile
from typing import Any

import numpy as np
import torch

from dinoflow.storage.client import ObjectStore, join_uri

_NAME = re.compile(r"step-(\d{8})\.pt$")


def checkpoint_uri(output_uri: str, step: int) -> str:
    return join_uri(output_uri, "checkpoints", f"step-{step:08d}.pt")


def list_checkpoints(store: ObjectStore, output_uri: str) -> list[tuple[int, str]]:
    prefix = join_uri(output_uri, "checkpoints") + "/"
    found = []
    for uri in store.list(prefix):
        m = _NAME.search(uri)
        if m:
            found.append((int(m.group(1)), uri))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=msd,
        optim_state_dict=osd,
        options=StateDictOptions(full_state_dict=True),
    )


def save_checkpoint(
    store: ObjectStore, output_uri: str, step: int, payload: dict[str, Any], keep: int
) -> str:
    """Upload atomically; then drop all but the ``keep`` newest checkpoints."""
    uri = checkpoint_uri(output_uri, step)
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, path)
        store.put_file(uri, path)
    finally:
        os.unlink(path)
    for _, old in list_checkpoints(store, output_uri)[:-keep]:
        store.delete(old)
    return uri


def load_checkpoint(store: ObjectStore, uri: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(store.get_bytes(uri)), map_location="cpu", weights_only=False)
