"""A bucket watcher that loses its lease while a deletion's last look is in flight (frozen by SIGSTOP
or a paused VM during the HEAD of an object, or the listing of a directory checkpoint, for longer
than its lease) must not send the DELETE when it thaws: another watcher holds the prefix by then,
possibly under a policy that keeps the checkpoint. The lease is asked again after that last look."""

from __future__ import annotations

import pytest

from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.bucket_trash import BucketTrashIndex
from ckpt_watcher.bucket_trash_moves import BucketTrashTarget
from ckpt_watcher.delete import Outcome
from ckpt_watcher.locations import StorageURL, parse_location
from ckpt_watcher.object_store import ObjectInfo, S3Store
from ckpt_watcher.plan import plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.scan import ScanOptions
from tests.support.factories import step_name, zip_bytes
from tests.support.s3_server import Bucket

pytestmark = pytest.mark.timeout(180)

LOST = "the lease on this prefix could not be renewed in time; deletions wait until it is"


class LeaseLostDuringLastLook(S3Store):
    """A real S3 store; the watcher's lease is lost while the HEAD of ``doomed`` (or the listing of
    its prefix, for a directory checkpoint) is in flight, as if the process were frozen then."""

    def __init__(self, url: StorageURL, doomed: str) -> None:
        super().__init__(url)
        self.doomed = doomed
        self.lost = False

    def refusal(self) -> str | None:
        return LOST if self.lost else None

    def head(self, key: str) -> ObjectInfo:
        info = super().head(key)
        self.lost = self.lost or key == self.doomed
        return info

    def list_prefix(self, prefix: str) -> list[ObjectInfo]:
        listed = super().list_prefix(prefix)
        self.lost = self.lost or prefix == self.doomed
        return listed


def _url(text: str) -> StorageURL:
    location = parse_location(text)
    assert isinstance(location, StorageURL)
    return location


def _seed(s3: Bucket, *, directory: bool) -> dict[str, bytes]:
    objects: dict[str, bytes] = {}
    for step in (100, 200, 300):
        payload = zip_bytes(f"weights of step {step}".encode() * 20)
        if directory:
            objects[f"run/{step_name(0, step)}/zero/rank0.pt"] = payload
            objects[f"run/{step_name(0, step)}/latest"] = b"global_step"
        else:
            objects[f"run/{step_name(0, step)}"] = payload
    s3.put_many(objects)
    return objects


@pytest.mark.parametrize(
    ("directory", "trash"),
    [(False, False), (True, False), (False, True)],
    ids=["object", "directory", "trash"],
)
def test_a_lease_lost_during_a_deletions_last_look_deletes_nothing(
    s3: Bucket, directory: bool, trash: bool
) -> None:
    objects = _seed(s3, directory=directory)
    url = _url(f"{s3.url}/run")
    store = LeaseLostDuringLastLook(url, f"run/{step_name(0, 100)}")
    storage = BucketStorage(url, store, may_delete=store.refusal)
    records = storage.scan_directory(
        url.core_path,
        url.core_path,
        Policy().compiled_naming,
        ScanOptions(directory_quiet_seconds=0.0),
        None,
        [],
    )
    [group] = plan(records, Policy(save_top_k_checkpoints=1)).groups
    assert [decision.record.name for decision in group.deletions] == [step_name(0, 100), step_name(0, 200)]
    mover = BucketTrashTarget(url, store, 3600, BucketTrashIndex(url, store), may_delete=store.refusal)

    results = storage.apply_group(group, url.core_path, trash=mover if trash else None)

    assert [(result.outcome, result.error) for result in results] == [(Outcome.FAILED, LOST)] * 2
    assert set(objects) <= s3.keys("run")  # every checkpoint is still there, untouched
    for key, data in objects.items():
        assert s3.get(key) == data
