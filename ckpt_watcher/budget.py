"""Byte budgets (issue 12). This file holds only the contract shared with the trash (WAVE2.md); the
budget helper's module replaces it when the two branches are merged."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reclaimable:
    """Space that can be given back before any kept checkpoint is evicted: one trash entry.

    ``key`` names it for the purge, ``device`` is the file system it is on, ``bytes`` its size and
    ``since`` when it was trashed (epoch seconds; the oldest goes first).
    """

    key: str
    device: int
    bytes: int
    since: float
