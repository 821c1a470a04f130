"""The trash of a bucket root: its layout and how it is read (moves in and out: bucket_trash_moves.py).

With ``trash: {grace: ...}`` a deleted checkpoint object is copied, server-side, into::

    PREFIX/.ckpt-trash/
      files/<relative key>@<KEY>[/...]   the checkpoint (a directory checkpoint: every object of it)
      info/<KEY>.json                    what it was (as on disk: trash.TrashEntry's document), plus
                                         ``objects``: each copy's key below the entry, ETag and size
      restored/<KEY>.json                a restored checkpoint's pin (trash.RestoredPin's document;
                                         its identity is (0, a digest of the restored ETag))

``KEY`` is when it was trashed and a random number (the same pattern as on disk), so the same name can
be trashed twice and never collides. A move is not free: a copy costs requests (and, on S3, storage
until the entry is purged); README "The trash" says how many.

Nothing in the trash prefix is trusted: an ``info`` object is read only if it is at most 64 KiB of valid
JSON naming a relative path inside the root; the keys of its copies are derived from its own key and
path (never taken from the document), and a copy is removed or restored only while it still has the
ETag the entry recorded. Objects that no entry names are never touched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ckpt_watcher.bucket_listing import TRASH_PREFIX, object_identity
from ckpt_watcher.locations import StorageURL, key_parts
from ckpt_watcher.object_store import ObjectInfo, ObjectMissingError, ObjectStore, StoreError
from ckpt_watcher.records import display_name
from ckpt_watcher.trash import (
    FILES,
    INFO,
    METADATA_LIMIT,
    METADATA_SUFFIX,
    RESTORED,
    RETRY_UNREAD_SECONDS,
    AtAGlance,
    RestoredPin,
    TrashEntry,
    TrashSummary,
    key_of,
    record_bytes,
)

logger = structlog.get_logger("ckpt_watcher.trash")

# An entry's info object names every object of a directory checkpoint (~100 bytes each): a limit of
# its own, as a deletion manifest has (bucket_delete), not the 64 KiB of a file's metadata.
INFO_LIMIT = 64 << 20


def trash_base(url: StorageURL) -> str:
    """The key prefix of ``url``'s trash: ``PREFIX/.ckpt-trash``."""
    return f"{url.prefix}/{TRASH_PREFIX}" if url.prefix else TRASH_PREFIX


@dataclass(frozen=True, slots=True)
class StoredCopy:
    """One object of a trash entry: its key below the entry ("" for an object checkpoint itself), the
    ETag its copy in the trash has, and its size."""

    relative: str
    tag: str
    size: int


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """A trash entry of a bucket: what it was (``entry``), its copies, and its ``info`` object."""

    entry: TrashEntry
    copies: tuple[StoredCopy, ...]
    info_key: str
    info_tag: str

    def data_key(self, base: str, relative: str) -> str:
        """The key of one of its copies: ``BASE/files/<relative path>@<KEY>[/relative]``."""
        stored = "/".join([base, FILES, *self.entry.parent_parts, self.entry.stored_name])
        return f"{stored}/{relative}" if relative else stored


def info_key(base: str, key: str) -> str:
    """The key of an entry's ``info`` object."""
    return f"{base}/{INFO}/{key}{METADATA_SUFFIX}"


def pin_key(base: str, key: str) -> str:
    """The key of a restored checkpoint's pin."""
    return f"{base}/{RESTORED}/{key}{METADATA_SUFFIX}"


def entry_document(entry: TrashEntry, copies: Iterable[StoredCopy]) -> bytes:
    """The ``info`` object of an entry."""
    document = {
        **entry.document(),
        "objects": [[copy.relative, copy.tag, copy.size] for copy in copies],
    }
    return record_bytes(document)


def parse_entry(key: str, data: bytes, info: ObjectInfo) -> StoredEntry:
    """The entry an ``info`` object describes; ValueError saying what is wrong with it."""
    if len(data) > INFO_LIMIT:
        raise ValueError(f"larger than {INFO_LIMIT >> 20} MiB")
    try:
        document: Any = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None
    entry = TrashEntry.from_document(key, document)
    items = document.get("objects")
    if not isinstance(items, list) or not items:
        raise ValueError("'objects' is not a list of the entry's copies")
    copies: list[StoredCopy] = []
    for item in items:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and isinstance(item[2], int)
            and not isinstance(item[2], bool)
            and item[2] >= 0
        ):
            raise ValueError("an item of 'objects' is not [key, ETag, size]")
        copies.append(StoredCopy(item[0], item[1], item[2]))
    relatives = [copy.relative for copy in copies]
    if entry.is_directory:
        if any(not relative or key_parts(relative) is None for relative in relatives):
            raise ValueError("a directory entry names a copy outside it")
    elif relatives != [""]:
        raise ValueError("an object entry names more than its one copy")
    if len(set(relatives)) != len(relatives):
        raise ValueError("'objects' names one copy twice")
    return StoredEntry(entry, tuple(copies), info.key, info.tag)


