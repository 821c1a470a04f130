"""The root's trash: its layout, how it is opened and locked, and how its entries are read.

With ``trash: {grace: ...}`` a deleted checkpoint is moved (``trash_moves.py``) into::

    ROOT/.ckpt-trash/
      files/<relative path>@<KEY>   the checkpoint itself, renamed here (a directory checkpoint whole)
      info/<KEY>.json               what it was: its relative path, when and why it was trashed, its
                                    grace, bytes, type and identity (device, inode)
      restored/<KEY>.json           a restored checkpoint's pin: its identity, and until when
      purging/<KEY>                 an entry being removed (renamed out of reach of restore first)

``KEY`` is when it was trashed and its inode (``20261128T074143.611037Z-i1234``), so the same name can
be trashed twice, and listing ``info/`` in order lists the trash oldest first. The metadata is
written before the move, so a crash leaves at worst an entry whose data is missing (dropped by the
next purge), never a checkpoint nobody knows about.

Nothing in the trash is trusted: every directory is opened from the root one component at a time with
``O_NOFOLLOW``, metadata files are read only if they are regular files of at most 64 KiB, a relative
path that leaves the root (``..``, absolute, into a trash) is refused, and an entry is moved or
removed only if it is still the very file or directory that was trashed (device, inode, type). Every
move in or out of the trash, and every purge's rename, holds an exclusive ``flock`` on the
``.ckpt-trash`` directory, so the daemon, ``prune``, ``restore`` and ``trash empty`` can run at once.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import operator
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import structlog

from ckpt_watcher.delete import open_below_root, remove_name
from ckpt_watcher.durations import LONGEST_SECONDS
from ckpt_watcher.filesystem import (
    DIRECTORY_FLAGS,
    EntryStatus,
    NotRegularFileError,
    open_regular,
    rename_no_replace,
)
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.records import TRASH_DIRECTORY_NAME, display_name

FILES = "files"
INFO = "info"
RESTORED = "restored"
PURGING = "purging"
SUBDIRECTORIES = (FILES, INFO, RESTORED, PURGING)
METADATA_SUFFIX = ".json"
METADATA_LIMIT = 64 * 1024
REASONS_LIMIT = 64
LOCK_FILE_NAME = "lock"  # only where the file system cannot lock a directory (NFS)
LOCK_TIMEOUT = 60.0
# A directory whose change time is less than this old when it is listed may change again within the same
# tick of its file system's clock, unseen by a later stat: the index lists it again rather than trust it.
RACY_SECONDS = 2.0
# An entry (or a bucket's) that could not be read for a reason that may pass is read again no sooner
# than this (seconds) after: a failure that lasts (a mode another user's umask gave) costs one try per
# entry this often, not one per pass. A pin is read again at every look: until then nothing is deleted.
RETRY_UNREAD_SECONDS = 300.0
METADATA_MODE = 0o644  # of every metadata file (entries, pins): see ``write_metadata``
_LOCK_POLL = 0.01
NAME_MAX = 255
KEY_PATTERN = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-i[0-9]+")
logger = structlog.get_logger("ckpt_watcher.trash")

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# A file system with no room left (or a user over quota): what the trash would write cannot be.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class TrashUnusableError(Exception):
    """The trash cannot be opened or used (a symlink or a file where a directory should be, a lock
    that cannot be had...); nothing is moved, and the message says why. ``no_space``: only because
    its file system has no room for what it needs (ENOSPC, EDQUOT). ``may_hold_pins``: what could
    not be opened may be a trash (or ``restored/``) this tool made, with pins in it (an I/O error,
    made writable by every user); False when it cannot be (missing, another user's, a symlink or a
    file in its place): none of this tool's restores wrote there. ``root_gone``: the root itself is
    not there (nothing to say of its trash: the daemon's root check says the root is gone)."""

    def __init__(
        self, message: str, *, no_space: bool = False, may_hold_pins: bool = True, root_gone: bool = False
    ) -> None:
        super().__init__(message)
        self.no_space = no_space
        self.may_hold_pins = may_hold_pins
        self.root_gone = root_gone


def iso_time(epoch_seconds: float) -> str:
    """``2026-11-28T07:41:43Z``: a time as every trash record and listing shows it (UTC); a time no
    calendar holds (a forged record's) as its seconds."""
    try:
        moment = datetime.datetime.fromtimestamp(epoch_seconds, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return f"{epoch_seconds:g} s after 1970"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# A time a trash record may hold: from 1970 to the end of year 9999 (what a calendar shows; a record
# outside it was not written by this tool).
_LATEST_TIME = 253_402_300_799.0


def _time(document: dict[str, Any], key: str) -> float:
    value = document.get(key)
    # The range is compared first, and exactly: math.isfinite or float() of an int too large for a
    # float raises OverflowError (NaN and the infinities fail the comparison too).
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _LATEST_TIME:
        raise ValueError(f"{key!r} is not a time")
    return float(value)


def make_key(trashed_at: float, inode: int) -> str:
    """The key of an entry trashed at ``trashed_at`` whose inode is ``inode``."""
    moment = datetime.datetime.fromtimestamp(trashed_at, datetime.UTC)
    return f"{moment.strftime('%Y%m%dT%H%M%S.%f')}Z-i{inode}"


def stored_name(name: str, key: str) -> str:
    """The name a checkpoint ``name`` has in the trash: ``<name>@<KEY>``, the name shortened if the
    whole would be longer than a file name may be."""
    suffix = f"@{key}"
    encoded = os.fsencode(name)[: NAME_MAX - len(suffix)]
    return os.fsdecode(encoded) + suffix


def valid_relative_path(text: object) -> bool:
    """True for a path relative to the root that stays in it and outside every trash."""
    if not isinstance(text, str) or not text or text.startswith("/") or "\0" in text or len(text) > 16384:
        return False
    parts = text.split("/")
    return all(
        part not in {"", ".", "..", TRASH_DIRECTORY_NAME} and len(os.fsencode(part)) <= NAME_MAX
        for part in parts
    )


@dataclass(frozen=True, slots=True)
class TrashEntry:
    """One trashed checkpoint, as its ``info/<KEY>.json`` describes it."""

    key: str
    original: str  # its path relative to the root, '/'-separated
    trashed_at: float
    grace_seconds: int
    reasons: tuple[str, ...]
    bytes: int
    is_directory: bool
    device: int
    inode: int
    mtime_ns: int | None = None  # of a file (a rename keeps it); None for a directory

    @property
    def purge_at(self) -> float:
        """When its grace is over (epoch seconds)."""
        return self.trashed_at + self.grace_seconds

    @property
    def parent_parts(self) -> list[str]:
        """The directories of its relative path."""
        return self.original.split("/")[:-1]

    @property
    def name(self) -> str:
        """Its own name."""
        return self.original.rsplit("/", 1)[-1]

    @property
    def stored_name(self) -> str:
        """Its name in the trash."""
        return stored_name(self.name, self.key)

    @property
    def trash_path(self) -> str:
        """Where it is, relative to the trash: ``files/<relative path>@<KEY>``."""
        return "/".join([FILES, *self.parent_parts, self.stored_name])

    def matches(self, status: EntryStatus) -> bool:
        """True if ``status`` (never following a symlink) is the very entry that was trashed: its device
        and inode, a directory for a directory, else a regular file of its size (an inode number freed
        and reused is not enough). Not its mtime: a scratch file system's "touch your files" routine
        changes that, and the entry must stay restorable and purgeable, never orphaned."""
        if (status.device, status.inode) != (self.device, self.inode):
            return False
        if self.is_directory:
            return stat.S_ISDIR(status.mode)
        return stat.S_ISREG(status.mode) and status.size == self.bytes

    def document(self) -> dict[str, Any]:
        """Its ``info/<KEY>.json``."""
        return {
            "original": self.original,
            "trashed_at": self.trashed_at,
            "grace_seconds": self.grace_seconds,
            "reasons": list(self.reasons),
            "bytes": self.bytes,
            "type": "directory" if self.is_directory else "file",
            "device": self.device,
            "inode": self.inode,
            "mtime_ns": self.mtime_ns,
        }

    @classmethod
    def from_document(cls, key: str, document: Any) -> TrashEntry:
        """The entry ``document`` describes; ValueError saying what is wrong with it."""
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        original = document.get("original")
        if not valid_relative_path(original):
            raise ValueError("its original path is not a path inside the root")
        reasons = document.get("reasons", [])
        if not isinstance(reasons, list) or not all(isinstance(reason, str) for reason in reasons):
            raise ValueError("'reasons' is not a list of strings")
        kind = document.get("type")
        if kind not in ("file", "directory"):
            raise ValueError("'type' is neither file nor directory")
        trashed_at = _time(document, "trashed_at")
        assert isinstance(original, str)
        return cls(
            key=key,
            original=original,
            trashed_at=trashed_at,
            grace_seconds=_whole(document, "grace_seconds", LONGEST_SECONDS),
            reasons=tuple(reasons[:REASONS_LIMIT]),
            bytes=_whole(document, "bytes", 1 << 62),
            is_directory=kind == "directory",
            device=_whole(document, "device", 1 << 64),
            inode=_whole(document, "inode", 1 << 64),
            mtime_ns=None if document.get("mtime_ns") is None else _whole(document, "mtime_ns", 1 << 64),
        )


def _whole(document: dict[str, Any], key: str, limit: int) -> int:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"{key!r} is not a whole number in range")
    return value


@dataclass(frozen=True, slots=True)
class RestoredPin:
    """A restored checkpoint, kept whatever the policy says until ``until`` (epoch seconds)."""

    key: str
    original: str
    device: int
    inode: int
    until: float

    @property
    def reason(self) -> str:
        """The reason the plan shows: ``restored from the trash: pinned until ...``."""
        return f"restored from the trash: pinned until {iso_time(self.until)}"

    def document(self) -> dict[str, Any]:
        """Its ``restored/<KEY>.json``."""
        return {"original": self.original, "device": self.device, "inode": self.inode, "until": self.until}

    @classmethod
    def from_document(cls, key: str, document: Any) -> RestoredPin:
        """The pin ``document`` describes; ValueError saying what is wrong with it."""
        if not isinstance(document, dict) or not valid_relative_path(document.get("original")):
            raise ValueError("not a pin of a path inside the root")
        return cls(
            key=key,
            original=str(document["original"]),
            device=_whole(document, "device", 1 << 64),
            inode=_whole(document, "inode", 1 << 64),
            until=_time(document, "until"),
        )


class TrashDirectory:
    """The root's trash, open: a descriptor of ``.ckpt-trash`` and of each subdirectory that exists."""

    def __init__(
        self,
        root: Path,
        fd: int,
        subdirectories: dict[str, int | None],
        owners: frozenset[int] = frozenset(),
        unusable: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.fd = fd
        self.device = os.fstat(fd).st_dev
        self.owners = owners  # who may own its directories (``trusted_owners``); empty: not checked
        self._subdirectories = subdirectories
        self._unusable = unusable or {}

    def sub(self, name: str) -> int | None:
        """The open subdirectory ``name`` (files, info, restored, purging), None if it does not exist
        or could not be opened (``unusable`` says which)."""
        return self._subdirectories[name]

    def unusable(self, name: str) -> str | None:
        """Why the subdirectory ``name`` is there but could not be opened, when it may still hold what
        this tool wrote (an I/O error, made writable by every user); None: it is open, or it does not
        exist, or it cannot be this tool's (``TrashUnusableError.may_hold_pins``)."""
        return self._unusable.get(name) if self._subdirectories[name] is None else None

    def ensure(self, name: str) -> int:
        """The open subdirectory ``name``, made if it is missing; TrashUnusableError if it cannot be."""
        fd = self._subdirectories[name]
        if fd is None:
            fd = open_directory(self.fd, name, create=True, what=self.path(name), owners=self.owners)
            assert fd is not None
            self._subdirectories[name] = fd
        return fd

    def path(self, *parts: str) -> Path:
        """An absolute path in the trash, for messages and logs."""
        return self.root.joinpath(TRASH_DIRECTORY_NAME, *parts)

    def close(self) -> None:
        """Close every descriptor."""
        for fd in [*self._subdirectories.values(), self.fd]:
            if fd is not None:
                os.close(fd)
        self._subdirectories = dict.fromkeys(self._subdirectories)

    def __enter__(self) -> TrashDirectory:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()


def open_trash(root: Path, *, create: bool) -> TrashDirectory | None:
    """Open ``root``'s trash (made if ``create``), or None if it has none.

    Raises TrashUnusableError if anything but a directory is where the trash should be, or the root
    cannot be opened. A subdirectory that is missing (or anything but a directory) is None: what needs
    it fails (``ensure``), the rest works (a broken ``purging/`` does not stop a listing).
    """
    try:
        root_fd = open_below_root(root, root)
    except (OSError, ValueError) as error:
        gone = not isinstance(error, OSError) or error.errno in (errno.ENOENT, *_NOT_DIRECTORY_ERRNOS)
        raise TrashUnusableError(  # (a root that is not there has no trash, and no pins)
            f"cannot open the root {display_name(root)}: {_describe(error)}",
            may_hold_pins=not gone,
            root_gone=gone,
        ) from None
    try:
        owners = trusted_owners(os.fstat(root_fd).st_uid)
        fd = open_directory(
            root_fd, TRASH_DIRECTORY_NAME, create=create, what=root / TRASH_DIRECTORY_NAME, owners=owners
        )
    finally:
        os.close(root_fd)
    if fd is None:
        return None
    subdirectories: dict[str, int | None] = {}
    unusable: dict[str, str] = {}
    try:
        for name in SUBDIRECTORIES:
            try:
                subdirectories[name] = open_directory(
                    fd, name, create=create, what=root / TRASH_DIRECTORY_NAME / name, owners=owners
                )
            except TrashUnusableError as error:
                subdirectories[name] = None  # ``ensure`` says why, to what needs it
                if error.may_hold_pins:
                    unusable[name] = str(error)
    except BaseException:
        for opened in [*subdirectories.values(), fd]:
            if opened is not None:
                os.close(opened)
        raise
    return TrashDirectory(root, fd, subdirectories, owners, unusable)


_READ_ANYWAY = "its pins are read anyway (one there can only keep more); fix it for the trash to be used"
_NOT_OURS = "not this tool's: nothing is moved into it, and no pin is read from it"


def open_restored_untrusted(root: Path) -> int | None:
    """``.ckpt-trash/restored`` of ``root`` opened to read pins only, whoever owns it and whatever its
    mode (never through a symlink); None if there is none. TrashUnusableError or OSError if it cannot
    be opened."""
    root_fd = open_below_root(root, root)
    try:
        trash_fd = open_directory(
            root_fd, TRASH_DIRECTORY_NAME, create=False, what=root / TRASH_DIRECTORY_NAME
        )
    finally:
        os.close(root_fd)
    if trash_fd is None:
        return None
    try:
        return open_directory(trash_fd, RESTORED, create=False, what=root / TRASH_DIRECTORY_NAME / RESTORED)
    finally:
        os.close(trash_fd)


def trusted_owners(root_owner: int) -> frozenset[int]:
    """Who may own the trash's directories: this process's user, the superuser, the root's owner.

    In a root others may write to (a shared scratch directory, mode 1777), another user could make
    ``.ckpt-trash`` (or a directory in it) first: checkpoints moved in would then be theirs to remove,
    and entries they forged would be restored as someone's ``last.ckpt``."""
    return frozenset({os.geteuid(), 0, root_owner})


def open_directory(
    parent_fd: int, name: str, *, create: bool, what: Path, owners: frozenset[int] = frozenset()
) -> int | None:
    """Open the directory ``name`` in ``parent_fd`` without following a symlink (made first if
    ``create``); None if it does not exist and is not to be made. TrashUnusableError for anything else
    in its place (``what`` names it), and, with ``owners``, for a directory owned by anyone else or
    writable by every user."""
    for _ in range(2):
        try:
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as error:
            owner = _owner_if_not_trusted(parent_fd, name, owners) if error.errno in _DENIED_ERRNOS else None
            if owner is not None:  # (another user's, mode 700 say: theirs, whatever it holds)
                raise TrashUnusableError(
                    f"{display_name(what)}: {_THEIRS.format(owner)}; {describe_os_error(error)}",
                    may_hold_pins=False,
                ) from None
            raise TrashUnusableError(
                f"{display_name(what)}: {_not_a_directory(error)}",
                may_hold_pins=error.errno not in _NOT_DIRECTORY_ERRNOS,
            ) from None
        else:
            return _trusted(fd, what, owners)
        try:
            os.mkdir(name, 0o775, dir_fd=parent_fd)
        except FileExistsError:
            pass
        except OSError as error:
            raise TrashUnusableError(
                f"cannot make {display_name(what)}: {describe_os_error(error)}",
                no_space=error.errno in NO_SPACE_ERRNOS,
                may_hold_pins=False,
            ) from None
    raise TrashUnusableError(f"{display_name(what)}: vanished as soon as it was made", may_hold_pins=False)


_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_THEIRS = "owned by uid {}, neither this user nor the root's owner"


def _owner_if_not_trusted(parent_fd: int, name: str, owners: frozenset[int]) -> int | None:
    """The owner of the entry ``name`` if ``owners`` are checked and it is none of them, else None."""
    if not owners:
        return None
    try:
        owner = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_uid
    except OSError:
        return None
    return owner if owner not in owners else None


def _trusted(fd: int, what: Path, owners: frozenset[int]) -> int:
    """``fd``, if the directory is owned by one of ``owners`` and not writable by every user (else
    closed, and TrashUnusableError saying so); any directory when ``owners`` is empty."""
    if not owners:
        return fd
    status = os.fstat(fd)
    problem = None
    theirs = status.st_uid not in owners  # (a squatter's, in a root every user may write to)
    if theirs:
        problem = _THEIRS.format(status.st_uid)
    elif status.st_mode & stat.S_IWOTH:
        problem = "writable by every user (chmod o-w)"
    if problem is None:
        return fd
    os.close(fd)
    raise TrashUnusableError(
        f"{display_name(what)}: {problem}; another user could change what it holds", may_hold_pins=not theirs
    )


_NOT_DIRECTORY_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR})


