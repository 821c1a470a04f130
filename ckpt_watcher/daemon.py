"""``watch``: keep a checkpoint tree within its policy while a trainer writes into it.

Events are hints, the disk is the truth: watchdog handlers only put paths into the ``Inbox``; one
worker thread takes them in batches, re-scans the affected groups, plans and deletes, and runs a full
rescan every ``rescan`` seconds and after an inotify queue overflow. The worker also reloads the policy,
restarts a dead observer, re-arms when the root comes back, touches the heartbeat file and sends the
systemd watchdog keep-alive, so a hung worker stops all of those.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch
from watchdog.observers.polling import PollingObserver

from ckpt_watcher.delete import DeletionResult, Outcome, apply_group, remove_leftovers
from ckpt_watcher.lock import DirectoryLock, LockHeldError
from ckpt_watcher.naming import Kind, Naming
from ckpt_watcher.notify import Notifier
from ckpt_watcher.overrides import OVERRIDE_FILE_NAME, EffectivePolicy, PolicyTree
from ckpt_watcher.plan import Summary, plan, symlink_targets
from ckpt_watcher.policy import LoadedPolicy, PolicyError, load_policy
from ckpt_watcher.protection import ProtectionRegistry, command_line_pins
from ckpt_watcher.records import CheckpointRecord, FileIdentity, display_name
from ckpt_watcher.report import human_bytes
from ckpt_watcher.scan import CompletenessCache, ScanOptions, ScanProblem, scan_directory, walk_directories

logger = structlog.get_logger("ckpt_watcher.daemon")

HEARTBEAT_INTERVAL = 5.0
ROOT_CHECK_INTERVAL = 1.0
MAXIMUM_WAIT = 1.0
QUIET_WINDOW = 0.02
MAXIMUM_BATCH_DELAY = 0.25
FALLBACK_POLL_INTERVAL = 5.0
ERROR_BACKOFF = 1.0


@dataclass(frozen=True)
class WatchOptions:
    """What ``ckpt-watcher watch`` was asked to do."""

    root: Path
    policy_path: Path | None = None
    poll_interval: float | None = None
    settle_seconds: float = 5.0
    rescan_seconds: float = 300.0
    heartbeat: Path | None = None
    protect: tuple[Path, ...] = ()


@dataclass
class Batch:
    """What arrived since the worker last looked."""

    files: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    trees: set[str] = field(default_factory=set)
    full_rescan: bool = False
    reload: bool = False
    forced_reload: bool = False

    def __bool__(self) -> bool:
        return bool(self.files or self.trees or self.full_rescan or self.reload)


class Inbox:
    """The hand-off between event handlers (which only add) and the one worker (which takes)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._batch = Batch()
        self._woken = False

    def add_file(self, path: str, *, closed: bool = False) -> None:
        """A file changed; ``closed`` means its writer closed it or it was moved into place."""
        with self._condition:
            self._batch.files.add(path)
            if closed:
                self._batch.closed.add(path)
            self._condition.notify()

    def add_tree(self, path: str) -> None:
        """A directory appeared, moved or vanished: rescan everything below it."""
        with self._condition:
            self._batch.trees.add(path)
            self._condition.notify()

    def request_full_rescan(self) -> None:
        """Events were lost (queue overflow) or the policy changed: rescan the whole root."""
        with self._condition:
            self._batch.full_rescan = True
            self._condition.notify()

    def request_reload(self, *, forced: bool = False) -> None:
        """Check the policy and protect_from files; ``forced`` (SIGHUP) re-reads even if unchanged."""
        with self._condition:
            self._batch.reload = True
            self._batch.forced_reload = self._batch.forced_reload or forced
            self._condition.notify()

    def wake(self) -> None:
        """Make ``take`` return now (used on stop)."""
        with self._condition:
            self._woken = True
            self._condition.notify()

    def take(self, timeout: float) -> Batch:
        """Wait up to ``timeout`` for work, then gather a burst until it goes quiet; return it."""
        with self._condition:
            if not self._batch and not self._woken:
                self._condition.wait(timeout)
            if self._batch and not self._woken:
                deadline = time.monotonic() + MAXIMUM_BATCH_DELAY
                while not self._woken:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._condition.wait(min(QUIET_WINDOW, remaining)):
                        break
            batch, self._batch, self._woken = self._batch, Batch(), False
            return batch


