"""``watch``: keep a checkpoint tree within its policy while a trainer writes into it.

The loop: wait for a batch of events or a deadline, reconcile the groups they name (every group on a
rescan), report. Events are hints, the disk is the truth: a full rescan runs every ``rescan`` seconds
and after an inotify queue overflow. The one worker thread also reloads the policy, keeps the
observer alive, re-arms when the root comes back and sends the liveness signals, so a hung worker
stops all of those.

Where the rest lives: ``place`` (a directory or a bucket prefix: how the root is held and its
reconcile core built), ``session`` (arming, disarming), ``status`` (reporting a pass), ``supervisor``
(the main thread, signals), ``events`` (watchdog in, paths out), ``reconcile`` (one pass),
``policy_file`` (the policy file), ``notify`` (liveness).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from ckpt_watcher import terminal
from ckpt_watcher.events import Batch, Inbox, ObserverFactory, default_observer_factory
from ckpt_watcher.lock import LockHeldError, LockUnusableError
from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.notify import Liveness, Notifier
from ckpt_watcher.place import Crew, DirectoryPlace, Place, WatchOptions
from ckpt_watcher.policy import LoadedPolicy
from ckpt_watcher.policy_file import PolicyFile
from ckpt_watcher.reconcile import Trigger
from ckpt_watcher.session import ROOT_CHECK_INTERVAL, Arming, Session
from ckpt_watcher.status import PassReporter
from ckpt_watcher.terminal import PassProgress

logger = structlog.get_logger("ckpt_watcher.daemon")

MAXIMUM_WAIT = 1.0
ERROR_BACKOFF = 1.0
# After a pass that raised, the next is a full pass (the events and re-checks of the one that raised
# were taken from the queue): 1 s later, doubling while passes keep raising, up to this.
LONGEST_ERROR_BACKOFF = 60.0


@dataclass(frozen=True)
class Work:
    """What a batch asks of the reconcile core."""

    trigger: Trigger
    groups: frozenset[Path] = frozenset()
    closed: frozenset[Path] = frozenset()


class Watcher:
    """The worker: one loop over one root (or none, while it is missing)."""

    def __init__(
        self,
        options: WatchOptions,
        loaded_policy: LoadedPolicy,
        *,
        place: Place | None = None,
        notifier: Notifier | None = None,
        observer_factory: ObserverFactory = default_observer_factory,
        stop: threading.Event | None = None,
        figures: DaemonFigures | None = None,
    ) -> None:
        self.options = options
        self.place = place if place is not None else DirectoryPlace(options, observer_factory)
        self.stop = stop if stop is not None else threading.Event()
        self.inbox = Inbox()
        self.notifier = notifier if notifier is not None else Notifier({})
        figures = figures if figures is not None else DaemonFigures()
        self.policy = PolicyFile(
            options.policy_path, loaded_policy, on_outcome=figures.record_reload, refuse=self.place.refuse
        )
        progress = PassProgress(terminal.current) if terminal.current is not None else None
        self.crew = Crew(
            options,
            self.stop,
            self.inbox,
            self.policy,
            Liveness(self.notifier, options.heartbeat),
            figures,
            progress,
        )
        self.reporter = PassReporter(
            self.crew.liveness, figures, progress, lambda: self.policy.loaded.policy, self.place.accepts
        )
        self.arming = Arming(self.place, self.crew, self.reporter)
        self.exit_code = 0

    @property
    def session(self) -> Session | None:
        """The armed root, or None while it is missing."""
        return self.arming.session

    def request_stop(self) -> None:
        """Stop at the next deletion (a group may be left half pruned: the next run finishes it)."""
        self.stop.set()
        self.inbox.wake()

    def request_reload(self) -> None:
        """Re-read the policy file at the next opportunity, changed or not (SIGHUP)."""
        self.inbox.request_reload(forced=True)

    def lock_now(self) -> None:
        """Take the root's lock (or lease) up front; raise LockHeldError if another watcher holds it."""
        self.place.lock_now()

    def run(self) -> int:
        """The worker thread's body; returns the process exit code."""
        errors_in_a_row = 0
        try:
            while not self.stop.is_set():
                try:
                    self._turn()
                    errors_in_a_row = 0
                except LockUnusableError as error:
                    logger.error("watch_lock_unusable", path=str(error.path), detail=str(error))
                    self.exit_code = 2
                    break
                except LockHeldError as error:
                    logger.error("watch_lock_held", path=str(error.path), pid=error.pid, detail=str(error))
                    self.exit_code = 2
                    break
                except Exception:
                    # (the exponent stops: 2**1024 converts to no float, and raised here, ended the loop)
                    backoff = min(LONGEST_ERROR_BACKOFF, ERROR_BACKOFF * 2 ** min(errors_in_a_row, 32))
                    errors_in_a_row += 1
                    logger.exception(
                        "worker_error",
                        detail="a full pass is retried; the daemon keeps running",
                        retry_seconds=backoff,
                    )
                    self.inbox.request_full_rescan()  # what the pass was to look at is not lost
                    self.stop.wait(backoff)
        finally:
            self.arming.disarm()
            self.place.release()
            since_start = dataclasses.asdict(self.reporter.since_start)
            logger.info("watch_stopped", path=str(self.options.root), **since_start)
        return self.exit_code

    def _turn(self) -> None:
        """One turn of the loop: wait for a batch or a deadline, reconcile, report."""
        session = self.arming.session or self.arming.arm()
        if session is None:
            self._wait_for_root()
            return
        batch = self.inbox.take(self._wait_time(session))
        if self.stop.is_set():
            return
        work = self._work_for(session, batch)  # None also when the root was lost
        if work is not None:
            result = session.reconciler.run(work.trigger, work.groups, closed=work.closed)
            self.reporter.report(result, session)
        self.crew.liveness.tick()

    def _work_for(self, session: Session, batch: Batch) -> Work | None:
        """Check the root, the observer and the policy when due; then say what to reconcile."""
        now = time.monotonic()
        policy_due = False  # (asked once: a file missing for its quiet time is said so at one asking)
        if now >= session.next_root_check:
            session.next_root_check = now + ROOT_CHECK_INTERVAL
            if not session.root.still_there():
                self.arming.lost()
                return None
            batch.full_rescan |= session.root.ensure_observer_alive(self.stop.is_set())
            if self.policy.changed_on_disk():
                batch.reload = policy_due = True
            elif self.place.registry.refresh(self.place.registry.configs()):
                batch.full_rescan = True
        if batch.reload and self._reload(forced=batch.forced_reload, due=policy_due):
            batch.full_rescan = True
        session.root.note_unwatched(batch.unwatched)
        held = now < session.held_until  # (what comes meanwhile is the retry's: a full pass)
        session.full_rescan_asked |= batch.full_rescan
        if (session.full_rescan_asked and not held) or now >= session.next_rescan:
            session.next_rescan = now + self.options.rescan_seconds
            full, session.full_rescan_asked = session.full_rescan_asked, False
            return Work(Trigger.FULL if full else Trigger.RESCAN)
        return None if held else self._work_between_rescans(session, batch, now)

    def _work_between_rescans(self, session: Session, batch: Batch, now: float) -> Work | None:
        """The groups events and due re-checks name; else keep_free's check, or a due purge."""
        trees = batch.trees | {str(subtree) for subtree in session.root.subtrees_to_poll(now)}
        reconciler = session.reconciler
        groups = reconciler.groups_touched(batch.files, trees) | reconciler.index.take_due_rechecks(now)
        if not groups:  # between passes, keep_free is checked against the free space as it is now
            if reconciler.space.pressure(now):
                return Work(Trigger.SPACE)
            if not reconciler.trash.is_due(time.time()):
                return None  # (a pass over no group still purges the trash when a grace is over)
        return Work(Trigger.EVENT, frozenset(groups), frozenset(Path(path) for path in batch.closed))

    def _reload(self, *, forced: bool, due: bool = False) -> bool:
        """Re-read the policy (if it changed, ``due`` if that was just asked, or ``forced``) and the
        protect_from configs; True if what is in force changed."""
        policy_changed = False
        if forced or due or self.policy.changed_on_disk():
            self.crew.liveness.reloading()
            try:
                policy_changed = self.policy.reload()
            finally:
                self.crew.liveness.reloaded()
                self.crew.figures.set_policy_file_on_disk(self.policy.on_disk)
            if policy_changed and self.session is not None:
                self.session.reconciler.tree.set_base(self.policy.loaded)
        protection_changed = self.place.registry.refresh(self.place.registry.configs())
        return policy_changed or protection_changed

    def _wait_for_root(self) -> None:
        """Wait a moment for the missing root (answering a SIGHUP meanwhile)."""
        self.arming.announce_missing()
        self.crew.liveness.tick()
        until_due = max(0.0, self.crew.liveness.next_deadline() - time.monotonic())
        if self.inbox.take(min(ROOT_CHECK_INTERVAL, until_due)).reload:
            self._reload(forced=True)

    def _wait_time(self, session: Session) -> float:
        """Seconds until the nearest deadline (at most ``MAXIMUM_WAIT``)."""
        reconciler = session.reconciler
        deadlines: list[float | None] = [
            session.next_rescan,
            session.next_root_check,
            self.crew.liveness.next_deadline(),
        ]
        if time.monotonic() >= session.held_until:  # (held: the others wait for the retry, not due now)
            deadlines += [
                reconciler.index.next_recheck(),
                session.root.next_deadline(),
                reconciler.space.next_check(),
                reconciler.trash.deadline(),
            ]
        nearest = min(deadline for deadline in deadlines if deadline is not None)
        return max(0.0, min(MAXIMUM_WAIT, nearest - time.monotonic()))
