"""Where ``watch`` works: a directory (``DirectoryPlace``) or a bucket prefix (bucket_watch.py).

The daemon's loop (daemon.py) is the same for both; what differs is asked of its ``Place``: how the
root is held (a directory lock and an observer, or a lease and listings), how its reconcile core is
built, which pins and which policy edits apply, and what a pass that could not look at the root means.
``Crew`` is what a place borrows from the loop to build those.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from ckpt_watcher.events import Inbox, ObserverFactory, ObserverLike, default_observer_factory
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.lock import DirectoryLock
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.notify import Liveness
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import LoadedPolicy
from ckpt_watcher.policy_file import PolicyFile
from ckpt_watcher.protection import ProtectionRegistry, command_line_pins
from ckpt_watcher.reconcile import PassResult, Reconciler
from ckpt_watcher.records import display_name
from ckpt_watcher.root import ArmedRoot, take_lock

if TYPE_CHECKING:
    from ckpt_watcher.session import Session
    from ckpt_watcher.terminal import PassProgress

logger = structlog.get_logger("ckpt_watcher.place")


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

    @classmethod
    def from_arguments(
        cls, arguments: argparse.Namespace, *, root: Path, poll: float | None, rescan: float
    ) -> WatchOptions:
        """The options of a parsed ``watch`` command line (a bucket passes its own poll and rescan)."""
        return cls(
            root=root,
            policy_path=arguments.policy,
            poll_interval=poll,
            settle_seconds=arguments.settle,
            rescan_seconds=rescan,
            heartbeat=arguments.heartbeat,
            protect=tuple(arguments.protect),
        )


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


@dataclass(frozen=True)
class Crew:
    """What the loop shares with its place: the options, the stop request, the inbox the observer
    fills, the policy file, the liveness signals, the metrics' figures, a terminal's progress line."""

    options: WatchOptions
    stop: threading.Event
    inbox: Inbox
    policy: PolicyFile
    liveness: Liveness
    figures: DaemonFigures
    progress: PassProgress | None


class Place(Protocol):
    """What differs between watching a directory and watching a bucket prefix."""

    @property
    def registry(self) -> ProtectionRegistry:
        """The protect_from configs (and what they pin) known here."""
        ...

    @property
    def pins(self) -> Mapping[Path, str]:
        """``--protect`` pins."""
        ...

    @property
    def refuse(self) -> Callable[[LoadedPolicy], list[str]] | None:
        """What a policy edit may not ask for here (a bucket: keep_free), as ``At 'key': ...`` problems."""
        ...

    def lock_now(self) -> None:
        """Take the root's lock (or lease) up front; raise LockHeldError if another watcher holds it."""
        ...

    def arm(self, crew: Crew) -> WatchedRoot | None:
        """Hold and watch the root if it is there now; None to try again later."""
        ...

    def reconciler(self, root: WatchedRoot, crew: Crew) -> Reconciler:
        """The reconcile core of a newly armed root."""
        ...

    def accepts(self, result: PassResult, session: Session | None) -> bool:
        """False if the pass could not look at the root (it is not reported; the place retries)."""
        ...

    def release(self) -> None:
        """Let go of whatever ``lock_now`` or ``arm`` still holds (at exit)."""
        ...


# A pass that could not read what it must (a bucket's listing, a pin of a restored checkpoint) is tried
# again this much later, doubling at each failure up to the longest (or the poll interval, if longer).
FIRST_RETRY_SECONDS = 1.0
LONGEST_RETRY_SECONDS = 60.0


class Retries:
    """When a root whose last pass could not read what it must is tried again, and the log of it: one
    ``storage_unavailable`` warning per failed attempt, ``storage_restored`` at the first pass after."""

    def __init__(self, path: str, poll_seconds: float, detail: str) -> None:
        self.path = path
        self.poll_seconds = poll_seconds
        self.detail = detail
        self.failures = 0
        self.next_attempt = 0.0  # (monotonic)

    def failed(self, error: str, session: Session | None) -> None:
        """One more failed attempt: the next one (a full pass of ``session``) after a growing delay."""
        self.failures += 1
        longest = max(LONGEST_RETRY_SECONDS, self.poll_seconds)
        delay = min(FIRST_RETRY_SECONDS * 2 ** min(self.failures - 1, 32), longest)
        now = time.monotonic()
        self.next_attempt = now + delay
        if session is not None:
            session.next_rescan = session.held_until = now + delay
        logger.warning(
            "storage_unavailable",
            path=self.path,
            error=error,
            attempt=self.failures,
            retry_in=delay,
            detail=self.detail,
        )

    def succeeded(self) -> None:
        """A pass read what it must: said once after failures."""
        if self.failures:
            logger.info("storage_restored", path=self.path, failed_attempts=self.failures)
            self.failures = 0


