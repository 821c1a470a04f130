"""A prefix in an object store as a checkpoint root: the bucket side of the storage seam (storage.py).

**Listing is the observer.** A pass lists the whole prefix once (ListObjectsV2, 1000 keys a request)
and works from that snapshot: the groups are its "directories", a group's records are its objects.
The listing is all or nothing: a failure on any page raises ``StorageUnavailableError`` before a
single group is planned, so a partial listing (which could hide a ``.keep`` pin, the newest
checkpoints or a per-run policy) never leads to a deletion.

**Completeness.** An object exists only once its upload completed (a PUT or a multipart upload's
completion is atomic), so a checkpoint object is complete iff its zip archive is whole: the same
rules as on disk (integrity.check_zip_archive), read with ranged GETs of the object's tail (and its
first bytes), never the whole object; every read names the listed ETag (``If-Match``), so the bytes
judged are the object's that was listed. No settle time applies to objects. The verdict is kept by
(ETag, size, mtime) in the group's cache, so an unchanged object is never read again: a pass over an
unchanged prefix costs its list requests only. A directory checkpoint (a prefix) counts when its
writer's marker object is in it and nothing under it changed for the quiet time, as on disk
(integrity.judge_directory); a Hugging Face one's ``trainer_state.json`` must be whole JSON too, and
names the best checkpoint (bucket_trainer_state.py: read once per ETag, kept across passes).

Objects have no symlinks, so ``last.ckpt`` is an object like any other (rule 5 and the pending-save
protection apply as on disk). An object whose key a path cannot name exactly (``run//x.ckpt``) is
never touched. The lease object (lease.py) and the trash prefix are not checkpoints and are skipped
(the trash's objects are kept aside in the listing for bucket_trash_pass.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ckpt_watcher.bucket_delete import apply_bucket_group, finish_bucket_leftovers
from ckpt_watcher.bucket_listing import (
    DirectorySummary,
    Listing,
    has_key_under,
    object_identity,
    odd_key,
    summarize_prefix,
)
from ckpt_watcher.bucket_nested import LeaseGuard
from ckpt_watcher.bucket_trainer_state import TrainerStates
from ckpt_watcher.bucket_trash_moves import BucketTrashTarget
from ckpt_watcher.config_access import LOCAL_FILES, UnreachableError
from ckpt_watcher.config_files import MAXIMUM_CONFIG_BYTES, ConfigFileError
from ckpt_watcher.delete import DeletionResult, LeftoverResult, TrashMover, _failed
from ckpt_watcher.integrity import Completeness, check_zip_archive, judge_directory
from ckpt_watcher.links import Link
from ckpt_watcher.locations import StorageURL, is_core_path_of_url, storage_url_of
from ckpt_watcher.naming import Kind, Naming, ParsedName
from ckpt_watcher.object_store import (
    BackendMissingError,
    ObjectInfo,
    ObjectMissingError,
    ObjectStore,
    PreconditionFailedError,
    RangeRead,
    StoreError,
    open_store,
)
from ckpt_watcher.plan import GroupPlan
from ckpt_watcher.protection import FileKey
from ckpt_watcher.records import (
    DELETING_PREFIX,
    CheckpointRecord,
    EntryType,
    FileIdentity,
    display_name,
    name_fields,
)
from ckpt_watcher.scan import (
    TEMPORARY_SUFFIXES,
    CompletenessCache,
    NamingLookup,
    ScanOptions,
    ScanProblem,
    ScanStopped,
    marker_verdict,
    markers_beside,
)
from ckpt_watcher.storage import StorageUnavailableError

logger = structlog.get_logger("ckpt_watcher.bucket")

_TAIL_BLOCK = 256 * 1024  # one GET of the tail holds the central directory of ~2,500 tensors
_HEAD_BLOCK = 4096
_READ_AHEAD = 8 * 1024 * 1024  # verify: crc reads an object sequentially, 8 MiB a request
_PREFETCH_BATCH = 64  # objects whose first reads are made at once (at most 64 x 260 KiB held)
# A config object outside the root is looked at again (a HEAD) at most this often.
CONFIG_RECHECK_SECONDS = 30.0


class ObjectSource:
    """The bytes of one listed object, for the zip rules: ranged GETs with If-Match, the tail first."""

    def __init__(
        self, store: ObjectStore, key: str, info: ObjectInfo, blocks: list[tuple[int, bytes]] | None = None
    ) -> None:
        self._store = store
        self._key = key
        self._info = info
        self._blocks: list[tuple[int, bytes]] = blocks or []  # (offset, bytes) already read

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end), from a block already fetched if it can."""
        length = min(length, self._info.size - offset)
        if length <= 0:
            return b""
        for start, data in self._blocks:
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start : offset - start + length]
        size = self._info.size
        if offset >= size - _TAIL_BLOCK:  # the end records and (usually) the central directory
            start, end = max(0, size - _TAIL_BLOCK), size
        else:  # the first bytes, or a sequential read (verify: crc) in large requests
            wanted = _READ_AHEAD if length >= _HEAD_BLOCK else _HEAD_BLOCK
            start, end = offset, min(size, offset + max(length, wanted))
        data = self._store.read_range(self._key, start, end - start, tag=self._info.tag)
        if len(data) != end - start:
            raise OSError(f"a ranged read returned {len(data)} bytes, not {end - start}")
        self._blocks = [*self._blocks[-1:], (start, data)]  # at most two blocks held
        return data[offset - start : offset - start + length]


