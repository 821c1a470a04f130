"""The commands on a bucket, end to end against a real S3 server: credentials never shown, a missing
backend named, the core install untouched, ``inspect URL``, protection by URL (PL #21813), and what
deleting from a bucket refuses (a replaced object, a planted deletion manifest) or finishes later."""

from __future__ import annotations

import hashlib
import io
import json
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.bucket_listing import DELETING_MARKER
from ckpt_watcher.delete import Outcome
from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from ckpt_watcher.locations import StorageURL, parse_location
from ckpt_watcher.object_store import ObjectInfo, ObjectStore, S3Store
from ckpt_watcher.plan import plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.scan import CompletenessCache, ScanOptions
from tests.support.cli import events, run_cli, run_python
from tests.support.daemon import running_daemon
from tests.support.factories import step_name, zip_bytes
from tests.support.quiet_clock import QuietClock
from tests.support.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, Bucket, free_port

pytestmark = pytest.mark.timeout(180)


def _checkpoint(step: int) -> bytes:
    return zip_bytes(f"weights of step {step}".encode() * 20)


def _url(text: str) -> StorageURL:
    location = parse_location(text)
    assert isinstance(location, StorageURL)
    return location


# -- credentials, backends, the core install ----------------------------------------------------------


def test_no_credential_is_ever_shown(s3: Bucket, tmp_path: Path) -> None:
    """Every failure a user can meet (no such bucket, the server down), at debug level: neither the
    access key id nor the secret appears in any output or log record."""
    down = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    outputs = [
        run_cli("--log-level", "debug", "prune", "s3://no-such-bucket-here/run"),
        run_cli("--log-level", "debug", "prune", f"{s3.url}/run", "--dry-run", environment=down),
        run_cli("--log-level", "debug", "inspect", f"{s3.url}/run/missing.ckpt", environment=down),
    ]
    with running_daemon(
        ["--log-level", "debug", "watch", f"{s3.url}/run", "--poll-interval", "0.3"],
        tmp_path / "watch.log",
        down,
    ) as daemon:
        daemon.wait_for("storage_unavailable", count=2)
        assert daemon.stop() == 0
    texts = [result.stdout + result.stderr for result in outputs]
    texts.append(daemon.log_path.read_text() + daemon.stdout_path.read_text())
    assert [result.returncode for result in outputs] == [1, 1, 1]
    assert "NoSuchBucket" in texts[0]
    for text in texts:
        assert ACCESS_KEY_ID not in text
        assert SECRET_ACCESS_KEY not in text


