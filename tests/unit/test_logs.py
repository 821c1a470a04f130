"""logs.py: whether a bound logger logs debug events, so a loop can skip building dropped fields."""

from __future__ import annotations

import io

import pytest
import structlog

from ckpt_watcher.logs import LEVELS, configure_logging, debug_enabled


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
