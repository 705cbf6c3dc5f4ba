"""Benchmarks, one module each: ``dinoflow bench NAME [ARGS...]`` runs ``NAME``'s ``main(args)``.

Every benchmark ends its output with one line of JSON holding its figures.
"""

from __future__ import annotations

import importlib
import pkgutil

from dinoflow.errors import DinoflowError


def names() -> list[str]:
    """The benchmarks, as the command line spells them (``train-step``)."""
    return sorted(
        m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
    )


def run(name: str, args: list[str]) -> None:
    """Run benchmark ``name`` with its command-line arguments."""
    if name not in names():
        raise DinoflowError(f"unknown benchmark {name!r}; available: {', '.join(names())}")
    importlib.import_module(f"{__name__}.{name.replace('-', '_')}").main(args)
