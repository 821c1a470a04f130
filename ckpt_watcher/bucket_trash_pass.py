"""The trash's part of a reconcile pass over a bucket root (the local one: trash_pass.py).

The trash is read from the pass's own listing (its objects under ``.ckpt-trash/`` come with the
prefix's), so a pass costs no request more for it; only an ``info`` or pin object not seen before is
read. A restore writes its pin before the restored object appears, and the pins are listed again after
the pass's listing (see ``pinned_identities``), so a pass that sees a restored checkpoint sees its pin:
it never takes it again while it is pinned. Purges (what is due; never in a dry
run) and moves into the trash are made only while deleting is allowed (the daemon's lease is held).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence

import structlog

from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.bucket_trash import BucketTrashIndex
from ckpt_watcher.bucket_trash_moves import BucketTrashTarget, pins_in_force, purge_stored
from ckpt_watcher.budget import Reclaimable
from ckpt_watcher.trash import TrashSummary
from ckpt_watcher.trash_moves import PurgeResult
from ckpt_watcher.trash_pass import PURGE_RETRY_SECONDS, PurgeSchedule

logger = structlog.get_logger("ckpt_watcher.trash")


class BucketTrashPass(PurgeSchedule):
    """One bucket root's trash as the reconcile core uses it, pass after pass (as trash_pass.TrashPass)."""

    index: BucketTrashIndex

    def __init__(self, storage: BucketStorage, stop: threading.Event | None = None) -> None:
        self.storage = storage
        self.index = BucketTrashIndex(storage.url, storage.store)
        self._stop = stop
        self._not_before = 0.0
        self._pins_looked = False

    def begin(self, *, purge: bool, dry_run: bool) -> PurgeResult | None:
        """Look at the trash in this pass's listing; purge what is due if ``purge`` or the first grace
        is over (never in a dry run, nor without the right to delete)."""
        self.index.look(self.storage.current_listing().trash)
        self._pins_looked = False
        now = time.time()
        if dry_run or not self.index.exists or not (purge or self.is_due(now)):
            return None
        if self.storage.refusal() is not None:
            return None
        result = purge_stored(
            self.index,
            lambda entry: entry.purge_at <= now,
            why="its grace is over",
            now=now,
            stop=self._stop,
            may_delete=self.storage.refusal,
        )
        if result.failed or result.interrupted:
            self._not_before = now + PURGE_RETRY_SECONDS
        return result

    def pinned_identities(self) -> dict[tuple[int, int], str]:
        """The restored checkpoints pinned now. The pins are listed again once a pass, after its listing,
        while the trash has entries (a restore under way needs one): a listing's pages are not one
        snapshot, so one that showed a restored object may have been made before its pin's page."""
        look = not self._pins_looked and self.index.lists_entries  # (an entry unread: a restore may be on)
        self._pins_looked = self._pins_looked or look
        return pins_in_force(self.index, time.time(), look=look)

    def target(self, grace_seconds: int) -> BucketTrashTarget | None:
        """Where a group whose policy has this grace moves its deletions; None: deleted at once."""
        if grace_seconds <= 0:
            return None
        return BucketTrashTarget(
            self.storage.url, self.storage.store, grace_seconds, self.index, may_delete=self.storage.refusal
        )

    def end(self) -> tuple[int | None, TrashSummary | None]:
        """The trash's bytes (None without a trash) and its summary, as this pass left it."""
        summary = self.index.summary()
        return (summary.bytes if summary is not None else None), summary

    def reclaimable(self) -> Sequence[Reclaimable]:
        """Nothing: only keep_free reclaims the trash, and a bucket has no keep_free."""
        return ()

    def reclaim(self, keys: Collection[str]) -> PurgeResult:
        """Nothing to reclaim on a bucket (see ``reclaimable``)."""
        return PurgeResult()