@pytest.mark.parametrize(
    ("url", "extra", "module"), [("s3://bucket/run", "s3", "s3fs"), ("gs://bucket/run", "gcs", "gcsfs")]
)
def test_a_url_whose_backend_is_missing_names_the_extra_to_install(url: str, extra: str, module: str) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{module!r}] = None  # as if it were not installed
        from ckpt_watcher.cli import main
        sys.exit(main(["prune", {url!r}, "--dry-run"]))
        """
    )
    result = run_python(code, timeout=60)
    assert result.returncode == 2
    assert f"pip install 'ckpt-watcher[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_core_commands_never_import_fsspec(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / step_name(0, 100)).write_bytes(_checkpoint(100))
    code = textwrap.dedent(
        f"""
        import sys
        from ckpt_watcher.cli import main
        main(["prune", {str(tmp_path)!r}, "--dry-run", "--json"])
        main(["policy"])
        print([name for name in ("fsspec", "s3fs", "botocore", "aiobotocore") if name in sys.modules])
        """
    )
    result = run_python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_policy_a_bucket_cannot_follow_is_refused(s3: Bucket, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("verify: load\n")
    result = run_cli("prune", f"{s3.url}/run", "--policy", str(policy), "--dry-run")
    assert result.returncode == 2
    assert "At 'verify': 'load' reads each checkpoint with torch from local disk" in result.stderr


# -- inspect ----------------------------------------------------------------------------------------


def test_inspect_reads_objects_as_it_reads_files(s3: Bucket) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({"epoch": 1, "global_step": 16, "state_dict": {"layer.weight": torch.zeros(3, 2)}}, buffer)
    complete = buffer.getvalue()
    s3.put_many(
        {
            f"run/{step_name(1, 16)}": complete,
            f"run/{step_name(1, 12)}": complete[: len(complete) // 2],
            "run/hparams.yaml": b"lr: 0.1\n",
        }
    )
    result = run_cli("inspect", f"{s3.url}/run", "--json")

    assert result.returncode == 1  # the half-written one cannot be read
    rows = {row["path"]: row for row in json.loads(result.stdout)}
    assert list(rows) == [f"{s3.url}/run/{step_name(1, 12)}", f"{s3.url}/run/{step_name(1, 16)}"]
    whole = rows[f"{s3.url}/run/{step_name(1, 16)}"]
    assert whole["error"] is None
    assert (whole["epoch"], whole["global_step"], whole["tensor_count"]) == (1, 16, 1)
    assert whole["bytes"] == len(complete)
    half = rows[f"{s3.url}/run/{step_name(1, 12)}"]
    assert half["error"] == (
        "not a complete checkpoint: no end-of-central-directory record: still being written or truncated"
    )
    failed = events(result.stderr, "inspect_failed")
    assert [record["path"] for record in failed] == [f"{s3.url}/run/{step_name(1, 12)}"]


# -- protection by URL ------------------------------------------------------------------------------


def test_protection_by_url_keeps_the_resume_source(s3: Bucket, tmp_path: Path) -> None:
    """PL #21813: on S3 the checkpoint a run resumed from is deleted by Lightning's own cleanup. Here it
    is named four ways, each of which must keep it: ``--protect URL``, a local training config whose
    ``ckpt_path`` is a URL, a ``protect_from`` entry that is itself a URL (a config object), and a
    per-run ``.ckpt-watcher.yaml`` object naming a config object beside it."""
    s3.put_many({f"run/{step_name(0, step)}": _checkpoint(step) for step in range(100, 1100, 100)})
    url = f"{s3.url}/run"
    local_config = tmp_path / "train.yaml"
    local_config.write_text(f"trainer:\n  ckpt_path: {url}/{step_name(0, 100)}\n")
    s3.put("configs/finetune.yaml", f"pretrained_ckpt_path: {url}/{step_name(0, 200)}\n".encode())
    s3.put("run/.ckpt-watcher.yaml", b"protect_from: [resume.yaml]\n")
    s3.put("run/resume.yaml", f"ckpt_path: {url}/{step_name(0, 300)}\n".encode())
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"save_top_k_checkpoints: 2\nprotect_from:\n  - train.yaml\n  - {s3.url}/configs/finetune.yaml\n"
    )

    result = run_cli(
        "prune",
        url,
        "--policy",
        str(policy),
        "--protect",
        f"{url}/{step_name(0, 400)}",
        "--json",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    entries = {
        entry["name"]: entry for group in json.loads(result.stdout)["groups"] for entry in group["entries"]
    }
    assert entries[step_name(0, 100)]["reasons"] == ["resume source in train.yaml (trainer.ckpt_path)"]
    assert entries[step_name(0, 200)]["reasons"] == [
        f"fine-tuning source in {s3.url}/configs/finetune.yaml (pretrained_ckpt_path)"
    ]
    assert entries[step_name(0, 300)]["reasons"] == ["resume source in resume.yaml (ckpt_path)"]
    assert entries[step_name(0, 400)]["reasons"] == [f"protected by --protect {url}/{step_name(0, 400)}"]
    kept = {name for name, entry in entries.items() if entry["action"] == "keep"}
    assert kept == {step_name(0, step) for step in (100, 200, 300, 400, 900, 1000)}
    assert {key.removeprefix("run/") for key in s3.keys("run")} >= kept
    assert not events(result.stderr, "protection_warning")


# -- what deleting from a bucket refuses, and finishes later ---------------------------------------------


class Interfering(ObjectStore):
    """A real S3 store with a writer that strikes at one moment: just before a HEAD of ``key``
    (``before="head"``), or just before its deletion (``before="delete"``), it rewrites the object."""

    def __init__(self, inner: S3Store, bucket: Bucket, key: str, before: str) -> None:
        self.inner = inner
        self.url = inner.url
        self.requests = inner.requests
        self.bucket = bucket
        self.key = key
        self.before = before

    def _strike(self, moment: str, key: str) -> None:
        if moment == self.before and key == self.key:
            self.bucket.put(key, _checkpoint(999_999))  # a new checkpoint under the same name

    def list_prefix(self, prefix: str) -> list[ObjectInfo]:
        return self.inner.list_prefix(prefix)

    def head(self, key: str) -> ObjectInfo:
        self._strike("head", key)
        return self.inner.head(key)

    def read_range(self, key: str, offset: int, length: int, *, tag: str) -> bytes:
        return self.inner.read_range(key, offset, length, tag=tag)

    def delete(self, key: str, *, tag: str) -> None:
        self._strike("delete", key)
        self.inner.delete(key, tag=tag)


@pytest.mark.parametrize("before", ["head", "delete"])
def test_an_object_replaced_after_it_was_planned_is_kept(s3: Bucket, before: str) -> None:
    """Replaced before the HEAD that re-checks it, or between that HEAD and the DeleteObject (which
    then fails its If-Match): either way ``checkpoint_changed`` and the new object stays."""
    s3.put_many({f"run/{step_name(0, step)}": _checkpoint(step) for step in range(100, 800, 100)})
    url = _url(f"{s3.url}/run")
    doomed = f"run/{step_name(0, 100)}"
    storage = BucketStorage(url, Interfering(S3Store(url), s3, doomed, before))
    records = storage.scan_directory(
        url.core_path, url.core_path, Policy().compiled_naming, ScanOptions(), None, []
    )
    [group] = plan(records, Policy()).groups

    results = storage.apply_group(group, url.core_path)

    outcomes = {result.decision.record.name: result.outcome for result in results}
    assert outcomes == {step_name(0, 100): Outcome.CHANGED, step_name(0, 200): Outcome.DELETED}
    assert s3.get(doomed) == _checkpoint(999_999)
    assert f"run/{step_name(0, 200)}" not in s3.keys("run")


class FailingBatches(S3Store):
    """A real S3 store whose DeleteObjects fails every key but the first of each batch (once)."""

    failed = False

    def delete_many(self, objects: Iterable[tuple[str, str]]) -> dict[str, str]:
        pending = list(objects)
        if self.failed:
            return super().delete_many(pending)
        self.failed = True
        super().delete_many(pending[:1])
        return dict.fromkeys((key for key, _ in pending[1:]), "InternalError: injected")


def _directory_checkpoint(bucket: Bucket, name: str, shards: int) -> None:
    bucket.put_many({f"run/{name}/zero/rank{index}.pt": _checkpoint(index) for index in range(shards)})
    bucket.put(f"run/{name}/latest", b"global_step")


class RewritesAShard(S3Store):
    """A real S3 store and a writer re-saving a directory checkpoint, shards first: once the
    checkpoint's marker is deleted and the prefix listed once more (the last look before the batches),
    it writes one of its shards again."""

    def __init__(self, url: StorageURL, bucket: Bucket, shard: str) -> None:
        super().__init__(url)
        self.bucket = bucket
        self.shard = shard
        self.armed = False

    def delete(self, key: str, *, tag: str) -> None:
        super().delete(key, tag=tag)
        self.armed = key.endswith("/latest") and self.shard.startswith(key.rpartition("/")[0])

    def list_prefix(self, prefix: str) -> list[ObjectInfo]:
        listed = super().list_prefix(prefix)
        if self.armed:
            self.armed = False
            self.bucket.put(self.shard, _checkpoint(999_999))
        return listed


def test_a_shard_written_again_after_the_listing_is_not_deleted_with_its_checkpoint(s3: Bucket) -> None:
    """The shards of a directory checkpoint are deleted in batches (DeleteObjects): each only if it
    still has the ETag it was listed with, so one written again after the plan stays."""
    for step in (100, 200):
        _directory_checkpoint(s3, step_name(0, step), shards=3)
    url = _url(f"{s3.url}/run")
    rewritten = f"run/{step_name(0, 100)}/zero/rank1.pt"
    storage = BucketStorage(url, RewritesAShard(url, s3, rewritten))
    options = ScanOptions(directory_quiet_seconds=0.0)
    records = storage.scan_directory(
        url.core_path, url.core_path, Policy().compiled_naming, options, None, []
    )
    [group] = plan(records, Policy(save_top_k_checkpoints=1)).groups

    [result] = storage.apply_group(group, url.core_path)

    assert result.outcome is Outcome.FAILED  # removed in part: the new shard (and the manifest) remain
    assert s3.get(rewritten) == _checkpoint(999_999)
    assert s3.keys(f"run/{step_name(0, 100)}") == {rewritten, f"run/{step_name(0, 100)}/{DELETING_MARKER}"}


def test_a_directory_checkpoint_deleted_only_in_part_is_finished_by_the_next_pass(s3: Bucket) -> None:
    for step in (100, 200):
        _directory_checkpoint(s3, step_name(0, step), shards=4)
    url = _url(f"{s3.url}/run")
    naming = Policy().compiled_naming
    options = ScanOptions(directory_quiet_seconds=0.0)
    storage = BucketStorage(url, FailingBatches(url))
    records = storage.scan_directory(url.core_path, url.core_path, naming, options, None, [])
    [group] = plan(records, Policy(save_top_k_checkpoints=1)).groups

    [result] = storage.apply_group(group, url.core_path)

    assert result.outcome is Outcome.FAILED
    assert result.error is not None
    assert result.error.startswith("removed only in part: 3 object(s) remain")
    doomed = f"run/{step_name(0, 100)}"
    left = s3.keys(doomed)
    assert f"{doomed}/latest" not in left  # the marker went first
    assert f"{doomed}/{DELETING_MARKER}" in left
    assert len(left) == 4  # three shards and the manifest

    storage.begin_pass()  # the next pass: it sees a deletion under way, never a checkpoint to count
    records = storage.scan_directory(url.core_path, url.core_path, naming, options, None, [])
    half = next(record for record in records if record.name == step_name(0, 100))
    assert not half.complete
    assert half.incomplete_reason == "being deleted (a deletion was cut short; the next pass finishes it)"
    [finished] = storage.finish_leftovers(url.core_path, url.core_path, naming_for=lambda _: naming)

    assert finished.removed
    assert s3.keys(doomed) == set()
    assert s3.keys(f"run/{step_name(0, 200)}") == {
        f"run/{step_name(0, 200)}/{name}"
        for name in ("latest", "zero/rank0.pt", "zero/rank1.pt", "zero/rank2.pt", "zero/rank3.pt")
    }


def test_a_deletion_manifest_the_tool_did_not_write_removes_nothing(s3: Bucket) -> None:
    """A manifest naming keys outside its own prefix (planted, or copied) is refused: nothing goes."""
    _directory_checkpoint(s3, step_name(0, 100), shards=2)
    s3.put("run/other.ckpt", _checkpoint(1))
    doomed = f"run/{step_name(0, 100)}"
    planted = {"keys": {f"{doomed}/latest": "x", "run/other.ckpt": "y"}}
    s3.put(f"{doomed}/{DELETING_MARKER}", json.dumps(planted).encode())
    url = _url(f"{s3.url}/run")
    storage = BucketStorage(url, S3Store(url))
    before = s3.keys("run")

    naming = Policy().compiled_naming
    assert (
        storage.finish_leftovers(url.core_path, url.core_path, naming_for=lambda _: naming, reported=set())
        == []
    )

    assert s3.keys("run") == before


def test_a_deletion_manifest_in_a_run_directory_removes_nothing(s3: Bucket) -> None:
    """The tool writes a manifest only into a directory checkpoint it deletes. One planted in a run
    directory (a group), naming that run's keys with their very ETags, emptied the whole run,
    ``last.ckpt``, the pinned and the --protect'ed checkpoints too, even where an invalid per-run
    policy blocked the run. Outside a checkpoint-named directory it is not the tool's: nothing goes."""
    objects = {f"proj/stage1/{step_name(0, step)}": _checkpoint(step) for step in (100, 200, 300)}
    objects["proj/stage1/last.ckpt"] = _checkpoint(300)
    objects[f"proj/stage1/{step_name(0, 100)}.keep"] = b""
    s3.put_many(objects)
    named = {key: f'"{hashlib.md5(data).hexdigest()}"' for key, data in objects.items()}  # noqa: S324
    s3.put(f"proj/stage1/{DELETING_MARKER}", json.dumps({"keys": named}).encode())
    before = s3.keys("proj")

    result = run_cli("prune", f"{s3.url}/proj", "--protect", f"{s3.url}/proj/stage1/{step_name(0, 200)}")

    assert result.returncode == 0, result.stderr
    assert s3.keys("proj") == before
    [refused] = events(result.stderr, "leftover_not_ours")
    assert refused["path"] == f"{s3.url}/proj/stage1"


