"""Run ``ckpt-watcher watch`` as a real process and read its JSON log lines; poll with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.cli import cli_command, log_records

DEFAULT_TIMEOUT = 30.0

LogRecord = dict[str, Any]


def only_child(pid: int) -> int:
    """The one child process of ``pid`` (e.g. the daemon that ``unshare --fork`` started)."""
    children: list[int] = []

    def found() -> bool:
        nonlocal children
        path = Path(f"/proc/{pid}/task/{pid}/children")
        children = [int(part) for part in path.read_text().split()] if path.exists() else []
        return len(children) == 1

    wait_until(found, timeout=10, what=f"the child of {pid}")
    return children[0]


def wait_until(condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    if condition():
        return
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")


class DaemonProcess:
    """One ``python -m ckpt_watcher ...`` child whose stderr (JSON lines) goes to a file."""

    def __init__(
        self,
        arguments: Sequence[str],
        log_path: Path,
        environment: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.log_path = log_path
        self.stdout_path = log_path.with_suffix(".stdout")
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
        }
        env.update(environment or {})
        self._log_file = log_path.open("wb")
        self._stdout_file = self.stdout_path.open("wb")
        self.process = subprocess.Popen(
            [*(command or cli_command()), *arguments],
            stdout=self._stdout_file,
            stderr=self._log_file,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )

    def records(self) -> list[LogRecord]:
        """Every complete JSON line logged so far (a line being written is left for later)."""
        text = self.log_path.read_text(errors="replace")
        return log_records(text[: text.rfind("\n") + 1])

    def events(self, event: str) -> list[LogRecord]:
        """The records with this event name."""
        return [record for record in self.records() if record.get("event") == event]

    def wait_for(
        self,
        event: str,
        predicate: Callable[[LogRecord], bool] = lambda record: True,
        timeout: float = DEFAULT_TIMEOUT,
        count: int = 1,
    ) -> list[LogRecord]:
        """Wait until ``count`` records of ``event`` match ``predicate``; return them."""
        found: list[LogRecord] = []

        def enough() -> bool:
            nonlocal found
            if self.process.poll() is not None and not self._has(event, predicate, count):
                raise AssertionError(
                    f"daemon exited ({self.process.returncode}) before {event}:\n{self.log_path.read_text()}"
                )
            found = [record for record in self.events(event) if predicate(record)]
            return len(found) >= count

        wait_until(enough, timeout, f"{count} x {event} in {self.log_path}")
        return found

    def _has(self, event: str, predicate: Callable[[LogRecord], bool], count: int) -> bool:
        return len([record for record in self.events(event) if predicate(record)]) >= count

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait for ``watch_started`` (after the start-up reconcile)."""
        self.wait_for("watch_started", timeout=timeout)

    def send(self, signal_number: int) -> None:
        """Send a signal to the daemon."""
        self.process.send_signal(signal_number)

    def stop(self, signal_number: int = signal.SIGTERM, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Signal the daemon and wait for it; return its exit code.

        ``timeout`` is a generous deadline (exceeding it fails the test), never a measurement: how fast
        the daemon stops is for bench/, the tests check what it did before it stopped.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal_number)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        """Kill the process if it is still running and close the log files."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log_file.close()
        self._stdout_file.close()


@contextmanager
def running_daemon(
    arguments: Sequence[str],
    log_path: Path,
    environment: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    cwd: Path | None = None,
) -> Iterator[DaemonProcess]:
    """A daemon that is always killed and closed at the end of the block."""
    daemon = DaemonProcess(arguments, log_path, environment, command, cwd)
    try:
        yield daemon
    finally:
        daemon.close()