def _not_a_directory(error: OSError) -> str:
    if error.errno in _NOT_DIRECTORY_ERRNOS:
        return "not a directory (a symlink or a file is in its place; it is never followed)"
    return describe_os_error(error)


def _describe(error: Exception) -> str:
    return describe_os_error(error) if isinstance(error, OSError) else str(error)


@contextmanager
def locked(trash: TrashDirectory, *, stop: threading.Event | None = None) -> Iterator[None]:
    """Hold the trash's exclusive lock: a ``flock`` on the ``.ckpt-trash`` directory (on a lock file
    in it where directories cannot be locked). Waits up to LOCK_TIMEOUT; TrashUnusableError after that,
    or as soon as ``stop`` is set."""
    # A description of its own (not a dup of trash.fd, which would share the lock's owner with every
    # other holder of that descriptor, e.g. another thread).
    fd = os.open(".", DIRECTORY_FLAGS, dir_fd=trash.fd)
    try:
        try:
            _wait_for_lock(fd, stop)
        except _CannotLockDirectoryError:
            os.close(fd)
            fd = _lock_file(trash)
            _wait_for_lock(fd, stop)
        yield
    finally:
        os.close(fd)  # closing its only descriptor releases the lock


class _CannotLockDirectoryError(Exception):
    pass