def test_a_pin_written_with_the_other_name_of_the_scheme_keeps_its_checkpoint(
    s3: Bucket, tmp_path: Path
) -> None:
    """s3a:// and s3:// name the same objects. A root given one way and a --protect or a resume
    config the other way never matched (two core paths), and both checkpoints were deleted."""
    s3.put_many({f"run/{step_name(0, step)}": _checkpoint(step) for step in range(100, 800, 100)})
    alias = s3.url.replace("s3://", "s3a://", 1)
    config = tmp_path / "train.yaml"
    config.write_text(f"ckpt_path: {alias}/run/{step_name(0, 200)}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\nprotect_from: [train.yaml]\n")

    result = run_cli(
        "prune", f"{s3.url}/run", "--policy", str(policy), "--protect", f"{alias}/run/{step_name(0, 100)}"
    )

    assert result.returncode == 0, result.stderr
    assert s3.keys("run") == {f"run/{step_name(0, step)}" for step in (100, 200, 600, 700)}


@pytest.mark.parametrize("how", ["cut right after the manifest", "planted beside a whole checkpoint"])
def test_a_manifest_beside_its_checkpoints_marker_is_called_off_and_nothing_is_deleted(
    s3: Bucket, how: str
) -> None:
    """A deletion removes the marker first, so a manifest whose checkpoint still has its marker marks
    a deletion that never began (or one copied or planted there): finishing it would delete a whole
    checkpoint the policy may keep now (a pinned one, the newest). The manifest alone goes, and the
    checkpoint is planned as any other (here the only one, never deleted)."""
    _directory_checkpoint(s3, step_name(0, 100), shards=2)
    doomed = f"run/{step_name(0, 100)}"
    objects = {key: s3.get(key) for key in s3.keys(doomed)}
    named = {key: f'"{hashlib.md5(data).hexdigest()}"' for key, data in objects.items()}  # noqa: S324
    if how.startswith("planted"):
        named = {key: tag for key, tag in named.items() if not key.endswith("/latest")}
    s3.put(f"{doomed}/{DELETING_MARKER}", json.dumps({"keys": named}).encode())

    first = run_cli("prune", f"{s3.url}/run")
    second = run_cli("prune", f"{s3.url}/run", "--dry-run", "--json")

    assert first.returncode == 0, first.stderr
    assert [record["path"] for record in events(first.stderr, "leftover_called_off")] == [
        f"{s3.url}/{doomed}"
    ]
    assert s3.keys(doomed) == set(objects)  # every object of it is still there; the manifest is not
    entries = {
        entry["name"]: entry for group in json.loads(second.stdout)["groups"] for entry in group["entries"]
    }
    assert entries[step_name(0, 100)]["action"] != "delete"
    assert "being deleted" not in str(entries[step_name(0, 100)]["reasons"])  # a checkpoint again