class BucketStorage:
    """The storage of a bucket root (see the module's docstring). ``may_delete`` says why deleting is
    not allowed right now (the daemon's lease is not held), or None when it is."""

    def __init__(
        self,
        url: StorageURL,
        store: ObjectStore,
        *,
        may_delete: Callable[[], str | None] | None = None,
    ) -> None:
        self.url = url
        self.store = store
        self.root = url.core_path
        self.listing: Listing | None = None
        self._stale = True
        self._uploads: set[str] | None = None
        self._sorted_uploads: list[str] | None = None  # the same keys, sorted: for upload_under
        self._may_delete = may_delete
        self._unnamable_reported: set[str] = set()
        self._leases = LeaseGuard(url, store)
        # kept across passes: a pass over an unchanged prefix reads no trainer_state.json again
        self.trainer_states = TrainerStates(store)

    def begin_pass(self) -> None:
        """The next request for the listing lists the prefix again (and the sub-prefixes' leases)."""
        self._stale = True
        self._leases.begin_pass()
        self._uploads = None
        self._sorted_uploads = None

    def uploads_in_progress(self) -> set[str]:
        """The keys under the prefix that an unfinished multipart upload is writing, asked once per pass
        and only when a directory checkpoint would count as complete (StorageUnavailableError if the
        store cannot say: nothing is deleted on a guess)."""
        if self._uploads is None:
            try:
                self._uploads = self.store.uploads_in_progress(self.url.prefix)
            except StoreError as error:
                raise StorageUnavailableError(str(error)) from None
        return self._uploads

    def upload_under(self, key: str) -> bool:
        """True if an unfinished multipart upload writes an object below ``key`` (a directory
        checkpoint's key): a binary search of this pass's sorted upload keys, not a walk over all of
        them for each directory (a prefix can hold many abandoned uploads)."""
        if self._sorted_uploads is None:
            self._sorted_uploads = sorted(self.uploads_in_progress())
        return has_key_under(self._sorted_uploads, key)

    def current_listing(self) -> Listing:
        """This pass's listing (listed now if this pass has none yet); StorageUnavailableError if the
        prefix cannot be listed whole."""
        if self.listing is None or self._stale:
            try:
                objects = self.store.list_prefix(self.url.prefix)
            except StoreError as error:
                raise StorageUnavailableError(str(error)) from None
            self.listing = Listing.of(self.url, objects)
            self._stale = False
            self.trainer_states.forget_unlisted(self.listing)
        return self.listing

    def walk_directories(
        self, root: Path, naming: NamingLookup, problems: list[ScanProblem]
    ) -> Iterator[Path]:
        """The root and every directory below it that is not a checkpoint, depth first."""
        listing = self.current_listing()
        for key in listing.unnamable:
            if key not in self._unnamable_reported:
                self._unnamable_reported.add(key)
                problems.append(
                    ScanProblem(
                        self.root,
                        f"{self.url.scheme}://{self.url.bucket}/{key}: a key that no path names exactly "
                        "(an empty, '.' or '..' component); never touched",
                    )
                )
        pending = [root]
        while pending:
            directory = pending.pop()
            yield directory
            classify = naming(directory).classify
            children = [
                directory / name
                for name in listing.subdirectories.get(directory, ())
                if not name.startswith(DELETING_PREFIX)
                and classify(name, directory=True).kind is Kind.UNKNOWN
                and name not in listing.files.get(directory, {})
            ]
            pending.extend(sorted(children, reverse=True))

    def is_group(self, directory: Path) -> bool:
        """A directory of this pass's listing."""
        return self.current_listing().is_directory(directory)

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
        """One record per object of the directory, and one per directory checkpoint in it;
        ``progress`` is called between two batches of reads."""
        listing = self.current_listing()
        files = listing.files.get(directory, {})
        subdirectories = listing.subdirectories.get(directory, set())
        scan = _GroupScan(self, listing, directory, naming, options, cache, problems)
        scan.markers = markers_beside([*files, *subdirectories])
        records: list[CheckpointRecord] = []
        objects = [(name, info) for name, info in files.items() if not name.startswith(DELETING_PREFIX)]
        for start in range(0, len(objects), _PREFETCH_BATCH):
            batch = objects[start : start + _PREFETCH_BATCH]
            if progress is not None:
                progress()
            scan.prefetch(batch)
            for name, info in batch:
                if stop is not None and stop.is_set():
                    raise ScanStopped(str(directory))
                records.append(scan.object_record(name, info, clashes=name in subdirectories))
        for name in sorted(subdirectories):
            if name in files or name.startswith(DELETING_PREFIX):
                continue  # a name that is an object too: the object's record says so
            parsed = naming.classify(name, directory=True)
            if parsed.kind is not Kind.UNKNOWN:
                records.append(scan.directory_record(name, parsed))
        return records

    def list_links(self, directory: Path, root: Path, naming: Naming) -> list[Link] | None:
        """A bucket has no symlinks."""
        return []

    def refusal(self) -> str | None:
        """Why nothing may be deleted now (the daemon's lease is not held), or None."""
        return self._may_delete() if self._may_delete is not None else None

    def apply_group(
        self,
        group: GroupPlan,
        root: Path,
        *,
        stop: threading.Event | None = None,
        trash: TrashMover | None = None,
        progress: Callable[[], None] | None = None,
    ) -> list[DeletionResult]:
        """bucket_delete.apply_bucket_group, against this pass's listing; ``trash`` (the bucket's
        trash, bucket_trash_moves.BucketTrashTarget) copies each deletion into the trash first."""
        if trash is not None and not isinstance(trash, BucketTrashTarget):  # never handed one: refused
            refused = "not a bucket's trash; nothing deleted"
            return [_failed(decision, refused) for decision in group.deletions]
        return apply_bucket_group(
            group,
            self.url,
            self.store,
            self.current_listing(),
            stop=stop,
            may_delete=self._may_delete,
            trash=trash,
            progress=progress,
        )

    def finish_leftovers(
        self,
        root: Path,
        directory: Path,
        *,
        naming_for: NamingLookup,
        reported: set[tuple[int, int]] | None = None,
        stop: threading.Event | None = None,
    ) -> list[LeftoverResult]:
        """bucket_delete.finish_bucket_leftovers (directory checkpoints whose deletion was cut short;
        ``naming_for`` says which subdirectories of ``directory`` are checkpoints). ``stop`` is not
        looked at: the reconcile core looks at it between two directories."""
        del stop
        refusal = self.refusal()
        if refusal is not None or self.kept_whole(root, directory):
            return []
        listing = self.current_listing()
        return finish_bucket_leftovers(
            directory, self.url, self.store, listing, reported, naming_for=naming_for
        )

    def identities_of(self, pins: Mapping[Path, str]) -> dict[FileKey, str]:
        """Objects are pinned by path (their key) only."""
        return {}

    def kept_whole(self, root: Path, group: Path) -> dict[Path, str]:
        """A sub-prefix another watcher holds the lease of is kept whole (bucket_nested.LeaseGuard);
        a prefix is never shown twice, nor mounted."""
        return self._leases.kept_whole(self.current_listing(), root, group)


