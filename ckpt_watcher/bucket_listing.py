"""One listing of a bucket prefix, arranged by directory: what a pass over a bucket works from.

The groups of a bucket root are the "directories" of its keys; a directory checkpoint is a prefix,
summarized from the listing (its size, its newest object, its identity, whether its deletion began).
The lease object and the trash prefix are not part of the tree; a key that no path can name exactly
(``run//x.ckpt``) is set aside (``unnamable``) and never touched, and so is a folder marker (a
zero-byte key ending in ``/``, as the S3 console's "Create folder" makes), unreported: it names a
folder. A directory checkpoint is summarized from every key below its prefix, as listed
(``objects_under``), exactly as its deletion lists it again: a folder marker in it is part of it
(deleted with it), and a key no path names keeps it whole (``odd_key``).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_watcher.locations import StorageURL, key_parts
from ckpt_watcher.object_store import ObjectInfo
from ckpt_watcher.records import FileIdentity

LEASE_NAME = ".ckpt-watcher.lease"
TRASH_PREFIX = ".ckpt-trash"  # where a trash on a bucket keeps what it holds (issue 13)
DELETING_MARKER = ".ckpt-watcher-deleting"  # inside a directory checkpoint whose deletion began


def object_identity(info: ObjectInfo) -> FileIdentity:
    """An object's identity as records carry it: (0, a digest of its tag, size, mtime)."""
    digest = hashlib.blake2b(info.tag.encode(), digest_size=8).digest()
    return FileIdentity(0, int.from_bytes(digest, "big"), info.size, info.mtime_ns)


@dataclass
class Listing:
    """One listing of the prefix: each directory's objects (by name) and subdirectories."""

    root: Path
    files: dict[Path, dict[str, ObjectInfo]] = field(default_factory=dict)
    subdirectories: dict[Path, set[str]] = field(default_factory=dict)
    unnamable: list[str] = field(default_factory=list)
    trash: list[ObjectInfo] = field(default_factory=list)  # the objects under the trash prefix
    everything: list[ObjectInfo] = field(default_factory=list)  # every object listed, sorted by key

    @classmethod
    def of(cls, url: StorageURL, objects: Iterable[ObjectInfo]) -> Listing:
        """Arrange a listing of ``url``'s prefix by directory."""
        listing = cls(url.core_path)
        listing.subdirectories[listing.root] = set()
        listing.everything = sorted(objects, key=lambda info: info.key)
        for info in listing.everything:
            path = url.path_of(info.key)
            relative = url.key_of(path) if path is not None else None
            if path is None or relative is None or path == listing.root:
                if not is_folder_marker(info):
                    listing.unnamable.append(info.key)
                continue
            parts = path.relative_to(listing.root).parts
            if parts[0] == TRASH_PREFIX:
                listing.trash.append(info)  # not part of the tree; what the trash holds (bucket_trash.py)
                continue
            if TRASH_PREFIX in parts[1:-1]:
                continue  # the trash of a root below (a nested watcher's): never this tree's, as on disk
            if len(parts) == 1 and parts[0] == LEASE_NAME:
                continue
            listing.files.setdefault(path.parent, {})[path.name] = info
            directory = listing.root
            for part in parts[:-1]:
                listing.subdirectories.setdefault(directory, set()).add(part)
                directory = directory / part
                listing.subdirectories.setdefault(directory, set())
        return listing

    def is_directory(self, path: Path) -> bool:
        """True if objects lie below ``path`` (or it is the root)."""
        return path in self.subdirectories

    def object_at(self, path: Path) -> ObjectInfo | None:
        """The object named by ``path``, if the listing holds one."""
        return self.files.get(path.parent, {}).get(path.name)

    def objects_under(self, key: str) -> list[ObjectInfo]:
        """Every object listed below ``key`` (a directory checkpoint's key: each one starting with
        ``key/``), as a listing of that prefix shows them: folder markers and keys no path names too."""
        below = f"{key}/"
        start = bisect.bisect_left(self.everything, below, key=lambda info: info.key)
        end = start
        while end < len(self.everything) and self.everything[end].key.startswith(below):
            end += 1
        return self.everything[start:end]

    def below(self, top: Path) -> Iterator[tuple[Path, ObjectInfo]]:
        """Every object below ``top`` with its path (depth first)."""
        pending = [top]
        while pending:
            directory = pending.pop()
            for name, info in self.files.get(directory, {}).items():
                yield directory / name, info
            pending.extend(directory / name for name in self.subdirectories.get(directory, ()))

    def forget_below(self, top: Path) -> None:
        """Drop ``top`` and everything below it (it was just removed)."""
        pending = [top]
        while pending:
            directory = pending.pop()
            self.files.pop(directory, None)
            pending.extend(directory / name for name in self.subdirectories.pop(directory, ()))
        self.subdirectories.get(top.parent, set()).discard(top.name)


@dataclass(frozen=True, slots=True)
class DirectorySummary:
    """A directory checkpoint (a prefix) as the listing shows it."""

    top_entries: set[str]
    total: int
    newest_mtime_ns: int
    identity: FileIdentity
    being_deleted: bool


def has_key_under(sorted_keys: Sequence[str], key: str) -> bool:
    """True if one of ``sorted_keys`` (sorted as str sorts) lies below ``key``: starts with ``key/``.
    The keys that start with a prefix are one run of a sorted list, found by one binary search."""
    below = f"{key}/"
    index = bisect.bisect_left(sorted_keys, below)
    return index < len(sorted_keys) and sorted_keys[index].startswith(below)


def summarize_prefix(objects: Sequence[tuple[str, ObjectInfo]]) -> DirectorySummary:
    """``objects`` are (key relative to the directory checkpoint, info); its identity changes whenever
    any object in it is added, removed or changed."""
    digest = hashlib.blake2b(digest_size=8)
    total = newest = 0
    top: set[str] = set()
    for relative, info in sorted(objects):
        digest.update(f"{relative}\0{info.tag}\0".encode(errors="surrogatepass"))
        total += info.size
        newest = max(newest, info.mtime_ns)
        top.add(relative.split("/", 1)[0])
    identity = FileIdentity(0, int.from_bytes(digest.digest(), "big"), total, newest)
    return DirectorySummary(top, total, newest, identity, DELETING_MARKER in top)


def is_folder_marker(info: ObjectInfo) -> bool:
    """A zero-byte key ending in ``/`` whose folder a path names (the S3 console's "Create folder")."""
    return (
        info.key.endswith("/")
        and info.size == 0
        and bool(info.key[:-1])
        and key_parts(info.key[:-1]) is not None
    )


def odd_key(objects: Sequence[tuple[str, ObjectInfo]]) -> str | None:
    """The first of ``objects`` (key relative to a directory checkpoint, info) that no path names
    exactly (an empty, ``.`` or ``..`` component) and is no folder marker, or None. Such a checkpoint
    is kept whole: what such a key is, and whether its writer is done with it, is anyone's guess."""
    for relative, info in sorted(objects):
        if not is_folder_marker(info) and (not relative or key_parts(relative) is None):
            return info.key
    return None
