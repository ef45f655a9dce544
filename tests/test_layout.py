"""The package's one direction of imports (README, file map): ops <- layers <- model <- programs. Every import of a
ttt module, also those inside functions, is read from the source."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ttt"
MODEL = ("ttt.model", "ttt.config")  # the model level; every other top-level module is a program


def level(module: str) -> int:
    if module == "ttt.ops" or module.startswith("ttt.ops."):
        return 0
    if module == "ttt.layers" or module.startswith("ttt.layers."):
        return 1
    return 2 if module in MODEL else 3


def imports() -> dict[str, set[str]]:
    """module -> the ttt modules it imports (relative imports resolved)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[:-1]  # the package a relative import starts from
        name = ".".join(package if path.name == "__init__.py" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                found.add(target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[name] = {m for m in found if m and (m == "ttt" or m.startswith("ttt."))}
    return out


def test_imports_point_down():
    """ops import no layer, model or program; layers no model or program; the model no program (the package's
    __init__ re-exports the public names and is exempt)."""
    found = imports()
    assert "ttt.ops.fused_layer" in found and "ttt.layers.conv" in found and "ttt.model" in found
    bad = [f"{m} -> {t}" for m, targets in found.items() if m != "ttt" for t in targets if level(t) > level(m)]
    assert not bad, bad