class ObserverLike(Protocol):
    """The parts of a watchdog observer the worker uses."""

    def schedule(self, event_handler: Any, path: str, *, recursive: bool = False) -> Any: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def is_alive(self) -> bool: ...


ObserverFactory = Callable[[float | None], ObserverLike]


# What the router uses from inotify. Leaving out opens, closes without writes, modifications and
# attribute changes means the kernel does not even queue them: the start-up reconcile opens every
# checkpoint, and a multi-GB write is thousands of IN_MODIFY, none of which would be acted on.
_INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]


def _lean_inotify_observer() -> ObserverLike:
    """inotify with full move events and only the events the router needs.

    ``generate_full_events`` reports a file renamed in from outside the tree (Lightning's atomic save:
    a temp file in $TMPDIR moved into place) as a move with no source, instead of as a creation, so it
    counts at once rather than after the settle time.
    """
    from watchdog.observers.inotify import InotifyObserver  # noqa: PLC0415  (Linux only)

    class LeanInotifyObserver(InotifyObserver):
        def schedule(
            self,
            event_handler: FileSystemEventHandler,
            path: str | Path,
            *,
            recursive: bool = False,
            event_filter: list[type[FileSystemEvent]] | None = None,
            follow_symlink: bool = False,
        ) -> ObservedWatch:
            return super().schedule(
                event_handler,
                path,
                recursive=recursive,
                event_filter=event_filter if event_filter is not None else _INOTIFY_EVENTS,
                follow_symlink=follow_symlink,
            )

    return LeanInotifyObserver(generate_full_events=True)


def default_observer_factory(poll_interval: float | None) -> ObserverLike:
    """inotify (lean, see above) or, with an interval, the polling observer."""
    if poll_interval is not None:
        return PollingObserver(timeout=poll_interval)
    if sys.platform.startswith("linux"):
        return _lean_inotify_observer()
    observer: ObserverLike = Observer()
    return observer


class EventRouter(FileSystemEventHandler):
    """The watchdog handler: classifies an event into the inbox and does nothing else."""

    def __init__(self, inbox: Inbox, *, polling: bool, config_files: frozenset[str]) -> None:
        super().__init__()
        self._inbox = inbox
        self._polling = polling
        self._config_files = config_files
        self._config_directories = frozenset(os.path.dirname(path) for path in config_files)

    def _is_config_change(self, path: str) -> bool:
        """The policy or a protect_from file itself, or a ConfigMap's ``..data`` symlink beside one."""
        if path in self._config_files:
            return True
        return os.path.basename(path) == "..data" and os.path.dirname(path) in self._config_directories

    def dispatch(self, event: FileSystemEvent) -> None:
        """Route every event; an exception here is logged and never reaches the observer."""
        try:
            self._route(event)
        except Exception:
            logger.exception("event_handler_failed", event_type=event.event_type)

    def _route(self, event: FileSystemEvent) -> None:
        event_type = event.event_type
        if event_type in {"opened", "closed_no_write"}:
            return  # reads, including our own completeness checks
        source = os.fsdecode(event.src_path)
        destination = os.fsdecode(event.dest_path) if event.dest_path else ""
        paths = [path for path in (source, destination) if path]
        if any(self._is_config_change(path) for path in paths):
            self._inbox.request_reload()  # re-read if the file's identity changed
        if any(os.path.basename(path) == OVERRIDE_FILE_NAME for path in paths):
            for path in paths:
                self._inbox.add_tree(os.path.dirname(path))  # a per-run policy: re-plan its subtree
            return
        if event_type == "modified" and not self._polling:
            return  # inotify: a write in progress; its close (or move into place) is what counts
        if event.is_directory:
            if event_type != "modified":  # a listing change; the files' own events say what changed
                for path in paths:
                    self._inbox.add_tree(path)
            return
        if event_type == "moved":
            # Either side may be empty: moved in from outside the tree, or out of it. A rename is
            # atomic, so what arrives is as complete as it will ever be (the zip check still applies).
            if source:
                self._inbox.add_file(source)
            if destination:
                self._inbox.add_file(destination, closed=True)
            return
        self._inbox.add_file(source, closed=event_type == "closed")


