"""Bytes a deletion released that ``statvfs`` does not show yet: a ledger per file system. Pure: no I/O.

btrfs frees an unlinked file's extents only at the next transaction commit (every 30 s by default, the
``commit=`` mount option), and on any file system a deleted file still held open (an uploader, a
dataloader) frees nothing until it is closed. Read right after a deletion, the free space is stale:
without this ledger, each deletion's own event would start a pass that reads the same shortfall and
evicts the next checkpoint for it.

Each deletion that should free bytes on a file system, and that the free space read right after it does
not show (``space.py``), is recorded as a ``Release``: when, how many bytes, and the free space read just
before it (itself credited with the releases still unseen then, so the free space each release leads one
to expect, ``expected_free``, grows release after release). A reading is credited with what the unseen
releases still owe it (``credit``): up to the highest free space they lead one to expect, never more
than their bytes. A release is seen, and dropped, once a reading shows its ``expected_free``; or at the
latest ``UNSEEN_RELEASE_SECONDS`` after it.

A trainer writing meanwhile lowers the free space, so a release may look unseen though it was freed: the
credit then hides up to that many written bytes, until the release is seen or its time is up. That errs
on the side of evicting less, for a bounded time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# The longest a release is credited without being seen. btrfs commits every 30 s by default, so a
# release shows within 30 s (twice that leaves room for a slow commit under load). A release that will
# never show (a file with another hard link, one a reader keeps open) is no longer credited after this,
# and eviction goes on.
UNSEEN_RELEASE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Release:
    """Bytes a deletion on a file system should free: ``at`` (monotonic seconds), ``bytes``, and
    ``free_before``, the free space (credited) read just before it."""

    at: float
    bytes: int
    free_before: int

    @property
    def expected_free(self) -> int:
        """The free space a reading shows once this release (and those before it) is seen."""
        return self.free_before + self.bytes


def unseen(releases: Iterable[Release], free_bytes: int, now: float) -> tuple[Release, ...]:
    """The releases a reading of ``free_bytes`` at ``now`` does not show yet (and not too old to be
    credited): the others are dropped."""
    return tuple(
        release
        for release in releases
        if now - release.at < UNSEEN_RELEASE_SECONDS and free_bytes < release.expected_free
    )


def credit(releases: Iterable[Release], free_bytes: int) -> int:
    """The bytes to add to a reading of ``free_bytes``: what the (unseen) ``releases`` still owe it,
    up to the highest free space they lead one to expect and never more than their bytes together."""
    releases = list(releases)
    if not releases:
        return 0
    owed = max(release.expected_free for release in releases) - free_bytes
    return max(0, min(sum(release.bytes for release in releases), owed))


def recorded(releases: Iterable[Release], release: Release) -> tuple[Release, ...]:
    """The ledger with ``release`` added (one that frees nothing is not recorded); those older than
    ``UNSEEN_RELEASE_SECONDS`` at its time are dropped."""
    kept = tuple(item for item in releases if release.at - item.at < UNSEEN_RELEASE_SECONDS)
    return (*kept, release) if release.bytes > 0 else kept


@dataclass
class ReleaseLedger:
    """The releases not seen yet on each file system (by device), kept by the daemon across passes
    (``prune``'s lives for its one pass)."""

    _releases: dict[int, tuple[Release, ...]] = field(default_factory=dict)
    credits: dict[int, int] = field(default_factory=dict)  # the credit of each device's last reading

    def credited(self, device: int, free_bytes: int, now: float) -> int:
        """``free_bytes`` read on ``device`` at ``now`` plus what its unseen releases still owe it
        (the releases it shows, or too old, are dropped)."""
        releases = unseen(self._releases.pop(device, ()), free_bytes, now)
        if releases:
            self._releases[device] = releases
        self.credits[device] = credit(releases, free_bytes)
        return free_bytes + self.credits[device]

    def record(self, device: int, release: Release) -> None:
        """``release`` is about to happen on ``device``."""
        self._releases[device] = recorded(self._releases.get(device, ()), release)
