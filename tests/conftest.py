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

from ckpt_watcher.logs import unroute_library_messages
from tests.support.quiet_clock import QuietClock
from tests.support.s3_server import Bucket, S3Server, environment


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
    """Undo any logging configuration a test made (by calling ``main``, say): structlog's, and the
    routing of the libraries' records and warnings into it."""
    yield
    structlog.reset_defaults()
    unroute_library_messages()


@pytest.fixture
def captured() -> Iterator[LogCapture]:
    """Every structlog event of the test, from any thread (read with ``tests.support.logs.logged``)."""
    capture = LogCapture()
    structlog.configure(processors=[capture], cache_logger_on_first_use=False)
    yield capture
    structlog.reset_defaults()


@pytest.fixture
def quiet_clock(monkeypatch: pytest.MonkeyPatch) -> QuietClock:
    """The clock this process measures quiet times on (``clocks.watcher_clock``), moved by the test."""
    clock = QuietClock()
    monkeypatch.setattr("ckpt_watcher.clocks.watcher_clock", clock)
    return clock


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 server (moto) for the session; each test makes a bucket of its own (``s3``).

    The threads of s3fs in this process are started here, before any test counts threads: fsspec's
    I/O thread and its event loop's one resolver thread (``asyncio_0``; the loop is given a default
    executor of one thread, so no test starts another), as in any program that uses s3fs.
    """
    import concurrent.futures

    import fsspec.asyn

    loop = fsspec.asyn.get_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncio")
    loop.call_soon_threadsafe(loop.set_default_executor, executor)
    server = S3Server(tmp_path_factory.mktemp("s3-server") / "requests.log")
    server.start()
    Bucket(server.endpoint, name="warm-up").create()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A new bucket on the session's S3 server, with the standard AWS environment pointing at it (in
    this process, and inherited by every command the test runs)."""
    for name, value in environment(s3_server.endpoint).items():
        monkeypatch.setenv(name, value)
    return Bucket(s3_server.endpoint).create()
