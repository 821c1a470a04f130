"""Moves in and out of a bucket root's trash (layout and reading: bucket_trash.py).

**Into the trash** (``BucketTrashTarget``): the object (or every object of a directory checkpoint, its
marker first) is copied server-side with CreateMultipartUpload + UploadPartCopy naming the planned
ETag (``x-amz-copy-source-if-match``), checked (the copy's one part must have the planned ETag as its
MD5, or the source must still have the planned ETag after the copy: so the copy is of the very version
planned even on a store that ignores the condition, as moto does), its ``info`` object written
(``If-None-Match: *``), the copy completed (``If-None-Match: *``), and only then is the checkpoint
removed exactly as without a trash (bucket_delete: ETag and size re-checked, a conditional delete; a
directory marker-first). A copy that cannot be made or checked deletes nothing.

**Out of it**: a purge deletes each copy only while it has the ETag its entry recorded
(``If-Match``), then the ``info`` object. A restore copies each copy back the same way, completing it
with ``If-None-Match: *`` so nothing that exists again is ever overwritten (a directory's marker
last, so a half-restored directory checkpoint never looks complete; what was restored of one that
cannot be restored whole is removed again), writing the ``restored`` pin before the object appears.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import structlog

from ckpt_watcher.bucket_delete import LastCheck, planned_object, remove_directory, remove_object
from ckpt_watcher.bucket_listing import Listing, is_folder_marker, summarize_prefix
from ckpt_watcher.bucket_trash import (
    INFO_LIMIT,
    BucketTrashIndex,
    StoredCopy,
    StoredEntry,
    entry_document,
    info_key,
    pin_key,
    pinned_inode,
)
from ckpt_watcher.delete import DeletionResult, Move, MoveOutcome, Outcome, _changed, _failed, _gone
from ckpt_watcher.integrity import DIRECTORY_MARKERS
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import (
    ObjectInfo,
    ObjectMissingError,
    ObjectStore,
    PendingCopy,
    PreconditionFailedError,
    StoreError,
)
from ckpt_watcher.plan import Decision
from ckpt_watcher.records import EntryType, display_name
from ckpt_watcher.storage import StorageUnavailableError
from ckpt_watcher.trash import RestoredPin, TrashEntry, iso_time, make_key, valid_relative_path
from ckpt_watcher.trash_moves import PurgeResult, RestoreResult
from ckpt_watcher.trash_pass import refuse_pins_in_doubt

logger = structlog.get_logger("ckpt_watcher.trash")


class _NotCopiedError(Exception):
    """A copy that could not be made or proved: ``outcome`` (changed, gone, failed) and why."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def _marker_last(objects: Sequence[ObjectInfo], top: str) -> list[ObjectInfo]:
    """``objects`` of a directory checkpoint at key ``top``, its writer's marker last."""
    return sorted(objects, key=lambda info: (info.key[len(top) + 1 :] in DIRECTORY_MARKERS, info.key))


def _abort_all(store: ObjectStore, pending: Sequence[PendingCopy]) -> None:
    for copy in pending:
        with contextlib.suppress(StoreError):
            store.abort_copy(copy)


def _delete_quietly(store: ObjectStore, items: Sequence[tuple[str, str]]) -> None:
    """Remove (key, ETag) objects this process just wrote, each only while it is still what was written."""
    for key, tag in items:
        with contextlib.suppress(StoreError):
            store.delete(key, tag=tag)


