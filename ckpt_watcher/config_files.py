"""Reading the files the tool takes settings from, safely: one reader and one YAML loader for all.

The policy file, every per-run ``.ckpt-watcher.yaml`` and every ``protect_from`` training config go
through here. Anyone who can write into a checkpoint directory can plant such a file, so reading one
must never hang (a FIFO), never read forever (``/dev/zero``), never use unbounded memory or CPU (a
YAML alias bomb, nesting thousands deep), and never fail with anything but a clear message. And since
the messages go to logs, they quote positions, never contents, of files the user did not name on the
command line.

Symlinks are followed on purpose: configs are often links (a Kubernetes ConfigMap is a chain of them).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_watcher import clocks
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.records import FileIdentity

if TYPE_CHECKING:
    import yaml

# A training config is a few KiB; a megabyte is already far more than any real one.
MAXIMUM_CONFIG_BYTES = 1024 * 1024
# How long a changed config must have been left alone before the daemon trusts what it reads: a file
# re-saved in place (yaml.safe_dump(config, open(path, "w")), an editor) is empty, then partial, for a
# moment, and a partial policy or resume config parses as one that asks for less.
CONFIG_QUIET_SECONDS = 2.0
# Values after expanding every alias as often as it is used. Each one costs PyYAML about 0.7 KiB
# while it is read, so this keeps a config under ~35 MiB; a large real config has a few thousand.
MAXIMUM_YAML_VALUES = 50_000
# Changed config files QuietFiles remembers before it forgets those quiet already (one per per-run
# file changed since start, at most: a bound for a volume of many runs).
REMEMBERED_QUIET_FILES = 4096
# Nesting of mappings and lists; real configs nest about ten deep.
MAXIMUM_YAML_DEPTH = 64


class ConfigFileError(Exception):
    """A config file that cannot be used; ``message`` is what follows ``At '<file>': ``. ``transient``:
    it could not be read (an I/O error, a store answering 503), not that its contents are wrong, so
    reading it again may work although the file did not change. ``missing``: there is no such file."""

    def __init__(self, message: str, *, transient: bool = False, missing: bool = False) -> None:
        self.message = message
        self.transient = transient
        self.missing = missing
        super().__init__(message)


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file: the Python value and the node tree it came from (for line numbers)."""

    value: Any
    node: yaml.Node | None


def _not_found(path: Path) -> ConfigFileError:
    """No file at ``path``: missing, unless a symlink is there whose target is not (yet): that one is
    meant to be there (a target on a mount not up yet), so it is not taken for a missing file."""
    try:
        os.lstat(path)
    except OSError:
        return ConfigFileError("no such file", missing=True)
    return ConfigFileError("no such file: a symlink to a file that is not there", transient=True)


def read_config_text(
    path: Path, *, confined_to: Sequence[Path] = (), limit: int = MAXIMUM_CONFIG_BYTES
) -> str:
    """The text of the regular file at ``path``; ConfigFileError for anything else.

    Never opens a FIFO, socket or device (it is refused after a ``stat``, and the file is opened
    non-blocking and checked again with ``fstat`` in case it was swapped in between), never reads
    more than ``limit`` bytes. With ``confined_to``, the file actually opened (after every symlink)
    must lie under one of those directories.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as error:
        raise ConfigFileError(_open_problem(error), transient=True) from None
    _require_regular(status, limit)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as error:
        raise ConfigFileError(_open_problem(error), transient=True) from None
    try:
        _require_regular(os.fstat(descriptor), limit)
        if confined_to:
            _require_inside(_opened_path(descriptor, path), confined_to)
        data = _read_at_most(descriptor, limit)
    finally:
        os.close(descriptor)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"not UTF-8 text ({error.reason})") from None


def _open_problem(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "a symlink loop"
    if error.errno == errno.ENXIO:
        return "not a regular file (a socket or device); refused"
    return f"cannot read it ({describe_os_error(error)})"


def _require_regular(status: os.stat_result, limit: int) -> None:
    mode = status.st_mode
    if stat.S_ISDIR(mode):
        raise ConfigFileError("is a directory, not a YAML file")
    if not stat.S_ISREG(mode):
        raise ConfigFileError(f"not a regular file ({_file_kind(mode)}); refused")
    if status.st_size > limit:
        raise ConfigFileError(
            f"{status.st_size} bytes, more than a config file may have ({limit} bytes); refused"
        )


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


def _opened_path(descriptor: int, path: Path) -> Path:
    """The real path of the open file: /proc knows it without a race; else resolve the name."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{descriptor}"))
    except OSError:
        return real_path(path)


