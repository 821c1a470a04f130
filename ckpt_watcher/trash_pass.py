"""The trash's part of a reconcile pass (reconcile.py calls it; the trash itself: trash.py,
trash_moves.py).

A pass opens the trash as it is, purges what is due (a full pass and a non-dry-run ``prune`` always
look; the daemon's other passes only when the first grace is over), reads the pins of restored
checkpoints for each group right after scanning it, moves the group's deletions into the trash when
its policy has a grace, and at its end looks at the trash again for ``trash_bytes`` and the next purge.

Pins are read after each group's scan, and a restore writes its pin before it renames the checkpoint
back, so a pass that sees a restored checkpoint always sees its pin: a restore racing a pass never has
its checkpoint taken again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from ckpt_watcher.budget import Reclaimable
from ckpt_watcher.delete import TrashMover
from ckpt_watcher.records import TRASH_DIRECTORY_NAME, display_name
from ckpt_watcher.storage import StorageUnavailableError
from ckpt_watcher.trash import IndexedEntry, TrashIndex, TrashSummary, TrashUnusableError
from ckpt_watcher.trash_moves import PurgeResult, TrashTarget, purge_due, purge_keys

logger = structlog.get_logger("ckpt_watcher.trash")

# A purge that left due entries behind (they failed) is tried again this much later, not at once.
PURGE_RETRY_SECONDS = 60.0


class TrashKeeper(Protocol):
    """What the reconcile core asks of a root's trash: ``TrashPass`` (a directory) or
    bucket_trash_pass.BucketTrashPass (a bucket prefix)."""

    def begin(self, *, purge: bool, dry_run: bool) -> PurgeResult | None: ...
    def pinned_identities(self) -> dict[tuple[int, int], str]: ...
    def target(self, grace_seconds: int) -> TrashMover | None: ...
    def end(self) -> tuple[int | None, TrashSummary | None]: ...
    def reclaimable(self) -> Sequence[Reclaimable]: ...
    def reclaim(self, keys: Collection[str]) -> PurgeResult: ...
    def is_due(self, now: float) -> bool: ...
    def deadline(self) -> float | None: ...


class PurgeTimes(Protocol):
    """A trash index as far as the purge schedule needs it."""

    def next_purge_at(self) -> float | None: ...


class PurgeSchedule:
    """When a trash's next purge is due: its first entry's purge time, but not before ``_not_before``
    (a purge that left due entries is retried later, not at once). Shared by the directory's trash and
    the bucket's."""

    index: PurgeTimes
    _not_before: float

    def is_due(self, now: float) -> bool:
        """True when the first grace is over at wall-clock ``now``."""
        first = self.index.next_purge_at()
        return first is not None and max(first, self._not_before) <= now

    def deadline(self) -> float | None:
        """When the next purge is due, as a ``time.monotonic()`` deadline (None: nothing to purge)."""
        first = self.index.next_purge_at()
        if first is None:
            return None
        return time.monotonic() + max(0.0, max(first, self._not_before) - time.time())


def refuse_pins_in_doubt(pins_in_doubt: str | None) -> None:
    """StorageUnavailableError if a pin of a restored checkpoint could not be read (``pins_in_doubt``
    says why): a restored checkpoint the pass cannot tell would be planned as never restored, so the
    pass deletes nothing more. Shared by the directory's trash and the bucket's."""
    if pins_in_doubt is not None:
        raise StorageUnavailableError(f"a pin of a restored checkpoint is unknown ({pins_in_doubt})")