def copy_checked(store: ObjectStore, source: ObjectInfo, destination: str) -> PendingCopy:
    """Copy ``source`` (the version listed) to ``destination``, not yet visible; _NotCopiedError if the
    copy is not provably of that version."""
    try:
        pending = store.start_copy(source.key, destination, tag=source.tag, size=source.size)
    except PreconditionFailedError:
        raise _NotCopiedError(Outcome.CHANGED, "replaced before it was copied") from None
    except ObjectMissingError:
        raise _NotCopiedError(Outcome.ALREADY_GONE, "gone before it was copied") from None
    except StoreError as error:
        raise _NotCopiedError(Outcome.FAILED, f"cannot be copied: {error}") from None
    if pending.copies_whole(source.tag):
        return pending
    try:
        current = store.head(source.key)
    except StoreError as error:
        _abort_all(store, [pending])
        raise _NotCopiedError(Outcome.FAILED, f"its copy cannot be checked: {error}") from None
    if (current.tag, current.size) != (source.tag, source.size):
        _abort_all(store, [pending])
        raise _NotCopiedError(Outcome.CHANGED, "replaced while it was copied")
    return pending


def pins_in_force(index: BucketTrashIndex, now: float, *, look: bool = True) -> dict[tuple[int, int], str]:
    """The restored checkpoints pinned at ``now`` (the pins listed again first if ``look``).
    StorageUnavailableError if they cannot be listed or one cannot be read: a restored checkpoint it
    cannot tell would be planned, or moved, as never restored. For a pass and for a move's last check."""
    if look:
        try:
            index.look_pins()
        except StoreError as error:
            problem = f"the pins of restored checkpoints cannot be listed ({error})"
            raise StorageUnavailableError(problem) from None
    refuse_pins_in_doubt(index.pins_in_doubt)
    return index.pinned_identities(now)


@dataclass
class _LastGate:
    """The checks a move asks right before its DELETE (a restore meanwhile, then the lease), and
    whether one held it back. Both are asked before anything of the checkpoint is deleted (an object's
    DELETE, a directory's marker), so a move one of them held deleted nothing, and its copy in the
    trash is dropped: kept, it was a second copy that a later pass trashed again beside it."""

    restored_meanwhile: LastCheck
    lease: Callable[[], str | None]
    held: bool = False

    def last_check(self) -> DeletionResult | None:
        kept = self.restored_meanwhile()
        self.held = self.held or kept is not None
        return kept

    def may_delete(self) -> str | None:
        refusal = self.lease()
        self.held = self.held or refusal is not None
        return refusal