def _require_inside(resolved: Path, directories: Sequence[Path]) -> None:
    for directory in directories:
        real_directory = real_path(directory)
        if resolved == real_directory or real_directory in resolved.parents:
            return
    raise ConfigFileError(
        "the file is outside the directories it may be read from "
        f"({', '.join(str(directory) for directory in directories)}); refused"
    )


def _read_at_most(descriptor: int, limit: int) -> bytes:
    """Read to the end, but fail once more than ``limit`` bytes arrive (a file that grows, /proc)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(descriptor, min(65536, limit + 1 - total))
        except OSError as error:
            raise ConfigFileError(f"cannot read it ({describe_os_error(error)})", transient=True) from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise ConfigFileError(f"more than a config file may have ({limit} bytes); refused")


def parse_yaml(text: str, *, quote_contents: bool = True) -> YamlDocument:
    """Parse one YAML document with ``config_yaml.BoundedLoader``; any failure is a ConfigFileError.

    Without ``quote_contents`` the message gives the position and the kind of problem only: what
    PyYAML quotes from the file (a character, a tag, an alias name) is left out. PyYAML is imported
    here, when a file is read, not with this module: a ``prune`` with the embedded policy reads none.
    """
    from ckpt_watcher import config_yaml  # noqa: PLC0415  (yaml: only when a file is parsed)

    return config_yaml.parse_yaml(text, quote_contents=quote_contents)


# A quoted part of a message ('x' or "x", with backslash escapes, as repr() writes them).
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
# Quoted parts that are PyYAML's own words, not the file's: '<block end>', ':', ...
_OWN_WORDS = re.compile(r"^['\"](?:<[a-z ]+>|.)['\"]$")


def redact_quoted(message: str) -> str:
    """``message`` with every quoted part longer than one character replaced by ``'…'``."""
    return _QUOTED.sub(lambda match: match[0] if _OWN_WORDS.match(match[0]) else "'…'", message)


class QuietFiles:
    """Whether a changed config file has been left alone long enough to be read as its writer meant.

    Quiet: seen unchanged (same identity) for ``CONFIG_QUIET_SECONDS`` by this process's own
    monotonic clock. The file's modification time does not count: a writer whose clock is behind
    (another machine on NFS or Lustre) dates a file still being written as long past, and a stepped
    wall clock would do the same. A changed file is therefore read at the second look at least that
    long after the first. A writer that pauses longer than that mid-file is not caught; nothing short
    of its close is.

    A file that is not there is quiet at once, unless ``missing_waits``: then only once it has been
    seen missing for the quiet time by this process's clock, as a file replaced by unlink + create
    (``rm && cp``, ``git checkout``) is missing for a moment, and its absence asks for less.
    """

    def __init__(self, quiet_seconds: float = CONFIG_QUIET_SECONDS, *, missing_waits: bool = False) -> None:
        self.quiet_seconds = quiet_seconds
        self.missing_waits = missing_waits
        self._seen: clocks.SeenSince[Path, FileIdentity | None] = clocks.SeenSince()
        self._sweep_at = REMEMBERED_QUIET_FILES  # (then twice what a sweep left: amortized, never quadratic)

    def quiet(self, path: Path, identity: FileIdentity | None) -> bool:
        """True if the file as ``identity`` describes it (None: no file) may be read now."""
        if identity is None and not self.missing_waits:
            self._seen.forget(path)
            return True
        now = clocks.watcher_clock()
        watched = self._seen.watched(path, identity, now)
        if watched is None:  # first seen so: its watch starts now
            if len(self._seen) > self._sweep_at:
                self._forget_settled(now)
                self._sweep_at = max(REMEMBERED_QUIET_FILES, 2 * len(self._seen))
            return False
        if watched < self.quiet_seconds:
            return False
        if identity is None:
            self._seen.forget(path)  # gone for good: nothing left to remember about it
        return True

    def forget(self, path: Path) -> None:
        """Drop ``path``'s watch (it is as last read): a later change waits its quiet time afresh."""
        self._seen.forget(path)

    def _forget_settled(self, now: float) -> None:
        """Drop the files seen unchanged for the quiet time already (read by now, most of them)."""
        self._seen.forget_watched_for(self.quiet_seconds, now)
