"""structlog set-up: JSON lines on stderr when it is not a terminal, the console renderer when it is."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once, in ``main``; every module logs stable snake_case event names."""
    output = stream if stream is not None else sys.stderr
    renderer: structlog.types.Processor
    if output.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=output),
        cache_logger_on_first_use=False,
    )


def describe_os_error(error: OSError) -> str:
    """What the operating system says went wrong (``Permission denied``), for a log field or a message."""
    return error.strerror or str(error)
