"""``watch``: keep a checkpoint tree within its policy while a trainer writes into it.

The loop: wait for a batch of events or a deadline, reconcile the groups they name (every group on a
rescan), report. Events are hints, the disk is the truth: a full rescan runs every ``rescan`` seconds
and after an inotify queue overflow. The one worker thread also reloads the policy, keeps the
observer alive, re-arms when the root comes back and sends the liveness signals, so a hung worker
stops all of those. ``supervise`` runs it and turns signals into requests.

Where the rest lives: ``events`` (watchdog in, paths out), ``root`` (the armed root: lock, observer),
``reconcile`` (one pass), ``policy_file`` (the policy file), ``notify`` (liveness).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from ckpt_watcher import terminal
from ckpt_watcher.events import Batch, Inbox, ObserverFactory, ObserverLike, default_observer_factory
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.lock import DirectoryLock, LockHeldError, LockUnusableError
from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.notify import Liveness, Notifier
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import LoadedPolicy, Policy
from ckpt_watcher.policy_file import PolicyFile
from ckpt_watcher.protection import ProtectionRegistry, command_line_pins
from ckpt_watcher.reconcile import PassResult, Reconciler, Trigger
from ckpt_watcher.root import ArmedRoot, take_lock
from ckpt_watcher.space import space_status
from ckpt_watcher.status import SinceStart, budget_in_force, free_bytes, pass_fields, pass_sentence
from ckpt_watcher.terminal import PassProgress

logger = structlog.get_logger("ckpt_watcher.daemon")

ROOT_CHECK_INTERVAL = 1.0
MAXIMUM_WAIT = 1.0
ERROR_BACKOFF = 1.0
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_HANDLED_SIGNALS = _STOP_SIGNALS | {signal.SIGHUP}


@dataclass(frozen=True)
class WatchOptions:
    """What ``ckpt-watcher watch`` was asked to do."""

    root: Path
    policy_path: Path | None = None
    poll_interval: float | None = None
    settle_seconds: float = 5.0
    rescan_seconds: float = 300.0
    heartbeat: Path | None = None
    protect: tuple[Path | StorageURL, ...] = ()


class WatchedRoot(Protocol):
    """What the loop needs of an armed root: ``root.ArmedRoot`` (a directory), or a bucket prefix
    (bucket_watch.ArmedBucket)."""

    path: Path
    observer_kind: str

    @property
    def observer(self) -> ObserverLike | None: ...
    def still_there(self) -> bool: ...
    def ensure_observer_alive(self, stopping: bool) -> bool: ...
    def note_unwatched(self, directories: Iterable[str]) -> None: ...
    def subtrees_to_poll(self, now: float) -> set[Path]: ...
    def next_deadline(self) -> float | None: ...
    def disarm(self) -> None: ...


@dataclass
class Session:
    """One armed root, the reconcile core that remembers it, and their deadlines."""

    root: WatchedRoot
    reconciler: Reconciler
    next_rescan: float
    next_root_check: float


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
        notifier: Notifier | None = None,
        observer_factory: ObserverFactory = default_observer_factory,
        stop: threading.Event | None = None,
        figures: DaemonFigures | None = None,
    ) -> None:
        self.options = options
        self.stop = stop if stop is not None else threading.Event()
        self.inbox = Inbox()
        self.notifier = notifier if notifier is not None else Notifier({})
        self.liveness = Liveness(self.notifier, options.heartbeat)
        self.figures = figures if figures is not None else DaemonFigures()
        self.progress = PassProgress(terminal.current) if terminal.current is not None else None
        self.policy = PolicyFile(options.policy_path, loaded_policy, on_outcome=self.figures.record_reload)
        self.registry = ProtectionRegistry(Path.cwd())
        self.session: Session | None = None
        self.exit_code = 0
        self.since_start = SinceStart()
        self._observer_factory = observer_factory
        self._pins = command_line_pins(options.protect, Path.cwd())
        self._early_lock: DirectoryLock | None = None
        self._ever_armed = False
        self._ready_sent = False
        self._announced_missing = False

    def request_stop(self) -> None:
        """Stop at the next deletion (a group may be left half pruned: the next run finishes it)."""
        self.stop.set()
        self.inbox.wake()

    def request_reload(self) -> None:
        """Re-read the policy file at the next opportunity, changed or not (SIGHUP)."""
        self.inbox.request_reload(forced=True)

    def lock_now(self) -> None:
        """Take the directory lock up front if the root exists; raise LockHeldError if it is held."""
        if self.options.root.is_dir():
            self._early_lock = take_lock(real_path(self.options.root))

    def run(self) -> int:
        """The worker thread's body; returns the process exit code."""
        try:
            while not self.stop.is_set():
                try:
                    self._turn()
                except LockUnusableError as error:
                    logger.error("watch_lock_unusable", path=str(error.path), detail=str(error))
                    self.exit_code = 2
                    break
                except LockHeldError as error:
                    logger.error("watch_lock_held", path=str(error.path), pid=error.pid, detail=str(error))
                    self.exit_code = 2
                    break
                except Exception:
                    logger.exception("worker_error", detail="the pass is retried; the daemon keeps running")
                    self.stop.wait(ERROR_BACKOFF)
        finally:
            self._disarm()
            logger.info("watch_stopped", path=str(self.options.root), **dataclasses.asdict(self.since_start))
        return self.exit_code

    def _turn(self) -> None:
        """One turn of the loop: wait for a batch or a deadline, reconcile, report."""
        session = self.session or self._arm()
        if session is None:
            self._wait_for_root()
            return
        batch = self.inbox.take(self._wait_time(session))
        if self.stop.is_set():
            return
        work = self._work_for(session, batch)  # None also when the root was lost
        if work is not None:
            self._report(session.reconciler.run(work.trigger, work.groups, closed=work.closed))
        self.liveness.tick()

    def _work_for(self, session: Session, batch: Batch) -> Work | None:
        """Check the root, the observer and the policy when due; then say what to reconcile."""
        now = time.monotonic()
        if now >= session.next_root_check:
            session.next_root_check = now + ROOT_CHECK_INTERVAL
            if not session.root.still_there():
                logger.warning(
                    "watch_path_lost",
                    path=str(self.options.root),
                    detail="deleted, replaced or unmounted; re-arming when it is back",
                )
                self._disarm()
                return None
            batch.full_rescan |= session.root.ensure_observer_alive(self.stop.is_set())
            if self.policy.changed_on_disk():
                batch.reload = True
            elif self.registry.refresh(self.registry.configs()):
                batch.full_rescan = True
        if batch.reload and self._reload(forced=batch.forced_reload):
            batch.full_rescan = True
        session.root.note_unwatched(batch.unwatched)
        if batch.full_rescan or now >= session.next_rescan:
            session.next_rescan = now + self.options.rescan_seconds
            return Work(Trigger.FULL if batch.full_rescan else Trigger.RESCAN)
        trees = batch.trees | {str(subtree) for subtree in session.root.subtrees_to_poll(now)}
        reconciler = session.reconciler
        groups = reconciler.groups_touched(batch.files, trees) | reconciler.index.take_due_rechecks(now)
        if not groups:  # between passes, keep_free is checked against the free space as it is now
            if reconciler.space.pressure(now):
                return Work(Trigger.SPACE)
            if not reconciler.trash.is_due(time.time()):
                return None  # (a pass over no group still purges the trash when a grace is over)
        return Work(Trigger.EVENT, frozenset(groups), frozenset(Path(path) for path in batch.closed))

    def _reload(self, *, forced: bool) -> bool:
        """Re-read the policy (if it changed, or ``forced``) and the protect_from configs; True if what
        is in force changed."""
        policy_changed = False
        if forced or self.policy.changed_on_disk():
            self.liveness.reloading()
            try:
                policy_changed = self.policy.reload()
            finally:
                self.liveness.reloaded()
                self.figures.set_policy_file_on_disk(self.policy.on_disk)
            if policy_changed and self.session is not None:
                self.session.reconciler.tree.set_base(self.policy.loaded)
        protection_changed = self.registry.refresh(self.registry.configs())
        return policy_changed or protection_changed

    def _arm(self) -> Session | None:
        """Lock and watch the root if it is there, reconcile it whole, and report ready."""
        armed = self._arm_root()
        if armed is None:
            return None
        self._early_lock = None
        reconciler = self._new_reconciler(armed)
        now = time.monotonic()
        self.session = Session(
            armed, reconciler, now + self.options.rescan_seconds, now + ROOT_CHECK_INTERVAL
        )
        rearm, self._ever_armed, self._announced_missing = self._ever_armed, True, False
        self._report(reconciler.run(Trigger.REARM if rearm else Trigger.STARTUP))
        details = {
            "path": str(armed.path),
            "observer": armed.observer_kind,
            "policy_source": self.policy.loaded.source_label,
            "settle_seconds": self.options.settle_seconds,
            "rescan_seconds": self.options.rescan_seconds,
        }
        if rearm:
            logger.info("watch_rearmed", **details)
        else:
            logger.info("watch_started", **details)
        self._ready(self.liveness.status_text)
        return self.session

    def _arm_root(self) -> WatchedRoot | None:
        """Lock and watch the directory if it is there (a bucket watcher arms its prefix instead)."""
        armed = ArmedRoot.arm(
            self.options.root,
            self.inbox,
            lock=self._early_lock,
            observer_factory=self._observer_factory,
            poll_interval=self.options.poll_interval,
            config_files=_config_files(self.options.policy_path, self.registry),
        )
        if armed is not None:
            self._early_lock = None
        return armed

    def _new_reconciler(self, armed: WatchedRoot) -> Reconciler:
        """The reconcile core of a newly armed root."""
        return Reconciler(
            PolicyTree(armed.path, self.policy.loaded, strict=False, on_outcome=self.figures.record_reload),
            self.registry,
            pins=self._pins,
            settle_seconds=self.options.settle_seconds,
            one_shot=False,
            stop=self.stop,
            progress=self.liveness.tick,
            on_group=self.progress.update if self.progress is not None else None,
        )

    def _wait_for_root(self) -> None:
        if not self._announced_missing:
            logger.warning(
                "watch_path_missing", path=str(self.options.root), detail="waiting for it to appear"
            )
            self._announced_missing = True
            self._ready(f"waiting for {self.options.root} to appear")
        self.liveness.tick()
        until_due = max(0.0, self.liveness.next_deadline() - time.monotonic())
        if self.inbox.take(min(ROOT_CHECK_INTERVAL, until_due)).reload:
            self._reload(forced=True)  # rare: a SIGHUP while waiting for the root

    def _ready(self, status: str) -> None:
        """READY=1 once, at the first start-up (armed, or waiting); afterwards only the status."""
        self.liveness.status(status, ready=not self._ready_sent or self.session is not None)
        self._ready_sent = True

    def _wait_time(self, session: Session) -> float:
        deadlines = [session.next_rescan, session.next_root_check, self.liveness.next_deadline()]
        reconciler = session.reconciler
        for deadline in (
            reconciler.index.next_recheck(),
            session.root.next_deadline(),
            reconciler.space.next_check(),
            reconciler.trash.deadline(),
        ):
            if deadline is not None:
                deadlines.append(deadline)
        return max(0.0, min(MAXIMUM_WAIT, min(deadlines) - time.monotonic()))

    def _report(self, result: PassResult) -> None:
        """Log the pass (``pass_completed``) and show it in ``systemctl status``, as one sentence."""
        self.since_start.add(result)
        root = self.session.root if self.session is not None else None
        if root is not None:
            self.figures.set_root(root.path, root.observer_kind)
        self.figures.record_pass(result, finished_at=time.time())
        if self.progress is not None:
            self.progress.finish()
        fields = pass_fields(
            result,
            free=free_bytes(root.path if root is not None else None),
            budget=budget_in_force(_root_policy(self.session, self.policy.loaded.policy)),
        )
        changed = result.deleted or result.trashed or result.purged or result.failed
        eventful = changed or result.detected or result.trigger.covers_everything
        logger.log(logging.INFO if eventful else logging.DEBUG, "pass_completed", **fields)
        space = "".join(f"; {space_status(fs_plan)}" for fs_plan in result.space if fs_plan.keep_free)
        self.liveness.status(f"{pass_sentence(fields)}{space}; {self.since_start.text()}")

    def _disarm(self) -> None:
        if self.session is not None:
            self.session.root.disarm()
            self.session = None
            self.figures.set_root(None, "none")
        if self._early_lock is not None:
            self._early_lock.release()
            self._early_lock = None


