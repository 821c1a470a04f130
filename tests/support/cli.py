"""Run ``python -m ckpt_watcher ...`` as a real process: the one command-line runner of the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 240.0  # a deadline for a hung command, generous for a loaded machine

# Drops the capabilities that let root read any directory, so a test run as root can stage an
# unreadable directory with chmod 000 (util-linux's setpriv).
WITHOUT_READ_OVERRIDE = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)


def run_cli(
    *arguments: str,
    cwd: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    environment: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``ckpt-watcher ARGUMENTS`` in a child interpreter; never raises on a non-zero exit code.

    ``prefix`` is a command that runs the interpreter (e.g. ``WITHOUT_READ_OVERRIDE``); ``environment``
    is added to the test's own environment.
    """
    env = {**os.environ, **(environment or {})}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "ckpt_watcher", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=env,
    )


def log_records(stderr: str) -> list[dict[str, Any]]:
    """The JSON log records of a finished command's stderr (a line that is not JSON is kept as text)."""
    records: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({"event": "<not json>", "line": line})
    return records


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    """The records of one event name in a finished command's stderr."""
    return [record for record in log_records(stderr) if record.get("event") == name]