class OverflowListener(logging.Handler):
    """watchdog reports an inotify queue overflow only as a log record; turn it into a full rescan."""

    def __init__(self, inbox: Inbox) -> None:
        super().__init__(level=logging.WARNING)
        self._inbox = inbox

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            logger.warning("event_queue_overflow", detail="events were lost; rescanning everything")
            self._inbox.request_full_rescan()


_WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


@dataclass
class GroupState:
    """What the worker remembers about one directory between passes (bounded by its entries)."""

    cache: CompletenessCache = field(default_factory=CompletenessCache)
    seen: dict[str, bool] = field(default_factory=dict)
    link_targets: dict[Path, str] = field(default_factory=dict)
    protect_from: dict[Path, str] = field(default_factory=dict)


@dataclass
class PassTotals:
    """What one pass did."""

    groups: int = 0
    summary: Summary = field(default_factory=Summary)
    deleted: int = 0
    failed: int = 0
    bytes_freed: int = 0
    detected: int = 0


class Watcher:
    """The worker: owns the policy, the observer, the lock and all per-group state."""

    def __init__(
        self,
        options: WatchOptions,
        loaded_policy: LoadedPolicy,
        *,
        notifier: Notifier | None = None,
        observer_factory: ObserverFactory = default_observer_factory,
        stop: threading.Event | None = None,
    ) -> None:
        self.options = options
        self.loaded = loaded_policy
        self.notifier = notifier if notifier is not None else Notifier({})
        self.stop = stop if stop is not None else threading.Event()
        self.inbox = Inbox()
        self.exit_code = 0
        self.total_deleted = 0
        self.total_bytes_freed = 0
        self._observer_factory = observer_factory
        self._observer: ObserverLike | None = None
        self._observer_kind = ""
        self._overflow_listener = OverflowListener(self.inbox)
        self._lock: DirectoryLock | None = None
        self._root: Path | None = None
        self._root_identity: tuple[int, int] | None = None
        self._groups: dict[Path, GroupState] = {}
        self.tree: PolicyTree | None = None
        self.registry = ProtectionRegistry(Path.cwd())
        self._command_line_pins = command_line_pins(options.protect, Path.cwd())
        self._blocked: set[Path] = set()
        self._rechecks: dict[Path, float] = {}
        self._announced_missing = False
        self._started = False
        self._ever_armed = False
        self._policy_signature = FileIdentity.of_path(options.policy_path)
        self._policy_missing_logged = False
        now = time.monotonic()
        self._next_rescan = now + options.rescan_seconds
        self._next_heartbeat = now
        self._next_keepalive = now
        self._next_root_check = now + ROOT_CHECK_INTERVAL
        self._last_status = "starting"

    # -- control from other threads -------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the group in hand (never half a group)."""
        self.stop.set()
        self.inbox.wake()

    def request_reload(self) -> None:
        """Re-read the policy file at the next opportunity, changed or not (SIGHUP)."""
        self.inbox.request_reload(forced=True)

    def lock_now(self) -> None:
        """Take the directory lock up front if the root exists; raise LockHeldError if it is held."""
        if self.options.root.is_dir():
            self._acquire_lock(Path(os.path.realpath(self.options.root)))

    # -- the worker loop --------------------------------------------------------------------------

    def run(self) -> int:
        """The worker thread's body; returns the process exit code."""
        try:
            while not self.stop.is_set():
                try:
                    if self._root is None:
                        self._try_arm()
                        if self._root is None:
                            self._keepalive()
                            if self.inbox.take(min(ROOT_CHECK_INTERVAL, self._until_keepalive())).reload:
                                self._reload_policy()  # rare: only while waiting for the root
                            continue
                    batch = self.inbox.take(self._wait_time())
                    if self.stop.is_set():
                        break
                    self._tick(batch)
                except LockHeldError as error:
                    logger.error("watch_lock_held", path=str(error.path), pid=error.pid, detail=str(error))
                    self.exit_code = 2
                    break
                except Exception:
                    logger.exception("worker_error", detail="the pass is retried; the daemon keeps running")
                    self.stop.wait(ERROR_BACKOFF)
        finally:
            self._disarm()
            logger.info(
                "watch_stopped",
                path=str(self.options.root),
                deleted=self.total_deleted,
                bytes_freed=self.total_bytes_freed,
            )
        return self.exit_code

    def _wait_time(self) -> float:
        now = time.monotonic()
        deadlines = [self._next_rescan, self._next_root_check, self._next_heartbeat_due()]
        if self.notifier.watchdog_interval is not None:
            deadlines.append(self._next_keepalive)
        if self._rechecks:
            deadlines.append(min(self._rechecks.values()))
        return max(0.0, min(MAXIMUM_WAIT, *(deadline - now for deadline in deadlines)))

    def _next_heartbeat_due(self) -> float:
        return self._next_heartbeat if self.options.heartbeat is not None else float("inf")

    def _until_keepalive(self) -> float:
        now = time.monotonic()
        due = min(self._next_heartbeat_due(), self._next_keepalive)
        return max(0.0, due - now)

    def _tick(self, batch: Batch) -> None:
        now = time.monotonic()
        if now >= self._next_root_check:
            self._next_root_check = now + ROOT_CHECK_INTERVAL
            if not self._root_still_there():
                return
            self._ensure_observer_alive()
            if FileIdentity.of_path(self.options.policy_path) != self._policy_signature:
                batch.reload = True
            elif self.registry.refresh(self.registry.configs()):
                batch.full_rescan = True
        if batch.reload:
            policy_changed = False
            if (
                batch.forced_reload
                or FileIdentity.of_path(self.options.policy_path) != self._policy_signature
            ):
                policy_changed = self._reload_policy()
            protection_changed = self.registry.refresh(self.registry.configs())
            if policy_changed or protection_changed:
                batch.full_rescan = True
        if batch.full_rescan or now >= self._next_rescan:
            self._full_pass("rescan" if not batch.full_rescan else "full")
        else:
            groups = self._groups_for(batch)
            due = [group for group, deadline in self._rechecks.items() if deadline <= now]
            for group in due:
                del self._rechecks[group]
            groups.update(due)
            if groups:
                self._pass(groups, closed={Path(path) for path in batch.closed}, trigger="event")
        self._keepalive()

    # -- arming: lock, observer, reconcile --------------------------------------------------------

    def _acquire_lock(self, root: Path) -> None:
        if self._lock is not None and self._lock.directory == root and self._lock.held:
            return
        lock = DirectoryLock(root)
        try:
            lock.acquire()
        except LockHeldError:
            raise
        except OSError as error:
            logger.warning(
                "watch_lock_unavailable",
                path=str(root),
                error=error.strerror or str(error),
                detail="running without the single-instance lock",
            )
            return
        self._lock = lock

    def _try_arm(self) -> None:
        root_as_given = self.options.root
        try:
            status = os.stat(root_as_given)
        except OSError:
            status = None
        if status is None or not os.path.isdir(root_as_given):
            if not self._announced_missing:
                logger.warning(
                    "watch_path_missing",
                    path=str(root_as_given),
                    detail="waiting for it to appear",
                )
                self._announced_missing = True
                self._set_status(f"waiting for {root_as_given} to appear", ready=not self._started)
                self._started = True
            return
        root = Path(os.path.realpath(root_as_given))
        self._acquire_lock(root)
        self._root = root
        self.tree = PolicyTree(root, self.loaded, strict=False)
        self._root_identity = (status.st_dev, status.st_ino)
        self._start_observer()
        rearm = self._ever_armed
        self._ever_armed = True
        self._groups.clear()
        self._rechecks.clear()
        self._full_pass("startup" if not rearm else "rearm")
        self._announced_missing = False
        logger.info(
            "watch_started" if not rearm else "watch_rearmed",
            path=str(root),
            observer=self._observer_kind,
            policy_source=self.loaded.source_label,
            settle_seconds=self.options.settle_seconds,
            rescan_seconds=self.options.rescan_seconds,
        )
        self._set_status(self._last_status, ready=True)
        self._started = True

    def _root_still_there(self) -> bool:
        try:
            status = os.stat(self.options.root)
            identity: tuple[int, int] | None = (status.st_dev, status.st_ino)
        except OSError:
            identity = None
        if identity is not None and identity == self._root_identity:
            return True
        logger.warning(
            "watch_path_lost",
            path=str(self.options.root),
            detail="deleted, replaced or unmounted; re-arming when it is back",
        )
        self._disarm()
        return False

    def _start_observer(self) -> None:
        assert self._root is not None
        polling = self.options.poll_interval is not None
        kind = f"polling every {self.options.poll_interval:g} s" if polling else "inotify"
        try:
            observer = self._schedule(self._observer_factory(self.options.poll_interval), polling)
        except OSError as error:
            if polling:
                raise
            logger.warning(
                "inotify_unavailable",
                error=error.strerror or str(error),
                detail=f"falling back to polling every {FALLBACK_POLL_INTERVAL:g} s "
                "(raise fs.inotify.max_user_watches / max_user_instances to avoid this)",
            )
            observer = self._schedule(self._observer_factory(FALLBACK_POLL_INTERVAL), True)
            kind = f"polling every {FALLBACK_POLL_INTERVAL:g} s (inotify unavailable)"
        self._observer = observer
        self._observer_kind = kind
        for name in _WATCHDOG_LOGGERS:
            logging.getLogger(name).addHandler(self._overflow_listener)

    def _schedule(self, observer: ObserverLike, polling: bool) -> ObserverLike:
        assert self._root is not None
        config_files = self._config_files()
        router = EventRouter(self.inbox, polling=polling, config_files=config_files)
        try:
            observer.schedule(router, str(self._root), recursive=True)
            for directory in sorted({os.path.dirname(path) for path in config_files}):
                if _is_below(Path(directory), self._root) or not os.path.isdir(directory):
                    continue
                try:
                    observer.schedule(router, directory, recursive=False)
                except OSError as error:
                    logger.warning(
                        "config_watch_unavailable",
                        path=directory,
                        error=error.strerror or str(error),
                        detail="edits are still picked up by a check every second",
                    )
            observer.start()
        except BaseException:
            _stop_observer(observer)
            raise
        return observer

    def _config_files(self) -> frozenset[str]:
        """The policy file and the protect_from configs known now, as absolute paths."""
        files = [self.options.policy_path] if self.options.policy_path is not None else []
        files.extend(self.registry.configs())
        return frozenset(os.path.abspath(path) for path in files)

    def _ensure_observer_alive(self) -> None:
        if self._observer is None or self._observer.is_alive() or self.stop.is_set():
            return
        logger.warning("observer_restarted", observer=self._observer_kind, detail="the observer thread died")
        _stop_observer(self._observer)
        self._observer = None
        self._start_observer()
        self.inbox.request_full_rescan()

    def _disarm(self) -> None:
        for name in _WATCHDOG_LOGGERS:
            logging.getLogger(name).removeHandler(self._overflow_listener)
        if self._observer is not None:
            _stop_observer(self._observer)
            self._observer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._root = None
        self._root_identity = None

    # -- policy -----------------------------------------------------------------------------------

    def _reload_policy(self) -> bool:
        """Re-read the policy file; True if a different valid policy is now in force."""
        path = self.options.policy_path
        self._policy_signature = FileIdentity.of_path(path)
        self.notifier.reloading()  # always paired with READY=1, so `systemctl reload` never hangs
        try:
            return self._read_policy(path)
        finally:
            self.notifier.ready(self._last_status)

    def _read_policy(self, path: Path | None) -> bool:
        if path is None:
            logger.info("policy_unchanged", source=self.loaded.source_label)
            return False
        if not path.exists():
            if not self._policy_missing_logged:
                logger.warning(
                    "policy_missing",
                    source=str(path),
                    detail="the policy file is gone; the last good policy stays in force",
                )
                self._policy_missing_logged = True
            return False
        self._policy_missing_logged = False
        try:
            loaded = load_policy(path)
        except PolicyError as error:
            logger.error(
                "policy_rejected",
                source=str(path),
                problems=error.problems,
                detail="the previous policy stays in force",
            )
            return False
        for warning in loaded.warnings:
            logger.warning("policy_warning", source=loaded.source_label, message=warning)
        old = self.loaded.policy.model_dump(mode="json")
        new = loaded.policy.model_dump(mode="json")
        changes = {key: {"old": old[key], "new": new[key]} for key in new if old.get(key) != new[key]}
        self.loaded = loaded
        if self.tree is not None:
            self.tree.set_base(loaded)
        if changes:
            logger.info("policy_reloaded", source=str(path), changes=changes)
        else:
            logger.info("policy_unchanged", source=str(path))
        return bool(changes)

    # -- passes -----------------------------------------------------------------------------------

    def _groups_for(self, batch: Batch) -> set[Path]:
        assert self._root is not None
        groups: set[Path] = set()
        for path in batch.files:
            group = self._group_of(Path(os.path.normpath(path)))
            if group is not None:
                groups.add(group)
        for tree in batch.trees:
            tree_path = Path(os.path.normpath(tree))
            if not _is_below(tree_path, self._root):
                continue
            parent = self._group_of(tree_path)
            if parent is not None:
                groups.add(parent)
            for known in list(self._groups):
                if _is_below(known, tree_path) and not known.is_dir():
                    self._forget(known)
            if tree_path.is_dir() and not tree_path.is_symlink():
                problems: list[ScanProblem] = []
                groups.update(walk_directories(tree_path, self._naming_for, problems))
                _log_problems(problems)
        return groups

    def _group_of(self, path: Path) -> Path | None:
        """The directory whose group ``path`` belongs to, or None if it is outside the root.

        A path inside a directory checkpoint belongs to the group that holds the checkpoint.
        """
        assert self._root is not None
        if path == self._root or not _is_below(path, self._root):
            return None
        relative = path.relative_to(self._root).parts
        for index, part in enumerate(relative[:-1]):
            parent = self._root.joinpath(*relative[:index])
            if self._naming_for(parent).classify(part).kind is not Kind.UNKNOWN:
                return parent
        return path.parent

    def _naming_for(self, directory: Path) -> Naming:
        if self.tree is None:
            return self.loaded.policy.compiled_naming
        return self.tree.naming_for(directory)

    def _full_pass(self, trigger: str) -> None:
        assert self._root is not None
        self._next_rescan = time.monotonic() + self.options.rescan_seconds
        problems: list[ScanProblem] = []
        groups = list(walk_directories(self._root, self._naming_for, problems))
        _log_problems(problems)
        present = set(groups)
        for known in list(self._groups):
            if known not in present:
                self._forget(known)
        self._rechecks.clear()
        for group in groups:
            remove_leftovers(self._root, group)
        self._pass(groups, closed=set(), trigger=trigger)

    def _forget(self, group: Path) -> None:
        self._groups.pop(group, None)
        self._rechecks.pop(group, None)

    def _effective_policies(self, groups: Iterable[Path]) -> dict[Path, EffectivePolicy | None]:
        assert self.tree is not None
        effective = {group: self.tree.for_directory(group) for group in groups}
        for group, value in effective.items():
            state = self._groups.setdefault(group, GroupState())
            state.protect_from = dict(value.protect_from) if value is not None else state.protect_from
        return effective

    def _known_configs(self) -> dict[Path, str]:
        configs: dict[Path, str] = {}
        for state in self._groups.values():
            configs.update(state.protect_from)
        return configs

    def _pass(self, groups: Iterable[Path], closed: set[Path], trigger: str) -> None:
        started = time.monotonic()
        totals = PassTotals()
        groups = set(groups)
        effective = self._effective_policies(groups)
        configs = self._known_configs()
        protection_changed = self.registry.refresh(configs)
        if trigger != "event":
            protection_changed = self.registry.retain(configs) or protection_changed
        if protection_changed and trigger == "event":
            groups |= set(self._groups)  # a new resume source may sit in any group
            effective = self._effective_policies(groups)
        pins = {**self._command_line_pins, **self.registry.pins()}
        for state in self._groups.values():
            pins.update(state.link_targets)
        for group in sorted(groups):
            if self.stop.is_set():
                break  # between groups only: a group in hand is always finished
            self._process_group(group, effective.get(group), pins, closed, totals)
            self._keepalive()  # a long pass (a big tree on slow NFS) must not look like a hang
        self.total_deleted += totals.deleted
        self.total_bytes_freed += totals.bytes_freed
        summary = totals.summary
        eventful = totals.deleted or totals.failed or totals.detected or trigger != "event"
        (logger.info if eventful else logger.debug)(
            "pass_completed",
            trigger=trigger,
            groups=totals.groups,
            kept=summary.kept,
            deleted=totals.deleted,
            skipped=summary.skipped,
            failed=totals.failed,
            bytes_freed=totals.bytes_freed,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        status = (
            f"last pass: kept {summary.kept}, deleted {totals.deleted}, skipped {summary.skipped}"
            f"; since start: deleted {self.total_deleted} ({human_bytes(self.total_bytes_freed)})"
        )
        if totals.failed:
            status += f"; {totals.failed} deletion(s) failed, retried next pass"
        self._set_status(status)

    def _process_group(
        self,
        directory: Path,
        effective: EffectivePolicy | None,
        pins: dict[Path, str],
        closed: set[Path],
        totals: PassTotals,
    ) -> None:
        assert self._root is not None
        if not directory.is_dir() or directory.is_symlink():
            self._forget(directory)
            return
        if effective is None:
            if directory not in self._blocked:
                logger.warning(
                    "group_blocked",
                    directory=str(directory),
                    detail=f"an invalid {OVERRIDE_FILE_NAME} applies here; "
                    "nothing is deleted here until it is fixed",
                )
                self._blocked.add(directory)
            return
        self._blocked.discard(directory)
        state = self._groups.setdefault(directory, GroupState())
        problems: list[ScanProblem] = []
        wall_now = time.time()
        records = scan_directory(
            self._root,
            directory,
            effective.policy.compiled_naming,
            ScanOptions(
                settle_seconds=self.options.settle_seconds,
                now=wall_now,
                closed_paths=frozenset(path for path in closed if path.parent == directory),
                verify=effective.policy.verify,
            ),
            state.cache,
            problems,
        )
        _log_problems(problems)
        state.cache.retain(records)
        totals.detected += self._log_detected(state, records)
        state.link_targets = symlink_targets(records)
        group_plans = plan(records, effective.policy, pins).groups
        totals.groups += 1
        if not group_plans:
            return
        group_plan = group_plans[0]
        totals.summary = totals.summary + group_plan.summary
        results = apply_group(group_plan, self._root)
        self._count(results, totals)
        if any(result.outcome is Outcome.CHANGED for result in results):
            self._rechecks[directory] = time.monotonic() + max(self.options.settle_seconds, 1.0)
        self._schedule_settle_recheck(directory, records, wall_now)

    @staticmethod
    def _count(results: list[DeletionResult], totals: PassTotals) -> None:
        for result in results:
            if result.outcome is Outcome.DELETED:
                totals.deleted += 1
                totals.bytes_freed += result.decision.record.bytes
            elif result.outcome is Outcome.FAILED:
                totals.failed += 1

    def _schedule_settle_recheck(
        self, directory: Path, records: Iterable[CheckpointRecord], wall_now: float
    ) -> None:
        """A file that is only waiting to settle is looked at again the moment it has."""
        waits = [record.settles_at - wall_now for record in records if record.settles_at is not None]
        if waits:
            due = time.monotonic() + max(0.05, min(waits) + 0.05)
            current = self._rechecks.get(directory)
            self._rechecks[directory] = due if current is None else min(current, due)

    @staticmethod
    def _log_detected(state: GroupState, records: list[CheckpointRecord]) -> int:
        """Log checkpoints that are new or whose completeness changed; return how many."""
        current: dict[str, bool] = {}
        detected = 0
        for record in records:
            if record.kind is Kind.UNKNOWN:
                continue
            current[record.name] = record.complete
            if state.seen.get(record.name) != record.complete:
                detected += 1
                logger.info(
                    "checkpoint_detected",
                    path=display_name(str(record.path)),
                    kind=record.kind.value,
                    complete=record.complete,
                    reason=record.incomplete_reason,
                )
        state.seen = current
        return detected

    # -- liveness ---------------------------------------------------------------------------------

    def _keepalive(self) -> None:
        now = time.monotonic()
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= self._next_keepalive:
            self.notifier.keepalive()
            self._next_keepalive = now + interval
        if self.options.heartbeat is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_INTERVAL
            _touch(self.options.heartbeat)

    def _set_status(self, status: str, *, ready: bool = False) -> None:
        self._last_status = status
        if ready:
            self.notifier.ready(status)
            self._keepalive()
        else:
            self.notifier.status(status)


def _stop_observer(observer: ObserverLike) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=1.0)
    except Exception:
        logger.exception("observer_stop_failed")


def _touch(path: Path) -> None:
    try:
        path.touch()
        os.utime(path)
    except OSError as error:
        logger.warning("heartbeat_failed", path=str(path), error=error.strerror or str(error))


def _is_below(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _log_problems(problems: list[ScanProblem]) -> None:
    for problem in problems:
        logger.warning("scan_problem", path=str(problem.path), error=problem.message)
