"""The structlog events of an in-process test (the ``captured`` fixture in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from structlog.testing import LogCapture


def logged(capture: LogCapture, name: str) -> list[MutableMapping[str, Any]]:
    """The captured events with this event name, in the order they were logged (any thread)."""
    return [entry for entry in list(capture.entries) if entry["event"] == name]