def _leave_a_leftover(s3: Bucket, url: StorageURL) -> str:
    """Two directory checkpoints; the older one's deletion cut short (its marker and one shard gone,
    the manifest and two shards left). Its prefix."""
    for step in (100, 200):
        _directory_checkpoint(s3, step_name(0, step), shards=3)
    storage = BucketStorage(url, FailingBatches(url))
    records = storage.scan_directory(
        url.core_path,
        url.core_path,
        Policy().compiled_naming,
        ScanOptions(directory_quiet_seconds=0.0),
        None,
        [],
    )
    [group] = plan(records, Policy(save_top_k_checkpoints=1)).groups
    [result] = storage.apply_group(group, url.core_path)
    assert result.outcome is Outcome.FAILED
    doomed = f"run/{step_name(0, 100)}"
    assert len(s3.keys(doomed)) == 3
    assert f"{doomed}/{DELETING_MARKER}" in s3.keys(doomed)
    return doomed


@pytest.mark.parametrize("rewrite", ["the same bytes", "the same bytes and a new shard", "a new shard"])
def test_a_leftover_written_again_is_called_off_and_nothing_of_it_is_deleted(
    s3: Bucket, tmp_path: Path, rewrite: str
) -> None:
    """A run rolled back writes the step of a cut-short deletion again, shards first: a shard with the
    same bytes has the same ETag as the manifest names (a digest, not a version), so finishing the
    leftover deleted the trainer's new shard while it was still writing the checkpoint. Anything in it
    the manifest does not name, or written after the manifest, calls the leftover off whole."""
    url = _url(f"{s3.url}/run")
    doomed = _leave_a_leftover(s3, url)
    shard = min(key for key in s3.keys(doomed) if key.endswith(".pt"))
    time.sleep(1.1)  # the store's last-modified times have whole seconds
    if "same bytes" in rewrite:
        s3.put(shard, s3.get(shard))
    if "new shard" in rewrite:
        s3.put(f"{doomed}/zero/rank9.pt", _checkpoint(9))
    written = s3.keys(doomed) - {f"{doomed}/{DELETING_MARKER}"}

    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")

    result = run_cli("prune", f"{s3.url}/run", "--policy", str(policy))

    assert result.returncode == 0, result.stderr
    assert s3.keys(doomed) == written  # every object kept; the manifest alone is gone
    [called_off] = events(result.stderr, "leftover_called_off")
    assert called_off["path"] == f"{s3.url}/{doomed}"
    assert "a writer may be at work there: nothing of it is deleted now" in called_off["detail"]
    assert not events(result.stderr, "leftover_removed")


