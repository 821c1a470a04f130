"""Safe file-system primitives for scanning and deleting: nothing here follows a symlink it was not
asked to, opens anything that is not a regular file, crosses into another mount, or recurses.

* ``open_regular`` opens a file for reading only after ``fstat`` says it is a regular file: it first
  takes an ``O_PATH`` handle (which opens nothing: a FIFO does not block, a device is not touched),
  checks it, then re-opens that very inode through ``/proc/self/fd``.
* ``summarize_tree`` and ``remove_tree`` walk a directory checkpoint iteratively, holding one open
  directory at a time (any depth, any path length): they go down with ``openat(O_NOFOLLOW)`` and back
  up by re-opening ``..`` and checking it is the directory they came from. A directory on another file
  system, or the root of another mount (a bind mount of the same file system has the same ``st_dev``,
  so the mount identity from ``statx`` is compared too), is never entered. Given a ``stop`` event,
  they look at it once a directory and every ``STOP_CHECKED_EVERY`` entries, and end with
  ``WalkStopped`` once it is set (a daemon asked to stop does not first walk 300,000 files).
* ``rename_no_replace`` moves an entry between two open directories and never replaces what is at the
  destination (``renameat2(RENAME_NOREPLACE)``): the trash's moves in and out.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ckpt_watcher.logs import describe_os_error

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_PATH_FLAG: int = getattr(os, "O_PATH", 0)
REMAINS_SHOWN = 20
STOP_CHECKED_EVERY = 256  # entries a tree walk handles between two looks at its stop event

# statx(2): the mount a file is on (STATX_MNT_ID, Linux 5.8) and whether it is a mount's root.
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BASIC_STATS = 0x7FF
_STATX_MNT_ID = 0x1000
_STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_BUFFER_SIZE = 256


class NotRegularFileError(OSError):
    """The path is a FIFO, socket, device, directory or symlink: it is never opened for reading."""


class TreeChangedError(OSError):
    """A directory moved while it was being walked; the walk stops rather than guess."""


class WalkStopped(Exception):  # noqa: N818  (an outcome asked for, not an error)
    """A tree walk ended early because its ``stop`` event was set; what it did so far stays done."""


@dataclass(frozen=True, slots=True)
class EntryStatus:
    """What ``lstat`` says, plus the mount it is on and whether it is a mount's root (None: unknown)."""

    device: int
    inode: int
    mode: int
    size: int
    mtime_ns: int
    mount_id: int | None = None
    mount_root: bool | None = None


_RENAME_NOREPLACE = 1
# renameat2 flags a file system does not support (some network ones) give EINVAL; an old kernel ENOSYS.
_NO_RENAMEAT2 = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


@cache
def _renameat2_function() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def rename_no_replace(source: str, destination: str, *, source_dir_fd: int, destination_dir_fd: int) -> None:
    """Rename ``source`` (in one open directory) to ``destination`` (in another), never replacing an
    entry already there (FileExistsError) and never following a symlink (names are single components).

    Atomic where ``renameat2(RENAME_NOREPLACE)`` works (Linux >= 3.15 on local file systems); where it
    does not, the destination is checked first and the rename follows, so only an entry created in
    between could be replaced.
    """
    function = _renameat2_function()
    if function is not None:
        encoded = (os.fsencode(source), os.fsencode(destination))
        if function(source_dir_fd, encoded[0], destination_dir_fd, encoded[1], _RENAME_NOREPLACE) == 0:
            return
        number = ctypes.get_errno()
        if number not in _NO_RENAMEAT2:
            raise OSError(number, os.strerror(number), source, None, destination)
    try:
        os.stat(destination, dir_fd=destination_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(source, destination, src_dir_fd=source_dir_fd, dst_dir_fd=destination_dir_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), destination)


