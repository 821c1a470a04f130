"""Rooms a newcomer can find: no class over 250 lines, no function over 60, unless its def line says why."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ckpt_watcher"
LONGEST_CLASS = 250
LONGEST_FUNCTION = 60


def _oversized() -> list[str]:
    found: list[str] = []
    for module in sorted(PACKAGE.glob("*.py")):
        text = module.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, str(module))):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = LONGEST_CLASS if isinstance(node, ast.ClassDef) else LONGEST_FUNCTION
            if length > limit and "long:" not in lines[node.lineno - 1]:
                found.append(f"{module.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_class_or_function_is_longer_than_the_limit_without_a_reason() -> None:
    assert _oversized() == [], "shorten it, or say why it is clearest long on its def line ('long: ...')"
