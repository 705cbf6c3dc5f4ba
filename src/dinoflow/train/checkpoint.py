"""Checkpoints in object storage: ``{out}/checkpoints/step-00000100.pt``, one file per save.

``ObjectStore.put_file`` is atomic (temporary key, then copy), so a checkpoint key that exists is
complete; resume picks the highest step. Full (unsharded) state dicts are gathered on rank 0 through
``torch.distributed.checkpoint.state_dict``, which treats plain, DDP and FSDP2 modules alike.

A checkpoint holds only tensors, plain containers, numbers and strings (RNG states as tensors), so
it loads with ``torch.load(weights_only=True)``: reading one never runs pickled code.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import tempfile
from typing import Any

import numpy as np
import torch

from dinoflow.errors import DinoflowError
from dinoflow.storage.client import ObjectStore, join_uri


class CheckpointError(DinoflowError):
    """A checkpoint that cannot be read safely."""


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
    """Every random generator's state, as tensors and plain numbers."""
    py_version, py_words, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {
            "version": py_version,
            "state": torch.tensor(py_words, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))


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
    try:
        return torch.load(io.BytesIO(store.get_bytes(uri)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{uri} holds more than tensors, containers, numbers and strings (written by an older "
            f"dinoflow?); delete it to restart, or resume with the version that wrote it: {e}"
        ) from e
