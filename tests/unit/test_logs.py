"""logs.py: whether a bound logger logs debug events, so a loop can skip building dropped fields."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from ckpt_watcher.logs import LEVELS, configure_logging, debug_enabled, unroute_library_messages


@pytest.mark.parametrize("level", LEVELS)
def test_a_logger_bound_after_configure_logging_says_if_it_logs_debug(level: str) -> None:
    stream = io.StringIO()
    configure_logging(level, stream)
    log = structlog.get_logger("test").bind()

    assert debug_enabled(log) is (level == "debug")
    log.debug("probe_event")
    assert ("probe_event" in stream.getvalue()) is (level == "debug")  # it says what really happens


def test_a_logger_that_cannot_say_is_taken_as_logging_debug() -> None:
    class Plain:
        def debug(self, event: str) -> None:
            """A logger without is_enabled_for."""

    assert debug_enabled(Plain())


@pytest.fixture
def routed() -> Iterator[io.StringIO]:
    """configure_logging on a stream, undone afterwards: the root logging handler it adds, and the
    warnings module's showwarning (inside catch_warnings), with every warning shown, not raised."""
    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_logging("info", stream=stream)
        yield stream
    unroute_library_messages()


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_what_libraries_log_and_python_warnings_are_json_records(routed: io.StringIO) -> None:
    """Libraries log with ``logging`` and warn with ``warnings``: both went to stderr as plain text
    among the JSON lines, which a log pipeline parsing JSON drops or chokes on. What watchdog logs
    that the daemon reports as its own event (an overflow, a directory it could not watch) is at
    debug, as is watchdog's bookkeeping of its watches."""
    logging.getLogger("s3fs").warning("Retrying %r after %s", "ListObjectsV2", "SlowDown")
    logging.getLogger("watchdog.observers.inotify").warning("Unable to watch %r: %s", "/x", "denied")
    logging.getLogger("botocore").info("at info: not shown")
    inotify = logging.getLogger("watchdog.observers.inotify_c")
    inotify.warning("Inotify queue overflowed; filesystem events were lost")  # the daemon's own event
    warnings.warn("a deprecated call", DeprecationWarning, stacklevel=1)
    warnings.warn("Callback with id 'x' already exists for watch /data", RuntimeWarning, stacklevel=1)

    records = _records(routed)

    assert [(record["event"], record["level"]) for record in records] == [
        ("library_message", "warning"),
        ("library_warning", "warning"),
    ]
    assert records[0]["library"] == "s3fs"
    assert records[0]["message"] == "Retrying 'ListObjectsV2' after SlowDown"
    assert records[1]["category"] == "DeprecationWarning"
    assert records[1]["message"] == "a deprecated call"


def test_configuring_twice_routes_each_library_record_once(routed: io.StringIO) -> None:
    configure_logging("debug", stream=routed)
    logging.getLogger("s3fs").error("a library's error")
    warnings.warn("Callback with id 'x' already exists for watch /data", RuntimeWarning, stacklevel=1)

    records = _records(routed)

    assert [(record["event"], record["level"]) for record in records] == [
        ("library_message", "error"),
        ("library_warning", "debug"),
    ]
