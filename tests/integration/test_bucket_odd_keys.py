"""Keys below a directory checkpoint on a bucket that no path names as the listing arranges them: a
folder marker (the S3 console's "Create folder") is part of the checkpoint and deleted with it; a key
with an empty component keeps the checkpoint whole, planned so. Either way the plan's identity of the
checkpoint is the one its deletion lists again: never 'delete', then 'changed' on every pass."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.delete import Outcome
from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from ckpt_watcher.locations import StorageURL, parse_location
from ckpt_watcher.object_store import S3Store
from ckpt_watcher.plan import GroupPlan, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.scan import ScanOptions
from tests.support.cli import events, run_cli
from tests.support.daemon import wait_until
from tests.support.factories import step_name, zip_bytes
from tests.support.s3_server import Bucket

pytestmark = pytest.mark.timeout(180)


def _url(text: str) -> StorageURL:
    location = parse_location(text)
    assert isinstance(location, StorageURL)
    return location


def _directory_checkpoint(bucket: Bucket, name: str, shards: int) -> None:
    bucket.put_many({f"run/{name}/zero/rank{index}.pt": zip_bytes(b"w" * index) for index in range(shards)})
    bucket.put(f"run/{name}/latest", b"global_step")


def _scan_and_plan(storage: BucketStorage, url: StorageURL) -> tuple[GroupPlan, ...]:
    records = storage.scan_directory(
        url.core_path,
        url.core_path,
        Policy().compiled_naming,
        ScanOptions(directory_quiet_seconds=0.0),
        None,
        [],
    )
    return plan(records, Policy(save_top_k_checkpoints=1)).groups


@pytest.mark.parametrize("folder", ["", "zero/"])
def test_a_folder_marker_in_a_directory_checkpoint_is_deleted_with_it(s3: Bucket, folder: str) -> None:
    """A zero-byte key ending in '/' (the S3 console's "Create folder"), the checkpoint's own or one
    inside it: the plan's identity left it out, the deletion's listing took it in, so every real pass
    said ``checkpoint_changed`` and kept it forever. It is part of the prefix, and goes with it."""
    for step in (100, 200):
        _directory_checkpoint(s3, step_name(0, step), shards=2)
    doomed = f"run/{step_name(0, 100)}"
    s3.put_raw(f"{doomed}/{folder}", b"")
    url = _url(f"{s3.url}/run")
    storage = BucketStorage(url, S3Store(url))
    [group] = _scan_and_plan(storage, url)

    [result] = storage.apply_group(group, url.core_path)

    assert result.outcome is Outcome.DELETED
    assert {key for key in s3.raw_keys() if key.startswith(f"{doomed}/")} == set()
    assert s3.keys(f"run/{step_name(0, 200)}")  # the newest stays


def test_a_key_no_path_names_in_a_directory_checkpoint_keeps_it_whole(s3: Bucket) -> None:
    """A key with an empty component ('zero//extra.pt') under a directory checkpoint: planned as a
    deletion, then 'changed' on every pass. In doubt it is kept, planned so, with the reason."""
    for step in (100, 200):
        _directory_checkpoint(s3, step_name(0, step), shards=2)
    doomed = f"run/{step_name(0, 100)}"
    s3.put_raw(f"{doomed}/zero//extra.pt", b"x")
    before = s3.raw_keys()
    url = _url(f"{s3.url}/run")
    storage = BucketStorage(url, S3Store(url))
    [group] = _scan_and_plan(storage, url)

    assert group.deletions == ()
    [kept] = [entry for entry in group.decisions if entry.record.name == step_name(0, 100)]
    assert kept.record.incomplete_reason == (
        f"holds a key no path names exactly ({s3.url}/{doomed}/zero//extra.pt); kept whole"
    )
    assert storage.apply_group(group, url.core_path) == []
    assert s3.raw_keys() == before


def test_with_a_trash_a_folder_marker_goes_with_its_checkpoint_and_its_data_comes_back(
    s3: Bucket, tmp_path: Path
) -> None:
    """Through the commands, the trash on: the dry run's "trash" is what the real pass does (never
    'changed'); the shards are copied into the trash (an empty folder marker is deleted, not copied),
    and restored byte-identical."""
    for step in (100, 200):
        _directory_checkpoint(s3, step_name(0, step), shards=2)
    doomed = f"run/{step_name(0, 100)}"
    s3.put_raw(f"{doomed}/", b"")
    s3.put_raw(f"{doomed}/zero/", b"")
    data = {
        key: s3.get(key) for key in s3.raw_keys() if key.startswith(f"{doomed}/") and not key.endswith("/")
    }
    quiet_from = time.time() + DIRECTORY_QUIET_SECONDS + 1
    wait_until(lambda: time.time() > quiet_from, timeout=90, what="the directory checkpoints' quiet time")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/run"

    dry = run_cli("prune", url, "--policy", str(policy), "--dry-run", "--json")
    pruned = run_cli("prune", url, "--policy", str(policy))

    assert dry.returncode == 0, dry.stderr
    planned = {
        entry["name"]: entry["action"]
        for group in json.loads(dry.stdout)["groups"]
        for entry in group["entries"]
    }
    assert planned[step_name(0, 100)] == "trash"
    assert pruned.returncode == 0, pruned.stderr
    assert [record["path"] for record in events(pruned.stderr, "checkpoint_trashed")] == [
        f"{url}/{step_name(0, 100)}"
    ]
    assert not events(pruned.stderr, "checkpoint_changed")
    assert not [key for key in s3.raw_keys() if key.startswith(f"{doomed}/")]

    restored = run_cli("restore", url, "--all")

    assert restored.returncode == 0, restored.stderr
    assert {key: s3.get(key) for key in s3.raw_keys() if key.startswith(f"{doomed}/")} == data
