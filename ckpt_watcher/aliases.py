"""Directories the root shows twice, and mounts that show a directory from outside the root.

Two paths under the root can be one directory: a run directory bind-mounted at another path
(``mount --bind root/run1 root/alias``), the root bind-mounted inside itself. Each path would be a
group of its own, under its own per-run policy and ``protect`` patterns, so what one view protects the
other would delete. And a directory from outside the root can be bind-mounted into it
(``mount --bind /elsewhere root/run2``): a path under the root then reaches files that are outside it.

Either way the group is **kept whole**: every checkpoint in it (and below it) is pinned, so nothing
there is deleted nor evicted for space, with one warning per pass while it lasts: ``group_aliased``
(both paths) or ``group_outside_root`` (the mount, and where its directory is outside the root).

* Aliases are told by identity: the (device, inode) of every directory a full walk lists (one
  ``lstat`` per directory, none per file); two paths with one identity are one directory. A group an
  event pass plans outside a full walk is looked at the same way against what the walk saw.
* A mount point inside the root is "outside the root" when the directory it shows is not within the
  root's own directory of its file system and another mount shows it at a path outside the root
  (``/proc/self/mountinfo``). A volume mounted only inside the root (a tmpfs, a disk, a Kubernetes
  volume), or a bind mount of a directory of the root itself, is the root's own and pruned as before.
  The mount table is read once a full walk, and again for an event pass's group on a mount that was
  not in it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from ckpt_watcher.filesystem import EntryStatus, _unescape_octal, real_path, status_at
from ckpt_watcher.records import display_name

logger = structlog.get_logger("ckpt_watcher.aliases")

MOUNT_TABLE = "/proc/self/mountinfo"
_AT_FDCWD = -100
ALIASED = (
    "one directory is seen at two paths under the root (a bind mount): each path would be planned "
    "under its own policy, so nothing is deleted in either until one of them is gone"
)
OUTSIDE = (
    "a mount shows here a directory that is outside the root: nothing in it or below it is deleted "
    "(watch that directory's own root to prune it)"
)


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of the mount table: its id (``statx``'s mount id), the file system (``major:minor``),
    the directory of it shown (``source``, from that file system's top), where (``point``) and the
    file system's type (``btrfs``; empty if the line does not say)."""

    mount_id: int
    device: str
    source: str
    point: str
    file_system: str = ""

    @property
    def device_number(self) -> int | None:
        """``device`` as a ``st_dev`` number (None if the line's field is not ``major:minor``)."""
        major, _, minor = self.device.partition(":")
        return os.makedev(int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def parse_mount_table(data: bytes) -> list[Mount]:
    """The mounts of a ``/proc/PID/mountinfo`` text (lines that cannot be one are left out)."""
    mounts: list[Mount] = []
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4 and fields[0].isdigit():
            source, point = (os.fsdecode(_unescape_octal(field)) for field in fields[3:5])
            # The optional fields end with a lone "-", then the file system's type.
            separator = fields.index(b"-", 6) if b"-" in fields[6:] else len(fields)
            file_system = os.fsdecode(fields[separator + 1]) if separator + 1 < len(fields) else ""
            mounts.append(Mount(int(fields[0]), os.fsdecode(fields[2]), source, point, file_system))
    return mounts


def read_mount_table() -> list[Mount]:
    """This process's mount table (empty if it cannot be read)."""
    try:
        with open(MOUNT_TABLE, "rb") as stream:
            return parse_mount_table(stream.read(1 << 24))
    except OSError:
        return []


def lock_table_device(path: str, mounts: Sequence[Mount]) -> int | None:
    """The device ``/proc/locks`` names the locks on ``path`` (absolute, normalized) with where that is
    not ``stat``'s: on btrfs, whose subvolumes each give ``stat`` a device of their own while the lock
    table gives the file system's (the mount table's). None on any other file system, or unknown."""
    status = _status(path)
    mount = _own_directory(path, status.mount_id if status else None, mounts)
    return mount.device_number if mount is not None and mount.file_system == "btrfs" else None


def is_within(path: str, top: str) -> bool:
    """True if ``path`` is ``top`` or below it (both absolute and normalized)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def mounts_from_outside(root: str, root_mount_id: int | None, mounts: Sequence[Mount]) -> dict[str, str]:
    """Each mount point strictly inside ``root`` (on the mount ``root_mount_id``; None: unknown) that
    shows a directory from outside the root, with a path outside the root where it is shown too.

    Outside the root: not within the root's own directory of its file system (that is an alias, told
    by identity), and shown by another mount at a path outside the root. A volume mounted only inside
    the root is the root's own. (A mount hidden under another still counts: in doubt, outside.)"""
    own = _own_directory(root, root_mount_id, mounts)
    found: dict[str, str] = {}
    for mount in mounts:
        if mount.point == root or not is_within(mount.point, root):
            continue
        if own is not None and mount.device == own.device and is_within(mount.source, own.source):
            continue
        for other in mounts:
            shown = _shown(mount, other) if other is not mount else None
            if shown is not None and not is_within(shown, root):
                found[mount.point] = shown
                break
    return found