def _wait_for_lock(fd: int, stop: threading.Event | None) -> None:
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as error:
            if error.errno in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise _CannotLockDirectoryError from None
            raise TrashUnusableError(f"cannot lock the trash: {describe_os_error(error)}") from None
        if stop is not None and stop.is_set():
            raise TrashUnusableError("asked to stop while waiting for the trash's lock")
        if time.monotonic() >= deadline:
            raise TrashUnusableError(f"the trash stayed locked by another process for {LOCK_TIMEOUT:g} s")
        time.sleep(_LOCK_POLL)


def _lock_file(trash: TrashDirectory) -> int:
    try:
        fd = os.open(
            LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=trash.fd
        )
    except OSError as error:
        raise TrashUnusableError(
            f"cannot open the trash's lock file: {_not_a_directory(error)}",
            no_space=error.errno in NO_SPACE_ERRNOS,
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TrashUnusableError("the trash's lock file is not a regular file")
    return fd


def record_bytes(document: dict[str, Any]) -> bytes:
    """A trash record's JSON, on one line. Never indented: an indented ``json.dumps`` runs the
    pure-Python encoder, whose nested functions make a reference cycle per call (~5 KB), which a pass
    (run with cyclic collection off, memory.py) kept until its end: 100,000 checkpoints moved into
    the trash in one pass peaked at 500 MB. The C encoder makes no garbage."""
    return json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(", ", ": ")).encode() + b"\n"