@dataclass
class BucketTrashTarget:
    """Moves one group's deletions into a bucket root's trash, each kept restorable ``grace_seconds``."""

    url: StorageURL
    store: ObjectStore
    grace_seconds: int
    index: BucketTrashIndex
    may_delete: Callable[[], str | None] = lambda: None
    clock: Callable[[], float] = time.time

    def move_in(self, directory_fd: int, decision: Decision) -> Move:
        """A local group's move (delete.TrashMover): never asked of a bucket's trash; refused."""
        return Move(MoveOutcome.FAILED, "a bucket's trash holds objects, not files")

    def __call__(self, decision: Decision, listing: Listing) -> DeletionResult:
        """Copy the checkpoint into the trash, then remove it (bucket_delete.TrashMove); never raises."""
        try:
            return self._trash(decision, listing)
        except _NotCopiedError as error:
            if error.outcome is Outcome.CHANGED:
                return _changed(decision)
            if error.outcome is Outcome.ALREADY_GONE:
                return _gone(decision)
            return _failed(decision, str(error))
        except Exception as error:
            return _failed(decision, f"unexpected error: {type(error).__name__}: {error}")

    def _trash(self, decision: Decision, listing: Listing) -> DeletionResult:
        record = decision.record
        key = self.url.key_of(record.path)
        relative = key[len(self.url.prefix) + 1 :] if key is not None and self.url.prefix else key
        if key is None or relative is None or not valid_relative_path(relative) or record.identity is None:
            return _failed(decision, "its path cannot be recorded in the trash")
        now = self.clock()
        entry = TrashEntry(
            key=make_key(now, secrets.randbits(40)),
            original=relative,
            trashed_at=now,
            grace_seconds=self.grace_seconds,
            reasons=decision.reasons,
            bytes=record.bytes,
            is_directory=record.entry_type is EntryType.DIRECTORY,
            device=0,
            inode=record.identity.inode,
            mtime_ns=None if record.entry_type is EntryType.DIRECTORY else record.identity.mtime_ns,
        )
        sources = self._sources(decision, key, listing)
        if isinstance(sources, DeletionResult):
            return sources
        stored = self._copy_in(entry, key, sources)
        refusal = self.may_delete()  # a long copy: the lease may have been lost meanwhile
        gate = _LastGate(partial(self._restored_meanwhile, decision), self.may_delete)
        outcome = (
            _failed(decision, refusal)
            if refusal
            else self._remove(decision, listing, stored, gate.last_check, gate.may_delete)
        )
        if refusal or gate.held or outcome.outcome is Outcome.CHANGED:  # nothing deleted: no copy needed
            copies = [(stored.data_key(self.index.base, copy.relative), copy.tag) for copy in stored.copies]
            _delete_quietly(self.store, [*copies, (stored.info_key, stored.info_tag)])
        elif outcome.outcome is not Outcome.TRASHED:
            self.index.add(stored)  # removed in part, maybe: the copy stays restorable
        return outcome

    def _restored_meanwhile(self, decision: Decision) -> DeletionResult | None:
        """Kept (CHANGED) if the checkpoint was restored and pinned after the pass read the pins: a
        stale plan (a pass whose listing came before another process's ``prune`` trashed it and a
        ``restore`` put it back, an object with the same ETag when both were uploaded alike) must not
        take it again. Asked right before the DELETE, after the HEAD that saw the object as planned:
        a restore writes its pin before its object appears, so a restored object's pin is listed by
        now (a restore landing between this look and the DELETE, one request, is not seen: there is
        no lock to hold it off). Kept too (FAILED) if the pins cannot be listed or one cannot be
        read: it may be this checkpoint's."""
        try:
            pinned = pins_in_force(self.index, self.clock())
        except StorageUnavailableError as error:
            return _failed(decision, str(error))
        identity = decision.record.identity
        assert identity is not None  # (``_trash`` refuses a record without one)
        if (identity.device, identity.inode) in pinned:
            return _changed(decision)
        return None

    def _sources(self, decision: Decision, key: str, listing: Listing) -> list[ObjectInfo] | DeletionResult:
        """The objects to copy: the planned object, or a directory's objects listed again (they must be
        exactly what was planned), its marker first."""
        if decision.record.entry_type is not EntryType.DIRECTORY:
            planned = planned_object(decision, self.url, listing)
            return planned if isinstance(planned, DeletionResult) else [planned]
        try:
            objects = self.store.list_prefix(key)
        except StoreError as error:
            return _failed(decision, f"cannot be listed before it is trashed: {error}")
        if not objects:
            return _gone(decision)
        summary = summarize_prefix([(info.key[len(key) + 1 :], info) for info in objects])
        if summary.identity != decision.record.identity or summary.being_deleted:
            return _changed(decision)
        data = [info for info in objects if not is_folder_marker(info)]  # empty: deleted, never copied
        return list(reversed(_marker_last(data, key)))

    def _copy_in(self, entry: TrashEntry, key: str, sources: list[ObjectInfo]) -> StoredEntry:
        """Copy every source, write the entry's info, complete the copies (_NotCopiedError if not done)."""
        draft = StoredEntry(entry, (), info_key(self.index.base, entry.key), "")
        pending: list[PendingCopy] = []
        try:
            for source in sources:
                relative = source.key[len(key) + 1 :] if entry.is_directory else ""
                pending.append(copy_checked(self.store, source, draft.data_key(self.index.base, relative)))
        except _NotCopiedError:
            _abort_all(self.store, pending)
            raise
        copies = tuple(
            StoredCopy(source.key[len(key) + 1 :] if entry.is_directory else "", copy.tag, source.size)
            for source, copy in zip(sources, pending, strict=True)
        )
        document = entry_document(entry, copies)
        if len(document) > INFO_LIMIT:
            _abort_all(self.store, pending)
            raise _NotCopiedError(Outcome.FAILED, "too many objects to record in the trash; kept")
        try:
            info_tag = self.store.put_new(draft.info_key, document)
        except StoreError as error:
            _abort_all(self.store, pending)
            raise _NotCopiedError(Outcome.FAILED, f"its trash entry cannot be written: {error}") from None
        stored = StoredEntry(entry, copies, draft.info_key, info_tag)
        return self._complete(stored, pending)

    def _complete(self, stored: StoredEntry, pending: list[PendingCopy]) -> StoredEntry:
        done: list[tuple[str, str]] = []
        actual: list[StoredCopy] = []
        try:
            for copy, item in zip(pending, stored.copies, strict=True):
                tag = self.store.finish_copy(copy)
                done.append((copy.destination, tag))
                actual.append(StoredCopy(item.relative, tag, item.size))
        except StoreError as error:
            _abort_all(self.store, pending[len(done) + 1 :])
            _delete_quietly(self.store, [*done, (stored.info_key, stored.info_tag)])
            problem = f"its copy in the trash cannot be completed: {error}"
            raise _NotCopiedError(Outcome.FAILED, problem) from None
        if tuple(actual) == stored.copies:
            return stored
        try:  # a store whose multipart ETags are not S3's: the entry records the real ones
            info_tag = self.store.put_replacing(
                stored.info_key, entry_document(stored.entry, actual), tag=stored.info_tag
            )
        except StoreError as error:
            _delete_quietly(self.store, [*done, (stored.info_key, stored.info_tag)])
            raise _NotCopiedError(Outcome.FAILED, f"its trash entry cannot be written: {error}") from None
        return StoredEntry(stored.entry, tuple(actual), stored.info_key, info_tag)

    def _remove(
        self,
        decision: Decision,
        listing: Listing,
        stored: StoredEntry,
        last_check: LastCheck,
        may_delete: Callable[[], str | None],
    ) -> DeletionResult:
        """Remove the checkpoint as without a trash (``last_check``, then ``may_delete``, right before
        its DELETE); on success, ``checkpoint_trashed``.

        Gone already once its copy is verified counts as trashed, and the copy stays: most likely our
        own conditional DELETE succeeded and its answer was lost, so botocore's retry found nothing
        (404). Dropping the copy then lost the checkpoint in both places, with nothing logged."""

        def trashed(decision: Decision) -> DeletionResult:
            self.index.add(stored)
            logger.info(
                "checkpoint_trashed",
                path=display_name(str(decision.record.path)),
                trash_path=display_name(self._url_of(stored.data_key(self.index.base, ""))),
                kind=decision.record.kind.value,
                step=decision.record.step,
                bytes=decision.record.bytes,
                reasons=list(decision.reasons),
                purge_at=iso_time(stored.entry.purge_at),
            )
            return DeletionResult(decision, Outcome.TRASHED)

        remove = remove_directory if stored.entry.is_directory else remove_object
        result = remove(
            decision,
            self.url,
            self.store,
            listing,
            trashed,
            may_delete=may_delete,
            last_check=last_check,
        )
        return trashed(decision) if result.outcome is Outcome.ALREADY_GONE else result

    def _url_of(self, key: str) -> str:
        return f"{self.url.scheme}://{self.url.bucket}/{key}"