def _with_trash(indexes: Sequence[TrashIndex], root: Path) -> list[TrashIndex]:
    """The directories above ``root`` (``indexes``, one each) that have a trash that may pin
    checkpoints of ``root``, opened (or refused but maybe this tool's). An ``lstat`` first, so the
    directories above, most of them without one, cost no more; ``root`` is stat'ed once, and only if
    one has. Left out: one on another file system than ``root`` (a move into a trash never crosses
    file systems, so no pin there names a file of ``root``), and one this process may search but not
    list (mode 711: another user's home, say), whose trash it could not open, which would otherwise
    stop every pass here for good."""
    present: list[TrashIndex] = []
    root_device: int | None = None
    for index in indexes:
        try:
            os.lstat(index.root / TRASH_DIRECTORY_NAME)
            if root_device is None:
                root_device = os.stat(root).st_dev
            if os.stat(index.root).st_dev != root_device:
                continue
        except FileNotFoundError:
            continue
        except OSError:
            pass  # (the open says why, and whether that puts the pins in doubt)
        if not os.access(index.root, os.R_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            index.note_unlistable()
            continue
        index.start()
        if index.exists or index.unusable is not None:
            present.append(index)
    return present


class TrashPass(PurgeSchedule):
    """One root's trash as the reconcile core uses it, pass after pass."""

    index: TrashIndex

    def __init__(self, root: Path, stop: threading.Event | None = None) -> None:
        self.root = root
        self.index = TrashIndex(root)
        self._stop = stop
        self._may_exist = False  # a trash missing when the pass began may be made by its moves
        self._not_before = 0.0  # wall clock: no purge before (after one that left due entries)
        self._moves = 0  # moves into the trash tried since the index last looked
        self._reclaimable: tuple[tuple[IndexedEntry, ...], tuple[Reclaimable, ...]] | None = (
            None  # (of a look)
        )
        # The trashes of the directories above: ``restore ROOT`` pins checkpoints below ROOT, which a
        # ``prune`` or ``watch`` of a run directory inside it must keep too. Looked for at each pass.
        self._above = [TrashIndex(directory) for directory in root.parents]
        self._above_present: list[TrashIndex] = []

    def begin(self, *, purge: bool, dry_run: bool) -> PurgeResult | None:
        """Open the trash for a pass; purge what is due if ``purge`` or the first grace is over (never in
        a dry run). Returns what the purge did, None when none ran. A full pass (``purge``) looks at the
        entries first (other processes may have changed them); any later pass goes by the previous
        pass's look at its end, so that no look stands between an event and its deletions."""
        self.index.start()
        self._may_exist = self.index.exists or self.index.unusable is not None
        self._above_present = _with_trash(self._above, self.root)
        if self.index.exists and (purge or not self.index.looked):
            self._look(force=True, retry=True)
        if dry_run or not self.index.exists or not (purge or self.is_due(time.time())):
            return None
        now = time.time()
        try:
            result = purge_due(self.root, now=now, stop=self._stop)
        except TrashUnusableError as error:
            logger.error("trash_purge_failed", path=display_name(str(self.root)), error=str(error))
            result = None
        self._look(force=True)  # (this process's change: listed whatever the directory's stat says)
        if result is None or result.failed or result.interrupted:
            self._not_before = now + PURGE_RETRY_SECONDS  # what is still due is retried later, not at once
        return result

    def pinned_identities(self) -> dict[tuple[int, int], str]:
        """The restored checkpoints pinned now, by this root's trash and by those of the directories
        above it (read after the group's scan: see the module's doc). StorageUnavailableError if a pin
        cannot be read or ``restored/`` listed: a restored checkpoint it cannot tell would be planned
        as never restored, so the pass deletes nothing more."""
        # (no trash here or above, so nothing restored: a tree without a trash costs nothing per group)
        indexes = ([self.index] if self._may_exist else []) + self._above_present
        pinned: dict[tuple[int, int], str] = {}
        for index in indexes:
            pinned.update(index.pinned_identities(time.time()))
            refuse_pins_in_doubt(index.pins_in_doubt)
        return pinned

    def target(self, grace_seconds: int) -> TrashTarget | None:
        """Where a group whose policy has this grace moves its deletions; None: deleted at once."""
        if grace_seconds <= 0:
            return None
        self._may_exist = True
        return TrashTarget(
            self.root,
            grace_seconds,
            stop=self._stop,
            on_move=self._count_move,
            known_pins=self.index.known_pins,
        )

    def _count_move(self) -> None:
        self._moves += 1

    def _look(self, *, force: bool = False, retry: bool = False) -> None:
        """Look at the entries again; listed whatever the stat of ``info/`` says if ``force`` or this
        process tried a move since the last look. A stat need not show a change made within the same
        tick of the file system's clock (a second on some), and a look's ``RACY_SECONDS`` is measured
        on this machine's clock, which may run ahead of the file system's (an NFS server's): this
        process's own changes are never left to it, so an offer to ``keep_free`` always has them.
        ``retry``: a full pass's look, which reads again the entries that could not be read."""
        force = force or self._moves > 0
        self._moves = 0
        self.index.refresh(force=force, retry=retry)

    def end(self) -> tuple[int | None, TrashSummary | None]:
        """Look at the trash again and close it: its bytes (None without a trash) and its summary."""
        try:
            self._look()
            return self.index.bytes, self.index.summary()
        finally:
            self.index.close()
            for above in self._above_present:
                above.close()

    def reclaimable(self) -> Sequence[Reclaimable]:
        """One ``Reclaimable`` per entry, oldest first: what a byte budget may reclaim before it evicts
        any kept checkpoint (WAVE2 contract; the budget wires it). As last looked at, and looked at
        again (I/O) first if this pass may have moved checkpoints into the trash since."""
        if self._moves:  # what this pass moved into the trash is reclaimable too, and goes first
            self.index.start()
            if self.index.exists:
                self._look()
            self._moves = 0  # (none landed where no trash is: it was never made)
        entries = self.index.entries  # (the same tuple until the index looks again)
        if self._reclaimable is None or self._reclaimable[0] is not entries:
            made = (Reclaimable(entry.key, entry.device, entry.bytes, entry.trashed_at) for entry in entries)
            self._reclaimable = (entries, tuple(made))
        return self._reclaimable[1]  # (made once a look: keep_free asks every second)

    def reclaim(self, keys: Collection[str]) -> PurgeResult:
        """Purge the entries a budget chose (``Reclaimable.key``), then look at the trash again."""
        try:
            result = purge_keys(self.root, keys, stop=self._stop)
        except TrashUnusableError as error:
            logger.error("trash_purge_failed", path=display_name(str(self.root)), error=str(error))
            result = PurgeResult()
        self._look(force=True)
        return result
