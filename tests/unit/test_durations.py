"""Durations (``durations.py``) and the policy key that uses them, ``trash: {grace: ...}``."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watcher.durations import LONGEST_SECONDS, DurationError, format_duration, parse_duration
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import PolicyError, load_policy
from ckpt_watcher.report import render_policy

GOOD: list[tuple[str, int]] = [
    ("0", 0),
    ("0s", 0),
    ("30s", 30),
    ("15m", 900),
    ("24h", 86400),
    ("7d", 604800),
    ("1h30m", 5400),
    ("1d12h", 129600),
    (" 2s ", 2),
    ("3650d", LONGEST_SECONDS),
]


@pytest.mark.parametrize(("text", "seconds"), GOOD)
def test_a_duration_is_read_in_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


BAD: list[tuple[str, str]] = [
    ("24", "a number needs a unit"),
    ("", "expected a duration"),
    ("h", "expected a duration"),
    ("1.5h", "expected a duration"),
    ("-1h", "expected a duration"),
    ("24H", "expected a duration"),
    ("1 h", "expected a duration"),
    ("1w", "expected a duration"),
    ("3651d", "at most 3650d"),
    ("99999999999999999999d", "at most 3650d"),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_anything_else_is_refused_with_a_reason(text: str, problem: str) -> None:
    with pytest.raises(DurationError, match=problem):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=LONGEST_SECONDS))
def test_format_then_parse_is_the_identity(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_uses_the_largest_units() -> None:
    assert [format_duration(value) for value in (0, 59, 61, 5400, 86400, 90061)] == [
        "0s",
        "59s",
        "1m1s",
        "1h30m",
        "1d",
        "1d1h1m1s",
    ]


# --- the policy key ---------------------------------------------------------------------------

TRASH_KEYS: list[tuple[str, int]] = [
    ("trash: {grace: 24h}\n", 86400),
    ("trash: {grace: 2s}\n", 2),
    ("trash:\n  grace: 1h30m\n", 5400),
    ("trash: {grace: 0}\n", 0),
    ("trash: {grace: 0s}\n", 0),
    ("trash: {}\n", 0),
    ("save_top_k_best: 2\n", 0),  # no trash key: off
]


@pytest.mark.parametrize(("text", "seconds"), TRASH_KEYS)
def test_the_trash_grace_is_a_duration_and_zero_or_absent_is_off(
    tmp_path: Path, text: str, seconds: int
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    trash = load_policy(path).policy.trash
    assert trash.grace_seconds == seconds
    assert trash.enabled is (seconds > 0)


BAD_TRASH: list[tuple[str, str]] = [
    ("trash: {grace: 24}\n", "At 'trash.grace': expected a duration such as 24h (units s, m, h, d) or 0"),
    ("trash: {grace: 1.5h}\n", "At 'trash.grace': expected a duration such as 30s, 15m, 24h, 7d or 1h30m"),
    ("trash: {grace: true}\n", "At 'trash.grace': expected a duration such as 24h"),
    ("trash: {grace: [1h]}\n", "At 'trash.grace': expected a duration such as 24h"),
    ("trash: {grace: 4000d}\n", "At 'trash.grace': must be at most 3650d"),
    ("trash: 24h\n", "At 'trash': expected a mapping, got '24h' (a string)"),
    ("trash:\n", "At 'trash': expected a mapping, got null"),
    ("trash: {grace_period: 1h}\n", "At 'trash.grace_period': unknown key (the only known one is grace)"),
    ("trash:\n  grace: 1h\n  grace: 2h\n", "At 'trash.grace': set more than once (lines 2, 3); keep one"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_TRASH)
def test_a_bad_trash_setting_is_a_policy_error(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(problem), caught.value.problems


def test_a_per_run_file_overrides_the_trash_and_its_errors_quote_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "run" / "other").mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text("trash: {grace: 24h}\n")
    (root / "run" / ".ckpt-watcher.yaml").write_text("trash: {grace: 10m}\n")
    (root / "run" / "other" / ".ckpt-watcher.yaml").write_text("trash: {grace: 0}\n")
    tree = PolicyTree(root, load_policy(policy), strict=True)

    graces = {name: tree.for_directory(root / name) for name in ("", "run", "run/other")}

    assert {name: value.policy.trash.grace_seconds for name, value in graces.items() if value} == {
        "": 86400,
        "run": 600,
        "run/other": 0,
    }
    (root / "run" / ".ckpt-watcher.yaml").write_text("trash: {grace: secret-words}\n")
    fresh = PolicyTree(root, load_policy(policy), strict=True)
    assert fresh.for_directory(root / "run") is None
    [error] = fresh.errors
    assert "secret-words" not in error.render()
    assert "At 'trash.grace': expected a duration" in error.render()


def test_the_policy_command_shows_the_trash_with_its_origin(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("trash: {grace: 24h}\n")
    text = render_policy(load_policy(path))
    assert f'trash:  # from {path}\n  grace: "24h"' in text