def _shown(mount: Mount, other: Mount) -> str | None:
    """Where ``other`` shows the directory ``mount`` shows, if it does."""
    if other.device != mount.device or not is_within(mount.source, other.source):
        return None
    return os.path.normpath(os.path.join(other.point, os.path.relpath(mount.source, other.source)))


def _own_directory(root: str, root_mount_id: int | None, mounts: Sequence[Mount]) -> Mount | None:
    """The root as a directory of its file system (its device, and its path from that file system's
    top as ``source``), from the mount it is on (the last one mounted on the deepest point above it,
    where the mount id is unknown)."""
    if root_mount_id is not None:
        candidates = [mount for mount in mounts if mount.mount_id == root_mount_id]
    else:
        candidates = [mount for mount in mounts if is_within(root, mount.point)]
    if not candidates:
        return None
    top = max(reversed(candidates), key=lambda mount: len(mount.point))
    source = os.path.normpath(os.path.join(top.source, os.path.relpath(root, top.point)))
    return Mount(top.mount_id, top.device, source, root, top.file_system)


def aliases_of(identities: Iterable[tuple[str, tuple[int, int]]]) -> dict[str, str]:
    """Each path whose identity another path has too, with that other path (the first one seen)."""
    first: dict[tuple[int, int], str] = {}
    aliased: dict[str, str] = {}
    for path, identity in identities:
        seen = first.setdefault(identity, path)
        if seen != path:
            aliased.setdefault(seen, path)
            aliased[path] = seen
    return aliased


def _status(path: str) -> EntryStatus | None:
    """``statx`` of ``path``, not following a symlink: its identity and mount (None: cannot be read)."""
    try:
        return status_at(_AT_FDCWD, path)
    except OSError:
        return None