@dataclass
class _GroupScan:
    """One directory of a listing being scanned: what every record needs."""

    storage: BucketStorage
    listing: Listing
    directory: Path
    naming: Naming
    options: ScanOptions
    cache: CompletenessCache | None
    problems: list[ScanProblem]
    markers: dict[str, str] = field(default_factory=dict)
    prefetched: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)

    def prefetch(self, objects: list[tuple[str, ObjectInfo]]) -> None:
        """Read at once the first blocks (the tail; and the head of a large object) of the objects a
        verdict will need, so a new group's objects are not read one round trip after another."""
        self.prefetched = {}
        reads: list[RangeRead] = []
        for name, info in objects:
            if not self._needs_reading(name, info):
                continue
            tail_start = max(0, info.size - _TAIL_BLOCK)
            reads.append(RangeRead(info.key, tail_start, info.size - tail_start, info.tag))
            if tail_start > 0:
                reads.append(RangeRead(info.key, 0, min(_HEAD_BLOCK, tail_start), info.tag))
        for read, data in zip(reads, self.storage.store.read_ranges(reads), strict=True):
            if isinstance(data, bytes) and len(data) == read.length:
                self.prefetched.setdefault(read.key, []).append((read.offset, data))

    def _needs_reading(self, name: str, info: ObjectInfo) -> bool:
        """True for a checkpoint object whose verdict is neither known nor settled by its name."""
        if info.size == 0 or name.endswith(TEMPORARY_SUFFIXES) or self.options.verify == "load":
            return False
        if marker_verdict(name, self.markers) is not None:
            return False
        if self.naming.classify(name).kind is Kind.UNKNOWN:
            return False
        return self.cache is None or self.cache.get(object_identity(info), self.options.verify) is None

    def _relative(self, name: str) -> str:
        relative_directory = str(self.directory)[len(str(self.storage.root)) + 1 :]
        return f"{relative_directory}/{name}" if relative_directory else name

    def object_record(self, name: str, info: ObjectInfo, *, clashes: bool) -> CheckpointRecord:
        """The record of one object (a checkpoint's completeness judged, see ``_completeness``)."""
        parsed = self.naming.classify(name)
        path = self.directory / name
        identity = object_identity(info)
        note = parsed.note
        if clashes:
            parsed = dataclasses.replace(parsed, kind=Kind.UNKNOWN)
            note = "an object and a prefix of the same name; never touched"
        if parsed.kind is Kind.UNKNOWN:
            completeness = Completeness(False, None)
        else:
            completeness = self._completeness(name, path, info, identity, parsed.kind)
        return CheckpointRecord.at(
            path,
            relative_path=self._relative(name),
            entry_type=EntryType.FILE,
            bytes=info.size,
            identity=identity,
            complete=completeness.complete,
            incomplete_reason=completeness.reason,
            note=note
            or ("not a zip archive" if completeness.not_zip else None)
            or ("corrupt: it does not load" if completeness.corrupt else None),
            settles_at=completeness.settles_at,
            **name_fields(parsed),
        )

    def _completeness(
        self, name: str, path: Path, info: ObjectInfo, identity: FileIdentity, kind: Kind
    ) -> Completeness:
        """As scan.py judges a file, less what objects cannot have (holes, a writer still at it)."""
        if name.endswith(TEMPORARY_SUFFIXES):
            return Completeness(False, "temporary file name", transient=True)
        marked = marker_verdict(name, self.markers)
        if marked is not None:
            return marked
        verify = self.options.verify
        cache = self.cache
        if cache is not None:
            cached = cache.recall(path, identity, kind, verify)
            if cached is not None:
                return cached
        verdict = self._read_verdict(path, info, verify)
        if cache is not None:
            cache.store(identity, verify, verdict)
            if verdict.complete:
                cache.counted(path, identity)
        return verdict

    def _read_verdict(self, path: Path, info: ObjectInfo, verify: str) -> Completeness:
        if verify == "load":
            return Completeness(
                False,
                "verify: load needs the file on local disk; on a bucket use zip or crc",
                transient=True,
            )
        source = ObjectSource(self.storage.store, info.key, info, self.prefetched.pop(info.key, None))
        try:
            return check_zip_archive(source, info.size, verify=verify)
        except PreconditionFailedError:
            return Completeness(False, "replaced while being checked; judged again", transient=True)
        except ObjectMissingError:
            return Completeness(False, "vanished while being checked", transient=True)
        except (StoreError, OSError) as error:
            self.problems.append(ScanProblem(path, f"cannot be read: {error}"))
            return Completeness(False, f"cannot be read: {error}", transient=True)

    def _still_uploading(self, path: Path) -> bool:
        """True if a multipart upload is writing an object under the directory checkpoint ``path``: its
        shard is not listed until complete, and its marker (DeepSpeed's rank 0 writes ``latest``
        first) and quiet time would count it complete."""
        key = self.storage.url.key_of(path)
        return key is not None and self.storage.upload_under(key)

    def directory_record(self, name: str, parsed: ParsedName) -> CheckpointRecord:
        """The record of a directory checkpoint: a prefix judged by its marker and its quiet time."""
        path = self.directory / name
        key = self.storage.url.key_of(path) or ""
        # every key below it, as its deletion lists them again: folder markers and odd keys too
        objects = [(info.key[len(key) + 1 :], info) for info in self.listing.objects_under(key)]
        summary = summarize_prefix(objects)
        now = self.options.now if self.options.now is not None else time.time()
        odd = odd_key(objects)
        names_best: str | None = None
        if summary.being_deleted:
            completeness = Completeness(
                False, "being deleted (a deletion was cut short; the next pass finishes it)", transient=True
            )
        elif odd is not None:
            shown = display_name(f"{self.storage.url.scheme}://{self.storage.url.bucket}/{odd}")
            completeness = Completeness(
                False,
                f"holds a key no path names exactly ({shown}); kept whole",
                transient=True,
            )
        else:
            completeness, names_best = self._directory_completeness(name, path, summary, now)
        return CheckpointRecord.at(
            path,
            relative_path=self._relative(name),
            entry_type=EntryType.DIRECTORY,
            bytes=summary.total,
            identity=summary.identity,
            complete=completeness.complete,
            incomplete_reason=completeness.reason,
            note=parsed.note or (completeness.reason if completeness.suspicious else None),
            settles_at=completeness.settles_at,
            names_best=names_best,
            **name_fields(parsed),
        )

    def _directory_completeness(
        self, name: str, path: Path, summary: DirectorySummary, now: float
    ) -> tuple[Completeness, str | None]:
        """A directory checkpoint's verdict from the listing (its marker and quiet time, as on disk; no
        multipart upload under it), then from its trainer_state.json (Hugging Face), and the checkpoint
        that one calls the best."""
        quiet = self.options.directory_quiet
        verdict = judge_directory(
            summary.top_entries, name, summary.newest_mtime_ns, summary.total, quiet_seconds=quiet, now=now
        )
        completeness = verdict.completeness
        if self.cache is not None:  # the daemon: quiet by its own clock too (the store's may be behind)
            identity = summary.identity  # (its inode is a digest of every key and ETag under it)
            signature = (identity.inode, identity.size, identity.mtime_ns)
            completeness = self.cache.seen_unchanged().judge(
                name, signature, completeness, quiet_seconds=quiet, now=now
            )
        completeness = marker_verdict(name, self.markers) or completeness
        if not completeness.complete:
            return completeness, None
        if self._still_uploading(path):
            reason = "a multipart upload in progress under it (still being written)"
            return Completeness(False, reason, transient=True), None
        return self.storage.trainer_states.judge(path, verdict.layout, self.listing, self.problems)


