"""The storage seam of the reconcile core: where groups are found, scanned and pruned.

A pass (reconcile.py) plans; a ``Storage`` does its I/O: walking the groups below the root, scanning
one, listing its symlinks, applying one group's deletions and finishing interrupted removals.
``LocalStorage`` is a directory tree on disk, exactly as before (the functions of scan.py, links.py
and delete.py); ``BucketStorage`` (bucket.py) is a prefix in an object store.

A store that cannot be listed whole raises ``StorageUnavailableError``: the pass then plans nothing
and deletes nothing (a partial listing could hide a ``.keep`` pin or the newest checkpoints). The
trash's part of a pass raises it too when a pin of a restored checkpoint cannot be read (trash_pass,
bucket_trash_pass): the pass stops before that group's plan, after what it did before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from ckpt_watcher.aliases import AliasGuard
from ckpt_watcher.delete import DeletionResult, LeftoverResult, TrashMover, apply_group, finish_leftovers
from ckpt_watcher.links import Link, list_links
from ckpt_watcher.naming import Naming
from ckpt_watcher.nested import NestedGuard
from ckpt_watcher.plan import GroupPlan
from ckpt_watcher.protection import FileKey, identities_of
from ckpt_watcher.records import CheckpointRecord
from ckpt_watcher.scan import (
    CompletenessCache,
    NamingLookup,
    ScanOptions,
    ScanProblem,
    is_group_directory,
    scan_directory,
    walk_directories,
)


class StorageUnavailableError(Exception):
    """The store could not be read whole (a listing failed, maybe halfway: nothing is planned), or a
    pin of a restored checkpoint could not be read (nothing more is planned)."""


class Storage(Protocol):
    """The I/O of one pass over one root; every method but ``begin_pass`` mirrors a function of the
    local implementation."""

    def begin_pass(self) -> None:
        """A pass starts: what was read for the previous one is out of date."""
        ...

    def walk_directories(
        self, root: Path, naming: NamingLookup, problems: list[ScanProblem]
    ) -> Iterable[Path]:
        """Every group below ``root`` (scan.walk_directories)."""
        ...

    def is_group(self, directory: Path) -> bool | None:
        """True while ``directory`` is still a group (a real directory, not a symlink); None if that
        cannot be told now (scan.is_group_directory: not gone, what is known about it stays)."""
        ...

    def scan_directory(
        self,
        root: Path,
        directory: Path,
        naming: Naming,
        options: ScanOptions,
        cache: CompletenessCache | None,
        problems: list[ScanProblem],
        *,
        stop: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
    ) -> list[CheckpointRecord]:
        """One group's records (scan.scan_directory); ``progress`` is called now and then in a long one
        (the daemon's keep-alive)."""
        ...

    def list_links(self, directory: Path, root: Path, naming: Naming) -> list[Link] | None:
        """The group's symlinks (links.list_links: None if it cannot be listed); a bucket has none."""
        ...

    def apply_group(
        self,
        group: GroupPlan,
        root: Path,
        *,
        stop: threading.Event | None = None,
        trash: TrashMover | None = None,
        progress: Callable[[], None] | None = None,
    ) -> list[DeletionResult]:
        """Delete what the group's plan says to (delete.apply_group), or move it into ``trash``;
        never raises. ``progress`` is called after each deletion (the daemon's keep-alive)."""
        ...

    def finish_leftovers(
        self,
        root: Path,
        directory: Path,
        *,
        naming_for: NamingLookup,
        reported: set[tuple[int, int]] | None = None,
        stop: threading.Event | None = None,
    ) -> list[LeftoverResult]:
        """Finish removals a previous run left halfway (delete.finish_leftovers); never raises.
        ``naming_for``: the templates in force in a directory (what is a checkpoint there), asked
        only where a leftover needs it; ``stop`` ends a long removal, leaving the rest for later."""
        ...

    def identities_of(self, pins: Mapping[Path, str]) -> dict[FileKey, str]:
        """The identities of pinned files, for pins by identity (protection.identities_of)."""
        ...

    def kept_whole(self, root: Path, group: Path) -> dict[Path, str]:
        """A pin keeping everything in ``group`` where its deletions cannot be trusted to stay under
        the root (aliases.AliasGuard: a directory the root shows twice, a mount from outside), or
        where another watcher prunes (nested.py: a watched directory, a sub-prefix's lease), else
        nothing."""
        ...


class LocalStorage:
    """A checkpoint tree on disk: today's functions, and what a full walk saw of the directories'
    identities and mounts (``aliases.AliasGuard``), and the directories other watchers hold
    (``nested.NestedGuard``)."""

    def __init__(self) -> None:
        self._aliases = AliasGuard()
        self._nested = NestedGuard()

    def begin_pass(self) -> None:
        """Each call reads the disk; only the guards' warnings (and the locks read) are per pass."""
        self._aliases.begin_pass()
        self._nested.begin_pass()

    def walk_directories(
        self, root: Path, naming: NamingLookup, problems: list[ScanProblem]
    ) -> Iterator[Path]:
        """scan.walk_directories, each directory's identity and mount noted (AliasGuard.walk), then
        the directories other watchers hold (NestedGuard.after_walk)."""
        yield from self._aliases.walk(root, walk_directories(root, naming, problems))
        self._nested.after_walk(root, self._aliases.walked)

    def is_group(self, directory: Path) -> bool | None:
        """A directory, and not a symlink to one (None: cannot be told now; scan.is_group_directory)."""
        return is_group_directory(directory)

    def scan_directory(
        self,
        root: Path,
        directory: Path,
        naming: Naming,
        options: ScanOptions,
        cache: CompletenessCache | None,
        problems: list[ScanProblem],
        *,
        stop: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
    ) -> list[CheckpointRecord]:
        """scan.scan_directory."""
        return scan_directory(root, directory, naming, options, cache, problems, stop=stop, progress=progress)

    def list_links(self, directory: Path, root: Path, naming: Naming) -> list[Link] | None:
        """links.list_links."""
        return list_links(directory, root, naming)

    def apply_group(
        self,
        group: GroupPlan,
        root: Path,
        *,
        stop: threading.Event | None = None,
        trash: TrashMover | None = None,
        progress: Callable[[], None] | None = None,
    ) -> list[DeletionResult]:
        """delete.apply_group."""
        return apply_group(group, root, stop=stop, trash=trash, progress=progress)

    def finish_leftovers(
        self,
        root: Path,
        directory: Path,
        *,
        naming_for: NamingLookup,
        reported: set[tuple[int, int]] | None = None,
        stop: threading.Event | None = None,
    ) -> list[LeftoverResult]:
        """delete.finish_leftovers (a leftover here is named as one: ``naming_for`` is not needed),
        never in a group kept whole."""
        del naming_for
        if self.kept_whole(root, directory):
            return []
        return finish_leftovers(root, directory, reported=reported, stop=stop)

    def identities_of(self, pins: Mapping[Path, str]) -> dict[FileKey, str]:
        """protection.identities_of."""
        return identities_of(pins)

    def kept_whole(self, root: Path, group: Path) -> dict[Path, str]:
        """AliasGuard.kept_whole, then NestedGuard.kept_whole (each warns of its own)."""
        return {**self._nested.kept_whole(root, group), **self._aliases.kept_whole(root, group)}
