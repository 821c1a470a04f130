"""``watch URL``: the daemon on a bucket prefix. Listing is the observer.

There are no events from a bucket, so the daemon's loop (daemon.py) runs a full pass every poll
interval (``--poll-interval``, default 30 s): one listing of the prefix, and a read only of objects
that changed since the last pass (the group caches remember each object's verdict by ETag, size and
mtime). Instead of a lock, the watcher holds the prefix's lease (lease.py): taken at start-up,
renewed from the loop and between groups of a long pass, released at the end; deleting stops as
soon as the lease may no longer be held, and a lease taken over by another watcher stops this one
(exit 2). A listing that fails, at any page, is logged (``storage_unavailable``) and retried after
1, 2, 4, ... s (at most a minute, or the poll interval if longer); nothing is planned or deleted
until the prefix can be listed whole again (``storage_restored``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from ckpt_watcher.bucket import BucketConfigFiles, BucketStorage
from ckpt_watcher.bucket_commands import bucket_pins, refusals_in_runs
from ckpt_watcher.bucket_trash_pass import BucketTrashPass
from ckpt_watcher.cli import UsageError
from ckpt_watcher.daemon import Watcher, WatchOptions, supervise
from ckpt_watcher.events import ObserverLike
from ckpt_watcher.lease import Lease
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.lock import LockHeldError
from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.notify import Notifier
from ckpt_watcher.object_store import ConditionalUnsupportedError, ObjectStore, StoreError
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import LoadedPolicy
from ckpt_watcher.protection import ProtectionRegistry
from ckpt_watcher.reconcile import PassResult, Reconciler

logger = structlog.get_logger("ckpt_watcher.bucket_watch")

DEFAULT_BUCKET_POLL_SECONDS = 30.0
_FIRST_RETRY_SECONDS = 1.0
_LONGEST_RETRY_SECONDS = 60.0


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


class BucketWatcher(Watcher):
    """The daemon's worker on a bucket prefix (see the module's docstring)."""

    def __init__(
        self,
        options: WatchOptions,
        loaded_policy: LoadedPolicy,
        *,
        url: StorageURL,
        store: ObjectStore,
        lease_seconds: float,
        notifier: Notifier | None = None,
        figures: DaemonFigures | None = None,
    ) -> None:
        super().__init__(
            dataclasses.replace(options, protect=()), loaded_policy, notifier=notifier, figures=figures
        )
        self.policy.refuse = refusals_in_runs(store)  # an edit asking keep_free (say) is refused
        self.options = options
        self.url = url
        self.lease = Lease(store, url, ttl_seconds=lease_seconds)
        self.storage = BucketStorage(url, store, may_delete=self.lease.refusal)
        self.files = BucketConfigFiles(self.storage)
        self.registry = ProtectionRegistry(Path.cwd(), files=self.files)
        self._pins = bucket_pins(options.protect, self.files)
        self._failures = 0
        self._next_attempt = 0.0

    def lock_now(self) -> None:
        """Take the lease up front (LeaseHeldError, exit 2, if another watcher holds it); a store that
        cannot be reached yet is retried by the loop."""
        try:
            self.lease.acquire()
        except ConditionalUnsupportedError as error:
            raise UsageError(
                f"{self.url.text}: the single-instance lease needs conditional writes, which this store "
                f"does not offer ({error})"
            ) from None
        except StoreError as error:
            self._unavailable(str(error))

    def _arm_root(self) -> ArmedBucket | None:
        """The prefix, once its lease is held (taken now if it is not yet)."""
        if not self.lease.held:
            if time.monotonic() < self._next_attempt:
                return None
            try:
                self.lease.acquire()
            except StoreError as error:
                self._unavailable(str(error))
                return None
        return ArmedBucket(self.url, self.lease, self.options.poll_interval or DEFAULT_BUCKET_POLL_SECONDS)

    def _new_reconciler(self, armed: object) -> Reconciler:
        """The reconcile core over the bucket's storage; the lease is renewed between groups too."""
        return Reconciler(
            PolicyTree(
                self.url.core_path,
                self.policy.loaded,
                strict=False,
                files=self.files,
                refuse=refusals_in_runs(self.storage.store),
            ),
            self.registry,
            pins=self._pins,
            settle_seconds=self.options.settle_seconds,
            one_shot=False,
            stop=self.stop,
            progress=self._between_groups,
            storage=self.storage,
            trash=BucketTrashPass(self.storage, self.stop),
        )

    def _between_groups(self) -> None:
        self.liveness.tick()
        self.lease.renew_if_due()

    def _report(self, result: PassResult) -> None:
        """A pass that could not list the prefix is retried soon, with a growing delay."""
        if result.storage_error is not None:
            self._unavailable(result.storage_error)
            return
        if self._failures:
            logger.info("storage_restored", path=self.url.text, failed_attempts=self._failures)
            self._failures = 0
        super()._report(result)

    def _unavailable(self, error: str) -> None:
        self._failures += 1
        poll = self.options.poll_interval or DEFAULT_BUCKET_POLL_SECONDS
        delay = min(_FIRST_RETRY_SECONDS * 2 ** (self._failures - 1), max(_LONGEST_RETRY_SECONDS, poll))
        now = time.monotonic()
        self._next_attempt = now + delay
        if self.session is not None:
            self.session.next_rescan = now + delay
        logger.warning(
            "storage_unavailable",
            path=self.url.text,
            error=error,
            attempt=self._failures,
            retry_in=delay,
            detail="nothing is planned or deleted until the prefix can be listed whole",
        )

    def _disarm(self) -> None:
        super()._disarm()
        self.lease.release()


def run_bucket_watch(
    arguments: argparse.Namespace, loaded: LoadedPolicy, store: ObjectStore, figures: DaemonFigures
) -> int:
    """``watch URL`` until a stop signal; a held lease is exit 2, as a held lock is. ``figures``: what
    ``--metrics`` serves (the file-system gauges are absent: a prefix has no file system)."""
    url: StorageURL = arguments.path
    poll = arguments.poll if arguments.poll is not None else DEFAULT_BUCKET_POLL_SECONDS
    options = WatchOptions(
        root=url.core_path,
        policy_path=arguments.policy,
        poll_interval=poll,
        settle_seconds=arguments.settle,
        rescan_seconds=poll,  # every poll is a full pass: one listing
        heartbeat=arguments.heartbeat,
        protect=tuple(arguments.protect),
    )
    watcher = BucketWatcher(
        options,
        loaded,
        url=url,
        store=store,
        lease_seconds=arguments.lease_seconds,
        notifier=Notifier(),
        figures=figures,
    )
    try:
        watcher.lock_now()
    except LockHeldError as error:
        raise UsageError(str(error)) from None
    return supervise(watcher)
