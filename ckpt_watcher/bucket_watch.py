"""``watch URL``: the daemon on a bucket prefix. Listing is the observer.

There are no events from a bucket, so the daemon's loop (daemon.py) runs a full pass every poll
interval (``--poll-interval``, default 30 s): one listing of the prefix, and a read only of objects
that changed since the last pass (the group caches remember each object's verdict by ETag, size and
mtime). Instead of a lock, the watcher holds the prefix's lease (lease.py): taken at start-up,
renewed from the loop and between groups of a long pass, released at the end; deleting stops as
soon as the lease may no longer be held, and a lease taken over by another watcher stops this one
(exit 2). A listing that fails, at any page, is logged (``storage_unavailable``) and retried after
1, 2, 4, ... s (at most a minute, or the poll interval if longer); nothing is planned or deleted
until the prefix can be listed whole again (``storage_restored``). A pin of a restored checkpoint
that cannot be read, or the store's unfinished uploads that it cannot list, stops the pass before
its next deletion, retried likewise; a pass that purged the trash or pruned groups before it stopped
is reported (``stopped``), so what it did is counted. A bucket
that does not exist at start is exit 2; one deleted under the running watcher is such an unavailable
store (its lease cannot be renewed, so nothing is deleted), never a lease taken over.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from ckpt_watcher.bucket import BucketConfigFiles, BucketStorage
from ckpt_watcher.bucket_commands import bucket_pins, refusals_in_runs
from ckpt_watcher.bucket_trash_pass import BucketTrashPass
from ckpt_watcher.cli import UsageError
from ckpt_watcher.daemon import Watcher
from ckpt_watcher.events import ObserverLike
from ckpt_watcher.lease import Lease
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.lock import LockHeldError
from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.notify import Notifier
from ckpt_watcher.object_store import BucketMissingError, ConditionalUnsupportedError, ObjectStore, StoreError
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.place import Crew, Retries, WatchedRoot, WatchOptions
from ckpt_watcher.policy import LoadedPolicy
from ckpt_watcher.protection import ProtectionRegistry
from ckpt_watcher.reconcile import PassResult, Reconciler
from ckpt_watcher.session import Session
from ckpt_watcher.supervisor import supervise

logger = structlog.get_logger("ckpt_watcher.bucket_watch")

DEFAULT_BUCKET_POLL_SECONDS = 30.0


class ArmedBucket:
    """A bucket prefix being watched: held by its lease, looked at by the loop's passes (no observer)."""

    def __init__(self, url: StorageURL, lease: Lease, poll_interval: float) -> None:
        self.path = url.core_path
        self.observer_kind = f"listing every {poll_interval:g} s"
        self.lease = lease

    @property
    def observer(self) -> ObserverLike | None:
        """None: listing is the observer."""
        return None

    def still_there(self) -> bool:
        """Renew the lease when due; LeaseLostError (exit 2) if another watcher took it over."""
        self.lease.renew_if_due()
        return True

    def ensure_observer_alive(self, stopping: bool) -> bool:
        """No observer to keep alive."""
        return False

    def note_unwatched(self, directories: Iterable[str]) -> None:
        """Nothing is watched, so nothing is unwatched."""

    def subtrees_to_poll(self, now: float) -> set[Path]:
        """Every pass is a full one."""
        return set()

    def next_deadline(self) -> float | None:
        """The loop's rescan deadline is the poll."""
        return None

    def disarm(self) -> None:
        """Release the lease."""
        self.lease.release()


