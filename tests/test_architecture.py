"""Layout rules: import direction between sub-packages, and file/function size caps."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "internvl35"
# sub-package -> sub-packages it may import (besides itself, config and errors)
ALLOWED = {
    "models": set(),
    "data": set(),
    "weights": {"models", "data"},
    "train": {"models", "data", "weights", "hardware", "chat", "eval"},
    "eval": {"models", "data", "weights", "chat", "engine", "sampling"},
    "engine": {"models", "data", "weights", "sampling", "chat", "generate"},
    "serve": {"models", "data", "weights", "engine", "sampling", "chat"},
}
FORBIDDEN_IN_MODELS = {"transformers", "fastapi", "tokenizers", "PIL"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_import_direction():
    bad = []
    for sub, allowed in ALLOWED.items():
        for f in (PKG / sub).rglob("*.py"):
            for name in _imports(f):
                top = name.split(".")[0]
                if sub == "models" and top in FORBIDDEN_IN_MODELS:
                    bad.append(f"{f.relative_to(PKG)} imports {name}")
                if top != "internvl35" or name.count(".") == 0:
                    continue
                target = name.split(".")[1]
                if target not in allowed | {sub, "config", "errors"}:
                    bad.append(f"{f.relative_to(PKG)} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_cli():
    users = [f for f in PKG.rglob("*.py") if f.name != "cli.py" and "internvl35.cli" in _imports(f)]
    assert not users


def test_size_caps():
    too_long = []
    for f in PKG.rglob("*.py"):
        lines = f.read_text().splitlines()
        if len(lines) > 400:
            too_long.append(f"{f.relative_to(PKG)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    too_long.append(f"{f.relative_to(PKG)}:{node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)