@cache
def _statx_function() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.statx
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def status_at(dir_fd: int, name: str) -> EntryStatus:
    """``lstat`` of ``name`` in ``dir_fd`` (``""``: ``dir_fd`` itself), with mount identity if known."""
    function = _statx_function()
    if function is None:
        return _from_stat(os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if name else os.fstat(dir_fd))
    buffer = ctypes.create_string_buffer(_STATX_BUFFER_SIZE)
    flags = _AT_SYMLINK_NOFOLLOW | (_AT_EMPTY_PATH if not name else 0)
    if function(dir_fd, os.fsencode(name), flags, _STATX_BASIC_STATS | _STATX_MNT_ID, buffer) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), name)
    raw = buffer.raw
    mask, attributes = struct.unpack_from("<I4xQ", raw, 0)
    (attributes_mask,) = struct.unpack_from("<Q", raw, 56)
    (mode,) = struct.unpack_from("<H", raw, 28)
    inode, size = struct.unpack_from("<QQ", raw, 32)
    seconds, nanoseconds = struct.unpack_from("<qI", raw, 112)
    major, minor = struct.unpack_from("<II", raw, 136)
    (mount_id,) = struct.unpack_from("<Q", raw, 144)
    return EntryStatus(
        device=os.makedev(major, minor),
        inode=inode,
        mode=mode,
        size=size,
        mtime_ns=seconds * 1_000_000_000 + nanoseconds,
        mount_id=mount_id if mask & _STATX_MNT_ID else None,
        mount_root=bool(attributes & _STATX_ATTR_MOUNT_ROOT)
        if attributes_mask & _STATX_ATTR_MOUNT_ROOT
        else None,
    )


def _from_stat(status: os.stat_result) -> EntryStatus:
    return EntryStatus(status.st_dev, status.st_ino, status.st_mode, status.st_size, status.st_mtime_ns)


def _mount_points() -> frozenset[str]:
    """Mount points of this process (for kernels without statx's mount identity); empty if unknown."""
    try:
        with open("/proc/self/mountinfo", "rb") as stream:
            lines = stream.read(1 << 24).splitlines()
    except OSError:
        return frozenset()
    points = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            points.add(os.fsdecode(_unescape_octal(fields[4])))
    return frozenset(points)


def _unescape_octal(text: bytes) -> bytes:
    r"""mountinfo writes space, tab, newline and backslash as ``\040`` etc."""
    parts = text.split(b"\\")
    result = bytearray(parts[0])
    for part in parts[1:]:
        if len(part) >= 3 and all(48 <= byte <= 55 for byte in part[:3]):
            result.append(int(part[:3], 8))
            result.extend(part[3:])
        else:
            result.extend(b"\\" + part)
    return bytes(result)


class _Boundary:
    """Decides whether an entry lies on another file system or mount than the top of the walk."""

    def __init__(self, top: EntryStatus) -> None:
        self._top = top
        self._mount_points: frozenset[str] | None = None
        if top.mount_id is None and top.mount_root is None:
            self._mount_points = _mount_points()

    def crosses(self, status: EntryStatus, dir_fd: int, name: str) -> bool:
        """True if ``name`` in ``dir_fd`` (whose status is ``status``) is on another mount."""
        if status.device != self._top.device:
            return True
        if status.mount_root is not None and status.mount_root:
            return True
        if status.mount_id is not None and self._top.mount_id is not None:
            return status.mount_id != self._top.mount_id
        if self._mount_points:
            try:
                directory = os.readlink(f"/proc/self/fd/{dir_fd}")
            except OSError:
                return False
            return os.path.join(directory, name) in self._mount_points
        return False


