"""Shared fixtures: every test must leave no thread behind (a leaked watcher thread is a bug), and
every test starts with structlog's defaults (``main`` configures it to write to the stderr of the
test that called it, which pytest closes afterwards)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import LogCapture


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Fail a test that leaves a thread running that it started."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    leaked: list[threading.Thread] = []
    while time.monotonic() < deadline:
        leaked = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"threads leaked by this test: {[thread.name for thread in leaked]}")


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """Undo any structlog configuration a test made (by calling ``main``, say)."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def captured() -> Iterator[LogCapture]:
    """Every structlog event of the test, from any thread (read with ``tests.support.logs.logged``)."""
    capture = LogCapture()
    structlog.configure(processors=[capture], cache_logger_on_first_use=False)
    yield capture
    structlog.reset_defaults()
