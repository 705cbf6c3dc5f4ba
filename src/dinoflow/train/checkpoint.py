"""Checkpoints in object storage: ``{out}/checkpoints/step-00000100.pt``, one file per save, each
with a record beside it (``step-00000100.json``: the file's SHA-256 and size, and the hash of the
training config that wrote it), written after the file.

``ObjectStore.put_file`` is atomic (temporary key, then copy), so a checkpoint whose record exists is
complete; resume picks the highest such step. A ``.pt`` without its record (a save killed between
the two writes, or a file put there by someone else) is never loaded. Full (unsharded) state dicts
are gathered on rank 0 through ``torch.distributed.checkpoint.state_dict``, which treats plain, DDP
and FSDP2 modules alike.

A checkpoint holds only tensors, plain containers, numbers and strings (RNG states as tensors), so
it loads with ``torch.load(weights_only=True)``: reading one never runs pickled code. Before that,
its bytes must match the recorded digest, and its config hash the resuming run's: a run never
resumes from a checkpoint another config wrote (``steps: 8`` cannot resume "step 10 of 8").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import random
import re
from typing import Any

import numpy as np
import torch

from dinoflow.errors import DinoflowError, SpecError, StorageError
from dinoflow.storage.client import ObjectStore, join_uri, local_tmp_file

log = logging.getLogger(__name__)


class CheckpointError(DinoflowError):
    """A checkpoint that cannot be read safely."""


_NAME = re.compile(r"step-(\d{8})\.pt$")
# Config fields that change how a run is executed or observed, not what it computes: a run resumed
# with other values of these still continues the same trajectory.
_RUNTIME_FIELDS = {
    "metrics_port",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "compile",
    "compile_heads",
    "activation_checkpointing",
    "distributed",
}
_RUNTIME_DATA_FIELDS = {"workers", "prefetch_batches"}


def checkpoint_uri(output_uri: str, step: int) -> str:
    return join_uri(output_uri, "checkpoints", f"step-{step:08d}.pt")


def record_uri(checkpoint: str) -> str:
    """The record beside a checkpoint: its digest, size and config hash."""
    return checkpoint[: -len(".pt")] + ".json"


def _trajectory(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in _RUNTIME_FIELDS}
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k not in _RUNTIME_DATA_FIELDS}
    return out


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a training config (``TrainConfig.model_dump(mode="json")``) without its runtime fields."""
    payload = json.dumps(_trajectory(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """``"steps: 60 -> 8, optim.lr_per_1024: ..."``: the trajectory fields that differ."""

    def flat(d: dict[str, Any], pre: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    a, b = flat(_trajectory(old)), flat(_trajectory(new))
    diffs = [
        f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    return ", ".join(diffs[:limit]) + (f" (and {len(diffs) - limit} more)" if len(diffs) > limit else "")


def list_checkpoints(store: ObjectStore, output_uri: str) -> list[tuple[int, str]]:
    """The complete checkpoints under ``output_uri`` (a ``.pt`` with its record), oldest first; a
    ``.pt`` without one is skipped with a warning."""
    prefix = join_uri(output_uri, "checkpoints") + "/"
    listed = set(store.list(prefix))
    found = []
    for uri in sorted(listed):
        m = _NAME.search(uri)
        if not m:
            continue
        if record_uri(uri) not in listed:
            log.warning(
                "%s has no record beside it (a killed save, or not written by dinoflow): not used", uri
            )
            continue
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
    """The model's state strictly (every key, every shape); then the optimizer's, where a parameter
    that has had no gradient yet (DINO's prototypes while frozen) rightly has no state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True, strict=True))
    set_optimizer_state_dict(
        model, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def save_checkpoint(
    store: ObjectStore, output_uri: str, step: int, payload: dict[str, Any], keep: int
) -> str:
    """Upload atomically, then its record (digest, size, config hash); then drop all but the
    ``keep`` newest checkpoints. ``payload["config"]`` (the training config) gives the hash."""
    uri = checkpoint_uri(output_uri, step)
    chash = config_hash(payload.get("config") or {})
    payload = {**payload, "config_hash": chash}
    path = local_tmp_file(".pt")  # a killed save leaves it to sweep_local_tmp
    try:
        torch.save(payload, path)
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
        store.put_file(uri, path)
    finally:
        path.unlink(missing_ok=True)
    store.put_json(
        record_uri(uri), {"step": step, "sha256": digest.hexdigest(), "size": size, "config_hash": chash}
    )
    for _, old in list_checkpoints(store, output_uri)[:-keep]:
        store.delete(record_uri(old))  # the record first: a half-deleted checkpoint is never loaded
        store.delete(old)
    return uri


def load_checkpoint(store: ObjectStore, uri: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint that its record vouches for: same bytes (SHA-256), then
    ``weights_only=True``; with ``config`` (the resuming run's training config), the checkpoint
    must have been written by the same config (``SpecError`` naming what differs)."""
    try:
        record = store.get_json(record_uri(uri))
        want_sha, want_size, chash = record["sha256"], int(record["size"]), record["config_hash"]
    except (StorageError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{uri}: its record {record_uri(uri)} is missing or unreadable ({e})") from None
    data = store.get_bytes(uri)
    if len(data) != want_size or hashlib.sha256(data).hexdigest() != want_sha:
        raise CheckpointError(
            f"{uri} does not match the digest recorded when it was written (changed or replaced since): "
            "refusing to load it; delete the checkpoint (and its .json) to restart from the previous one"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # not a weights-only file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{uri} holds more than tensors, containers, numbers and strings (written by an older "
            f"dinoflow, or not by dinoflow); delete it to restart: {first}"
        ) from None
    if not isinstance(state, dict) or state.get("config_hash") != chash:
        raise CheckpointError(f"{uri}: its content does not carry the config hash its record names")
    if config is not None and chash != config_hash(config):
        raise SpecError(
            f"{uri} was written by another training config ({config_diff(state.get('config') or {}, config)}): "
            "resume with the config that wrote it, or choose a new output_uri"
        )
    return state
