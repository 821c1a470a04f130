"""README's reference lists are the code's: the event names the code logs, the policy keys' meanings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ckpt_watcher.policy import POLICY_DESCRIPTIONS

REPOSITORY = Path(__file__).resolve().parents[2]
PACKAGE = REPOSITORY / "ckpt_watcher"
README = REPOSITORY / "README.md"
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})


def _is_logger(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and re.fullmatch(r"(\w+_)?log(ger)?", node.id) is not None


def _log_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LOG_METHODS
        and _is_logger(node.func.value)
    ]


def _event_name(call: ast.Call) -> str | None:
    is_log_method = isinstance(call.func, ast.Attribute) and call.func.attr == "log"
    arguments = call.args[1:] if is_log_method else call.args
    if arguments and isinstance(arguments[0], ast.Constant) and isinstance(arguments[0].value, str):
        return arguments[0].value
    return None


def emitted_event_names() -> dict[str, set[str]]:
    """Every event name a log call in the package names, with the modules that log it."""
    names: dict[str, set[str]] = {}
    for module in sorted(PACKAGE.glob("*.py")):
        for call in _log_calls(ast.parse(module.read_text(), str(module))):
            name = _event_name(call)
            assert name is not None, f"{module.name}:{call.lineno}: a log call without a literal event name"
            names.setdefault(name, set()).add(module.name)
    return names


def documented_event_names() -> set[str]:
    """The names in README's "Event names are stable" paragraph."""
    text = README.read_text()
    start = text.index("Event names are stable")
    paragraph = text[start : text.index("\n\n", start)]
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", paragraph))


def test_every_log_call_names_a_stable_snake_case_event() -> None:
    for name in emitted_event_names():
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)+", name), name


def test_the_readme_lists_exactly_the_events_the_code_emits() -> None:
    emitted = emitted_event_names()
    documented = documented_event_names()

    assert sorted(set(emitted) - documented) == [], "logged by the code, missing from README"
    assert sorted(documented - set(emitted)) == [], "listed in README, logged nowhere"


def _policy_table() -> dict[str, str]:
    """README's policy table: key -> meaning, markdown links read as their text."""
    text = README.read_text()
    start = text.index("| key | type | default | meaning |")
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        meaning = re.sub(r"\[([^]]+)\]\([^)]*\)", r"\1", cells[-1])
        rows[cells[0].strip("`")] = meaning
    return rows


def test_the_readme_policy_table_is_the_policy_models_own_description() -> None:
    assert _policy_table() == POLICY_DESCRIPTIONS
