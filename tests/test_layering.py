"""The house rules that keep each feature in one place (docs/architecture.md): the
import-linter contracts of pyproject.toml, one reader of ``model.family``, ruff."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "jaxformer" / "tasks" / "registry.py"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def test_import_contracts_hold() -> None:
    """model imports no train/data/parallel internals, data no model, parallel no model
    classes, nothing the command line, and no two siblings import each other."""
    out = subprocess.run(
        [_tool("lint-imports"), "--config", "pyproject.toml"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "5 kept, 0 broken" in out.stdout


def _is_family(node: ast.AST) -> bool:
    """A read of ``X.family``, ``X["family"]`` or ``X.get("family")``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "family" and isinstance(node.ctx, ast.Load)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value == "family" and isinstance(node.ctx, ast.Load)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
        return node.func.attr == "get" and getattr(node.args[0], "value", None) == "family"
    return False


def family_reads(path: Path) -> list[int]:
    """Lines of ``path`` that read a config's family other than to name it in a message
    (an f-string): each is a decision on the family's name, which belongs to the registry."""
    tree = ast.parse(path.read_text(), str(path))
    in_messages = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FormattedValue)
        for inner in ast.walk(node.value)
    }
    return sorted(
        {node.lineno for node in ast.walk(tree) if _is_family(node) and id(node) not in in_messages}
    )


def test_only_the_registry_compares_model_family() -> None:
    files = sorted((ROOT / "jaxformer").rglob("*.py")) + sorted((ROOT / "tools").rglob("*.py"))
    found = {
        str(p.relative_to(ROOT)): lines
        for p in files
        if p != REGISTRY and (lines := family_reads(p))
    }
    assert found == {}, f"read model.family only in {REGISTRY.relative_to(ROOT)}: {found}"


def test_the_family_check_finds_every_kind_of_read(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "if cfg.model.family == 'bert':\n    pass\nx = TABLE[m.family]\n"
        "f = cfg['family']\ng = m.get('family')\nm.family = 't5'\nerr = f'{m.family!r}'\n"
    )
    assert family_reads(probe) == [1, 3, 4, 5]


def test_ruff_is_clean() -> None:
    out = subprocess.run(
        [_tool("ruff"), "check", "jaxformer", "tools", "tests", "configs", "launch"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