# -- out of the trash: purge ------------------------------------------------------------------------


def purge_stored(
    index: BucketTrashIndex,
    select: Callable[[TrashEntry], bool],
    *,
    why: str,
    now: float | None = None,
    stop: threading.Event | None = None,
    may_delete: Callable[[], str | None] = lambda: None,
) -> PurgeResult:
    """Remove every entry ``select`` picks (oldest first), then the pins that expired. Each copy is
    deleted only while it has the ETag its entry recorded; a copy that changed is left where it is and
    the entry dropped (``trash_entry_dropped``). ``may_delete`` ends it (the daemon's lease)."""
    now = time.time() if now is None else now
    result = PurgeResult()
    for stored in index.stored:
        if (stop is not None and stop.is_set()) or may_delete() is not None:
            result.interrupted = True
            break
        if select(stored.entry):
            _purge_one(index, stored, why, result)
    for pin in index.pins:
        key = pin_key(index.base, pin.key)
        if pin.until <= now and key in index.objects:
            with contextlib.suppress(StoreError):
                index.store.delete(key, tag=index.objects[key].tag)
    return result


def _purge_one(index: BucketTrashIndex, stored: StoredEntry, why: str, result: PurgeResult) -> None:
    entry = stored.entry
    path = display_name(f"{index.url.scheme}://{index.url.bucket}/{index.url.below(entry.original).prefix}")
    foreign: list[str] = []
    try:
        for copy in stored.copies:
            try:
                index.store.delete(stored.data_key(index.base, copy.relative), tag=copy.tag)
            except ObjectMissingError:
                continue
            except PreconditionFailedError:
                foreign.append(copy.relative or entry.name)
        index.store.delete(stored.info_key, tag=stored.info_tag)
    except ObjectMissingError:
        pass  # purged or restored meanwhile
    except StoreError as error:
        result.failed.append((entry, str(error)))
        detail = "still in the trash; retried by the next purge"
        logger.error("trash_purge_failed", path=path, error=str(error), detail=detail)
        return
    index.drop(stored)
    if foreign:
        result.dropped.append(entry)
        logger.warning(
            "trash_entry_dropped",
            path=path,
            key=entry.key,
            detail="what is stored under its name is not what was trashed; left where it is, never removed",
        )
        return
    result.purged.append(entry)
    logger.info(
        "checkpoint_purged",
        path=path,
        trash_path=_trash_url(index, stored),
        bytes=entry.bytes,
        trashed_at=iso_time(entry.trashed_at),
        why=why,
    )


