"""The only module that removes objects from a bucket (delete.py is the only one that removes files).

Each planned deletion is confirmed immediately before it happens: the object must still have the
ETag and size that were planned (a HEAD), and it is deleted with the store's conditional delete
(``If-Match``), so an object replaced in between is kept (``checkpoint_changed``) and planned again.

A directory checkpoint (a prefix) is listed again and must be exactly what was planned. Then a
deletion manifest (``.ckpt-watcher-deleting``: every key with its ETag) is written into it with
``If-None-Match: *``, its writer's **marker object is deleted first** (so from then on it never looks
complete), the prefix listed once more (anything written there since, even with the same bytes,
hence the same ETag, stops it), then everything else in batches (DeleteObjects, 1000 keys a request,
each with its ETag), and the manifest last. A deletion cut short (a failed batch, a crash) is a failure,
never a deletion: the prefix keeps its manifest, so no pass counts or plans it, and the next pass that
finds it (``finish_bucket_leftovers``) lists it again and deletes what the manifest names, but only if
every object there is named by it with its ETag and none was last modified after it: otherwise the
checkpoint was written again (a run rolled back saving the same step), nothing of it is deleted and the
manifest alone is removed (``leftover_called_off``). A manifest the tool did not write is never acted on
(``leftover_not_ours``).

A failure is a FAILED result, logged, and retried on the next pass; the rest of the plan goes on.
Nothing here raises.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from ckpt_watcher.bucket_listing import DELETING_MARKER, Listing, object_identity, summarize_prefix
from ckpt_watcher.delete import (
    DeletionResult,
    LeftoverResult,
    _changed,
    _deleted,
    _failed,
    _gone,
    _unexpected,
)
from ckpt_watcher.integrity import DIRECTORY_MARKERS
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.naming import Kind, Naming
from ckpt_watcher.object_store import (
    ObjectInfo,
    ObjectMissingError,
    ObjectStore,
    PreconditionFailedError,
    StoreError,
)
from ckpt_watcher.plan import Decision, GroupPlan
from ckpt_watcher.records import EntryType, display_name

logger = structlog.get_logger("ckpt_watcher.bucket_delete")

_MANIFEST_LIMIT = 64 << 20  # ~100 bytes a key: 600,000 objects in one directory checkpoint
_REMAINS_SHOWN = 10

MayDelete = Callable[[], "str | None"]
# Instead of a deletion: a move into the bucket's trash (bucket_trash.py), which removes the object
# with this module's ``remove_object`` / ``remove_directory`` once it is copied.
TrashMove = Callable[[Decision, Listing], DeletionResult]
Removed = Callable[[Decision], DeletionResult]
# Asked before the DELETE, just before ``MayDelete``: a result to return instead (the trash's look at
# the pins of restored checkpoints, bucket_trash_moves.py), or None to delete.
LastCheck = Callable[[], "DeletionResult | None"]


def apply_bucket_group(
    group: GroupPlan,
    url: StorageURL,
    store: ObjectStore,
    listing: Listing,
    *,
    stop: threading.Event | None = None,
    may_delete: MayDelete | None = None,
    trash: TrashMove | None = None,
    progress: Callable[[], None] | None = None,
) -> list[DeletionResult]:
    """Delete one group's planned objects, oldest first; ``stop`` ends it between two deletions, and
    ``progress`` is called after each (the daemon's keep-alive).

    ``listing`` (bucket.Listing) is the pass's listing the plan was made from; ``may_delete`` says why
    nothing may be deleted now (the daemon's lease is not held), or None; ``trash`` moves each into
    the trash instead (the group's policy has one).
    """
    results: list[DeletionResult] = []
    for decision in group.deletions:
        if stop is not None and stop.is_set():
            break
        try:
            refusal = may_delete() if may_delete is not None else None
            if refusal is not None:
                results.append(_failed(decision, refusal))
            elif trash is not None:
                results.append(trash(decision, listing))
            elif decision.record.entry_type is EntryType.DIRECTORY:
                results.append(_delete_directory(decision, url, store, listing, may_delete=may_delete))
            else:
                results.append(_delete_object(decision, url, store, listing, may_delete=may_delete))
        except Exception as error:
            results.append(_failed(decision, _unexpected(error)))
        if progress is not None:
            progress()
    return results


def planned_object(decision: Decision, url: StorageURL, listing: Listing) -> ObjectInfo | DeletionResult:
    """The object of the pass's listing a decision names, if it is still what was planned."""
    record = decision.record
    key = url.key_of(record.path)
    planned = listing.object_at(record.path)
    if key is None or planned is None or planned.key != key:
        return _failed(decision, "not an object of the listing the plan was made from; refusing")
    if object_identity(planned) != record.identity:
        return _changed(decision)
    return planned


def _delete_object(
    decision: Decision,
    url: StorageURL,
    store: ObjectStore,
    listing: Listing,
    on_removed: Removed = _deleted,
    *,
    may_delete: MayDelete | None = None,
    last_check: LastCheck | None = None,
) -> DeletionResult:
    """HEAD, then the conditional DELETE. ``may_delete`` is asked again right before the DELETE: a
    watcher frozen (SIGSTOP, a paused VM) while its HEAD was in flight may have lost its lease to
    another watcher meanwhile, and must not act on its stale plan. ``last_check`` just before it (it
    sends requests of its own, during which the lease may lapse too)."""
    planned = planned_object(decision, url, listing)
    if isinstance(planned, DeletionResult):
        return planned
    key = planned.key
    try:
        current = store.head(key)
    except ObjectMissingError:
        return _gone(decision)
    except StoreError as error:
        return _failed(decision, str(error))
    if (current.tag, current.size) != (planned.tag, planned.size):
        return _changed(decision)
    held = last_check() if last_check is not None else None
    if held is not None:
        return held
    refusal = may_delete() if may_delete is not None else None  # (after the check: it sends requests)
    if refusal is not None:
        return _failed(decision, refusal)
    try:
        store.delete(key, tag=planned.tag)
    except PreconditionFailedError:
        return _changed(decision)
    except ObjectMissingError:
        return _gone(decision)
    except StoreError as error:
        return _failed(decision, str(error))
    return on_removed(decision)


remove_object = _delete_object  # the trash's way to remove an object it copied (see TrashMove)


def _delete_directory(
    decision: Decision,
    url: StorageURL,
    store: ObjectStore,
    listing: Listing,
    on_removed: Removed = _deleted,
    *,
    may_delete: MayDelete | None = None,
    last_check: LastCheck | None = None,
) -> DeletionResult:
    """Listed again and compared, the manifest written, the marker deleted first, then the rest;
    ``last_check``, then ``may_delete``, are asked again before the marker goes (as in
    ``_delete_object``)."""
    record = decision.record
    key = url.key_of(record.path)
    if key is None:
        return _failed(decision, "outside the root; refusing")
    prepared = _prepare_directory(decision, key, store)
    if isinstance(prepared, DeletionResult):
        return prepared
    objects, manifest_key, manifest_tag = prepared
    held = last_check() if last_check is not None else None
    if held is not None:
        _remove_quietly(store, manifest_key, manifest_tag)
        return held
    refusal = may_delete() if may_delete is not None else None  # (after the check: it sends requests)
    if refusal is not None:
        _remove_quietly(store, manifest_key, manifest_tag)
        return _failed(decision, refusal)
    markers = [info for info in objects if info.key[len(key) + 1 :] in DIRECTORY_MARKERS]
    rest = [info for info in objects if info not in markers]
    remains = _remove_marker_first(store, markers, rest, lambda: _written_since(store, key, objects))
    if remains is None:  # a marker was rewritten: a writer is at work there; leave it whole
        _remove_quietly(store, manifest_key, manifest_tag)
        return _changed(decision)
    if isinstance(remains, str):  # written again after its marker went: the next pass calls it off
        return _failed(
            decision,
            f"its marker was deleted, then {remains}; nothing more of it deleted (the next pass calls "
            "its deletion off)",
        )
    if remains:
        shown = [display_name(f"{url.scheme}://{url.bucket}/{item}") for item in remains[:_REMAINS_SHOWN]]
        return _failed(
            decision,
            f"removed only in part: {len(remains)} object(s) remain; the rest is removed on a later pass",
            remains=shown,
        )
    try:
        store.delete(manifest_key, tag=manifest_tag)
    except ObjectMissingError:
        pass
    except StoreError as error:
        return _failed(
            decision, f"removed, but its deletion manifest remains: {error}", remains=[manifest_key]
        )
    listing.forget_below(record.path)
    return on_removed(decision)


remove_directory = _delete_directory  # as remove_object, for a directory checkpoint


def _prepare_directory(
    decision: Decision, key: str, store: ObjectStore
) -> DeletionResult | tuple[list[ObjectInfo], str, str]:
    """The directory checkpoint's objects listed again (it must be exactly what was planned) and its
    deletion manifest written: (objects, manifest key, manifest ETag), or the outcome if not."""
    try:
        objects = store.list_prefix(key)
    except StoreError as error:
        return _failed(decision, f"cannot be listed before removal: {error}")
    if not objects:
        return _gone(decision)
    summary = summarize_prefix([(info.key[len(key) + 1 :], info) for info in objects])
    if summary.identity != decision.record.identity or summary.being_deleted:
        return _changed(decision)
    manifest_key = f"{key}/{DELETING_MARKER}"
    manifest = json.dumps({"keys": {info.key: info.tag for info in objects}}).encode()
    try:
        manifest_tag = store.put_new(manifest_key, manifest)
    except PreconditionFailedError:
        return _failed(decision, "another deletion of it is under way")
    except StoreError as error:
        return _failed(decision, f"its deletion manifest cannot be written: {error}")
    return objects, manifest_key, manifest_tag


def _remove_marker_first(
    store: ObjectStore,
    markers: list[ObjectInfo],
    rest: list[ObjectInfo],
    written: Callable[[], str | None] = lambda: None,
) -> list[str] | str | None:
    """Delete the markers (conditionally), then the rest in batches: the keys that remain, None if a
    marker was replaced before any was deleted, or what was written there meanwhile (a marker replaced
    after another was deleted, or what ``written``, asked once the markers are gone, says), nothing
    else deleted then. (A sharded Lightning checkpoint has two markers: one replaced after the first
    went is no "nothing deleted", which would drop a trash move's copy of it.)"""
    remains: list[str] = []
    deleted_one = False
    for info in markers:
        try:
            store.delete(info.key, tag=info.tag)
            deleted_one = True
        except ObjectMissingError:
            continue
        except PreconditionFailedError:
            return f"{display_name(info.key)} was written again" if deleted_one else None
        except StoreError:
            remains.append(info.key)
    if remains:  # the marker is still there: deleting the rest would leave a complete-looking husk
        return remains + [info.key for info in rest]
    meanwhile = written()
    if meanwhile is not None:
        return meanwhile
    failures = store.delete_many((info.key, info.tag) for info in rest)  # each only if not replaced
    return sorted(failures)


def _written_since(store: ObjectStore, key: str, objects: list[ObjectInfo]) -> str | None:
    """What was written under ``key`` since ``objects`` (and the deletion manifest after them) were
    listed, asked once its marker is gone, right before the rest is deleted: the DeleteObjects batches
    name each ETag, but a shard written again with the same bytes has the same ETag (a digest, not a
    version), so only its last-modified time tells it apart. None if nothing was."""
    manifest_key = f"{key}/{DELETING_MARKER}"
    try:
        fresh = store.list_prefix(key)
    except StoreError as error:
        return f"it could not be listed again ({error})"
    manifest = next((info for info in fresh if info.key == manifest_key), None)
    if manifest is None:
        return "its deletion manifest vanished"
    named = {info.key: info.tag for info in objects}
    return leftover_kept(key, manifest, named, [info for info in fresh if info.key != manifest_key])


def _remove_quietly(store: ObjectStore, key: str, tag: str) -> None:
    try:
        store.delete(key, tag=tag)
    except StoreError:
        logger.warning(
            "leftover_not_removed",
            path=key,
            detail="a deletion manifest of a directory checkpoint left in place; removed on a later pass",
        )


def finish_bucket_leftovers(
    directory: Path,
    url: StorageURL,
    store: ObjectStore,
    listing: Listing,
    reported: set[tuple[int, int]] | None,
    *,
    naming_for: Callable[[Path], Naming],
) -> list[LeftoverResult]:
    """Finish the deletions of directory checkpoints in ``directory`` that were cut short: each prefix
    holding a deletion manifest. Never raises.

    The tool writes a manifest only into a directory checkpoint it deletes, so one anywhere else (a
    run directory, any directory not named as a checkpoint under ``naming_for(directory)``, asked
    only once a manifest is found) is not its own, and removes nothing: it would have emptied a whole
    run, ``last.ckpt`` and pins included."""
    results: list[LeftoverResult] = []
    for name in sorted(listing.subdirectories.get(directory, ())):
        path = directory / name
        manifest = listing.files.get(path, {}).get(DELETING_MARKER)
        if manifest is None:
            continue
        if naming_for(directory).classify(name, directory=True).kind is Kind.UNKNOWN:
            _not_ours(path, manifest, reported)
            continue
        try:
            result = _finish_one(path, manifest, url, store, listing, reported)
        except Exception as error:
            logger.error(
                "leftover_not_removed",
                path=str(path),
                error=_unexpected(error),
                detail="retried on a later pass",
            )
            continue
        if result is not None:
            results.append(result)
    return results


def _finish_one(
    path: Path,
    manifest: ObjectInfo,
    url: StorageURL,
    store: ObjectStore,
    listing: Listing,
    reported: set[tuple[int, int]] | None,
) -> LeftoverResult | None:
    key = url.key_of(path)
    named = _read_manifest(store, manifest, key) if key is not None else None
    if key is None or named is None:
        _not_ours(path, manifest, reported)
        return None
    try:  # listed again now: this pass's listing may be minutes old, and a writer may be at work there
        present = [info for info in store.list_prefix(key) if info.key != manifest.key]
    except StoreError as error:
        shown: tuple[str, ...] = (f"cannot be listed again: {error}",)
        logger.error(
            "leftover_not_removed", path=str(path), remains=list(shown), detail="retried on a later pass"
        )
        return LeftoverResult(path, False, shown)
    why = leftover_kept(key, manifest, named, present)
    if why is not None:
        _call_off(path, manifest, store, why)
        return None
    removed = _remove_marker_first(store, [], present)  # no marker: leftover_kept keeps one
    remains = removed if isinstance(removed, list) else []
    if not remains:
        try:
            store.delete(manifest.key, tag=manifest.tag)
        except ObjectMissingError:
            pass
        except StoreError as error:
            remains.append(f"{manifest.key} ({error})")
    shown = tuple(display_name(item) for item in remains[:_REMAINS_SHOWN])
    if remains:
        logger.error(
            "leftover_not_removed", path=str(path), remains=list(shown), detail="retried on a later pass"
        )
        return LeftoverResult(path, False, shown)
    listing.forget_below(path)
    logger.info("leftover_removed", path=str(path))
    return LeftoverResult(path, True)


def leftover_kept(
    key: str, manifest: ObjectInfo, named: dict[str, str], present: list[ObjectInfo]
) -> str | None:
    """Why nothing of a leftover (the objects ``present`` under ``key`` beside its ``manifest``, which
    names ``named``) may be deleted, or None if all of it may.

    An ETag is a digest of the bytes, not a version: a shard written again with the same bytes has the
    same one. So an object the manifest does not name (with that ETag), or one last modified after the
    manifest was written, means the checkpoint was written again since its deletion began (a run rolled
    back, saving the same step): a writer may be at work there, and nothing of it is deleted."""
    written = sorted(
        info.key for info in present if named.get(info.key) != info.tag or info.mtime_ns > manifest.mtime_ns
    )
    if written:
        return (
            f"{len(written)} object(s) in it not named by its deletion manifest or written after it "
            f"(first: {display_name(written[0])}): a writer may be at work there"
        )
    if any(info.key[len(key) + 1 :] in DIRECTORY_MARKERS for info in present):
        return "its marker, which a deletion deletes before anything else, is still there"
    return None


def _call_off(path: Path, manifest: ObjectInfo, store: ObjectStore, why: str) -> None:
    """A leftover nothing of which is deleted (``why``: leftover_kept): a deletion that never began (cut
    right after its manifest was written), a checkpoint written again since, or a manifest copied or
    planted there. The manifest alone is removed, and the next pass plans the checkpoint as any other
    (pins, last.ckpt and all; without its marker it is never complete, so never deleted)."""
    try:
        store.delete(manifest.key, tag=manifest.tag)
    except (ObjectMissingError, PreconditionFailedError):
        return  # gone, or written again meanwhile: the next pass looks again
    except StoreError as error:
        remains = [display_name(f"{manifest.key} ({error})")]  # as _finish_one reports a manifest left
        logger.error(
            "leftover_not_removed", path=str(path), remains=remains, detail="retried on a later pass"
        )
        return
    logger.warning(
        "leftover_called_off",
        path=str(path),
        detail=f"{why}: nothing of it is deleted now; its deletion manifest alone is removed, and the "
        "checkpoint is planned again as any other",
    )


def _not_ours(path: Path, manifest: ObjectInfo, reported: set[tuple[int, int]] | None) -> None:
    """Log, once per manifest object, a deletion manifest this tool did not write: never acted on."""
    identity = object_identity(manifest)
    if reported is None or (identity.device, identity.inode) not in reported:
        logger.warning(
            "leftover_not_ours",
            path=str(path),
            detail="holds a deletion manifest this tool did not write (or cannot read); never removed",
        )
        if reported is not None:
            reported.add((identity.device, identity.inode))


def _read_manifest(store: ObjectStore, manifest: ObjectInfo, key: str) -> dict[str, str] | None:
    """The keys and ETags a deletion manifest names, if it is one this tool wrote for this prefix."""
    try:
        fetched = store.fetch(manifest.key, limit=_MANIFEST_LIMIT)
        document = json.loads(fetched.data)
    except (StoreError, ValueError):
        return None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, dict) or fetched.info.tag != manifest.tag:
        return None
    if not all(isinstance(name, str) and isinstance(tag, str) for name, tag in keys.items()):
        return None
    if not all(name.startswith(f"{key}/") for name in keys):
        return None
    return keys