class RewritesTheSameBytes(S3Store):
    """A real S3 store and a writer re-saving a directory checkpoint with the same bytes: right after
    the checkpoint's marker is deleted (a second later, so its last-modified time is later), it writes
    one of its shards again, byte for byte, so with the same ETag."""

    def __init__(self, url: StorageURL, bucket: Bucket, shard: str) -> None:
        super().__init__(url)
        self.bucket = bucket
        self.shard = shard

    def delete(self, key: str, *, tag: str) -> None:
        super().delete(key, tag=tag)
        if key.endswith("/latest") and self.shard.startswith(key.rpartition("/")[0]):
            time.sleep(1.1)
            self.bucket.put(self.shard, self.bucket.get(self.shard))


def test_a_shard_written_again_with_the_same_bytes_during_a_deletion_stops_it(s3: Bucket) -> None:
    """The DeleteObjects batches name each shard's ETag, which a shard written again with the same
    bytes still has: the prefix is listed again once the marker is gone, and a shard last modified after
    the manifest stops the deletion there; the next pass calls the leftover off, deleting nothing."""
    for step in (100, 200):
        _directory_checkpoint(s3, step_name(0, step), shards=3)
    url = _url(f"{s3.url}/run")
    doomed = f"run/{step_name(0, 100)}"
    rewritten = f"{doomed}/zero/rank1.pt"
    storage = BucketStorage(url, RewritesTheSameBytes(url, s3, rewritten))
    naming = Policy().compiled_naming
    options = ScanOptions(directory_quiet_seconds=0.0)
    records = storage.scan_directory(url.core_path, url.core_path, naming, options, None, [])
    [group] = plan(records, Policy(save_top_k_checkpoints=1)).groups

    [result] = storage.apply_group(group, url.core_path)

    assert result.outcome is Outcome.FAILED
    assert result.error is not None
    assert result.error.startswith("its marker was deleted, then 1 object(s)")
    shards = {f"{doomed}/zero/rank{index}.pt" for index in range(3)}
    assert s3.keys(doomed) == shards | {f"{doomed}/{DELETING_MARKER}"}

    storage.begin_pass()
    storage.scan_directory(url.core_path, url.core_path, naming, options, None, [])
    assert storage.finish_leftovers(url.core_path, url.core_path, naming_for=lambda _: naming) == []
    assert s3.keys(doomed) == shards  # called off: the manifest alone went