def write_metadata(dir_fd: int, key: str, document: dict[str, Any]) -> None:
    """Write ``<KEY>.json`` in ``dir_fd`` whole or not at all (a hidden temporary, then a rename that
    never replaces). Raises OSError."""
    name = key + METADATA_SUFFIX
    temporary = f".{name}.{os.getpid()}.tmp"
    data = record_bytes(document)
    fd = os.open(temporary, _FILE_FLAGS, 0o666, dir_fd=dir_fd)
    try:
        try:
            # Readable by every user whatever the umask: a pin a daemon running as another user cannot
            # read stops its pruning (its restored checkpoint may be any), an entry leaves its bytes
            # out of keep_free's offer. What it says (a path in the root, a reason) is no secret.
            with contextlib.suppress(OSError):  # (a file system without modes)
                os.fchmod(fd, METADATA_MODE)
            write_whole(fd, data)
            os.fsync(fd)  # whole on disk before its name is: a crash never leaves an empty record
        finally:
            os.close(fd)
        rename_no_replace(temporary, name, source_dir_fd=dir_fd, destination_dir_fd=dir_fd)
    except BaseException:
        remove_name(dir_fd, temporary)
        raise


def write_whole(fd: int, data: bytes) -> None:
    """Write all of ``data``: ``os.write`` may write less (a full disk makes a write that spans pages
    come back short, with no error), so write the rest until done; ENOSPC if nothing more goes."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def read_metadata(dir_fd: int, name: str) -> Any:
    """The JSON document in the file ``name`` of ``dir_fd``: never through a symlink, only a regular
    file, at most METADATA_LIMIT bytes. ValueError (or OSError) saying why not."""
    try:
        fd, status = open_regular(name, dir_fd=dir_fd)
    except NotRegularFileError:
        raise ValueError("not a regular file") from None
    try:
        if status.st_size > METADATA_LIMIT:
            raise ValueError(f"larger than {METADATA_LIMIT // 1024} KiB")
        data = os.read(fd, METADATA_LIMIT + 1)
    finally:
        os.close(fd)
    if len(data) > METADATA_LIMIT:
        raise ValueError(f"larger than {METADATA_LIMIT // 1024} KiB")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None


def metadata_names(dir_fd: int | None) -> list[tuple[str, int]]:
    """The ``<KEY>.json`` names in ``dir_fd`` with their inodes, in key order (oldest first); hidden
    temporaries are left out."""
    return sorted(metadata_files(dir_fd))


def metadata_files(dir_fd: int | None, *, versioned: bool = False) -> list[tuple[str, int]]:
    """``metadata_names`` in the directory's own order (a look needs none: sorting 100,000 names took
    a quarter of it). ``versioned``: each with its ``file_version`` instead of its inode (an ``lstat``
    each; the pins, which are few)."""
    if dir_fd is None:
        return []
    found: list[tuple[str, int]] = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(METADATA_SUFFIX):
                continue
            if not versioned:
                found.append((entry.name, entry.inode()))
                continue
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # (gone meanwhile)
            found.append((entry.name, file_version(status)))
    return found


def file_version(status: os.stat_result) -> int:
    """The inode and the change time of a file in one int (the inode above the 64 bits of the time):
    a pin removed and written again under its name (a ``restore`` tried again) may get the freed
    inode back, but not its change time, so what was read of the old file is never taken for the
    new one's."""
    return (status.st_ino << 64) | (status.st_ctime_ns & ((1 << 64) - 1))


