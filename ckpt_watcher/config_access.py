"""How the tool reaches the config files it reads while it runs: per-run ``.ckpt-watcher.yaml`` files
and ``protect_from`` training configs.

On disk they are read with ``config_files`` (bounded, regular files only, links followed). Under a
bucket root a per-run policy is an object, and a ``protect_from`` entry may name an object by its URL
(``s3://bucket/configs/train.yaml``); the bucket backend provides a ``ConfigAccess`` that reads those
from the store, within the same limits, and everything else from disk (bucket.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ckpt_watcher.config_files import read_config_text
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.records import FileIdentity


class UnreachableError(OSError):
    """A place that cannot be looked at at all, whatever is there (an object whose store's backend is
    not installed): ``exists`` raises it, and a reference to it is kept in doubt (protection.py)."""


class ConfigAccess(Protocol):
    """What reading config files needs of where they are."""

    def identity(self, path: Path) -> FileIdentity | None:
        """The identity of the file (through links), None if there is none: a change means re-read."""
        ...

    def entry_identity(self, path: Path) -> FileIdentity | None:
        """``identity``, or for an entry that is there but leads nowhere (a dangling or looping link)
        that entry's own identity: a per-run file meant to be there is then read and refused."""
        ...

    def read_text(self, path: Path, *, confined_to: Sequence[Path] = ()) -> str:
        """The file's text (ConfigFileError if it cannot be used; see config_files.read_config_text)."""
        ...

    def real_path(self, path: Path) -> Path:
        """The path with every symlink resolved (where the file really is, for confinement)."""
        ...

    def exists(self, path: Path) -> bool:
        """True if something is there (for warnings about a config naming a missing checkpoint); an
        OSError if it cannot be looked at (UnreachableError: not at all)."""
        ...

    def is_directory(self, path: Path) -> bool:
        """True if ``path`` is a directory (a group) now."""
        ...


class LocalConfigFiles:
    """Config files on disk: what the tool always did."""

    def identity(self, path: Path) -> FileIdentity | None:
        """The identity through links (``os.stat``)."""
        return FileIdentity.of_path(path)

    def entry_identity(self, path: Path) -> FileIdentity | None:
        """Through links, else the link's own (``os.lstat``)."""
        identity = FileIdentity.of_path(path)
        if identity is not None:
            return identity
        try:
            status = os.lstat(path)
        except OSError:
            return None
        return FileIdentity.of_stat(status)

    def read_text(self, path: Path, *, confined_to: Sequence[Path] = ()) -> str:
        """``read_config_text``."""
        return read_config_text(path, confined_to=confined_to)

    def real_path(self, path: Path) -> Path:
        """``filesystem.real_path`` (``os.path.realpath`` without recursion)."""
        return real_path(path)

    def exists(self, path: Path) -> bool:
        """``Path.exists`` (through links)."""
        return path.exists()

    def is_directory(self, path: Path) -> bool:
        """``os.path.isdir`` (through links)."""
        return os.path.isdir(path)


LOCAL_FILES = LocalConfigFiles()