def parse_pin(key: str, data: bytes) -> RestoredPin:
    """The pin a ``restored`` object describes; ValueError saying what is wrong with it."""
    if len(data) > METADATA_LIMIT:
        raise ValueError(f"larger than {METADATA_LIMIT // 1024} KiB")
    try:
        document: Any = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None
    return RestoredPin.from_document(key, document)


def pinned_inode(tag: str) -> int:
    """The inode of an object's identity with this ETag (bucket_listing.object_identity)."""
    return object_identity(ObjectInfo("", 0, tag, 0)).inode


@dataclass
class BucketTrashIndex:
    """What is known of a bucket root's trash, from the objects under its prefix (a pass's listing, or
    a listing of the trash alone). Each ``info`` or pin object is read once per ETag; what cannot be
    read is logged once (``trash_problem``) and skipped: for good if what it holds is not an entry or a
    pin; if the store failed to give it (a timeout, throttling, a key it may not use), a pin until the
    next look and an entry for ``RETRY_UNREAD_SECONDS`` (a GET of each of 100,000 entries at every poll
    would cost more than the look). ``pins_in_doubt`` says why the last look could not read every pin
    (a restored checkpoint it cannot tell), or None."""

    url: StorageURL
    store: ObjectStore
    objects: dict[str, ObjectInfo] = field(default_factory=dict)  # every key under the trash prefix
    exists: bool = False
    _entries: dict[str, tuple[str, StoredEntry | None]] = field(default_factory=dict)
    _pins: dict[str, tuple[str, RestoredPin | None]] = field(default_factory=dict)
    _reported: set[tuple[str, str]] = field(default_factory=set)
    _at_a_glance: AtAGlance[StoredEntry] | None = None  # of ``_entries``: made once a change
    pins_in_doubt: str | None = None
    lists_entries: bool = False  # the last look's listing showed an entry (read or not)
    _pin_objects: list[ObjectInfo] = field(default_factory=list)  # those of ``objects`` in restored/
    _unread: dict[str, tuple[str, float]] = field(default_factory=dict)  # entry key: (tag, failed at)
    clock: Callable[[], float] = time.monotonic

    @property
    def base(self) -> str:
        """The trash's key prefix."""
        return trash_base(self.url)

    def look(self, objects: Iterable[ObjectInfo]) -> None:
        """What the trash holds now: ``objects`` are every object under its prefix."""
        self.objects = {info.key: info for info in objects if info.key.startswith(self.base + "/")}
        entries = f"{self.base}/{INFO}/"
        self.lists_entries = any(key.startswith(entries) for key in self.objects)
        self.exists = self.exists or bool(self.objects)
        self._entries = self._read(INFO, self._entries, parse_entry, INFO_LIMIT, self.objects.items())
        self._at_a_glance = None
        pins = f"{self.base}/{RESTORED}/"
        self._pin_objects = [info for key, info in self.objects.items() if key.startswith(pins)]
        self._read_pins()

    def look_pins(self) -> None:
        """List the pins alone again (StoreError if they cannot be listed whole). Only they are gone
        over: a move into the trash asks this each time, and the entries may be 100,000s."""
        fresh = self.store.list_prefix(f"{self.base}/{RESTORED}")
        for info in self._pin_objects:
            self.objects.pop(info.key, None)
        self._pin_objects = fresh
        self.objects.update((info.key, info) for info in fresh)
        self._read_pins()

    def _read_pins(self) -> None:
        pins = ((info.key, info) for info in self._pin_objects)
        self._pins = self._read(
            RESTORED, self._pins, lambda key, data, _: parse_pin(key, data), METADATA_LIMIT, pins
        )

    def look_again(self) -> None:
        """List the trash prefix itself (StoreError if it cannot be listed whole)."""
        self.look(self.store.list_prefix(self.base))

    def _read(
        self,
        directory: str,
        known: dict[str, tuple[str, Any]],
        parse: Any,
        limit: int,
        objects: Iterable[tuple[str, ObjectInfo]],
    ) -> dict[str, Any]:
        found: dict[str, tuple[str, Any]] = {}
        prefix = f"{self.base}/{directory}/"
        pins = directory == RESTORED
        now = self.clock()
        if pins:
            self.pins_in_doubt = None
        else:
            self._unread = {key: value for key, value in self._unread.items() if key in self.objects}
        for object_key, info in objects:
            name = object_key[len(prefix) :] if object_key.startswith(prefix) else None
            if name is None or "/" in name:
                continue
            previous = known.get(object_key)
            unread = self._unread.get(object_key)
            if (
                previous is not None
                and previous[0] == info.tag
                and (unread is None or now - unread[1] < RETRY_UNREAD_SECONDS)
            ):
                found[object_key] = previous
                continue
            self._unread.pop(object_key, None)
            try:
                found[object_key] = (info.tag, self._read_one(info, key_of(name), parse, limit))
            except ObjectMissingError:
                continue  # purged or restored since the listing
            except StoreError as error:
                when = "read again at the next look" if pins else "read again in a few minutes"
                self._report(object_key, info.tag, str(error), f"not read now; {when}")
                if pins and self.pins_in_doubt is None:
                    self.pins_in_doubt = f"{display_name(object_key)} cannot be read: {error}"
                if not pins:
                    found[object_key] = (info.tag, None)
                    self._unread[object_key] = (info.tag, now)
        return found

    def _read_one(self, info: ObjectInfo, key: str | None, parse: Any, limit: int) -> Any:
        """What the object says (None, reported, if it is not what its place holds); StoreError if the
        store failed to give it."""
        try:
            if key is None:
                raise ValueError(f"not named like a trash entry (<KEY>{METADATA_SUFFIX})")
            if info.size > limit:
                raise ValueError(f"larger than {limit} bytes")
            fetched = self.store.fetch(info.key, limit=limit)
            return parse(key, fetched.data, fetched.info)
        except ValueError as error:
            self._report(info.key, info.tag, str(error))
            return None

    def _report(self, key: str, tag: str, problem: str, detail: str = "skipped; never followed") -> None:
        if (key, tag) not in self._reported:
            self._reported.add((key, tag))
            logger.warning(
                "trash_problem",
                path=display_name(f"{self.url.scheme}://{self.url.bucket}/{key}"),
                error=problem,
                detail=detail,
            )

    def add(self, stored: StoredEntry) -> None:
        """An entry this process just made (no need to read it back)."""
        self.exists = True
        self._entries[stored.info_key] = (stored.info_tag, stored)
        self._at_a_glance = None

    def drop(self, stored: StoredEntry) -> None:
        """An entry this process just purged or restored."""
        self._entries.pop(stored.info_key, None)
        self._at_a_glance = None

    def _glance(self) -> AtAGlance[StoredEntry]:
        if self._at_a_glance is None:
            found = [value for _, value in self._entries.values() if value is not None]
            self._at_a_glance = AtAGlance(found, lambda stored: stored.entry)
        return self._at_a_glance

    @property
    def stored(self) -> tuple[StoredEntry, ...]:
        """The readable entries, oldest first."""
        return self._glance().oldest_first

    @property
    def entries(self) -> list[TrashEntry]:
        """The readable entries as the local trash's, oldest first."""
        return [stored.entry for stored in self.stored]

    @property
    def pins(self) -> list[RestoredPin]:
        """Every readable pin (expired ones too)."""
        return [pin for _, pin in self._pins.values() if pin is not None]

    def pinned_identities(self, now: float) -> dict[tuple[int, int], str]:
        """(device, inode) of each restored checkpoint still pinned at ``now``, with the reason."""
        return {(pin.device, pin.inode): pin.reason for pin in self.pins if pin.until > now}

    def summary(self) -> TrashSummary | None:
        """The trash at a glance, or None when the root has none."""
        if not self.exists:
            return None
        glance = self._glance()
        oldest = glance.oldest
        return TrashSummary(glance.count, glance.bytes, oldest.entry if oldest is not None else None)

    def next_purge_at(self) -> float | None:
        """When the first grace ends (epoch seconds), or None with nothing in the trash."""
        return self._glance().next_purge_at