def key_of(name: str) -> str | None:
    """The key of a metadata file's name, or None if it is not ``<KEY>.json``."""
    key = name.removesuffix(METADATA_SUFFIX)
    return key if name.endswith(METADATA_SUFFIX) and KEY_PATTERN.fullmatch(key) else None


@dataclass
class TrashListing:
    """What the trash holds: its entries (oldest first) and the metadata files that could not be read."""

    entries: list[TrashEntry]
    problems: list[tuple[str, str]]  # (file name, why it was skipped)

    @property
    def bytes(self) -> int:
        """Bytes of every entry."""
        return sum(entry.bytes for entry in self.entries)


def read_entries(trash: TrashDirectory) -> TrashListing:
    """Every readable entry of an open trash, oldest first."""
    listing = TrashListing([], [])
    info = trash.sub(INFO)
    for name, _ in metadata_names(info):
        assert info is not None
        entry = read_entry(info, name, listing.problems)
        if entry is not None:
            listing.entries.append(entry)
    listing.entries.sort(key=lambda entry: (entry.trashed_at, entry.key))
    return listing


def read_entry(
    info_fd: int, name: str, problems: list[tuple[str, str]], *, later: bool = False
) -> TrashEntry | None:
    """The entry ``info/<name>`` describes, or None with the problem noted (``later``: ReadLaterError
    instead, after noting it, when the reason may pass)."""
    key = key_of(name)
    if key is None:
        problems.append((name, "not named like a trash entry (<KEY>.json)"))
        return None
    try:
        return TrashEntry.from_document(key, read_metadata(info_fd, name))
    except FileNotFoundError:
        return None  # purged or restored meanwhile
    except (OSError, ValueError) as error:
        _unread(name, error, problems, later=later)
        return None


class ReadLaterError(Exception):
    """A metadata file could not be read for a reason that may pass (EIO, too many open files, a
    permission since fixed): it is not remembered as unreadable, and is read again later (a pin at the
    next look, an entry RETRY_UNREAD_SECONDS later). What a file says does not change while it is
    the same file (written whole, then renamed into place; an entry's name is never written twice, a
    pin's is known by its ``file_version``), so a malformed one (ValueError) is remembered."""


def _unread(name: str, error: Exception, problems: list[tuple[str, str]], *, later: bool) -> None:
    """Note why ``name`` could not be read; ReadLaterError if ``later`` and the reason may pass."""
    problems.append((name, _describe(error)))
    if later and isinstance(error, OSError):
        raise ReadLaterError(name) from None


def read_pins(trash: TrashDirectory, problems: list[tuple[str, str]]) -> list[RestoredPin]:
    """Every readable pin of restored checkpoints (expired ones too)."""
    restored = trash.sub(RESTORED)
    pins: list[RestoredPin] = []
    for name, _ in metadata_names(restored):
        assert restored is not None
        pin = read_pin(restored, name, problems)
        if pin is not None:
            pins.append(pin)
    return pins


def read_pin(
    restored_fd: int, name: str, problems: list[tuple[str, str]], *, later: bool = False
) -> RestoredPin | None:
    """The pin ``restored/<name>`` describes, or None with the problem noted (``later``: as
    ``read_entry``)."""
    key = key_of(name)
    if key is None:
        problems.append((name, "not named like a pin (<KEY>.json)"))
        return None
    try:
        return RestoredPin.from_document(key, read_metadata(restored_fd, name))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        _unread(name, error, problems, later=later)
        return None


