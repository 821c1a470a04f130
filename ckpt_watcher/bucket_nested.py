"""Sub-prefixes of a bucket root that another ckpt-watcher watches: kept whole, left to that one.

``watch s3://b/run`` beside ``watch s3://b/run/stage1``: each holds the lease of its own prefix
(lease.py), so both run, and the outer one's policy would delete what the inner one's keeps. So a
sub-prefix of the root with a lease object (``SUB/.ckpt-watcher.lease``) that has not expired is
**kept whole**, as nested.py keeps a watched directory on disk: every checkpoint in it and below it is
pinned, and ``group_watched_elsewhere`` is warned once a pass.

* The listing shows where lease objects are; each one a planned group is at or below is read once a
  pass, and judged as lease.py does: expired once the store's clock is past its last-modified time
  plus its ``ttl_seconds``.
* A lease that cannot be read (a store error) keeps its sub-prefix whole: in doubt, kept.
* An expired lease (its watcher crashed, or was cut off from the store) keeps nothing: that sub-prefix
  is pruned by this root's policy again, until a watcher takes its lease again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from ckpt_watcher.bucket_listing import LEASE_NAME, Listing
from ckpt_watcher.lease import LEASE_LIMIT, Holder, read_lease
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.nested import directories_below
from ckpt_watcher.object_store import BucketMissingError, ObjectMissingError, ObjectStore, StoreError
from ckpt_watcher.records import display_name

logger = structlog.get_logger("ckpt_watcher.bucket_nested")

LEASED = (
    "another ckpt-watcher holds the lease of this prefix: nothing in it or below it is deleted here, it "
    "is left to that one while it renews its lease (once the lease expires, a watcher that crashed, "
    "this watcher prunes it again)"
)
UNREADABLE = (
    "a lease object of another ckpt-watcher is here but could not be read: nothing in it or below it "
    "is deleted this pass (in doubt, kept)"
)


@dataclass(frozen=True, slots=True)
class LeaseSeen:
    """A sub-prefix's lease that keeps it whole: its holder (None: unreadable) and the reason."""

    holder: Holder | None
    reason: str
    detail: str


class LeaseGuard:
    """The leases of sub-prefixes read this pass (directory -> what keeps it whole, None: nothing),
    and the sub-prefixes warned about this pass."""

    def __init__(self, url: StorageURL, store: ObjectStore) -> None:
        self._url = url
        self._store = store
        self._seen: dict[Path, LeaseSeen | None] = {}
        self._warned: set[Path] = set()

    def begin_pass(self) -> None:
        """A new pass: the leases are read again, and warned about again."""
        self._seen = {}
        self._warned = set()

    def kept_whole(self, listing: Listing, root: Path, group: Path) -> dict[Path, str]:
        """A pin keeping everything in ``group`` if it (or a prefix above it, below the root) holds an
        unexpired (or unreadable) lease object of another watcher, else nothing."""
        for text in directories_below(os.fspath(group), os.fspath(root)):
            directory = Path(text)
            if LEASE_NAME not in listing.files.get(directory, {}):
                continue
            if directory not in self._seen:
                self._seen[directory] = self._read(root, directory)
            seen = self._seen[directory]
            if seen is not None:
                self._warn(directory, seen)
                return {group: seen.reason}
        return {}

    def _read(self, root: Path, directory: Path) -> LeaseSeen | None:
        where = display_name(os.path.relpath(directory, root))
        key = self._url.key_of(directory / LEASE_NAME)
        unreadable = LeaseSeen(
            None, f"kept whole: {where} has another watcher's lease, unreadable", UNREADABLE
        )
        if key is None:
            return unreadable
        try:
            fetched = self._store.fetch(key, limit=LEASE_LIMIT)
        except BucketMissingError:
            return unreadable
        except ObjectMissingError:
            return None  # released since the listing
        except StoreError:
            return unreadable
        holder, expires_in = read_lease(fetched)
        if expires_in <= 0:
            return None
        who = holder.describe() if holder is not None else "an unreadable lease object"
        reason = (
            f"kept whole: {where} is watched by another ckpt-watcher ({who}; its lease expires in "
            f"{expires_in:.0f} s unless renewed), left to that one"
        )
        return LeaseSeen(holder, reason, LEASED)

    def _warn(self, directory: Path, seen: LeaseSeen) -> None:
        if directory in self._warned:
            return
        self._warned.add(directory)
        known = {"pid": seen.holder.pid, "host": seen.holder.host} if seen.holder is not None else {}
        logger.warning(
            "group_watched_elsewhere", directory=display_name(str(directory)), **known, detail=seen.detail
        )
