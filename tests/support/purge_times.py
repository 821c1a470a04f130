"""Counting the purge times a trash index reads: what it works out once a look, not at each question."""

from __future__ import annotations

import pytest

from ckpt_watcher.trash import IndexedEntry, TrashEntry


def purge_times_asked(monkeypatch: pytest.MonkeyPatch, kind: type[TrashEntry | IndexedEntry]) -> list[str]:
    """The key of each entry of ``kind`` (what the index keeps) whose ``purge_at`` is read from now on,
    in order."""
    asked: list[str] = []
    purge_at: property = vars(kind)["purge_at"]

    def counted(entry: TrashEntry | IndexedEntry) -> float:
        asked.append(entry.key)
        return float(purge_at.__get__(entry, kind))

    monkeypatch.setattr(kind, "purge_at", property(counted))
    return asked