def list_trash(root: Path) -> TrashListing | None:
    """What ``root``'s trash holds, or None if it has no trash. TrashUnusableError if it cannot be read."""
    trash = open_trash(root, create=False)
    if trash is None:
        return None
    with trash:
        return read_entries(trash)


@dataclass(frozen=True, slots=True)
class IndexedEntry:
    """What a ``TrashIndex`` keeps of one entry between looks: its key, device, bytes and times. Not
    its original path or reasons (read again for the summary's oldest entry): a daemon that trashed
    100,000 checkpoints held every ``TrashEntry`` whole, ~87 MB, for the whole grace period."""

    key: str
    device: int
    bytes: int
    trashed_at: float
    grace_seconds: int

    @property
    def purge_at(self) -> float:
        """When its grace is over (epoch seconds)."""
        return self.trashed_at + self.grace_seconds


@dataclass(frozen=True, slots=True)
class TrashSummary:
    """The trash at a glance, for the dry run's header and JSON: its entries, bytes, oldest entry."""

    entries: int
    bytes: int
    oldest: TrashEntry | None


_Item = TypeVar("_Item")


class TimedEntry(Protocol):
    """What a glance reads of an entry: ``TrashEntry`` or ``IndexedEntry``."""

    @property
    def key(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def trashed_at(self) -> float: ...
    @property
    def purge_at(self) -> float: ...


class AtAGlance(Generic[_Item]):
    """A trash index's entries at a glance: their count, bytes, first end of a grace and oldest entry,
    worked out once per change (the daemon asks when the next purge is due at every turn of its loop:
    sorting a trash of 100,000 entries at each took ~11% of a core at rest); all of them oldest first
    only when asked (``keep_free``'s offer), as sorting them took ~0.1 s of every pass's look."""

    __slots__ = ("_entries", "_items", "_oldest", "_oldest_first", "bytes", "next_purge_at")

    def __init__(self, items: Iterable[_Item], entry_of: Callable[[_Item], TimedEntry]) -> None:
        """The glance at ``items``, each ``entry_of`` one: oldest by (trashed at, key)."""
        self._items = list(items)
        self._entries = list(map(entry_of, self._items))
        self._oldest_first: tuple[_Item, ...] | None = None
        self._oldest: _Item | None = None  # (once worked out)
        self.bytes: int = sum(map(_BYTES, self._entries))
        self.next_purge_at: float | None = min(map(_PURGE_AT, self._entries), default=None)

    @property
    def count(self) -> int:
        """How many entries."""
        return len(self._items)

    @property
    def oldest(self) -> _Item | None:
        """The oldest entry (the first by trashed at, then key), None with none."""
        if self._oldest is None and self._items:
            if self._oldest_first is not None:
                self._oldest = self._oldest_first[0]
            else:
                order = list(map(_OLDEST_FIRST, self._entries))
                self._oldest = self._items[min(range(len(order)), key=order.__getitem__)]
        return self._oldest

    @property
    def oldest_first(self) -> tuple[_Item, ...]:
        """Every entry, oldest first (the same tuple at each question)."""
        if self._oldest_first is None:
            order = list(map(_OLDEST_FIRST, self._entries))  # (in C: a lambda per entry took half the sort)
            ranks = sorted(range(len(order)), key=order.__getitem__)
            self._oldest_first = tuple(map(self._items.__getitem__, ranks))
        return self._oldest_first


_OLDEST_FIRST = operator.attrgetter("trashed_at", "key")
_BYTES = operator.attrgetter("bytes")
_PURGE_AT = operator.attrgetter("purge_at")


class TrashIndex:
    """What a reconciler knows of its root's trash between looks: the entries (``trash_bytes``, when
    the next purge is due) and the pins of restored checkpoints. A look lists ``info/`` (unless its
    stat says it is unchanged: ``refresh``) or ``restored/`` and reads only the metadata files it has
    not seen (by name and inode).

    ``start`` opens the trash for a pass (it may have appeared or been replaced since the last one),
    ``close`` ends the pass. Metadata that cannot be read is logged once (``trash_problem``).
    """

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self._clock = clock  # wall clock, against the file system's change times (``refresh``)
        self._trash: TrashDirectory | None = None
        self._entries: dict[tuple[str, int], IndexedEntry | None] = {}
        self._unread: set[tuple[str, int]] = set()  # of ``_entries``' None: to read again (``retry``)
        self._retry_at = 0.0  # (wall clock) not before
        self._at_a_glance: AtAGlance[IndexedEntry] | None = None  # of ``_entries``: made once a change
        self._oldest: TrashEntry | None = None  # the summary's oldest entry, read whole
        self._numbers: dict[int, int] = {}  # one int object per device number and grace, shared
        self._unchanged_as: tuple[int, ...] | None = None  # ``info/``'s stat at a look it can be trusted by
        self.looked = False  # at the entries once at least
        self._pins: dict[tuple[str, int], RestoredPin | None] = {}  # by (name, ``file_version``)
        # Why the last look could not read every pin (a restored checkpoint it cannot tell), or None.
        self.pins_in_doubt: str | None = None
        self.unusable: str | None = None  # why the trash, there and maybe this tool's, cannot be opened
        self._reported: set[tuple[str, int]] = set()
        self.exists = False

    def start(self) -> None:
        """Open the trash as it is now (nothing if the root has none, or it cannot be used)."""
        self.close()
        self.unusable = None
        try:
            self._trash = open_trash(self.root, create=False)
        except TrashUnusableError as error:
            detail = f"nothing is moved into it; {_READ_ANYWAY}" if error.may_hold_pins else _NOT_OURS
            if not error.root_gone:  # (a root removed: its trash is not "not this tool's")
                self._report(("<trash>", 0), str(self.root / TRASH_DIRECTORY_NAME), str(error), detail)
            self._trash = None
            self.unusable = str(error) if error.may_hold_pins else None
        self.exists = self._trash is not None

    def note_unlistable(self) -> None:
        """Say once that this directory's trash (above a root) is not read: this user may not list it."""
        problem = f"{display_name(str(self.root))} cannot be listed by this user"
        detail = "its pins (of checkpoints restored through that directory) are not read"
        self._report(("<unlistable>", 0), str(self.root / TRASH_DIRECTORY_NAME), problem, detail)

    def close(self) -> None:
        """Close the trash's descriptors (what was learned stays)."""
        if self._trash is not None:
            self._trash.close()
            self._trash = None

    def _opened(self) -> TrashDirectory | None:
        if self._trash is None:
            self.start()  # made since the pass began (by this pass's first move, say)
        return self._trash

    def pinned_identities(self, now: float) -> dict[tuple[int, int], str]:
        """(device, inode) of each checkpoint restored and still pinned at ``now``, with the reason.
        ``pins_in_doubt`` says why not every pin could be read (None: all were). A trash, or its
        ``restored/``, refused but maybe this tool's (made writable by every user) has its pins read
        anyway: a pin there can only keep more, and none there means none to keep."""
        trash = self._opened()
        self.pins_in_doubt = None
        if trash is None:  # (said at ``start``)
            return self._pins_anyway(self.unusable, now) if self.unusable is not None else {}
        unusable = trash.unusable(RESTORED)
        if unusable is not None:
            self._report((RESTORED, 0), str(trash.path(RESTORED)), unusable, _READ_ANYWAY)
            return self._pins_anyway(unusable, now)
        return self._pins_in(trash.sub(RESTORED), now)

    def _pins_anyway(self, refused: str, now: float) -> dict[tuple[int, int], str]:
        """The pins of a trash (or ``restored/``) refused for ``refused``, read without trusting it; in
        doubt (those known before kept) if even that cannot be done."""
        try:
            restored = open_restored_untrusted(self.root)
        except (OSError, ValueError, TrashUnusableError) as error:
            self.pins_in_doubt = f"{refused}; {_describe(error)}" if str(error) != refused else refused
            return self._in_force(now)
        try:
            return self._pins_in(restored, now)
        finally:
            if restored is not None:
                os.close(restored)

    def _pins_in(self, restored: int | None, now: float) -> dict[tuple[int, int], str]:
        """The pins in force in the open ``restored/`` (None: there is none)."""
        problems: list[tuple[str, str]] = []
        later: list[tuple[str, int]] = []
        where = f"{TRASH_DIRECTORY_NAME}/{RESTORED}"
        try:  # (a pin that could not be read is read again at each look: until then, the pass stops)
            _, later = _look(
                restored,
                self._pins,
                lambda fd, name: read_pin(fd, name, problems, later=True),
                versioned=True,
            )
        except OSError as error:  # (the pins known before stay in force)
            self.pins_in_doubt = f"{where}/ cannot be listed: {describe_os_error(error)}"
        else:
            if later:
                name = later[0][0]
                self.pins_in_doubt = f"{where}/{name} cannot be read: {dict(problems).get(name, 'unknown')}"
        self._report_all(problems, RESTORED, (name for name, _ in later), "read again at the next look")
        return self._in_force(now)

    @property
    def known_pins(self) -> Mapping[tuple[str, int], RestoredPin | None]:
        """Each pin read so far by (name, ``file_version``), None for one that says nothing (malformed):
        what a file says cannot change unless its version does (a pin is written whole, then renamed
        into place, which sets its change time), so a move's check may go by it when that very file
        cannot be read again (``trash_moves._pinned_in``). A live view."""
        return MappingProxyType(self._pins)

    def _in_force(self, now: float) -> dict[tuple[int, int], str]:
        return {
            (pin.device, pin.inode): pin.reason
            for pin in self._pins.values()
            if pin is not None and pin.until > now
        }

    def refresh(self, *, force: bool = False, retry: bool = False) -> None:
        """Look at the entries again (after a pass: its moves, and other processes' since). ``info/`` is
        listed only if its stat changed since a look made well after its last change (see
        ``RACY_SECONDS``), or ``force``: a look at 100,000 entries took ~0.3 s, twice a pass, and most
        passes change nothing there. A full pass forces it: a change no stat showed is seen by a rescan.
        ``retry`` (a full pass) reads again what could not be read for a reason that may pass (an I/O
        error; a file another user's ``prune`` wrote with mode 600), once RETRY_UNREAD_SECONDS have
        passed: at every look (or every keep_free pass, a second apart), 100,000 of those would cost a
        failed open each."""
        trash = self._opened()
        self.looked = True
        if trash is None:
            self._entries, self._at_a_glance, self._unchanged_as = {}, None, None
            return
        info_fd = trash.sub(INFO)
        looked_at = self._clock()
        stamp = _directory_stamp(info_fd)
        if retry and self._unread and looked_at >= self._retry_at:
            for key in self._unread:  # (gone from the index: the look reads them as new)
                self._entries.pop(key, None)
            self._unread.clear()
            force = True
        if not force and stamp is not None and stamp == self._unchanged_as:
            return
        problems: list[tuple[str, str]] = []
        try:
            changed, later = _look(info_fd, self._entries, lambda fd, name: self._read(fd, name, problems))
        except OSError:
            changed, later = False, []
            stamp = None  # (what was known stays, and is listed again at the next look)
        for key in later:
            self._entries[key] = None  # (known, as unreadable, until ``retry``)
            self._unread.add(key)
        if later:
            self._retry_at = looked_at + RETRY_UNREAD_SECONDS
        if changed:
            self._at_a_glance = None
            self._oldest = None  # (read again: an entry's record may have been rewritten under its key)
        self._report_all(problems, INFO, (name for name, _ in later), "read again at the next full pass")
        racy = stamp is None or looked_at - stamp[-1] / 1e9 < RACY_SECONDS
        self._unchanged_as = None if racy else stamp

    def _read(self, info_fd: int, name: str, problems: list[tuple[str, str]]) -> IndexedEntry | None:
        entry = read_entry(info_fd, name, problems, later=True)
        if entry is None:
            return None
        shared = self._numbers.setdefault
        return IndexedEntry(
            entry.key,
            shared(entry.device, entry.device),
            entry.bytes,
            entry.trashed_at,
            shared(entry.grace_seconds, entry.grace_seconds),
        )

    def _glance(self) -> AtAGlance[IndexedEntry]:
        if self._at_a_glance is None:
            found = [entry for entry in self._entries.values() if entry is not None]
            self._at_a_glance = AtAGlance(found, lambda entry: entry)
        return self._at_a_glance

    @property
    def entries(self) -> tuple[IndexedEntry, ...]:
        """The entries as last looked at, oldest first."""
        return self._glance().oldest_first

    @property
    def bytes(self) -> int | None:
        """Bytes in the trash as last looked at; None when the root has no trash."""
        return self._glance().bytes if self.exists else None

    def next_purge_at(self) -> float | None:
        """When the first grace ends (epoch seconds), or None with nothing in the trash."""
        return self._glance().next_purge_at

    def summary(self) -> TrashSummary | None:
        """The trash at a glance, or None when the root has none."""
        if not self.exists:
            return None
        glance = self._glance()
        return TrashSummary(glance.count, glance.bytes, self._oldest_whole(glance))

    def _oldest_whole(self, glance: AtAGlance[IndexedEntry]) -> TrashEntry | None:
        """The oldest entry as its metadata describes it, read again only when it is another entry (one
        gone since the look is passed over)."""
        problems: list[tuple[str, str]] = []
        found: TrashEntry | None = None
        opened_here = self._trash is None
        try:
            for indexed in _oldest_then_the_rest(glance):
                if self._oldest is not None and self._oldest.key == indexed.key:
                    return self._oldest
                trash = self._opened()
                info_fd = trash.sub(INFO) if trash is not None else None
                if info_fd is None:
                    break
                found = read_entry(info_fd, indexed.key + METADATA_SUFFIX, problems)
                if found is not None:
                    break
        finally:
            if opened_here:
                self.close()
        self._report_all(problems, INFO)
        self._oldest = found
        return found

    def _report_all(
        self, problems: list[tuple[str, str]], directory: str, later: Iterable[str] = (), when: str = ""
    ) -> None:
        again = frozenset(later)
        for name, problem in problems:
            detail = f"not read now; {when}" if name in again else None
            self._report((name, 0), str(self.root / TRASH_DIRECTORY_NAME / directory / name), problem, detail)

    def _report(self, key: tuple[str, int], path: str, problem: str, detail: str | None = None) -> None:
        if key not in self._reported:
            self._reported.add(key)
            logger.warning(
                "trash_problem",
                path=display_name(path),
                error=problem,
                detail=detail or "skipped; never followed",
            )


def _directory_stamp(dir_fd: int | None) -> tuple[int, ...] | None:
    """What changes when a directory's entries do: its identity, size, links, mtime and (last) ctime,
    which ``utime`` cannot set (a clock step can). None when it cannot be read."""
    if dir_fd is None:
        return None
    try:
        status = os.fstat(dir_fd)
    except OSError:
        return None
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_nlink,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


def _oldest_then_the_rest(glance: AtAGlance[_Item]) -> Iterator[_Item]:
    """The oldest entry, then (only if asked for: it costs a sort) the others, oldest first."""
    oldest = glance.oldest
    if oldest is not None:
        yield oldest
        yield from glance.oldest_first[1:]


_Metadata = TypeVar("_Metadata")


def _look(
    dir_fd: int | None,
    known: dict[tuple[str, int], _Metadata | None],
    read: Callable[[int, str], _Metadata | None],
    *,
    versioned: bool = False,
) -> tuple[bool, list[tuple[str, int]]]:
    """Bring ``known`` to the metadata files of ``dir_fd`` now (by name and inode, or ``file_version``
    if ``versioned``), reading each new one once; True if any came or went, and the (name, inode) of
    each that could not be read for a reason that may pass (``ReadLaterError``: left out of ``known``,
    so a next look reads it again). In place, and what went is looked for only when some did:
    building a new mapping of 100,000 entries took ~0.1 s of every look. OSError if ``dir_fd`` cannot
    be listed, ``known`` unchanged (when in doubt, a pin stays in force)."""
    listed = metadata_files(dir_fd, versioned=versioned)
    # In the listing's order: looking each up in a set's order took six times as long.
    came = [name_and_inode for name_and_inode in listed if name_and_inode not in known]
    gone: list[tuple[str, int]] = []
    # A listing racing a rename may give a name twice: then the counts prove nothing.
    if len(listed) - len(came) != len(known) or len(set(listed)) != len(listed):
        present = set(listed)
        gone = [name_and_inode for name_and_inode in known if name_and_inode not in present]
    for name_and_inode in gone:
        del known[name_and_inode]
    later: list[tuple[str, int]] = []
    for name, inode in sorted(set(came)):
        assert dir_fd is not None
        try:
            known[(name, inode)] = read(dir_fd, name)
        except ReadLaterError:
            later.append((name, inode))
    return bool(gone) or len(later) < len(set(came)), later
