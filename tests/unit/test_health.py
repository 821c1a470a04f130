"""``health``'s verdict on a heartbeat file, and how the console script finds the command word."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_watcher.console import command_position
from ckpt_watcher.health import EXIT_FRESH, EXIT_STALE, check

MAX_AGE = 60.0
NOW = 1_800_000_000.0


def _heartbeat(tmp_path: Path, age: float) -> Path:
    path = tmp_path / "heartbeat"
    path.touch()
    os.utime(path, (NOW - age, NOW - age))
    return path


@pytest.mark.parametrize(
    ("age", "exit_code", "words"),
    [
        (0.0, EXIT_FRESH, "fresh: "),
        (4.2, EXIT_FRESH, "last touched 4.2 s ago (max age 1 min)"),
        (60.0, EXIT_FRESH, "fresh: "),
        (61.0, EXIT_STALE, "last touched 1 min 1 s ago (max age 1 min)"),
        (125.0, EXIT_STALE, "last touched 2 min 5 s ago"),
        (3 * 3600 + 12 * 60, EXIT_STALE, "last touched 3 h 12 min ago"),
        (2 * 86400 + 3600, EXIT_STALE, "last touched 2 d 1 h ago"),
        (-30.0, EXIT_FRESH, "last touched 0.0 s ago"),  # a touch a little ahead of this clock
        (-3600.0, EXIT_STALE, "dated 1 h in the future (was the clock set back?)"),
    ],
)
def test_the_verdict_and_its_line_follow_the_heartbeats_age(
    tmp_path: Path, age: float, exit_code: int, words: str
) -> None:
    verdict = check(_heartbeat(tmp_path, age), MAX_AGE, now=NOW)

    assert verdict.exit_code == exit_code
    assert words in verdict.line
    assert verdict.line.startswith("fresh: " if exit_code == EXIT_FRESH else "stale: ")
    assert "\n" not in verdict.line


def test_a_missing_heartbeat_is_stale_and_says_so(tmp_path: Path) -> None:
    verdict = check(tmp_path / "never-written", MAX_AGE, now=NOW)

    assert verdict.exit_code == EXIT_STALE
    assert "never-written does not exist" in verdict.line


def test_a_heartbeat_that_cannot_be_read_is_stale(tmp_path: Path) -> None:
    """A component that is a file, not a directory: stat fails with ENOTDIR."""
    (tmp_path / "file").touch()

    verdict = check(tmp_path / "file" / "heartbeat", MAX_AGE, now=NOW)

    assert verdict.exit_code == EXIT_STALE
    assert verdict.line.startswith("stale: cannot read ")
    assert "Not a directory" in verdict.line


def test_a_hostile_heartbeat_name_is_printed_on_one_line(tmp_path: Path) -> None:
    verdict = check(tmp_path / "beat\nfresh: \x1b[2J", MAX_AGE, now=NOW)

    assert verdict.exit_code == EXIT_STALE
    assert "\n" not in verdict.line
    assert "\x1b" not in verdict.line


@pytest.mark.parametrize(
    ("arguments", "position"),
    [
        (["health", "--heartbeat", "F"], 0),
        (["--log-level", "debug", "health"], 2),
        (["--log-level=debug", "health"], 1),
        (["--log-level", "health", "health"], 2),  # the option's value is never the command
        (["watch", "health"], 0),
        (["--version"], None),
        (["--help", "health"], None),
        ([], None),
    ],
)
def test_the_console_script_finds_the_command_word_past_the_global_options(
    arguments: list[str], position: int | None
) -> None:
    assert command_position(arguments) == position
