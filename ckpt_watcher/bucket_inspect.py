"""``inspect`` of objects in a bucket: the same rows as for files, torch imported lazily as always.

An object is first judged by the zip rules through ranged reads of its tail (as a scan does, never
downloading it); only a complete one is then copied, with ``If-Match`` on the listed ETag, into a
private temporary directory (refused when it would not fit in the free space there) and inspected
as a local file (contents.py), then the copy is removed. A URL naming a prefix gives one row per
checkpoint object directly in it, as a directory does; a directory checkpoint (a prefix with a
checkpoint's name) is described by its marker and size.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from ckpt_watcher.bucket import ObjectSource
from ckpt_watcher.bucket_listing import summarize_prefix
from ckpt_watcher.contents import CheckpointContents, inspect_checkpoint, inspect_paths
from ckpt_watcher.integrity import check_zip_archive, judge_directory
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.naming import CHECKPOINT_EXTENSION, Kind, Naming
from ckpt_watcher.object_store import ObjectInfo, ObjectMissingError, ObjectStore, StoreError

logger = structlog.get_logger("ckpt_watcher.bucket_inspect")

# Room left free in the temporary directory after a download (a checkpoint must fit with this to spare).
_SPARE_BYTES = 256 << 20


def inspect_objects(
    locations: Sequence[Path | StorageURL],
    stores: Mapping[tuple[str, str], ObjectStore],
    *,
    unsafe: bool,
    naming: Naming,
) -> list[CheckpointContents]:
    """One result per checkpoint, in the order given (a prefix expanded); failures are their rows."""
    results: list[CheckpointContents] = []
    for location in locations:
        if not isinstance(location, StorageURL):
            results.extend(inspect_paths([location], unsafe=unsafe, naming=naming))
            continue
        store = stores[(location.scheme, location.bucket)]
        for result in _inspect_url(location, store, unsafe=unsafe, naming=naming):
            if result.error is not None:
                logger.error("inspect_failed", path=str(result.path), error=result.error)
            results.append(result)
    return results


def _inspect_url(
    url: StorageURL, store: ObjectStore, *, unsafe: bool, naming: Naming
) -> list[CheckpointContents]:
    try:
        info = store.head(url.prefix) if url.prefix else None
    except ObjectMissingError:
        info = None
    except StoreError as error:
        return [CheckpointContents(path=url.core_path, error=f"cannot read it: {error}")]
    if info is not None:
        return [_inspect_object(url, info, store, unsafe=unsafe, naming=naming)]
    try:
        objects = store.list_prefix(url.prefix)
    except StoreError as error:
        return [CheckpointContents(path=url.core_path, error=f"cannot read it: {error}")]
    if not objects:
        return [CheckpointContents(path=url.core_path, error="cannot read it: no such object or prefix")]
    name = url.prefix.rpartition("/")[2]
    if name and naming.classify(name, directory=True).kind is not Kind.UNKNOWN:
        return [_describe_directory(url, objects)]
    start = len(url.prefix) + 1 if url.prefix else 0
    direct = [
        item for item in objects if "/" not in item.key[start:] and item.key.endswith(CHECKPOINT_EXTENSION)
    ]
    direct.sort(key=lambda item: _order(item.key[start:], naming))
    return [
        _inspect_object(url.below(item.key[start:]), item, store, unsafe=unsafe, naming=naming)
        for item in direct
    ]


def _order(name: str, naming: Naming) -> tuple[int, int, str]:
    parsed = naming.classify(name)
    return ({Kind.STEP: 0, Kind.BEST: 1, Kind.LAST: 2}.get(parsed.kind, 3), parsed.step or 0, name)


def _describe_directory(url: StorageURL, objects: list[ObjectInfo]) -> CheckpointContents:
    """A directory checkpoint: its marker and size (its files are not loaded), as on disk."""
    contents = CheckpointContents(path=url.core_path)
    summary = summarize_prefix([(item.key[len(url.prefix) + 1 :], item) for item in objects])
    name = url.prefix.rpartition("/")[2]
    verdict = judge_directory(
        summary.top_entries, name, summary.newest_mtime_ns, summary.total, quiet_seconds=0.0, now=time.time()
    )
    contents.bytes = verdict.bytes
    contents.layout = verdict.layout
    contents.complete = verdict.completeness.complete and not summary.being_deleted
    contents.integrity = "complete" if contents.complete else (verdict.completeness.reason or "being deleted")
    if not contents.complete:
        contents.error = f"not a complete directory checkpoint: {contents.integrity}"
    else:
        contents.warnings.append(f"a {verdict.layout} directory checkpoint: its files are not loaded")
    return contents


def _inspect_object(
    url: StorageURL, info: ObjectInfo, store: ObjectStore, *, unsafe: bool, naming: Naming
) -> CheckpointContents:
    """Judged by ranged reads; if complete, copied to a temporary file and inspected there."""
    contents = CheckpointContents(path=url.core_path, bytes=info.size)
    try:
        verdict = check_zip_archive(ObjectSource(store, info.key, info), info.size)
    except (StoreError, OSError) as error:
        contents.error = f"cannot read it: {error}"
        return contents
    if not verdict.complete:
        contents.integrity = verdict.reason or "incomplete"
        contents.error = f"not a complete checkpoint: {contents.integrity}"
        return contents
    with tempfile.TemporaryDirectory(prefix="ckpt-watcher-inspect-") as directory:
        free = shutil.disk_usage(directory).free
        if info.size + _SPARE_BYTES > free:
            contents.error = (
                f"cannot read it here: {info.size} bytes to download, {free} free in {directory} "
                "(set TMPDIR to a larger file system)"
            )
            return contents
        copy = Path(directory) / url.prefix.rpartition("/")[2]
        try:
            with copy.open("wb") as destination:
                store.download(info.key, destination, tag=info.tag, limit=info.size)
        except StoreError as error:
            contents.error = f"cannot read it: {error}"
            return contents
        result = inspect_checkpoint(copy, unsafe=unsafe, naming=naming)
    result.path = url.core_path
    if result.error is not None:  # its messages name the object, not the temporary copy
        result.error = result.error.replace(str(copy), url.text)
    result.warnings = [warning.replace(str(copy), url.text) for warning in result.warnings]
    return result
