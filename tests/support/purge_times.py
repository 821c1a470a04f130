"""Counting the purge times a trash index reads: what it works out once a look, not at each question."""

from __future__ import annotations

import pytest

from ckpt_watcher.trash import TrashEntry


def purge_times_asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key of each entry whose ``purge_at`` is read from now on, in order."""
    asked: list[str] = []
    purge_at = TrashEntry.purge_at

    def counted(entry: TrashEntry) -> float:
        asked.append(entry.key)
        return purge_at.fget(entry)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(TrashEntry, "purge_at", property(counted))
    return asked
