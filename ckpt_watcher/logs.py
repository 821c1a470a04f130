"""structlog set-up: JSON lines on stderr when it is not a terminal, the console renderer when it is
(with ``pass_completed`` as a sentence, and a line for the progress of a long pass: ``terminal``).

Every string in a record goes through ``display_name`` (one processor, so no call site can forget):
a path with a newline, a terminal escape or bytes that are not UTF-8 cannot forge a record, steer a
terminal or make the output invalid UTF-8. The same processor removes any credential of the
environment from every string (``credentials.redact``): no client library's error text can leak one.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO, cast

import structlog

from ckpt_watcher import terminal
from ckpt_watcher.credentials import redact
from ckpt_watcher.records import DisplayText, display_name
from ckpt_watcher.terminal import TerminalLine

LEVELS = ("debug", "info", "warning", "error")

# structlog's format_exc_info puts the traceback here: escaped line by line, so it stays readable.
_MULTI_LINE_KEYS = frozenset({"exception"})


def escape_text_values(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: every string value (in lists and dicts too) and every path, escaped.

    Values that ``display_name`` already escaped are left as they are.
    """
    for key, value in event_dict.items():
        if key in _MULTI_LINE_KEYS and isinstance(value, str):
            event_dict[key] = "\n".join(display_name(line) for line in redact(value).split("\n"))
        else:
            event_dict[key] = _escaped(value)
    return event_dict


def _escaped(value: Any) -> Any:
    if isinstance(value, DisplayText):
        cleaned = redact(value)
        return value if cleaned is value else DisplayText(cleaned)
    if isinstance(value, str | os.PathLike):
        return display_name(redact(os.fspath(value)))
    if isinstance(value, Mapping):
        return {_escaped(key): _escaped(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_escaped(item) for item in value]
    return value


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once, in ``main``; every module logs stable snake_case event names."""
    output: TextIO = stream if stream is not None else sys.stderr
    renderers: list[structlog.types.Processor]
    if output.isatty():
        # status imports report, which imports delete, which imports this module: imported here.
        from ckpt_watcher.status import readable_records  # noqa: PLC0415

        # On a terminal: records as sentences where they have one, under a line for progress.
        terminal.current = TerminalLine(output)
        output = cast(TextIO, terminal.current)  # it has what a WriteLogger uses: write, flush
        renderers = [readable_records, structlog.dev.ConsoleRenderer()]
    else:
        terminal.current = None
        renderers = [structlog.processors.JSONRenderer(sort_keys=False)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            escape_text_values,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=output),
        cache_logger_on_first_use=False,
    )
    _route_library_messages()


library_logger = structlog.get_logger("ckpt_watcher.libraries")

# watchdog's own bookkeeping of its inotify watches (a directory watched twice, as one created while
# its parent's walk ran): nothing for the user, so at debug.
_BOOKKEEPING = ("Callback with id ",)
# What watchdog logs that the daemon reports as its own event (event_queue_overflow; the observer's
# inotify_unavailable and watch_incomplete): the library's line is at debug, not said twice.
_REPORTED_BY_THE_DAEMON = ("Inotify queue overflowed", "Unable to watch ")
_ORIGINAL_SHOW_WARNING = warnings.showwarning


class _LibraryRecords(logging.Handler):
    """The warnings and errors the libraries log with ``logging`` (watchdog, botocore, s3fs), as one
    ``library_message`` record each, like every other line on stderr (they went out as plain text)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a library's own bad format string
            message = str(record.msg)
        level = record.levelno
        if record.name.startswith("watchdog") and message.startswith(_REPORTED_BY_THE_DAEMON):
            level = logging.DEBUG
        try:
            library_logger.log(level, "library_message", library=record.name, message=message)
        except (OSError, ValueError):  # stderr closed (a library's thread at exit): nowhere to say it
            return


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the daemon: a Python warning (watchdog's RuntimeWarning, say) as a
    ``library_warning`` record, never a plain-text line among the JSON ones."""
    text = str(message)
    level = logging.DEBUG if text.startswith(_BOOKKEEPING) else logging.WARNING
    library_logger.log(
        level, "library_warning", category=category.__name__, message=text, source=f"{filename}:{lineno}"
    )


def _route_library_messages() -> None:
    """Send the libraries' ``logging`` records and Python's warnings through structlog (once, however
    often ``configure_logging`` runs)."""
    unroute_library_messages()
    logging.getLogger().addHandler(_LibraryRecords())
    warnings.showwarning = _show_warning


def unroute_library_messages() -> None:
    """Undo ``_route_library_messages`` (for a process that configures logging again, and tests)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _LibraryRecords):
            root.removeHandler(handler)
    if warnings.showwarning is _show_warning:
        warnings.showwarning = _ORIGINAL_SHOW_WARNING


def debug_enabled(bound: Any) -> bool:
    """True if ``bound`` (a logger from ``bind()``) logs debug events: a loop can then skip building
    the fields of events that would be dropped. A logger that cannot say is taken as logging them."""
    is_enabled_for = getattr(bound, "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))


def describe_os_error(error: OSError) -> str:
    """What the operating system says went wrong (``Permission denied``), for a log field or a message."""
    return error.strerror or str(error)