def _identity(path: str) -> tuple[int, int] | None:
    """Device and inode of ``path``, not following a symlink (the walk's one ``lstat`` a directory)."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _read_mounts(root: str) -> tuple[dict[str, str], set[int]]:
    """``mounts_from_outside`` of this process's mount table, and the ids of the mounts in it (empty
    if it cannot be read)."""
    mounts = read_mount_table()
    if not mounts:
        return {}, set()
    status = _status(root)
    found = mounts_from_outside(root, status.mount_id if status else None, mounts)
    return found, {mount.mount_id for mount in mounts}


class AliasGuard:
    """What the latest full walk saw of the directories' identities and mounts (``walk``), what the
    groups of later event passes add (``kept_whole``), and which pairs were warned about this pass."""

    def __init__(self) -> None:
        self._root = ""
        self._paths: dict[tuple[int, int], str] = {}  # identity -> a path it was seen at
        self._aliased: dict[str, str] = {}  # path -> another path of the same directory
        self._outside: dict[str, str] = {}  # mount point -> where its directory shows outside the root
        self._mount_ids: set[int] = set()  # the mounts of the table the walk read
        self._looked_at: set[str] = set()  # this pass: no need to look again
        self._warned: set[frozenset[str]] = set()

    def begin_pass(self) -> None:
        """A new pass: every group is looked at again, and warned about again."""
        self._looked_at = set()
        self._warned = set()

    def walk(self, root: Path, directories: Iterable[Path]) -> Iterator[Path]:
        """Yield ``directories`` (a full walk of ``root``), noting each one's identity; once all were
        yielded, they and the mount table read now are what later checks go by."""
        identities: list[tuple[str, tuple[int, int]]] = []
        for directory in directories:
            yield directory
            identity = _identity(os.fspath(directory))
            if identity is not None:
                identities.append((os.fspath(directory), identity))
        self._root = os.fspath(root)
        self._paths = {identity: path for path, identity in reversed(identities)}  # the first seen
        self._aliased = aliases_of(identities)
        self._outside, self._mount_ids = _read_mounts(self._root)
        self._looked_at = {self._root, *(path for path, _ in identities)}

    @property
    def walked(self) -> Mapping[tuple[int, int], str]:
        """The directories of the latest full walk: identity -> the first path it was seen at."""
        return self._paths

    def kept_whole(self, root: Path, group: Path) -> dict[Path, str]:
        """A pin on ``group`` keeping everything in it if it (or a directory above it) is one of two
        paths of one directory or a mount from outside the root (warned once a pass), else nothing."""
        path = os.fspath(group)
        if path not in self._looked_at:
            self._look_at(os.fspath(root), path)
        if not self._aliased and not self._outside:
            return {}
        for above in _from_the_top(path, self._root):
            if above in self._aliased:
                return {group: self._warn_aliased(above, self._aliased[above])}
            if above in self._outside:
                return {group: self._warn_outside(above, self._outside[above])}
        return {}

    def _look_at(self, root: str, path: str) -> None:
        """A group outside the latest full walk (an event pass's): is it another path of a directory
        seen, or on a mount the walk did not see (the mount table is read again then)?"""
        self._looked_at.add(path)
        self._root = root
        status = _status(path)
        if status is None:
            return
        identity = (status.device, status.inode)
        seen = self._paths.setdefault(identity, path)
        if seen != path:
            other = self._still_at(identity, (seen, self._aliased.get(seen)), path)
            if other is not None:
                self._aliased.setdefault(other, path)
                self._aliased[path] = other
            else:
                self._paths[identity] = path  # (that path is another directory now)
        if status.mount_id is None or status.mount_id not in self._mount_ids:
            self._outside, self._mount_ids = _read_mounts(root)  # a mount made since the walk

    @staticmethod
    def _still_at(identity: tuple[int, int], paths: Iterable[str | None], path: str) -> str | None:
        """The first of ``paths`` (the walk's, but ``path``) that still shows the directory ``identity``
        names, with no symlink on the way: ``mv run out/; ln -s out/run run`` leaves the walk's path
        leading to the run's new one, which is no second path of it, though a bind mount of it the
        walk saw elsewhere still is."""
        for other in paths:
            if other is None or other == path or os.fspath(real_path(other)) != other:
                continue
            again = _status(other)
            if again is not None and (again.device, again.inode) == identity:
                return other
        return None

    def _warn_aliased(self, path: str, other: str) -> str:
        pair = frozenset({path, other})
        if pair not in self._warned:
            self._warned.add(pair)
            logger.warning(
                "group_aliased", directory=display_name(path), same_as=display_name(other), detail=ALIASED
            )
        return f"kept whole: the same directory as {display_name(self._relative(other))} (a bind mount)"

    def _warn_outside(self, point: str, shown: str) -> str:
        if frozenset({point}) not in self._warned:
            self._warned.add(frozenset({point}))
            where = {"directory": display_name(point), "outside": display_name(shown)}
            logger.warning("group_outside_root", **where, detail=OUTSIDE)
        return f"kept whole: a mount of {display_name(shown)}, outside the root"

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self._root) if self._root and is_within(path, self._root) else path


def _from_the_top(path: str, root: str) -> list[str]:
    """``path`` and the directories above it up to ``root`` (or the top), highest first."""
    chain = [path]
    while chain[-1] != root and os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]