def open_regular(
    path: str, *, dir_fd: int | None = None, follow_symlinks: bool = False
) -> tuple[int, os.stat_result]:
    """Open a regular file for reading; raise NotRegularFileError for anything else, never blocking.

    The caller closes the returned descriptor.
    """
    if _PATH_FLAG:
        handle = open_handle(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        try:
            status = os.fstat(handle)
            return reopen_regular(handle, status, path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        finally:
            os.close(handle)
    return _open_by_name(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)


def open_handle(path: str, *, dir_fd: int | None = None, follow_symlinks: bool = False) -> int:
    """An ``O_PATH`` handle on ``path``: it opens nothing (a FIFO does not block, a device is not
    touched), and ``fstat`` on it is the ``lstat`` of the entry (of its target with
    ``follow_symlinks``). Only where ``O_PATH`` exists (``HAS_HANDLES``)."""
    return os.open(path, _PATH_FLAG | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW), dir_fd=dir_fd)


HAS_HANDLES = bool(_PATH_FLAG)


def open_process_descriptors() -> int | None:
    """``/proc/self/fd`` opened as a directory (None without /proc): re-opening a handle relative to
    it resolves one name, not the three of ``/proc/self/fd/N``, for every file of a scan. The caller
    closes it, and never keeps it across a ``fork`` (it names this process's descriptors)."""
    try:
        return os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def reopen_regular(
    handle: int,
    status: os.stat_result,
    path: str,
    *,
    dir_fd: int | None = None,
    follow_symlinks: bool = False,
    process_descriptors: int | None = None,
) -> tuple[int, os.stat_result]:
    """Open for reading the very inode the ``O_PATH`` ``handle`` holds (``status`` is its ``fstat``),
    only if it is a regular file (NotRegularFileError for anything else); the caller closes both.
    ``process_descriptors`` is ``open_process_descriptors()``'s directory, if the caller holds one."""
    if not stat.S_ISREG(status.st_mode):
        raise NotRegularFileError(0, "not a regular file", path)
    try:
        if process_descriptors is not None:
            return os.open(str(handle), _READ_FLAGS, dir_fd=process_descriptors), status
        return os.open(f"/proc/self/fd/{handle}", _READ_FLAGS), status
    except FileNotFoundError:
        pass  # no /proc: open by name below, and check it is a regular file again
    return _open_by_name(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)


def _open_by_name(path: str, *, dir_fd: int | None, follow_symlinks: bool) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading, never blocking, and keep it only if ``fstat`` says it is a regular file
    (where there is no ``O_PATH``, or no /proc to re-open a handle through)."""
    file_descriptor = os.open(path, _READ_FLAGS | (0 if follow_symlinks else os.O_NOFOLLOW), dir_fd=dir_fd)
    try:
        opened = os.fstat(file_descriptor)
        if not stat.S_ISREG(opened.st_mode):
            raise NotRegularFileError(0, "not a regular file", path)
    except BaseException:
        os.close(file_descriptor)
        raise
    return file_descriptor, opened


class _Cursor:
    """The one open directory of an iterative walk, and the identities of the directories above it."""

    def __init__(self, top_fd: int, top: EntryStatus) -> None:
        self.fd = top_fd
        self.boundary = _Boundary(top)
        self._ancestors: list[tuple[int, int]] = []
        self.parts: list[str] = []
        self._identity = (top.device, top.inode)

    def relative(self, name: str = "") -> str:
        """The path of ``name`` (in the current directory) relative to the top of the walk."""
        return "/".join([*self.parts, name] if name else self.parts)

    def enter(self, name: str) -> str | None:
        """Go down into ``name``; None if entered, else why not (gone, not a directory, a mount)."""
        try:
            child = os.open(name, DIRECTORY_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return "vanished"
        except OSError as error:
            return describe_os_error(error)
        try:
            status = status_at(child, "")
            if self.boundary.crosses(status, self.fd, name):
                os.close(child)
                return "a mount point: never entered"
        except BaseException:
            os.close(child)
            raise
        self._ancestors.append(self._identity)
        self._identity = (status.device, status.inode)
        os.close(self.fd)
        self.fd = child
        self.parts.append(name)
        return None

    def leave(self) -> str:
        """Go back up; return the name of the directory just left. Raises TreeChangedError if ``..``
        is no longer the directory it came from (something moved it)."""
        parent = os.open("..", DIRECTORY_FLAGS, dir_fd=self.fd)
        try:
            status = status_at(parent, "")
            expected = self._ancestors[-1]
            if (status.device, status.inode) != expected:
                raise TreeChangedError(0, f"{self.relative()} was moved during the walk")
        except BaseException:
            os.close(parent)
            raise
        os.close(self.fd)
        self.fd = parent
        self._identity = self._ancestors.pop()
        return self.parts.pop()

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class TreeSummary:
    """A directory checkpoint as a walk that never left its mount saw it."""

    bytes: int = 0
    newest_mtime_ns: int = 0
    top_entries: set[str] = field(default_factory=set)
    # The newest regular file anywhere in it, and each regular file directly in it (its writer's marker
    # must be written after the rest: a file newer than the marker was rewritten after it).
    newest_file_mtime_ns: int = 0
    top_file_mtimes: dict[str, int] = field(default_factory=dict)
    mount_points: list[str] = field(default_factory=list)
    identity: EntryStatus | None = None
    # Every entry counted, and the sum of their times: with ``bytes``, what changes whenever anything
    # in it is written, created or removed, whatever clock dated it (``signature``).
    entries: int = 0
    mtime_sum_ns: int = 0

    def signature(self) -> tuple[int, int, int]:
        """What a writer still at work in it changes (a file's size, any time, an entry's coming)."""
        return (self.entries, self.bytes, self.mtime_sum_ns)


def _open_top(name: str, dir_fd: int | None, follow_symlinks: bool) -> tuple[int, EntryStatus]:
    flags = DIRECTORY_FLAGS if not follow_symlinks else DIRECTORY_FLAGS & ~os.O_NOFOLLOW
    top_fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        return top_fd, status_at(top_fd, "")
    except BaseException:
        os.close(top_fd)
        raise


def summarize_tree(
    name: str,
    *,
    dir_fd: int | None = None,
    follow_symlinks: bool = False,
    stop: threading.Event | None = None,
) -> TreeSummary:
    """Bytes of regular files, newest mtime, top-level names and mount points below ``name``.

    Raises OSError if ``name`` itself cannot be opened as a directory, TreeChangedError if the tree
    is moved about during the walk, WalkStopped once ``stop`` is set.
    """
    top_fd, top = _open_top(name, dir_fd, follow_symlinks)
    cursor = _Cursor(top_fd, top)
    summary = TreeSummary(newest_mtime_ns=top.mtime_ns, identity=top)
    try:
        if dir_fd is not None and _is_mount_of_its_own(top, dir_fd, name):
            summary.mount_points.append(".")  # the directory itself is another mount
        pending = [_summarize_here(cursor, summary, stop, top_level=True)]
        while pending:
            if pending[-1]:
                child = pending[-1].pop()
                refusal = cursor.enter(child)
                if refusal is None:
                    pending.append(_summarize_here(cursor, summary, stop, top_level=False))
                elif refusal.startswith("a mount point"):
                    summary.mount_points.append(cursor.relative(child))
            else:
                pending.pop()
                if pending:
                    cursor.leave()
    finally:
        cursor.close()
    return summary


def _is_mount_of_its_own(top: EntryStatus, parent_fd: int, name: str) -> bool:
    """True if ``top`` (``name`` in ``parent_fd``) is not on its parent directory's mount."""
    parent = status_at(parent_fd, "")
    return _Boundary(parent).crosses(top, parent_fd, name)


def _summarize_here(
    cursor: _Cursor, summary: TreeSummary, stop: threading.Event | None, *, top_level: bool
) -> list[str]:
    """Account for the entries of the current directory; return its subdirectories to visit."""
    subdirectories: list[str] = []
    for count, name in enumerate(os.listdir(cursor.fd)):
        _check_stop(stop, count)
        if top_level:
            summary.top_entries.add(name)
        try:
            status = status_at(cursor.fd, name)
        except FileNotFoundError:
            continue
        summary.newest_mtime_ns = max(summary.newest_mtime_ns, status.mtime_ns)
        summary.entries += 1
        summary.mtime_sum_ns += status.mtime_ns
        if stat.S_ISLNK(status.mode):
            continue
        if cursor.boundary.crosses(status, cursor.fd, name):
            summary.mount_points.append(cursor.relative(name))
        elif stat.S_ISDIR(status.mode):
            subdirectories.append(name)
        elif stat.S_ISREG(status.mode):
            summary.bytes += status.size
            summary.newest_file_mtime_ns = max(summary.newest_file_mtime_ns, status.mtime_ns)
            if top_level:
                summary.top_file_mtimes[name] = status.mtime_ns
    subdirectories.sort(reverse=True)
    return subdirectories


@dataclass
class Removal:
    """What a removal left: nothing (``removed``), or the paths that remain and why."""

    removed: bool
    remains: list[str] = field(default_factory=list)

    def note(self, path: str, reason: str) -> None:
        """Record a path that could not be removed (the first few are kept, for the log)."""
        if len(self.remains) < REMAINS_SHOWN:
            self.remains.append(f"{path} ({reason})")


def remove_tree(name: str, *, dir_fd: int, stop: threading.Event | None = None) -> Removal:  # noqa: C901, PLR0912  (one iterative walk: each kind of entry and each way a removal can fail, handled where it happens)
    """Remove the directory ``name`` in ``dir_fd`` and everything in it, never leaving its mount.

    Entries are unlinked without following symlinks (a planted link is removed, not followed); a
    mount point is never entered, so it and its parents remain and the removal reports what is left.
    Raises OSError only if ``name`` itself cannot be opened, WalkStopped once ``stop`` is set (what
    is not removed yet stays under ``name``: only a tree already renamed out of the way, whose
    removal can be finished later, is handed a stop).
    """
    top_fd, top = _open_top(name, dir_fd, follow_symlinks=False)
    cursor = _Cursor(top_fd, top)
    removal = Removal(removed=False)
    try:
        pending = [_clear_here(cursor, removal, stop)]
        while pending:
            if pending[-1]:
                child = pending[-1].pop()
                refusal = cursor.enter(child)
                if refusal is None:
                    pending.append(_clear_here(cursor, removal, stop))
                elif refusal != "vanished":
                    removal.note(cursor.relative(child), refusal)
            else:
                pending.pop()
                if pending:
                    left = cursor.leave()
                    try:
                        os.rmdir(left, dir_fd=cursor.fd)
                    except FileNotFoundError:
                        pass
                    except OSError as error:
                        removal.note(cursor.relative(left), describe_os_error(error))
    except TreeChangedError as error:
        removal.note(cursor.relative(), str(error.strerror))
    finally:
        cursor.close()
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        removal.removed = not removal.remains
    except OSError as error:
        if not removal.remains:
            removal.note(".", describe_os_error(error))
    else:
        removal.removed = True
    return removal


def _clear_here(cursor: _Cursor, removal: Removal, stop: threading.Event | None) -> list[str]:
    """Unlink every non-directory in the current directory; return the subdirectories to clear."""
    subdirectories: list[str] = []
    try:
        names = os.listdir(cursor.fd)
    except OSError as error:
        removal.note(cursor.relative() or ".", f"cannot list it: {describe_os_error(error)}")
        return subdirectories
    for count, name in enumerate(names):
        _check_stop(stop, count)
        try:
            os.unlink(name, dir_fd=cursor.fd)
        except IsADirectoryError:
            subdirectories.append(name)
        except FileNotFoundError:
            continue
        except OSError as error:
            removal.note(cursor.relative(name), describe_os_error(error))
    return subdirectories


def _check_stop(stop: threading.Event | None, count: int) -> None:
    """Raise WalkStopped if ``stop`` is set, looking at it only at every ``STOP_CHECKED_EVERY``-th
    entry of a directory (the first included, so a tree of small directories looks once each)."""
    if stop is not None and count % STOP_CHECKED_EVERY == 0 and stop.is_set():
        raise WalkStopped


def real_path(path: str | os.PathLike[str]) -> Path:
    """``os.path.realpath(path)`` (non-strict) without recursion: a chain of symlinks of any length.

    Python 3.11's realpath recurses once per link it follows, so a chain of ~1,000 links anywhere in a
    checkpoint tree (``last.ckpt -> link-0 -> ... -> link-999 -> ...``) raised RecursionError in every
    command. To resolve many paths (every link of a directory), use one ``PathResolver``.
    """
    return PathResolver().resolve(path)


class PathResolver:
    """Resolves paths as ``os.path.realpath`` does, remembering every link it resolved, so the links
    of one listing cost one resolution each: a chain of N links, each listed, is N steps, not N².

    Python 3.13's iterative algorithm: a stack of the parts still to resolve; a link met again before
    it resolved is a loop, left as it is (a link inside a loop may then resolve to another link of the
    loop rather than to itself: neither exists). It reads link targets only (``lstat``, ``readlink``),
    opens nothing; what it remembers is as current as the listing it serves.
    """

    def __init__(self) -> None:
        self._resolved: dict[str, str | None] = {}  # link -> what it resolves to (None: in progress)

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """The path with every symlink in it resolved (what does not exist is taken as written)."""
        text = os.fspath(path)
        remaining: list[str | None] = list(reversed(text.split("/")))
        parts_left = len(remaining)
        resolved = "/" if text.startswith("/") else os.getcwd()
        while parts_left:
            name = remaining.pop()
            if name is None:  # a link's target is resolved: remember it
                link = remaining.pop()
                assert link is not None
                self._resolved[link] = resolved
                continue
            parts_left -= 1
            if not name or name == ".":
                continue
            if name == "..":
                resolved = resolved[: resolved.rindex("/")] or "/"
                continue
            candidate = resolved + name if resolved == "/" else f"{resolved}/{name}"
            if candidate in self._resolved:  # resolved before (its value), or a loop (left as it is)
                resolved = self._resolved[candidate] or candidate
                continue
            target = _link_target(candidate)
            if target is None:  # not a link (or not there): taken as it is
                resolved = candidate
                continue
            if target.startswith("/"):
                resolved = "/"
            self._resolved[candidate] = None
            remaining.extend([candidate, None])
            target_parts = list(reversed(target.split("/")))
            remaining.extend(target_parts)
            parts_left += len(target_parts)
        for link in remaining:  # only the links resolved last are left: each resolves to the end
            if link is not None:
                self._resolved[link] = resolved
        return Path(resolved)


def _link_target(path: str) -> str | None:
    """The target of the symlink at ``path``, or None if it is anything else or cannot be read."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return None
        return os.readlink(path)
    except OSError:
        return None
