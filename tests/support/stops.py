"""Stop requests that come midway, for the walks and removals that look at a ``threading.Event``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest


class StopAfter(threading.Event):
    """A stop request that comes once it has been looked at ``looks`` times (a SIGTERM midway); it
    counts every look."""

    def __init__(self, looks: int) -> None:
        super().__init__()
        self.left = looks
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        self.left -= 1
        return self.left < 0 or super().is_set()


def stop_as_it_begins(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str, stop: threading.Event
) -> None:
    """Replace ``module.name`` by a function that sets ``stop`` (a SIGTERM arriving just then), then
    calls the original."""
    original: Callable[..., Any] = getattr(module, name)

    def stopped_first(*arguments: Any, **keywords: Any) -> Any:
        stop.set()
        return original(*arguments, **keywords)

    monkeypatch.setattr(module, name, stopped_first)
