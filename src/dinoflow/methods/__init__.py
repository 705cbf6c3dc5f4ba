"""Training methods behind one interface (``dinoflow.methods.base.Method``).

``method_class(name)`` picks one by name from ``METHODS``; ``build_method(cfg, store)`` builds it with
its ``from_config``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dinoflow.errors import SpecError

if TYPE_CHECKING:
    from dinoflow.methods.base import Method
    from dinoflow.storage.client import ObjectStore
    from dinoflow.train.config import TrainConfig

# name -> "module:Class"
METHODS: dict[str, str] = {
    "dinov2": "dinoflow.methods.dinov2:DINOv2",
    "distill": "dinoflow.methods.distill:Distill",
    "mae": "dinoflow.methods.mae:MAE",
    "splitmask": "dinoflow.methods.splitmask:SplitMask",
    "sscd": "dinoflow.methods.sscd:SSCD",
}


def method_class(name: str) -> Any:
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    mod, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def build_method(cfg: TrainConfig, store: ObjectStore | None = None) -> Method:
    """The method ``cfg.method`` names, built from ``cfg`` (and ``store`` for stored weights)."""
    return method_class(cfg.method).from_config(cfg, store)
