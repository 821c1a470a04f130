"""``prune URL``, ``watch URL`` and ``inspect URL...``: the commands on a bucket prefix.

Imported by cli.py only for a URL, so fsspec and the backend are imported only then. A missing
backend is a usage error naming the extra to install (exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import structlog

from ckpt_watcher.bucket import BucketConfigFiles, BucketStorage
from ckpt_watcher.bucket_trash import BucketTrashIndex
from ckpt_watcher.bucket_trash_moves import purge_stored, restore_stored
from ckpt_watcher.bucket_trash_pass import BucketTrashPass
from ckpt_watcher.cli import UsageError
from ckpt_watcher.config_access import UnreachableError
from ckpt_watcher.contents import CheckpointContents
from ckpt_watcher.lease import LeaseHeldError, refuse_if_held
from ckpt_watcher.locations import StorageURL, shown_as_url
from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.naming import Naming
from ckpt_watcher.object_store import (
    BackendMissingError,
    BucketMissingError,
    ObjectStore,
    StoreError,
    open_store,
)
from ckpt_watcher.policy import LoadedPolicy, Policy, PolicyCheck
from ckpt_watcher.reconcile import PassResult, prune_once
from ckpt_watcher.report import render_json, render_trash_table, trash_list_document
from ckpt_watcher.trash import TrashListing
from ckpt_watcher.trash_moves import PurgeResult, RestoreResult, select_entries

logger = structlog.get_logger("ckpt_watcher.bucket_commands")


def store_for(url: StorageURL) -> ObjectStore:
    """The store of ``url``; a missing backend is a UsageError naming the extra (exit 2)."""
    try:
        return open_store(url)
    except BackendMissingError as error:
        raise UsageError(str(error)) from None


def refused_on_a_bucket(policy: Policy, *, copies: bool = False) -> list[str]:
    """What a policy asks that a bucket cannot give, as ``At 'key': ...`` problems (none: it runs).
    ``copies``: the store makes conditional server-side copies (S3), which a trash needs."""
    problems = []
    if policy.verify == "load":
        problems.append(
            "At 'verify': 'load' reads each checkpoint with torch from local disk; on a bucket use "
            "'zip' or 'crc'"
        )
    if policy.keep_free is not None:
        problems.append(
            "At 'keep_free': a bucket has no free space to keep (it has no disk that fills); use "
            "max_size to bound what a run keeps"
        )
    if policy.trash.enabled and not copies:
        problems.append(
            "At 'trash': the trash on a bucket needs conditional server-side copies (S3 and "
            "S3-compatible stores), which this store does not offer here; remove the key, or keep "
            "deleted checkpoints with the bucket's own versioning"
        )
    return problems


def refusals_in_runs(store: ObjectStore) -> Callable[[LoadedPolicy], list[str]]:
    """What a per-run ``.ckpt-watcher.yaml`` object may not ask for on ``store``'s bucket: the same as
    the root policy. Such a file is an invalid per-run policy: ``prune`` exits 2, the daemon blocks its
    group (``group_blocked``) until it is fixed; never silently ignored."""
    copies = store.conditional_writes

    def refused(loaded: LoadedPolicy) -> list[str]:
        return refused_on_a_bucket(loaded.policy, copies=copies)

    return refused


def refusals_when_invalid(url: StorageURL) -> PolicyCheck:
    """What ``url``'s bucket refuses of a root policy refused for other problems too, so that one
    message lists them all (nothing if the backend is missing: that is said once the policy is fixed)."""

    def refused(partial: LoadedPolicy) -> list[str]:
        try:
            store = open_store(url)
        except BackendMissingError:
            return []
        return refused_on_a_bucket(partial.policy, copies=store.conditional_writes)

    return refused


def check_policy(loaded: LoadedPolicy, store: ObjectStore) -> None:
    """Refuse, before anything is read, a policy whose keys have no meaning on a bucket."""
    problems = refused_on_a_bucket(loaded.policy, copies=store.conditional_writes)
    if problems:
        raise UsageError(f"invalid policy {loaded.source_label} for a bucket:\n  " + "\n  ".join(problems))


def bucket_pins(protect: Iterable[Path | StorageURL], files: BucketConfigFiles) -> dict[Path, str]:
    """``--protect`` pins: each a URL naming an object (its core path). A local path is a UsageError
    (exit 2): it can never name an object under a URL root, so the checkpoint meant would be deleted."""
    root = files.storage.url
    pins: dict[Path, str] = {}
    for item in protect:
        if not isinstance(item, StorageURL):
            raise UsageError(
                f"--protect {item}: under {root.text} give the object's URL "
                f"({root.scheme}://{root.bucket}/...), not a local path, which names no object there"
            )
        path = item.core_path
        try:
            there = files.exists(path)
        except UnreachableError as error:  # gs:// without gcsfs, say: as for the root, exit 2
            raise UsageError(f"--protect {item.text}: {error}") from None
        if not there:
            logger.warning(
                "protected_path_missing", path=item.text, detail="--protect names no existing object"
            )
        pins.setdefault(path, f"protected by --protect {item.text}")
    return pins


def _refuse_beside_a_watcher(store: ObjectStore, url: StorageURL) -> None:
    """A ``prune`` that deletes does not run where a watcher holds the lease: it would apply its own
    policy beside the watcher's (exit 2; ``--dry-run`` runs beside it). A missing bucket is left to
    the pass, which says so; a lease that cannot be read is a doubt, so nothing is deleted."""
    try:
        refuse_if_held(store, url)
    except LeaseHeldError as error:
        raise UsageError(f"{error}: stop it before a prune that deletes (--dry-run runs beside it)") from None
    except BucketMissingError:
        return
    except StoreError as error:
        raise UsageError(
            f"{url.text}: cannot read the lease to tell whether a watcher prunes here ({error}); "
            "nothing was deleted"
        ) from None


def prune_bucket(arguments: argparse.Namespace, loaded: LoadedPolicy) -> PassResult:
    """``prune URL``: one strict pass over the prefix (``prune_once`` with the bucket's storage)."""
    url: StorageURL = arguments.path
    store = store_for(url)
    check_policy(loaded, store)
    if not arguments.dry_run:
        _refuse_beside_a_watcher(store, url)
    storage = BucketStorage(url, store)
    files = BucketConfigFiles(storage)
    return prune_once(
        url.core_path,
        loaded,
        pins=bucket_pins(arguments.protect, files),
        settle_seconds=arguments.settle,
        dry_run=arguments.dry_run,
        working_directory=Path.cwd(),
        storage=storage,
        files=files,
        refuse_in_runs=refusals_in_runs(store),
        trash=lambda: BucketTrashPass(storage),
    )


def watch_bucket(arguments: argparse.Namespace, loaded: LoadedPolicy, figures: DaemonFigures) -> int:
    """``watch URL``: see bucket_watch.py (``figures``: what ``--metrics`` serves)."""
    from ckpt_watcher.bucket_watch import run_bucket_watch  # noqa: PLC0415  (watchdog: watch only)

    store = store_for(arguments.path)
    check_policy(loaded, store)
    return run_bucket_watch(arguments, loaded, store, figures)


def inspect_locations(
    locations: Sequence[Path | StorageURL], *, unsafe: bool, naming: Naming
) -> list[CheckpointContents]:
    """``inspect`` of paths and URLs, in the order given (see bucket_inspect.py)."""
    from ckpt_watcher.bucket_inspect import inspect_objects  # noqa: PLC0415  (torch: inspect only)

    stores: dict[tuple[str, str], ObjectStore] = {}
    for location in locations:
        if isinstance(location, StorageURL) and (location.scheme, location.bucket) not in stores:
            stores[(location.scheme, location.bucket)] = store_for(location)
    return inspect_objects(locations, stores, unsafe=unsafe, naming=naming)


# -- the trash of a bucket root (bucket_trash.py) ---------------------------------------------------------


def _trash_index(url: StorageURL) -> BucketTrashIndex | str:
    """The trash of ``url``'s prefix, listed now; or why it cannot be (a message)."""
    index = BucketTrashIndex(url, store_for(url))
    try:
        index.look_again()
    except StoreError as error:
        return f"the trash of {url.text} cannot be listed: {error}"
    return index


def bucket_trash_list(url: StorageURL, *, as_json: bool) -> tuple[int, str]:
    """``trash list URL``: (exit code, what to print)."""
    index = _trash_index(url)
    if isinstance(index, str):
        return 1, index
    listing = TrashListing(index.entries, []) if index.exists else None
    if as_json:
        document = trash_list_document(url.core_path, listing)
        document["trash"] = shown_as_url(document["trash"])
        for entry in document["entries"]:
            entry["path"] = shown_as_url(entry["path"])
            entry["trash_path"] = shown_as_url(entry["trash_path"])
        return 0, render_json(document)
    if listing is None:
        return 0, f"no trash in {url.text}"
    return 0, render_trash_table(listing)


def bucket_trash_empty(url: StorageURL, cutoff: float | None, why: str) -> tuple[PurgeResult | None, str]:
    """``trash empty URL``: what the purge did (None if the trash could not be listed, with why)."""
    index = _trash_index(url)
    if isinstance(index, str):
        return None, index
    return purge_stored(index, lambda entry: cutoff is None or entry.trashed_at <= cutoff, why=why), ""


def bucket_restore(
    url: StorageURL, patterns: Sequence[str], *, since: float | None, everything: bool
) -> tuple[list[RestoreResult] | None, str]:
    """``restore URL ...``: each entry's result (None when nothing matched or the trash could not be
    listed, with why)."""
    index = _trash_index(url)
    if isinstance(index, str):
        return None, index
    chosen = select_entries(index.entries, patterns, since=since, everything=everything)
    if not chosen:
        return None, f"nothing in the trash of {url.text} matches"
    return restore_stored(index, chosen), ""
