"""The generic fsspec store (gs://, az://), over fsspec's in-memory file system: listing, ranged reads,
deletes and a prune work as for S3; without conditional writes there is no lease, so ``watch`` refuses."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from ckpt_watcher.bucket import BucketConfigFiles, BucketStorage
from ckpt_watcher.bucket_commands import check_policy, refusals_in_runs
from ckpt_watcher.bucket_watch import BucketPlace
from ckpt_watcher.cli import UsageError
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import ConditionalUnsupportedError, FsspecStore, PreconditionFailedError
from ckpt_watcher.place import WatchOptions
from ckpt_watcher.policy import load_policy
from ckpt_watcher.policy_file import InvalidPolicyFilesError
from ckpt_watcher.reconcile import PassResult, Trigger, prune_once
from tests.support.factories import step_name, zip_bytes

URL = StorageURL("gs", "bucket", "run")


@pytest.fixture
def store() -> FsspecStore:
    memory = fsspec.filesystem("memory", skip_instance_cache=True)
    memory.store.clear()
    memory.pseudo_dirs.clear()
    memory.pseudo_dirs.append("")
    for step in range(100, 800, 100):
        memory.pipe_file(f"bucket/run/{step_name(0, step)}", zip_bytes(f"step {step}".encode()))
    memory.pipe_file("bucket/run/half.ckpt", zip_bytes()[:20])
    memory.pipe_file("bucket/other/x.ckpt", zip_bytes())
    return FsspecStore(URL, memory)


def test_listing_reads_and_deletes(store: FsspecStore) -> None:
    listed = {info.key: info for info in store.list_prefix("run")}
    assert set(listed) == {f"run/{step_name(0, step)}" for step in range(100, 800, 100)} | {"run/half.ckpt"}
    info = listed[f"run/{step_name(0, 100)}"]
    assert store.read_range(info.key, 0, 4, tag=info.tag) == b"PK\x03\x04"
    assert store.delete_many([(f"run/{step_name(0, 200)}", listed[f"run/{step_name(0, 200)}"].tag)]) == {}
    store.delete(info.key, tag=info.tag)
    assert len(store.list_prefix("run")) == 6
    with pytest.raises(ConditionalUnsupportedError):
        store.put_new("run/.ckpt-watcher.lease", b"{}")
    with pytest.raises(PreconditionFailedError):
        store.read_range(f"run/{step_name(0, 300)}", 0, 4, tag="another version")


def test_a_prune_through_the_generic_store(store: FsspecStore, tmp_path: Path) -> None:
    storage = BucketStorage(URL, store)
    result = prune_once(
        URL.core_path,
        load_policy(None),
        pins={},
        settle_seconds=0,
        dry_run=False,
        working_directory=tmp_path,
        storage=storage,
        files=BucketConfigFiles(storage),
    )
    assert result.deleted == 2
    remaining = {info.key for info in store.list_prefix("run")}
    assert remaining == {f"run/{step_name(0, step)}" for step in range(300, 800, 100)} | {"run/half.ckpt"}


def test_watch_refuses_a_store_without_conditional_writes(store: FsspecStore) -> None:
    place = BucketPlace(
        WatchOptions(root=URL.core_path, poll_interval=30, rescan_seconds=30),
        url=URL,
        store=store,
        lease_seconds=60,
    )
    with pytest.raises(UsageError, match="the single-instance lease needs conditional writes"):
        place.lock_now()


def test_a_store_without_conditional_copies_refuses_a_trash_at_the_root_and_in_a_run(
    store: FsspecStore, tmp_path: Path
) -> None:
    """The trash needs conditional server-side copies (S3): a gs:// root policy asking for one is
    refused (exit 2) and so is a per-run object (an invalid per-run policy: nothing is deleted),
    never silently turned into deletions."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("trash:\n  grace: 1h\n")
    with pytest.raises(UsageError, match="At 'trash': the trash on a bucket needs conditional"):
        check_policy(load_policy(policy), store)
    memory = fsspec.filesystem("memory", skip_instance_cache=True)  # the store's, shared in memory
    memory.pipe_file("bucket/run/.ckpt-watcher.yaml", b"trash:\n  grace: 1h\n")
    storage = BucketStorage(URL, store)
    with pytest.raises(InvalidPolicyFilesError, match="At 'trash'"):
        prune_once(
            URL.core_path,
            load_policy(None),
            pins={},
            settle_seconds=0,
            dry_run=False,
            working_directory=tmp_path,
            storage=storage,
            files=BucketConfigFiles(storage),
            refuse_in_runs=refusals_in_runs(store),
        )
    assert len(store.list_prefix("run")) == 9  # 7 checkpoints, the half one, the per-run policy


@pytest.mark.parametrize(
    ("stopped", "groups", "purged", "reported"),
    [
        (None, 3, 0, True),  # a whole pass
        ("the listing failed", 0, 0, False),  # nothing done: retried, not reported
        ("a pin of a restored checkpoint is unknown", 0, 2, True),  # purged first
        ("the unfinished uploads cannot be listed", 2, 0, True),  # groups pruned first
    ],
)
def test_a_stopped_bucket_pass_is_reported_only_if_it_did_something(
    store: FsspecStore, stopped: str | None, groups: int, purged: int, reported: bool
) -> None:
    """A pass that stopped (``storage_error``) is retried in every case; it is reported (``stopped``,
    counted by the metrics) when it did something first, else dropped as it always was."""
    place = BucketPlace(
        WatchOptions(root=URL.core_path, poll_interval=30, rescan_seconds=30),
        url=URL,
        store=store,
        lease_seconds=60,
    )
    result = PassResult(Trigger.RESCAN, scanned_groups=groups, purged=purged, storage_error=stopped)

    assert place.accepts(result, None) is reported
    assert place._retries.failures == (0 if stopped is None else 1)