def test_the_daemon_counts_a_directory_checkpoint_once_it_saw_its_objects_unchanged(
    s3: Bucket, quiet_clock: QuietClock
) -> None:
    """A store whose clock is behind the watcher's dates the shards still being uploaded long past
    (here the watcher's clock is an hour ahead): by their times the checkpoint was quiet at once. The
    daemon's scan (the one with a cache) counts it only once it has seen the same objects (keys and
    ETags) for the quiet time by its own clock; a shard arriving starts that again."""
    _directory_checkpoint(s3, step_name(0, 100), shards=2)
    url = _url(f"{s3.url}/run")
    storage = BucketStorage(url, S3Store(url))
    cache = CompletenessCache()
    options = ScanOptions(now=time.time() + 3600)

    def counted() -> bool:
        storage.begin_pass()
        records = storage.scan_directory(
            url.core_path, url.core_path, Policy().compiled_naming, options, cache, []
        )
        (record,) = [record for record in records if record.name == step_name(0, 100)]
        return record.complete

    answers = [counted()]
    quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS / 2)
    s3.put(f"run/{step_name(0, 100)}/zero/rank2.pt", _checkpoint(2))  # another rank's shard
    answers.append(counted())
    quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS / 2)
    answers.append(counted())
    quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS / 2)
    answers.append(counted())
    one_shot = storage.scan_directory(
        url.core_path, url.core_path, Policy().compiled_naming, options, None, []
    )

    assert answers == [False, False, False, True]
    assert all(record.complete for record in one_shot if record.name == step_name(0, 100))  # looks once