def _trash_url(index: BucketTrashIndex, stored: StoredEntry) -> str:
    return display_name(f"{index.url.scheme}://{index.url.bucket}/{stored.data_key(index.base, '')}")


# -- out of the trash: restore ----------------------------------------------------------------------


def restore_stored(
    index: BucketTrashIndex, entries: Sequence[TrashEntry], *, now: float | None = None
) -> list[RestoreResult]:
    """Copy ``entries`` back where they were, newest first, each pinned for its grace; never over
    anything (an entry whose name exists again is refused). Logs ``checkpoint_restored`` or
    ``restore_refused`` for each."""
    now = time.time() if now is None else now
    by_key = {stored.entry.key: stored for stored in index.stored}
    results: list[RestoreResult] = []
    for entry in sorted(entries, key=lambda entry: (entry.trashed_at, entry.key), reverse=True):
        path = display_name(index.url.below(entry.original).text)
        stored = by_key.get(entry.key)
        try:
            problem = _restore_one(index, stored, now) if stored is not None else "no longer in the trash"
        except StoreError as error:
            problem = str(error)
        if problem is not None:
            logger.warning("restore_refused", path=path, key=entry.key, error=problem)
            results.append(RestoreResult(entry, restored=False, problem=problem))
            continue
        until = now + entry.grace_seconds
        logger.info(
            "checkpoint_restored",
            path=path,
            trash_path=_trash_url(index, stored) if stored is not None else None,
            bytes=entry.bytes,
            trashed_at=iso_time(entry.trashed_at),
            pinned_until=iso_time(until),
        )
        results.append(RestoreResult(entry, restored=True, pinned_until=until))
    return results


