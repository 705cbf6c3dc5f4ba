"""The layers (README, "Layout") point down, and no module imports itself back through others.

Every ``import`` in the package (module level and inside functions alike) is read with ``ast``:
pipelines -> components -> the component runtime (``dinoflow.kfp``) -> stages -> the science
(curation, methods, train, eval, losses) -> data, models, storage -> errors, settings, metrics.
The drivers above the pipelines (the CLI, the demo, compiling, local runs, cluster submission) may
import anything. The tooling (``tools/``) is never imported by the package.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> folder in the repository
PACKAGES = {
    "dinoflow": ROOT / "src" / "dinoflow",
    "dinoflow.components": ROOT / "components",
    "dinoflow.pipelines": ROOT / "pipelines",
}
# module prefix -> layer (higher imports lower); the longest matching prefix decides
LAYERS = {
    "dinoflow": 0,
    "dinoflow.errors": 0,
    "dinoflow.settings": 0,
    "dinoflow.metrics": 0,
    "dinoflow.data": 1,
    "dinoflow.models": 1,
    "dinoflow.storage": 1,
    "dinoflow.losses": 2,
    "dinoflow.curation": 2,
    "dinoflow.methods": 2,
    "dinoflow.train": 2,
    "dinoflow.eval": 2,
    "dinoflow.stages": 3,
    "dinoflow.kfp": 4,
    "dinoflow.components": 5,
    "dinoflow.pipelines": 6,
    "dinoflow.kfp.compile": 7,
    "dinoflow.kfp.local": 7,
    "dinoflow.kfp.client": 7,
    "dinoflow.demo": 7,
    "dinoflow.cli": 7,
}
FOREIGN = ("components", "pipelines", "dinoflow_tools")  # never imported by the package


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names imported by module ``name`` (relative imports resolved)."""
    out: set[str] = set()
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for target in _imports(name, path):
            parts = target.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges[name].add(".".join(parts))
    return edges


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_every_module_has_a_layer():
    mods = _modules()
    assert "dinoflow.stages.pretrain" in mods and "dinoflow.pipelines.full" in mods
    for name in mods:
        _layer(name)  # raises on a module outside every layer


def test_no_upward_import():
    upward = sorted(
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, targets in _graph().items()
        for b in targets
        if _layer(b) > _layer(a)
    )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_generic_top_level_or_tooling_import():
    bad = sorted(
        f"{name} imports {target}"
        for name, path in _modules().items()
        for target in _imports(name, path)
        if target.split(".")[0] in FOREIGN
    )
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_look_for():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("dinoflow.kfp.runtime") == 4 and _layer("dinoflow.kfp.compile") == 7
    assert _layer("dinoflow.stages.ingest") > _layer("dinoflow.data.ingest")
