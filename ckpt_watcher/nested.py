"""Directories below the root that another ckpt-watcher watches: kept whole, left to that one.

``watch ROOT`` beside ``watch ROOT/run1``: each locks its own directory (lock.py), so both run, and
the outer one's policy would delete what the inner one's keeps (and it never reads the inner one's
``restore`` pins). So a directory strictly below the root that another process holds ckpt-watcher's
lock on is **kept whole**, as aliases.py keeps an aliased directory: every checkpoint in it and below
it is pinned, nothing there is deleted nor evicted for space, and ``group_watched_elsewhere`` is
warned once a pass while it lasts.

* The lock is told from ``/proc/locks``: an exclusive lock, held by another process than this one,
  on the (device, inode) of a directory the full walk listed (aliases.py ``lstat``s each one), or on
  a lock file of lock.py's fallback beside it (``.NAME.ckpt-watcher.lock``) or inside it
  (``.ckpt-watcher.lock``), looked for only on a file system other processes hold locks on.
* ``/proc/locks`` is read after a full walk that listed a directory below the root, and once again
  in each later pass that plans a group below the root (its directories up to the root are then
  looked at again): a watcher started on a run directory between two full walks is seen before the
  outer deletes anything there. It is never read for the root's own group, which is this watcher's:
  the kernel write-locks its lock table to list it, for an RCU grace period (~10 ms here, while every
  process's ``flock`` waits), so a watcher of one run directory with no subdirectories never does.
* Only locks taken on this host (in this kernel) are in ``/proc/locks``: a watcher on another host
  of an NFS volume is invisible here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ckpt_watcher.aliases import Mount, is_within, lock_table_device, read_mount_table
from ckpt_watcher.lock import LOCK_FILE_NAME, exclusive_locks, holder_among, read_proc_locks
from ckpt_watcher.records import display_name

logger = structlog.get_logger("ckpt_watcher.nested")

WATCHED = (
    "another ckpt-watcher watches this directory (it holds the directory's lock): nothing in it or "
    "below it is deleted nor evicted here, it is left to that one (until its lock is released)"
)


@dataclass(frozen=True, slots=True)
class OtherLocks:
    """The exclusive locks that processes other than this one hold: inode -> [(device, pid)]; and the
    mount table, only when one of them is on btrfs (``lock_table_device``), else empty."""

    by_inode: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    devices: frozenset[int] = frozenset()
    mounts: tuple[Mount, ...] = ()

    @classmethod
    def parse(cls, text: str, own_pid: int, mounts: Sequence[Mount] = ()) -> OtherLocks:
        """The locks of ``/proc/locks`` text, but those of ``own_pid`` (this watcher's own); ``mounts``
        (the mount table) kept only if some lock is on a btrfs file system of it."""
        by_inode: dict[int, list[tuple[int, int]]] = {}
        for device, inode, pid in exclusive_locks(text):
            if pid != own_pid:
                by_inode.setdefault(inode, []).append((device, pid))
        devices = frozenset(device for locks in by_inode.values() for device, _ in locks)
        return cls(by_inode, devices).with_mounts(mounts)

    def with_mounts(self, mounts: Sequence[Mount]) -> OtherLocks:
        """These locks with the mount table, kept only if some lock is on a btrfs file system of it."""
        on_btrfs = any(
            mount.file_system == "btrfs" and mount.device_number in self.devices for mount in mounts
        )
        return OtherLocks(self.by_inode, self.devices, tuple(mounts) if on_btrfs else ())

    def holder(self, device: int, inode: int, path: str | None = None) -> int | None:
        """The pid holding a lock on (device, inode) (0: unknown, outside this pid namespace), or None
        if nobody else does. On btrfs (``path``'s file system, per the mount table), whose subvolumes
        give ``stat`` another device than the lock table's, the one lock on that inode with the file
        system's device counts; never a lock on another file system that has the same inode number."""
        on_inode = self.by_inode.get(inode)
        if not on_inode:
            return None
        pid = holder_among(on_inode, device, None)  # (the mount table only if no lock has the device)
        if pid is not None or path is None:
            return pid
        return holder_among(on_inode, device, self.table_device(path))

    def table_device(self, path: str) -> int | None:
        """The device the lock table gives ``path``'s locks if it is on btrfs where a lock is, else None."""
        return lock_table_device(path, self.mounts) if self.mounts else None


def read_other_locks() -> OtherLocks:
    """The other processes' locks now (none known if ``/proc/locks`` cannot be read); the mount table
    is read only if another process holds a lock at all."""
    text = read_proc_locks()
    if text is None:
        return OtherLocks()
    locks = OtherLocks.parse(text, os.getpid())
    return locks.with_mounts(read_mount_table()) if locks.by_inode else locks


def lock_files_of(directory: str) -> list[str]:
    """Where lock.py's fallback puts a watcher's lock file for ``directory``: beside it, inside it."""
    parent, name = os.path.split(directory)
    return [os.path.join(parent, f".{name}{LOCK_FILE_NAME}"), os.path.join(directory, LOCK_FILE_NAME)]


def watcher_of(
    directory: str, identity: tuple[int, int] | None, locks: OtherLocks, *, strict: bool = False
) -> int | None:
    """The pid of another watcher holding ``directory``'s lock (0: pid unknown), else None.
    ``strict`` (a directory above the one asked about, where any tool may hold a lock: ``flock /srv
    cron.sh``): only a lock held by a process whose command line names ckpt-watcher (or one whose
    command line cannot be read), and on btrfs no guess across subvolumes for a subvolume's root
    (inode 256 in every subvolume)."""
    if not locks.by_inode:
        return None
    if identity is not None:
        where = None if strict and identity[1] == _SUBVOLUME_ROOT_INODE else directory
        pid = locks.holder(*identity, where)
        if pid is not None and (not strict or _runs_ckpt_watcher(pid)):
            return pid
        if identity[0] not in locks.devices and locks.table_device(directory) not in locks.devices:
            return None  # nobody else locks anything on that file system: no lock file is held
    for lock_file in lock_files_of(directory):
        try:
            status = os.lstat(lock_file)
        except OSError:
            continue
        if stat.S_ISREG(status.st_mode):
            pid = locks.holder(status.st_dev, status.st_ino, lock_file)
            if pid is not None:
                return pid
    return None


_SUBVOLUME_ROOT_INODE = 256  # btrfs: the root directory of every subvolume


def _runs_ckpt_watcher(pid: int) -> bool:
    """True if process ``pid`` runs ckpt-watcher (its command line says so), or cannot be told (pid 0:
    outside this pid namespace; its command line hidden, ``hidepid``). A pid that is gone is no
    watcher: one holds its lock until it exits (``flock DIR sh -c 'job &'`` leaves it to a child)."""
    if pid <= 0:
        return True
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()[:4096]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return b"ckpt_watcher" in command_line or b"ckpt-watcher" in command_line


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISDIR(status.st_mode) else None


def directories_below(path: str, root: str) -> list[str]:
    """The directories from just below ``root`` down to ``path`` (empty for the root itself)."""
    if not is_within(path, root) or path == root:
        return []
    chain = [path]
    while os.path.dirname(chain[-1]) != root:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]


class NestedGuard:
    """Which directories below the root other watchers hold (``_watched``: path -> pid, 0 unknown),
    as of the locks read this pass, and which were warned about this pass."""

    def __init__(self) -> None:
        self._locks: OtherLocks | None = None  # read this pass (None: not yet)
        self._watched: dict[str, int] = {}
        self._looked_at: set[str] = set()  # this pass, with the locks read this pass
        self._warned: set[str] = set()

    def begin_pass(self) -> None:
        """A new pass: the locks are read again before a group is planned, and warned about again."""
        self._locks = None
        self._looked_at = set()
        self._warned = set()

    def after_walk(self, root: Path, identities: Mapping[tuple[int, int], str]) -> None:
        """A full walk listed these directories (identity -> path): read the locks, note the held.
        A walk that found no directory below the root reads no locks: none could be another's."""
        top = os.fspath(root)
        below = [(identity, path) for identity, path in identities.items() if path != top]
        self._watched = {}
        self._looked_at = {top}
        self._locks = None
        if not below:
            return
        self._locks = locks = read_other_locks()
        for identity, path in below:
            self._looked_at.add(path)
            pid = watcher_of(path, identity, locks)
            if pid is not None:
                self._watched[path] = pid

    def kept_whole(self, root: Path, group: Path) -> dict[Path, str]:
        """A pin keeping everything in ``group`` if it (or a directory above it, below the root) is
        watched by another watcher (warned once a pass), else nothing."""
        top, path = os.fspath(root), os.fspath(group)
        chain = directories_below(path, top)
        unseen = [directory for directory in chain if directory not in self._looked_at]
        if unseen:  # (the root's own group has none: no locks read for it)
            if self._locks is None:
                self._locks = read_other_locks()  # an event pass: a watcher may have started since
            locks = self._locks
            for directory in unseen:
                self._looked_at.add(directory)
                pid = watcher_of(directory, _identity(directory), locks) if locks.by_inode else None
                if pid is None:
                    self._watched.pop(directory, None)
                else:
                    self._watched[directory] = pid
        for directory in chain:
            if directory in self._watched:
                return {group: self._warn(top, directory, self._watched[directory])}
        return {}

    def _warn(self, root: str, directory: str, pid: int) -> str:
        if directory not in self._warned:
            self._warned.add(directory)
            known = {"pid": pid} if pid > 0 else {}
            logger.warning(
                "group_watched_elsewhere", directory=display_name(directory), **known, detail=WATCHED
            )
        holder = f"pid {pid}" if pid > 0 else "pid unknown"
        where = display_name(os.path.relpath(directory, root))
        return f"kept whole: {where} is watched by another ckpt-watcher ({holder}), left to that one"