class BucketConfigFiles:
    """Config files for a bucket root: objects (a per-run ``.ckpt-watcher.yaml``, a ``protect_from``
    config named by a URL) read from their store, within config_files' limits; local files as always.

    An object under the root is known from the pass's listing (no request); one elsewhere is looked at
    with a HEAD at most every ``CONFIG_RECHECK_SECONDS``.
    """

    def __init__(self, storage: BucketStorage) -> None:
        self.storage = storage
        self._stores: dict[tuple[str, str], ObjectStore] = {
            (storage.url.scheme, storage.url.bucket): storage.store
        }
        self._heads: dict[Path, tuple[float, ObjectInfo | None]] = {}

    def _store_for(self, url: StorageURL) -> ObjectStore:
        key = (url.scheme, url.bucket)
        if key not in self._stores:
            self._stores[key] = open_store(url)
        return self._stores[key]

    def _info(self, path: Path) -> ObjectInfo | None:
        listing = self.storage.listing
        if listing is not None and self.storage.url.key_of(path) is not None:
            return listing.object_at(path)
        url = storage_url_of(path)
        if url is None:
            return None
        now = time.monotonic()
        known = self._heads.get(path)
        if known is not None and now - known[0] < CONFIG_RECHECK_SECONDS:
            return known[1]
        try:
            info: ObjectInfo | None = self._store_for(url).head(url.prefix)
        except (StoreError, BackendMissingError):  # (``exists`` says which it was)
            info = None
        self._heads[path] = (now, info)
        return info

    def identity(self, path: Path) -> FileIdentity | None:
        """From the listing, or a HEAD (objects); os.stat (files)."""
        if not is_core_path_of_url(path):
            return LOCAL_FILES.identity(path)
        info = self._info(path)
        return object_identity(info) if info is not None else None

    def entry_identity(self, path: Path) -> FileIdentity | None:
        """Objects have no links: ``identity``."""
        if not is_core_path_of_url(path):
            return LOCAL_FILES.entry_identity(path)
        return self.identity(path)

    def read_text(self, path: Path, *, confined_to: Sequence[Path] = ()) -> str:
        """An object's text, at most config_files' limit; a local file's as always."""
        url = storage_url_of(path)
        if url is None:
            return LOCAL_FILES.read_text(path, confined_to=confined_to)
        if confined_to and not any(path == place or place in path.parents for place in confined_to):
            raise ConfigFileError("lies outside the directories this file may be read from")
        try:
            fetched = self._store_for(url).fetch(url.prefix, limit=MAXIMUM_CONFIG_BYTES)
        except BackendMissingError as error:  # not read until it is installed: in doubt, keep
            raise ConfigFileError(f"cannot be read: {_backend_missing(url, error)}") from None
        except ObjectMissingError:
            raise ConfigFileError("no such file", missing=True) from None
        except StoreError as error:
            raise ConfigFileError(f"cannot be read: {error}", transient=True) from None
        self._heads.pop(path, None)
        try:
            return fetched.data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigFileError(f"not UTF-8 text ({error.reason})") from None

    def real_path(self, path: Path) -> Path:
        """An object's path is its own (no symlinks)."""
        return path if is_core_path_of_url(path) else LOCAL_FILES.real_path(path)

    def exists(self, path: Path) -> bool:
        """Listed, or answered by a HEAD (objects); Path.exists (files). UnreachableError for an
        object whose store's backend is not installed (it cannot be looked at, whatever is there)."""
        if not is_core_path_of_url(path):
            return LOCAL_FILES.exists(path)
        listing = self.storage.listing
        if listing is not None and listing.is_directory(path):
            return True  # a directory checkpoint
        if self._info(path) is not None:
            return True
        url = storage_url_of(path)
        if url is not None:
            try:
                self._store_for(url)
            except BackendMissingError as error:
                raise UnreachableError(_backend_missing(url, error)) from None
        return False

    def is_directory(self, path: Path) -> bool:
        """A directory of the listing (objects lie below it)."""
        if not is_core_path_of_url(path):
            return LOCAL_FILES.is_directory(path)
        listing = self.storage.listing
        return listing is not None and listing.is_directory(path)


def _backend_missing(url: StorageURL, error: BackendMissingError) -> str:
    """``gs:// needs fsspec and gcsfs, ...: pip install ...``, for a message that names the URL already."""
    return str(error).removeprefix(f"{url.text}: ")
