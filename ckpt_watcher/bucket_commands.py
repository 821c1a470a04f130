"""``prune URL``, ``watch URL`` and ``inspect URL...``: the commands on a bucket prefix.

Imported by cli.py only for a URL, so fsspec and the backend are imported only then. A missing
backend is a usage error naming the extra to install (exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog

from ckpt_watcher.bucket import BucketConfigFiles, BucketStorage
from ckpt_watcher.cli import UsageError
from ckpt_watcher.contents import CheckpointContents
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.naming import Naming
from ckpt_watcher.object_store import BackendMissingError, ObjectStore, open_store
from ckpt_watcher.policy import LoadedPolicy, Policy
from ckpt_watcher.protection import command_line_pins
from ckpt_watcher.reconcile import PassResult, prune_once

logger = structlog.get_logger("ckpt_watcher.bucket_commands")


def store_for(url: StorageURL) -> ObjectStore:
    """The store of ``url``; a missing backend is a UsageError naming the extra (exit 2)."""
    try:
        return open_store(url)
    except BackendMissingError as error:
        raise UsageError(str(error)) from None


def refused_on_a_bucket(policy: Policy) -> list[str]:
    """What a policy asks that a bucket cannot give, as ``At 'key': ...`` problems (none: it runs)."""
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
    if policy.trash.enabled:
        problems.append(
            "At 'trash': a bucket root has no trash (a server-side copy of every deleted checkpoint "
            "is not a rename); remove the key, or keep deleted checkpoints with the bucket's own "
            "versioning"
        )
    return problems


def refused_in_a_run(loaded: LoadedPolicy) -> list[str]:
    """What a per-run ``.ckpt-watcher.yaml`` object may not ask for on a bucket: the same as the root
    policy. Such a file is an invalid per-run policy: ``prune`` exits 2, the daemon blocks its group
    (``group_blocked``) until it is fixed; never silently ignored."""
    return refused_on_a_bucket(loaded.policy)


def check_policy(loaded: LoadedPolicy) -> None:
    """Refuse, before anything is read, a policy whose keys have no meaning on a bucket."""
    problems = refused_on_a_bucket(loaded.policy)
    if problems:
        raise UsageError(f"invalid policy {loaded.source_label} for a bucket:\n  " + "\n  ".join(problems))


def bucket_pins(protect: Iterable[Path | StorageURL], files: BucketConfigFiles) -> dict[Path, str]:
    """``--protect`` pins: a URL names an object (its core path); a local path as always."""
    pins: dict[Path, str] = {}
    local: list[Path | StorageURL] = []
    for item in protect:
        if not isinstance(item, StorageURL):
            local.append(item)
            continue
        path = item.core_path
        if not files.exists(path):
            logger.warning(
                "protected_path_missing", path=item.text, detail="--protect names no existing object"
            )
        pins.setdefault(path, f"protected by --protect {item.text}")
    if local:
        pins.update(command_line_pins(local, Path.cwd()))
    return pins


def prune_bucket(arguments: argparse.Namespace, loaded: LoadedPolicy) -> PassResult:
    """``prune URL``: one strict pass over the prefix (``prune_once`` with the bucket's storage)."""
    url: StorageURL = arguments.path
    check_policy(loaded)
    storage = BucketStorage(url, store_for(url))
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
        refuse_in_runs=refused_in_a_run,
    )


def watch_bucket(arguments: argparse.Namespace, loaded: LoadedPolicy) -> int:
    """``watch URL``: see bucket_watch.py."""
    from ckpt_watcher.bucket_watch import run_bucket_watch  # noqa: PLC0415  (watchdog: watch only)

    check_policy(loaded)
    return run_bucket_watch(arguments, loaded, store_for(arguments.path))


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