class DirectoryPlace:
    """A directory on a local or network file system: a lock beside it, an observer on it."""

    refuse = None

    def __init__(
        self, options: WatchOptions, observer_factory: ObserverFactory = default_observer_factory
    ) -> None:
        self.options = options
        self.registry = ProtectionRegistry(Path.cwd())
        self.pins = command_line_pins(options.protect, Path.cwd())
        self._observer_factory = observer_factory
        self._early_lock: DirectoryLock | None = None
        self._unusable: str | None = None  # why the root could not be opened, as last logged
        # Where the root led when it was first armed (its real path) and whether it was a symlink then:
        # a root replaced by a symlink, or leading elsewhere since, is never armed again (a re-arm on
        # where it leads now would prune a tree that was never the watched root).
        self._first_armed: tuple[Path, bool] | None = None
        self._retries = Retries(
            str(options.root),
            0.0,  # (at most a minute: a directory's passes are not paced by its poll)
            "the pass stopped before its next deletion; nothing more is deleted until every pin of a "
            "restored checkpoint can be read",
        )

    def lock_now(self) -> None:
        """Take the directory lock up front if the root exists (so a second daemon exits 2 at once)."""
        if self.options.root.is_dir():
            self._early_lock = take_lock(real_path(self.options.root))

    def arm(self, crew: Crew) -> ArmedRoot | None:
        """Lock and watch the directory if it is there and can be opened (a root that comes back
        unreadable, mode 700 for another user, is waited for like a missing one: said once)."""
        problem = _unopenable(self.options.root)
        if problem is not None:
            if problem != self._unusable:
                logger.warning(
                    "watch_path_unusable",
                    path=str(self.options.root),
                    error=problem,
                    detail="it is there but cannot be opened; waiting until it can",
                )
                self._unusable = problem
            return None
        leads_to = _leads_to(self.options.root)
        if self._elsewhere(leads_to):
            return None
        self._unusable = None
        armed = ArmedRoot.arm(
            self.options.root,
            crew.inbox,
            lock=self._early_lock,
            observer_factory=self._observer_factory,
            poll_interval=self.options.poll_interval,
            config_files=config_files(self.options.policy_path, self.registry),
        )
        if armed is None:
            return None
        self._early_lock = None  # the armed root holds it now
        if self._first_armed is not None and armed.path != self._first_armed[0]:  # (swapped meanwhile)
            armed.disarm()
            return None
        self._first_armed = self._first_armed or (armed.path, leads_to[1])
        return armed

    def _elsewhere(self, leads_to: tuple[Path, bool]) -> bool:
        """True (said once) if the root now leads elsewhere than where it was first armed, or is a
        symlink now and was not: it is waited for, never followed, like a root that cannot be opened."""
        first = self._first_armed
        if first is None or leads_to == first:
            return False
        problem = f"it now leads to {display_name(str(leads_to[0]))}" + (
            ", through a symlink" if leads_to[1] and not first[1] else ""
        )
        if problem != self._unusable:
            logger.warning(
                "watch_path_unusable",
                path=display_name(str(self.options.root)),
                error=problem,
                detail=f"first watched at {display_name(str(first[0]))}; a root replaced by a symlink or "
                "leading elsewhere is never followed: waiting until it is that directory again (restart "
                "the daemon to watch where it leads now)",
            )
            self._unusable = problem
        return True

    def reconciler(self, root: WatchedRoot, crew: Crew) -> Reconciler:
        """The reconcile core over the directory."""
        return Reconciler(
            PolicyTree(root.path, crew.policy.loaded, strict=False, on_outcome=crew.figures.record_reload),
            self.registry,
            pins=self.pins,
            settle_seconds=self.options.settle_seconds,
            one_shot=False,
            stop=crew.stop,
            progress=crew.liveness.tick,
            on_group=crew.progress.update if crew.progress is not None else None,
        )

    def accepts(self, result: PassResult, session: Session | None) -> bool:
        """Every pass over a directory is reported (one that could not scan a group says so itself;
        one that could not read the trash's pins, with what it did before, is also tried again soon)."""
        if result.storage_error is not None:
            self._retries.failed(result.storage_error, session)
        elif result.trigger.covers_everything:  # (a pass of one group may not have read the pins)
            self._retries.succeeded()
        return True

    def release(self) -> None:
        """Release the lock taken by ``lock_now`` if the root never armed."""
        if self._early_lock is not None:
            self._early_lock.release()
            self._early_lock = None


def config_files(policy_path: Path | None, registry: ProtectionRegistry) -> frozenset[str]:
    """The policy file and the protect_from configs known now, as absolute paths (watched for edits)."""
    files = [policy_path] if policy_path is not None else []
    files.extend(registry.configs())
    return frozenset(os.path.abspath(path) for path in files)


def _leads_to(root: Path) -> tuple[Path, bool]:
    """Where ``root`` leads now (its real path), and whether it is itself a symlink."""
    return real_path(root), os.path.islink(root)


def _unopenable(root: Path) -> str | None:
    """Why the directory ``root`` cannot be opened, or None if it can (or is not there: ``arm`` says
    so). Opening it is what its lock and its observer do first."""
    try:
        descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        return describe_os_error(error)
    os.close(descriptor)
    return None