class BucketPlace:
    """A bucket prefix as the daemon's place (see the module's docstring): held by its lease, its
    reconcile core over the bucket's storage."""

    def __init__(
        self, options: WatchOptions, *, url: StorageURL, store: ObjectStore, lease_seconds: float
    ) -> None:
        self.options = options
        self.url = url
        self.lease = Lease(store, url, ttl_seconds=lease_seconds)
        self.storage = BucketStorage(url, store, may_delete=self.lease.refusal)
        self.files = BucketConfigFiles(self.storage)
        self.registry = ProtectionRegistry(Path.cwd(), files=self.files)
        self.pins = bucket_pins(options.protect, self.files)
        self.refuse = refusals_in_runs(store)  # an edit asking keep_free (say) is refused
        self._retries = Retries(
            url.text,
            options.poll_interval or DEFAULT_BUCKET_POLL_SECONDS,
            "nothing is planned or deleted until the prefix can be listed whole and every pin of a "
            "restored checkpoint read",
        )

    def lock_now(self) -> None:
        """Take the lease up front (LeaseHeldError, exit 2, if another watcher holds it; a bucket that
        does not exist is exit 2 too); a store that cannot be reached yet is retried by the loop."""
        try:
            self.lease.acquire()
        except BucketMissingError as error:
            raise UsageError(
                f"{self.url.text}: the bucket {self.url.bucket} does not exist ({error})"
            ) from None
        except ConditionalUnsupportedError as error:
            raise UsageError(
                f"{self.url.text}: the single-instance lease needs conditional writes, which this store "
                f"does not offer ({error})"
            ) from None
        except StoreError as error:
            self._retries.failed(str(error), None)

    def arm(self, crew: Crew) -> ArmedBucket | None:
        """The prefix, once its lease is held (taken now if it is not yet)."""
        if not self.lease.held:
            if time.monotonic() < self._retries.next_attempt:
                return None
            try:
                self.lease.acquire()
            except StoreError as error:
                self._retries.failed(str(error), None)
                return None
        return ArmedBucket(self.url, self.lease, self.options.poll_interval or DEFAULT_BUCKET_POLL_SECONDS)

    def reconciler(self, root: WatchedRoot, crew: Crew) -> Reconciler:
        """The reconcile core over the bucket's storage; the lease is renewed between groups too."""

        def between_groups() -> None:
            crew.liveness.tick()
            self.lease.renew_if_due()

        return Reconciler(
            PolicyTree(
                self.url.core_path, crew.policy.loaded, strict=False, files=self.files, refuse=self.refuse
            ),
            self.registry,
            pins=self.pins,
            settle_seconds=self.options.settle_seconds,
            one_shot=False,
            stop=crew.stop,
            progress=between_groups,
            storage=self.storage,
            trash=BucketTrashPass(self.storage, crew.stop),
        )

    def accepts(self, result: PassResult, session: Session | None) -> bool:
        """A pass that could not list the prefix (or read a pin) is retried soon, with a growing delay.
        It is not reported unless it did something first (a purge at its start, the groups before a
        pin in doubt): then it is, ``stopped``, so what it did is counted (``pass_completed``, the
        metrics) as a directory's is."""
        if result.storage_error is not None:
            self._retries.failed(result.storage_error, session)
            return bool(result.scanned_groups or result.purged)
        self._retries.succeeded()
        return True

    def release(self) -> None:
        """Release the lease."""
        self.lease.release()


def run_bucket_watch(
    arguments: argparse.Namespace, loaded: LoadedPolicy, store: ObjectStore, figures: DaemonFigures
) -> int:
    """``watch URL`` until a stop signal; a held lease is exit 2, as a held lock is. ``figures``: what
    ``--metrics`` serves (the file-system gauges are absent: a prefix has no file system)."""
    url: StorageURL = arguments.path
    poll = arguments.poll if arguments.poll is not None else DEFAULT_BUCKET_POLL_SECONDS
    # every poll is a full pass: one listing
    options = WatchOptions.from_arguments(arguments, root=url.core_path, poll=poll, rescan=poll)
    place = BucketPlace(options, url=url, store=store, lease_seconds=arguments.lease_seconds)
    watcher = Watcher(options, loaded, place=place, notifier=Notifier(), figures=figures)
    try:
        watcher.lock_now()
    except LockHeldError as error:
        raise UsageError(str(error)) from None
    return supervise(watcher)
