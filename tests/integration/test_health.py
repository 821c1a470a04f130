"""``ckpt-watcher health`` as probes run it: the console script and ``python -m``, exit codes, and
what it imports (never the daemon's dependencies: it runs every few seconds in every pod)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from ckpt_watcher.cli import main
from tests.support.cli import imported_modules, run_cli, run_command

CONSOLE_SCRIPT = Path(sys.executable).parent / "ckpt-watcher"
HEAVY = ("pydantic", "structlog", "yaml", "watchdog", "prometheus_client", "torch", "ckpt_watcher.cli")


def _run(
    command: Sequence[str], environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_command(command, timeout=60, environment=environment)


def _fresh(tmp_path: Path) -> Path:
    heartbeat = tmp_path / "heartbeat"
    heartbeat.touch()
    return heartbeat


ENTRY_POINTS = {
    "console-script": [str(CONSOLE_SCRIPT)],
    "python-m": [sys.executable, "-m", "ckpt_watcher"],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=str)
def test_health_imports_none_of_the_daemons_dependencies(tmp_path: Path, entry: str) -> None:
    command = [*ENTRY_POINTS[entry], "--log-level", "info", "health", "--heartbeat", str(_fresh(tmp_path))]

    result = _run(command, {"PYTHONPROFILEIMPORTTIME": "1"})

    assert result.returncode == 0, result.stdout + result.stderr
    imported = imported_modules(result.stderr)
    assert "ckpt_watcher.health" in imported, "the import profile was not read"
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY or name in HEAVY)
    assert heavy == []


def test_the_other_commands_still_go_through_cli(tmp_path: Path) -> None:
    result = _run([str(CONSOLE_SCRIPT), "policy", "--json"], {"PYTHONPROFILEIMPORTTIME": "1"})

    assert result.returncode == 0, result.stderr
    assert {"ckpt_watcher.cli", "structlog"} <= imported_modules(result.stderr)


def test_fresh_stale_and_missing_heartbeats_give_0_1_1(tmp_path: Path) -> None:
    heartbeat = _fresh(tmp_path)
    arguments = ("health", "--heartbeat", str(heartbeat), "--max-age", "30")

    fresh = run_cli(*arguments)
    assert (fresh.returncode, fresh.stdout.startswith("fresh: ")) == (0, True), fresh.stderr

    two_minutes_ago = time.time() - 120
    os.utime(heartbeat, (two_minutes_ago, two_minutes_ago))
    stale = run_cli(*arguments)
    assert stale.returncode == 1
    # The age is whole seconds when the command ran (its start takes ~0.1 s, more on a loaded machine:
    # "2 min 1 s"); the wording at a given age is tests/unit/test_health.py's, with a fixed clock.
    [line] = stale.stdout.splitlines()
    assert re.fullmatch(
        rf"stale: {re.escape(str(heartbeat))} was last touched 2 min( \d+ s)? ago \(max age 30 s\)", line
    )

    heartbeat.unlink()
    missing = run_cli(*arguments)
    assert missing.returncode == 1
    assert missing.stdout.startswith(f"stale: {heartbeat} does not exist")


@pytest.mark.parametrize(
    "arguments",
    [
        ["health"],
        ["health", "--heartbeat"],
        ["health", "--heartbeat", "F", "--max-age", "0"],
        ["health", "--heartbeat", "F", "--max-age", "-5"],
        ["health", "--heartbeat", "F", "--max-age", "soon"],
        ["health", "--heartbeat", "F", "--max-age", "inf"],
        ["health", "--heartbeat", "F", "extra"],
    ],
)
def test_usage_errors_exit_2(arguments: list[str]) -> None:
    result = run_cli(*arguments)

    assert result.returncode == 2
    assert "ckpt-watcher health: error:" in result.stderr
    assert result.stdout == ""


def test_cli_main_answers_health_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Called as ``cli.main`` (an old console script, or a program), ``health`` works the same."""
    assert main(["health", "--heartbeat", str(_fresh(tmp_path))]) == 0
    assert capsys.readouterr().out.startswith("fresh: ")
    assert main(["health", "--heartbeat", str(tmp_path / "none")]) == 1