def _config_files(policy_path: Path | None, registry: ProtectionRegistry) -> frozenset[str]:
    """The policy file and the protect_from configs known now, as absolute paths (watched for edits)."""
    files = [policy_path] if policy_path is not None else []
    files.extend(registry.configs())
    return frozenset(os.path.abspath(path) for path in files)


class Supervised(Protocol):
    """What ``supervise`` needs of a worker (a test stands in a hung one)."""

    notifier: Notifier
    exit_code: int

    def run(self) -> int: ...
    def request_stop(self) -> None: ...
    def request_reload(self) -> None: ...


def supervise(watcher: Supervised) -> int:
    """Run the worker in its own thread; the main thread takes signals synchronously.

    The handled signals are blocked in every thread and collected with ``sigtimedwait``, so no handler
    ever runs inside a lock, and SIGTERM works the same when this process is PID 1 in a container.
    The first SIGTERM/SIGINT asks the worker to stop (at the next deletion); a second one exits at once.
    """
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    try:
        worker = threading.Thread(target=watcher.run, name="ckpt-watcher-worker")
        worker.start()
        stopping = False
        while worker.is_alive():
            received = signal.sigtimedwait(_HANDLED_SIGNALS, 0.2)
            if received is None:
                continue
            name = signal.Signals(received.si_signo).name
            if received.si_signo == signal.SIGHUP:
                logger.info("reload_requested", signal=name)
                watcher.request_reload()
            elif stopping:
                logger.warning("forced_exit", signal=name, detail="second stop signal; exiting at once")
                os._exit(128 + received.si_signo)
            else:
                stopping = True
                logger.info("stop_requested", signal=name)
                watcher.notifier.stopping()
                watcher.request_stop()
        worker.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return watcher.exit_code


def _root_policy(session: Session | None, main_policy: Policy) -> Policy:
    """The policy in force at the root: the ``--policy`` file with the root's own ``.ckpt-watcher.yaml``
    over it (``main_policy`` alone while no root is armed or an invalid override blocks it)."""
    if session is not None:
        effective = session.reconciler.tree.for_directory(session.reconciler.root)
        if effective is not None:
            return effective.policy
    return main_policy
