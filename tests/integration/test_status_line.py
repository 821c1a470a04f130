"""The status line of a real daemon: ``pass_completed``'s fields in JSON, the same as one sentence in
``STATUS=`` and, on a terminal (a pseudo-terminal here), in the log itself."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_watcher.status import pass_sentence
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import step_name, write_checkpoint
from tests.support.notify_socket import NotifySocket

pytestmark = pytest.mark.timeout(120)


def _seed(root: Path) -> None:
    for run in ("run-a", "run-b"):
        for step in range(100, 900, 100):
            write_checkpoint(root / run / step_name(0, step))


def test_pass_completed_says_kept_deleted_freed_free_space_and_budget(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _seed(root)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        arguments = ["watch", str(root), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", {"NOTIFY_SOCKET": str(notify.path)}) as daemon:
            daemon.wait_ready()
            [startup] = daemon.events("pass_completed")
            wait_until(lambda: any(line.startswith("STATUS=kept") for line in notify.lines()), what="STATUS=")
            raw = daemon.log_path.read_text()
    finally:
        notify.close()

    assert startup["trigger"] == "startup"
    assert (startup["kept_overall"], startup["deleted"], startup["bytes_freed"]) == (10, 6, 6 * 137)
    assert startup["bytes_kept_overall"] == 10 * 137
    assert startup["free_bytes"] > 0
    assert (startup["budget"], startup["budget_unmet_bytes"]) == ("none", 0)
    sentence = pass_sentence(startup)
    assert sentence.startswith("kept 10 (1.3 KiB); startup pass: deleted 6 (822 B); ")
    assert sentence.endswith(" free; budget: none")
    status = next(line for line in notify.lines() if line.startswith("STATUS=kept"))
    assert status == f"STATUS={sentence}; since start: deleted 6 (822 B)"
    assert not {"\r", "\x1b"} & set(raw), "no progress drawn into a log that is not a terminal"
    assert all(line.startswith("{") and line.endswith("}") for line in raw.splitlines())


@pytest.mark.parametrize("where", ["policy", "root override"])
def test_the_budget_is_the_one_in_force_at_the_root(tmp_path: Path, where: str) -> None:
    """The budget shown is the root's effective one: the --policy file, or the root's own
    .ckpt-watcher.yaml over it (which evicts as well)."""
    root = tmp_path / "checkpoints"
    _seed(root)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 5\n")
    budget = "max_size: 500\n"
    if where == "policy":
        policy.write_text(policy.read_text() + budget)
    else:
        (root / ".ckpt-watcher.yaml").write_text(budget)
    arguments = ["watch", str(root), "--settle", "0", "--policy", str(policy)]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        [startup] = daemon.events("pass_completed")
    assert startup["budget"] == "max_size 500"
    assert pass_sentence(startup).endswith("; budget: max_size 500 (met)")
    assert startup["deleted"] == 2 * (8 - 3), "per run: 5 kept by count, of which 3 of 137 bytes fit in 500"


def test_on_a_terminal_the_pass_is_a_readable_sentence(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _seed(root)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "ckpt_watcher", "watch", str(root), "--settle", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while b"watch_started" not in output and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                output += os.read(controller, 65536)
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.close(controller)
    text = output.decode("utf-8", "replace")

    assert "watch_started" in text, text
    assert "pass completed: kept 10 (1.3 KiB); startup pass: deleted 6 (822 B); " in text
    assert "budget: none" in text
    assert "kept_overall=" not in text, "the sentence replaces the fields on a terminal"
    assert '{"' not in text, "no JSON on a terminal"
