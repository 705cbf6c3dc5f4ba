"""Training methods behind one interface (``dinoflow.methods.base.Method``).

``build_method(name, backbone, **configs)`` picks one by name; MAE / SplitMask / distillation register
themselves in ``METHODS`` from their own modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from dinoflow.errors import SpecError

# name -> "module:Class"; other engineers add their methods here.
METHODS: dict[str, str] = {
    "dinov2": "dinoflow.methods.dinov2:DINOv2",
    "mae": "dinoflow.methods.mae:MAE",
    "splitmask": "dinoflow.methods.splitmask:SplitMask",
}


def method_class(name: str) -> Any:
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    mod, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)