def _restore_one(index: BucketTrashIndex, stored: StoredEntry, now: float) -> str | None:
    """Copy one entry back (None when done, else why not): its copies must be what was trashed, its
    name free; the pin first, the marker last, each copy completed only where nothing is."""
    store, entry = index.store, stored.entry
    target = index.url.below(entry.original).prefix
    sources: list[ObjectInfo] = []
    for copy in stored.copies:
        info = index.objects.get(stored.data_key(index.base, copy.relative))
        if info is None:
            return "its data is missing from the trash"
        if info.tag != copy.tag:
            return "what is stored under its name in the trash is not what was trashed; not restored"
        sources.append(info)
    if store.list_prefix(target) if entry.is_directory else _exists(store, target):
        return f"{entry.original} exists again; it is never overwritten (move it away first)"
    top = stored.data_key(index.base, "")
    ordered = _marker_last(sources, top) if entry.is_directory else sources
    pending: list[PendingCopy] = []
    try:
        for source in ordered:
            relative = source.key[len(top) + 1 :] if entry.is_directory else ""
            pending.append(copy_checked(store, source, f"{target}/{relative}" if relative else target))
    except _NotCopiedError as error:
        _abort_all(store, pending)
        return str(error)
    return _land(index, stored, pending, now)


def _exists(store: ObjectStore, key: str) -> bool:
    try:
        store.head(key)
    except ObjectMissingError:
        return False
    return True


def _identity_inode(entry: TrashEntry, target: str, tags: Sequence[tuple[str, str]]) -> int:
    """The inode a restored checkpoint's identity will have, from its objects' (key, ETag)."""
    if not entry.is_directory:
        return pinned_inode(tags[0][1])
    objects = [(key[len(target) + 1 :], ObjectInfo(key, 0, tag, 0)) for key, tag in tags]
    return summarize_prefix(objects).identity.inode


def _land(index: BucketTrashIndex, stored: StoredEntry, pending: list[PendingCopy], now: float) -> str | None:
    """Pin, complete each copy where nothing is (the marker last), then drop the entry."""
    store, entry = index.store, stored.entry
    target = index.url.below(entry.original).prefix
    expected = [(copy.destination, copy.tag) for copy in pending]
    inode = _identity_inode(entry, target, expected)
    pin = RestoredPin(entry.key, entry.original, 0, inode, now + entry.grace_seconds)
    pin_object = pin_key(index.base, entry.key)
    pin_tag = _write_pin(store, pin_object, pin) if entry.grace_seconds > 0 else None
    done: list[tuple[str, str]] = []
    try:
        for copy in pending:
            done.append((copy.destination, store.finish_copy(copy)))
    except StoreError as error:
        _abort_all(store, pending[len(done) + 1 :])
        _delete_quietly(store, list(reversed(done)) + ([(pin_object, pin_tag)] if pin_tag else []))
        if isinstance(error, PreconditionFailedError):
            return f"{entry.original} exists again; it is never overwritten (move it away first)"
        return str(error)
    if done != expected and pin_tag is not None:  # a store whose multipart ETags are not S3's
        pin = RestoredPin(pin.key, pin.original, 0, _identity_inode(entry, target, done), pin.until)
        try:
            store.put_replacing(pin_object, _pin_document(pin), tag=pin_tag)
        except StoreError as error:  # (pinned as it is not, the policy could take it again at once)
            _delete_quietly(store, [*reversed(done), (pin_object, pin_tag)])
            return (
                f"its pin could not be written ({error}); not restored (undone as far as the store let "
                "it), still in the trash"
            )
    copies = [(stored.data_key(index.base, copy.relative), copy.tag) for copy in stored.copies]
    _delete_quietly(store, [*copies, (stored.info_key, stored.info_tag)])
    index.drop(stored)
    return None


def _pin_document(pin: RestoredPin) -> bytes:
    return json.dumps(pin.document(), ensure_ascii=True, allow_nan=False).encode()


def _write_pin(store: ObjectStore, key: str, pin: RestoredPin) -> str:
    try:
        return store.put_new(key, _pin_document(pin))
    except PreconditionFailedError:  # a pin of an earlier restore of this entry that did not finish
        return store.put_replacing(key, _pin_document(pin), tag=store.head(key).tag)
