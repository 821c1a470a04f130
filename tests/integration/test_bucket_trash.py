"""The trash on a bucket root (issues 13 and 14), end to end against a real S3 server (moto, through
s3fs): a deletion is a conditional server-side copy into ``PREFIX/.ckpt-trash/`` then the same
conditional delete as without a trash; ``trash list``, ``restore`` (byte-identical, pinned, never over
anything), purge after the grace, ``trash empty``, a directory checkpoint trashed and restored whole,
the dry run's ``trash`` action and header, and objects planted in the trash prefix never followed."""

from __future__ import annotations

import hashlib
import json
import random
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher import bucket_delete, bucket_trash_moves, object_store
from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.bucket_trash_moves import BucketTrashTarget
from ckpt_watcher.cli import main
from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import PreconditionFailedError, S3Store
from tests.integration.test_bucket_prune import EXPECTED  # the plan of file_checkpoints()
from tests.support.cli import events, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import step_name, zip_bytes
from tests.support.layouts import file_checkpoints, write_files
from tests.support.s3_server import Bucket, FaultProxy, S3Server

pytestmark = pytest.mark.timeout(240)

TRASH = "root/.ckpt-trash"


def _checkpoint(step: int) -> bytes:
    """A small complete checkpoint whose bytes are its own."""
    return zip_bytes(f"weights of step {step}".encode() * 50)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def _seed(s3: Bucket, steps: range) -> dict[str, bytes]:
    objects = {f"root/run/{step_name(0, step)}": _checkpoint(step) for step in steps}
    s3.put_many(objects)
    return objects


def _checkpoint_keys(s3: Bucket) -> set[str]:
    return {key for key in s3.raw_keys() if key.startswith("root/run/")}


def _entries(stdout: str) -> dict[str, dict[str, Any]]:
    """A ``prune --json`` document's entries by name."""
    return {entry["name"]: entry for group in json.loads(stdout)["groups"] for entry in group["entries"]}


def _trash_list(s3: Bucket) -> list[dict[str, Any]]:
    listed = run_cli("trash", "list", f"{s3.url}/root", "--json")
    assert listed.returncode == 0, listed.stderr
    entries: list[dict[str, Any]] = json.loads(listed.stdout)["entries"]
    return entries


def test_a_deletion_is_trashed_listed_and_restored_byte_identical(s3: Bucket, tmp_path: Path) -> None:
    """Trash on, a policy that keeps 2 of 8: the 6 others are in the trash, not lost; ``trash list``
    shows them; the dry run says ``trash`` and shows the trash above the table; ``restore --all`` brings
    every one back byte-identical, and the next prune keeps them (the restored pin)."""
    objects = _seed(s3, range(100, 900, 100))
    policy = _policy(tmp_path, "save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/root"

    dry = run_cli("prune", url, "--policy", str(policy), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "trash: none yet" in dry.stdout
    assert sum(line.lstrip().startswith("trash ") for line in dry.stdout.splitlines()) == 6
    assert _checkpoint_keys(s3) == set(objects)

    pruned = run_cli("prune", url, "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr
    trashed = events(pruned.stderr, "checkpoint_trashed")
    assert sorted(record["path"] for record in trashed) == sorted(
        f"{s3.url}/root/run/{step_name(0, step)}" for step in range(100, 700, 100)
    )
    assert not events(pruned.stderr, "checkpoint_deleted")
    kept = {f"root/run/{step_name(0, step)}" for step in (700, 800)}
    assert _checkpoint_keys(s3) == kept

    listed = _trash_list(s3)
    assert sorted(entry["original"] for entry in listed) == sorted(
        f"run/{step_name(0, step)}" for step in range(100, 700, 100)
    )
    assert all(entry["reasons"][0].startswith("outside newest 2 step checkpoints") for entry in listed)
    assert all(entry["trash_path"].startswith(f"{s3.url}/{TRASH}/files/run/") for entry in listed)

    dry_again = run_cli("prune", url, "--policy", str(policy), "--dry-run", "--json")
    assert json.loads(dry_again.stdout)["trash"]["entries"] == 6

    restored = run_cli("restore", url, "--all")
    assert restored.returncode == 0, restored.stderr
    assert len(events(restored.stderr, "checkpoint_restored")) == 6
    assert _checkpoint_keys(s3) == set(objects)
    for key, data in objects.items():
        assert _digest(s3.get(key)) == _digest(data)
    assert not [key for key in s3.raw_keys() if key.startswith(f"{TRASH}/files/")]

    again = run_cli("prune", url, "--policy", str(policy), "--json")
    assert again.returncode == 0, again.stderr
    entries = _entries(again.stdout)
    for step in range(100, 700, 100):
        assert entries[step_name(0, step)]["action"] == "keep"
        assert entries[step_name(0, step)]["reasons"][0].startswith("restored from the trash: pinned until ")
    assert _checkpoint_keys(s3) == set(objects)


def test_purged_after_its_grace_and_by_trash_empty(s3: Bucket, tmp_path: Path) -> None:
    """A 1 s grace: the next prune after it purges the entry (``checkpoint_purged``, its copy gone);
    ``trash empty`` purges the rest at once; neither touches a checkpoint outside the trash."""
    _seed(s3, range(100, 500, 100))
    short = _policy(tmp_path, "save_top_k_checkpoints: 3\ntrash:\n  grace: 1s\n")
    url = f"{s3.url}/root"
    assert run_cli("prune", url, "--policy", str(short)).returncode == 0
    assert len(_trash_list(s3)) == 1
    trashed_at = time.time()
    wait_until(lambda: time.time() > trashed_at + 1.5, what="the grace")
    s3.put(f"root/run/{step_name(0, 500)}", _checkpoint(500))

    long = tmp_path / "long.yaml"
    long.write_text("save_top_k_checkpoints: 3\ntrash:\n  grace: 1h\n")
    pruned = run_cli("prune", url, "--policy", str(long))
    assert pruned.returncode == 0, pruned.stderr
    purged = events(pruned.stderr, "checkpoint_purged")
    assert [record["path"] for record in purged] == [f"{url}/run/{step_name(0, 100)}"]
    assert purged[0]["why"] == "its grace is over"
    assert [entry["original"] for entry in _trash_list(s3)] == [f"run/{step_name(0, 200)}"]

    emptied = run_cli("trash", "empty", url)
    assert emptied.returncode == 0, emptied.stderr
    assert emptied.stdout.startswith("purged 1 entry")
    assert _trash_list(s3) == []
    assert not [key for key in s3.raw_keys() if key.startswith(f"{TRASH}/files/")]
    assert _checkpoint_keys(s3) == {f"root/run/{step_name(0, step)}" for step in (300, 400, 500)}


def test_restore_never_overwrites_a_checkpoint_that_exists_again(s3: Bucket, tmp_path: Path) -> None:
    objects = _seed(s3, range(100, 400, 100))
    policy = _policy(tmp_path, "save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/root"
    assert run_cli("prune", url, "--policy", str(policy)).returncode == 0
    key = f"root/run/{step_name(0, 100)}"
    assert key not in s3.raw_keys()
    newer = _checkpoint(100_100)
    s3.put(key, newer)  # the same name written again

    refused = run_cli("restore", url, step_name(0, 100))
    assert refused.returncode == 1
    assert "exists again; it is never overwritten" in refused.stdout
    assert events(refused.stderr, "restore_refused")
    assert s3.get(key) == newer
    assert [entry["original"] for entry in _trash_list(s3)] == [f"run/{step_name(0, 100)}"]

    s3.delete([key])
    restored = run_cli("restore", url, f"run/{step_name(0, 100)}")
    assert restored.returncode == 0, restored.stderr
    assert s3.get(key) == objects[key]


def test_a_directory_checkpoint_is_trashed_and_restored_whole(s3: Bucket, tmp_path: Path) -> None:
    """Every object of it is copied (its marker first), then it is removed marker-first as without a
    trash; restored, every object is back byte-identical, the marker last."""
    shards = {
        f"root/run/{step_name(0, step)}/{name}": _checkpoint(step + index)
        for step in (100, 200)
        for index, name in enumerate(["zero/rank0.pt", "zero/rank1.pt", "latest"])
    }
    s3.put_many(shards)
    quiet_from = time.time() + DIRECTORY_QUIET_SECONDS + 1
    wait_until(lambda: time.time() > quiet_from, timeout=90, what="the directory checkpoints' quiet time")
    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/root"

    pruned = run_cli("prune", url, "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr
    assert [record["path"] for record in events(pruned.stderr, "checkpoint_trashed")] == [
        f"{url}/run/{step_name(0, 100)}"
    ]
    assert _checkpoint_keys(s3) == {key for key in shards if step_name(0, 200) in key}
    (entry,) = _trash_list(s3)
    assert entry["type"] == "directory"

    restored = run_cli("restore", url, "--all")
    assert restored.returncode == 0, restored.stderr
    assert _checkpoint_keys(s3) == set(shards)
    for key, data in shards.items():
        assert s3.get(key) == data
    # Its objects are new ones: it counts again after its quiet time, and until then it is never deleted.
    again = run_cli("prune", url, "--policy", str(policy), "--dry-run", "--json")
    entries = _entries(again.stdout)
    assert entries[step_name(0, 100)]["action"] == "skip"
    quiet_from = time.time() + DIRECTORY_QUIET_SECONDS + 1
    wait_until(lambda: time.time() > quiet_from, timeout=90, what="the restored checkpoint's quiet time")
    pruned_again = run_cli("prune", url, "--policy", str(policy), "--json")
    assert pruned_again.returncode == 0, pruned_again.stderr
    entries = _entries(pruned_again.stdout)
    assert entries[step_name(0, 100)]["action"] == "keep"  # its pin names the restored objects
    assert entries[step_name(0, 100)]["reasons"][0].startswith("restored from the trash: pinned until ")
    assert _checkpoint_keys(s3) == set(shards)


def test_objects_planted_in_the_trash_are_never_followed_or_restored_over_anything(
    s3: Bucket, tmp_path: Path
) -> None:
    """A copy in the trash replaced by something else is neither restored nor purged; an entry naming
    a path outside the root, or copies outside itself, is skipped (``trash_problem``); an entry naming a
    checkpoint that exists is refused; nothing outside the trash changes."""
    objects = _seed(s3, range(100, 400, 100))
    s3.put("elsewhere/secret.ckpt", b"not ours")
    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/root"
    assert run_cli("prune", url, "--policy", str(policy)).returncode == 0
    entries = {entry["original"]: entry for entry in _trash_list(s3)}
    swapped = entries[f"run/{step_name(0, 100)}"]
    swapped_key = swapped["trash_path"].removeprefix(f"{s3.url}/")
    s3.put(swapped_key, b"planted")
    info = json.loads(s3.get(f"{TRASH}/info/{swapped['key']}.json"))
    plants: dict[str, dict[str, Any]] = {
        "20261128T074143.611037Z-i1": {"original": "../elsewhere/secret.ckpt"},
        "20261128T074143.611037Z-i2": {
            "objects": [["../../elsewhere/secret.ckpt", "x", 1]],
            "type": "directory",
        },
        "20261128T074143.611037Z-i3": {"original": f"run/{step_name(0, 300)}"},
    }
    for name, change in plants.items():
        s3.put(f"{TRASH}/info/{name}.json", json.dumps({**info, **change}).encode())
    s3.put(f"{TRASH}/info/not-a-key.json", b"{}")

    listed = run_cli("trash", "list", url)
    assert listed.returncode == 0, listed.stderr
    problems = events(listed.stderr, "trash_problem")
    assert len(problems) == 3  # the path outside the root, the copy outside the entry, the name

    restored = run_cli("restore", url, "--all")
    assert restored.returncode == 1
    results = {line.split()[1]: line for line in restored.stdout.splitlines()}
    assert "not what was trashed" in results[f"run/{step_name(0, 100)}"]
    assert results[f"run/{step_name(0, 200)}"].startswith("restored")
    assert s3.get(f"root/run/{step_name(0, 300)}") == objects[f"root/run/{step_name(0, 300)}"]
    assert s3.get("elsewhere/secret.ckpt") == b"not ours"

    emptied = run_cli("trash", "empty", url)
    assert emptied.returncode == 0, emptied.stderr
    assert events(emptied.stderr, "trash_entry_dropped")
    assert s3.get(swapped_key) == b"planted"  # left where it is, never removed
    assert s3.get("elsewhere/secret.ckpt") == b"not ours"
    assert s3.get(f"root/run/{step_name(0, 300)}") == objects[f"root/run/{step_name(0, 300)}"]


def test_the_daemon_trashes_purges_and_keeps_a_restored_checkpoint_for_its_grace(
    s3: Bucket, tmp_path: Path
) -> None:
    """``watch URL`` with a trash: deletions go to the trash; a checkpoint restored while it runs is
    pinned for the grace (passes after the restore keep it), the purge after the grace removes what was
    not restored, and once the pin is over the restored checkpoint is judged by the policy again."""
    _seed(s3, range(100, 400, 100))
    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 8s\n")
    url = f"{s3.url}/root"
    restored_key = f"root/run/{step_name(0, 100)}"
    arguments = ["watch", url, "--policy", str(policy), "--poll-interval", "0.5", "--settle", "0"]
    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        daemon.wait_for("checkpoint_trashed", count=2)
        restored = run_cli("restore", url, step_name(0, 100))
        assert restored.returncode == 0, restored.stderr
        passes = len(daemon.events("pass_completed"))
        daemon.wait_for("pass_completed", count=passes + 2)
        assert restored_key in s3.raw_keys()  # pinned: passes after the restore keep it
        assert len(daemon.events("checkpoint_trashed")) == 2
        daemon.wait_for("checkpoint_purged")
        daemon.wait_for("checkpoint_trashed", count=3, timeout=60)  # the pin is over: judged again
        assert daemon.stop() == 0
    records = [
        record
        for record in daemon.records()
        if record.get("event") in {"checkpoint_purged", "checkpoint_trashed"}
    ]
    assert [(record["event"], record["path"].rsplit("/", 1)[-1]) for record in records] == [
        ("checkpoint_trashed", step_name(0, 100)),
        ("checkpoint_trashed", step_name(0, 200)),
        ("checkpoint_purged", step_name(0, 200)),
        ("checkpoint_trashed", step_name(0, 100)),
    ]
    assert not daemon.events("checkpoint_deleted")
    assert _checkpoint_keys(s3) == {f"root/run/{step_name(0, 300)}"}


@pytest.mark.parametrize("where", ["directory", "bucket"])
def test_a_trash_on_policy_trashes_and_restores_the_same_on_a_directory_and_a_bucket(
    s3: Bucket, tmp_path: Path, where: str
) -> None:
    """The layout of tests/support/layouts.py (its files) under a directory and a prefix, the trash on:
    the same plan (``trash`` actions and reasons, relative to the root), the same checkpoints trashed
    and listed in the trash, and after ``restore --all`` the whole layout back, byte for byte."""
    layout = file_checkpoints()
    if where == "directory":
        root = str(tmp_path / "root")
        write_files(Path(root), layout)
    else:
        root = f"{s3.url}/root"
        s3.put_many({f"root/{key}": data for key, data in layout.items()})
    policy = _policy(tmp_path, "trash:\n  grace: 1h\n")

    dry = run_cli("prune", root, "--policy", str(policy), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    document = json.loads(dry.stdout)
    plan = sorted(
        (entry["path"].removeprefix(root + "/"), entry["action"], tuple(entry["reasons"]))
        for group in document["groups"]
        for entry in group["entries"]
    )
    expected = sorted(
        (path, "trash" if action == "delete" else action, reasons) for path, action, reasons in EXPECTED
    )
    assert [item for item in plan if not item[0].startswith("stage3/")] == [
        item for item in expected if not item[0].startswith("stage3/")
    ]
    assert document["trash"] is None  # none yet, on both

    pruned = run_cli("prune", root, "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr
    trashed = {path for path, action, _ in plan if action == "trash"}
    assert {
        record["path"].removeprefix(root + "/") for record in events(pruned.stderr, "checkpoint_trashed")
    } == trashed
    listed = run_cli("trash", "list", root, "--json")
    assert {entry["original"] for entry in json.loads(listed.stdout)["entries"]} == trashed

    restored = run_cli("restore", root, "--all")
    assert restored.returncode == 0, restored.stderr
    if where == "directory":
        present = {
            str(path.relative_to(root)): path.read_bytes()
            for path in Path(root).rglob("*")
            if path.is_file() and ".ckpt-trash" not in path.parts
        }
    else:
        present = {
            key.removeprefix("root/"): s3.get(key) for key in s3.raw_keys() if not key.startswith(TRASH)
        }
    assert present == layout


def test_what_a_trashed_object_costs_in_requests(s3: Bucket, s3_server: S3Server, tmp_path: Path) -> None:
    """Measured on the server's log (for README and BENCHMARKS.md): trashing an object uploaded in one
    PUT is 6 requests and one listing of the pins (a deletion alone: 2), its purge 3, its restore 9."""
    key = f"root/run/{step_name(0, 100)}"
    _seed(s3, range(100, 300, 100))
    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/root"

    def requests_about(run: Callable[[], Any]) -> list[tuple[str, str]]:
        before = len(s3_server.requests())
        run()
        mine = f"/{s3.name}/"
        return [
            (
                method,
                urllib.parse.unquote(target).removeprefix(mine).split("?")[0]
                + ("?" + target.split("?")[1].split("=")[0] if "?" in target else ""),
            )
            for method, target, _ in s3_server.requests()[before:]
            if target.startswith(mine) and "list-type=2" not in target and not target.endswith(".lease")
        ]

    listed_before = len(s3_server.requests())
    pruned = requests_about(lambda: run_cli("prune", url, "--policy", str(policy)))
    pin_listings = [
        target
        for _, target, _ in s3_server.requests()[listed_before:]
        if "list-type=2" in target and f"prefix={TRASH}/restored/" in urllib.parse.unquote(target)
    ]
    assert len(pin_listings) == 1  # the move's look at the pins, right before its DELETE
    reads = [("GET", f"root/run/{step_name(0, step)}") for step in (100, 200)]  # the zip tails, as always
    trash_move = [request for request in pruned if request not in reads]
    assert len(pruned) == len(trash_move) + 2
    (entry,) = _trash_list(s3)
    copy = entry["trash_path"].removeprefix(f"{s3.url}/")
    info = f"{TRASH}/info/{entry['key']}.json"
    assert sorted(trash_move) == sorted(
        [
            ("POST", f"{copy}?uploads"),  # CreateMultipartUpload
            ("PUT", f"{copy}?uploadId"),  # UploadPartCopy, x-amz-copy-source-if-match
            ("PUT", info),  # the entry, If-None-Match: *
            ("POST", f"{copy}?uploadId"),  # CompleteMultipartUpload, If-None-Match: *
            ("HEAD", key),  # re-checked, as without a trash
            ("DELETE", key),  # If-Match
        ]
    )
    purge = requests_about(lambda: run_cli("trash", "empty", url))
    assert sorted(purge) == sorted([("GET", info), ("DELETE", copy), ("DELETE", info)])

    s3.put(key, _checkpoint(100))
    assert run_cli("prune", url, "--policy", str(policy)).returncode == 0
    (entry,) = _trash_list(s3)
    copy = entry["trash_path"].removeprefix(f"{s3.url}/")
    info = f"{TRASH}/info/{entry['key']}.json"
    pin = f"{TRASH}/restored/{entry['key']}.json"
    restore = requests_about(lambda: run_cli("restore", url, "--all"))
    assert sorted(restore) == sorted(
        [
            ("GET", info),  # the entry, read
            ("HEAD", key),  # is the name free?
            ("POST", f"{key}?uploads"),
            ("PUT", f"{key}?uploadId"),  # UploadPartCopy of the copy in the trash
            ("HEAD", copy),  # still the copy that was trashed?
            ("PUT", pin),  # the restored pin, before the checkpoint appears
            ("POST", f"{key}?uploadId"),  # CompleteMultipartUpload, If-None-Match: *
            ("DELETE", copy),
            ("DELETE", info),
        ]
    )


def test_a_copy_in_parts_is_byte_identical_and_never_lands_over_an_object(
    s3: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's copy primitive, on the server: an object copied in three parts (parts of 5 MiB here;
    1 GiB in use) is byte-identical and has the ETag computed before it was completed (the restored
    pin's key); completing a copy where an object exists is refused (If-None-Match: *) and leaves that
    object as it was."""
    monkeypatch.setattr(object_store, "COPY_PART", 5 << 20)
    data = random.Random(3).randbytes(11 << 20)  # noqa: S311  (test data)
    s3.put("root/big.ckpt", data)
    store = S3Store(StorageURL("s3", s3.name, "root"))
    source = store.head("root/big.ckpt")

    pending = store.start_copy(source.key, "root/copy.ckpt", tag=source.tag, size=source.size)
    assert len(pending.part_tags) == 3
    assert store.finish_copy(pending) == pending.tag
    assert _digest(s3.get("root/copy.ckpt")) == _digest(data)

    s3.put("root/taken.ckpt", b"already here")
    refused = store.start_copy(source.key, "root/taken.ckpt", tag=source.tag, size=source.size)
    with pytest.raises(PreconditionFailedError):
        store.finish_copy(refused)
    assert s3.get("root/taken.ckpt") == b"already here"


def test_a_lost_answer_to_the_delete_after_the_copy_keeps_the_copy(
    s3: Bucket, s3_server: S3Server, tmp_path: Path
) -> None:
    """The checkpoint is copied into the trash, then its conditional DELETE is done but its answer
    lost; botocore's retry finds nothing (404). That is our own deletion: the verified copy is kept
    and the checkpoint is trashed, never lost in both places without a word."""
    objects = _seed(s3, range(100, 400, 100))
    doomed = f"root/run/{step_name(0, 100)}"
    proxy = FaultProxy(s3_server.port, tmp_path / "proxy-control")
    proxy.start()
    try:
        proxy.drop_answer_once(f"DELETE /{s3.name}/{urllib.parse.quote(doomed, safe='/')}")
        pruned = run_cli(
            "prune",
            f"{s3.url}/root",
            "--policy",
            str(_policy(tmp_path, "save_top_k_checkpoints: 2\ntrash:\n  grace: 1d\n")),
            environment={"AWS_ENDPOINT_URL": proxy.endpoint},
        )
    finally:
        proxy.stop()

    assert proxy.answer_dropped()
    assert pruned.returncode == 0, pruned.stderr
    assert [record["path"] for record in events(pruned.stderr, "checkpoint_trashed")] == [
        f"{s3.url}/{doomed}"
    ]
    assert doomed not in _checkpoint_keys(s3)
    [entry] = _trash_list(s3)
    assert entry["original"] == f"run/{step_name(0, 100)}"
    assert run_cli("restore", f"{s3.url}/root", "--all").returncode == 0
    assert s3.get(doomed) == objects[doomed]


def test_a_pin_the_store_fails_to_give_holds_every_deletion_until_it_is_read(
    s3: Bucket, s3_server: S3Server, tmp_path: Path
) -> None:
    """A restored checkpoint is kept by its pin. When the store failed to give the pin (a timeout, a
    500 on every retry), the pin was taken as unreadable, the restored checkpoint as never restored,
    and the policy trashed it again; in the daemon, until it restarted. Now ``prune`` stops before any
    deletion (exit 1, saying why), and the daemon deletes nothing, retries, and keeps the restored
    checkpoint once the pin can be read."""
    _seed(s3, range(100, 400, 100))
    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/root"
    pruned = run_cli("prune", url, "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr
    restored = run_cli("restore", url, step_name(0, 100))
    assert restored.returncode == 0, restored.stderr
    restored_key = f"root/run/{step_name(0, 100)}"
    seed = _seed(s3, range(400, 600, 100))  # two newer: the policy would take the restored one again
    proxy = FaultProxy(s3_server.port, tmp_path / "proxy-control")
    proxy.start()
    try:
        environment = {"AWS_ENDPOINT_URL": proxy.endpoint}
        proxy.fail_requests(f"GET /{s3.name}/{TRASH}/restored/")
        held = run_cli("prune", url, "--policy", str(policy), environment=environment)
        assert held.returncode == 1
        assert "a pin of a restored checkpoint is unknown" in held.stderr
        assert "InternalError" in held.stderr
        assert held.stderr.rstrip().endswith("; nothing was deleted")
        assert _checkpoint_keys(s3) == {restored_key, *seed, f"root/run/{step_name(0, 300)}"}

        arguments = ["watch", url, "--policy", str(policy), "--poll-interval", "0.5", "--settle", "0"]
        with running_daemon(arguments, tmp_path / "watch.log", environment=environment) as daemon:
            failures = daemon.wait_for("storage_unavailable", count=2, timeout=60)
            assert all("a pin of a restored checkpoint is unknown" in record["error"] for record in failures)
            assert not daemon.events("checkpoint_trashed")
            proxy.serve_all()
            daemon.wait_for("storage_restored", timeout=60)
            daemon.wait_for("checkpoint_trashed", count=2, timeout=60)
            assert daemon.stop() == 0
    finally:
        proxy.stop()
    trashed = [record["path"].rsplit("/", 1)[-1] for record in daemon.events("checkpoint_trashed")]
    assert sorted(trashed) == [step_name(0, 300), step_name(0, 400)]
    assert _checkpoint_keys(s3) == {restored_key, f"root/run/{step_name(0, 500)}"}
    problems = [record for record in daemon.events("trash_problem") if "/restored/" in record["path"]]
    assert [record["detail"] for record in problems] == ["not read now; read again at the next look"]


def test_a_pass_stopped_by_a_pin_after_its_purge_is_reported_with_what_it_purged(
    s3: Bucket, s3_server: S3Server, tmp_path: Path
) -> None:
    """A bucket pass that stopped because a pin could not be read was never reported, even when it
    had purged the trash's due entries first: ``pass_completed`` and the metrics lost them. It is
    reported now, ``stopped``, with what it purged; a pass that did nothing before stopping is not."""
    _seed(s3, range(100, 400, 100))
    url = f"{s3.url}/root"
    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    assert run_cli("prune", url, "--policy", str(policy)).returncode == 0  # 100 and 200, for an hour
    assert run_cli("restore", url, step_name(0, 100)).returncode == 0  # pinned for that hour
    _seed(s3, range(400, 600, 100))
    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1s\n")
    pruned = run_cli("prune", url, "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr
    assert len(events(pruned.stderr, "checkpoint_trashed")) == 2  # 300 and 400, for a second
    time.sleep(1.5)
    proxy = FaultProxy(s3_server.port, tmp_path / "proxy-control")
    proxy.start()
    try:
        environment = {"AWS_ENDPOINT_URL": proxy.endpoint}
        proxy.fail_requests(f"GET /{s3.name}/{TRASH}/restored/")
        arguments = ["watch", url, "--policy", str(policy), "--poll-interval", "0.5", "--settle", "0"]
        with running_daemon(arguments, tmp_path / "watch.log", environment=environment) as daemon:
            daemon.wait_for("storage_unavailable", count=2, timeout=60)
            passes = daemon.wait_for("pass_completed", timeout=30)
            assert daemon.stop() == 0
    finally:
        proxy.stop()
    assert passes[0]["purged"] == 2
    assert "a pin of a restored checkpoint is unknown" in passes[0]["stopped"]
    assert len(daemon.events("pass_completed")) == 1  # the retries after it purged nothing
    assert len(daemon.events("checkpoint_purged")) == 2
    assert not daemon.events("checkpoint_trashed")
    assert _checkpoint_keys(s3) == {f"root/run/{step_name(0, 100)}", f"root/run/{step_name(0, 500)}"}


def _etag(s3: Bucket, key: str) -> str:
    head = s3.filesystem.call_s3("head_object", Bucket=s3.name, Key=key)
    return str(head["ETag"])


@pytest.mark.parametrize("when", ["before the move", "after its copy, before its HEAD"])
def test_a_stale_plan_does_not_trash_a_checkpoint_restored_meanwhile(
    s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A review found the bucket's moves had no check like the directory's under its lock: a pass
    planned X for the trash; meanwhile another ``prune`` trashed X and a ``restore`` put it back,
    pinned, with the same ETag (a restore's copy of X when X was itself restored once before); the
    stale plan then trashed the restored X again. Now the move lists the pins right before its
    DELETE, after the HEAD that saw X (a restore writes its pin before its object appears), and keeps
    X (CHANGED); its copy is dropped. A second review found a first fix looked before the HEAD."""
    seeded = {f"root/run/{step_name(0, step)}": _checkpoint(step) for step in (100, 200, 300, 400)}
    s3.put_many(seeded)
    x = f"root/run/{step_name(0, 100)}"
    url = f"{s3.url}/root"
    short = tmp_path / "short.yaml"
    short.write_text("save_top_k_checkpoints: 2\ntrash:\n  grace: 2s\n")
    long = tmp_path / "long.yaml"
    long.write_text("save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\n")
    assert run_cli("prune", url, "--policy", str(short)).returncode == 0  # an earlier cycle of X:
    assert run_cli("restore", url, step_name(0, 100)).returncode == 0  # its ETag is now a restore's
    planned_tag = _etag(s3, x)
    time.sleep(2.5)  # (that pin over: X is planned again)
    raced: dict[str, Any] = {}

    def another_prune_and_a_restore(decision: Any) -> None:
        if decision.record.name == step_name(0, 100) and not raced:
            other = run_cli("prune", url, "--policy", str(long))
            assert events(other.stderr, "checkpoint_trashed"), other.stderr
            again = run_cli("restore", url, step_name(0, 100))
            assert events(again.stderr, "checkpoint_restored"), again.stderr
            raced["tag"] = _etag(s3, x)

    if when == "before the move":
        move = BucketTrashTarget.__call__

        def racing_move(self: BucketTrashTarget, decision: Any, listing: Any) -> Any:
            another_prune_and_a_restore(decision)
            return move(self, decision, listing)

        monkeypatch.setattr(BucketTrashTarget, "__call__", racing_move)
    else:
        remove = bucket_delete.remove_object

        def racing_remove(decision: Any, *arguments: Any, **keywords: Any) -> Any:
            another_prune_and_a_restore(decision)
            return remove(decision, *arguments, **keywords)

        monkeypatch.setattr(bucket_trash_moves, "remove_object", racing_remove)
    code = main(["prune", url, "--policy", str(long)])

    assert raced["tag"] == planned_tag  # (what makes the race possible: the same ETag)
    assert code == 0
    assert x in s3.raw_keys()  # restored and pinned: kept
    listed = [entry["original"] for entry in _trash_list(s3)]
    assert listed.count(f"run/{step_name(0, 100)}") == 0  # (the stale move's copy dropped)


def test_a_move_the_lease_stops_at_its_delete_leaves_no_copy_in_the_trash(
    s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A move whose lease was lost right before its DELETE (asked last) deleted nothing, yet kept its
    copy in the trash: the next pass trashed the object again beside it, two entries for one
    checkpoint. The copy is dropped, as for a move a restore meanwhile holds back; the next pass
    trashes the object once."""
    seeded = _seed(s3, range(100, 500, 100))
    policy = _policy(tmp_path, "save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\n")
    url = f"{s3.url}/root"
    remove = bucket_delete.remove_object
    lease = {"held": True}

    def the_lease_lost_at_the_delete(decision: Any, *arguments: Any, **keywords: Any) -> Any:
        lease["held"] = False  # (lapsing while its HEAD and its look at the pins are in flight)
        try:
            return remove(decision, *arguments, **keywords)
        finally:
            lease["held"] = True

    def refusal(self: BucketStorage) -> str | None:
        return None if lease["held"] else "the lease could not be renewed in time"

    with monkeypatch.context() as patched:
        patched.setattr(bucket_trash_moves, "remove_object", the_lease_lost_at_the_delete)
        patched.setattr(BucketStorage, "refusal", refusal)
        code = main(["prune", url, "--policy", str(policy)])

    assert code == 1  # (each move failed, saying why)
    assert _checkpoint_keys(s3) == set(seeded)
    assert _trash_list(s3) == []
    assert main(["prune", url, "--policy", str(policy)]) == 0
    originals = sorted(entry["original"] for entry in _trash_list(s3))
    assert originals == [f"run/{step_name(0, 100)}", f"run/{step_name(0, 200)}"]


def test_a_second_marker_written_again_after_the_first_went_keeps_the_copy(
    s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a sharded Lightning checkpoint has two markers (``.metadata``, ``meta.pt``). The first
    deleted, the second found written again (a re-save in place: 412) was called CHANGED, which a
    trash move takes for "nothing deleted": its copy was dropped, though the original had lost its
    ``.metadata``, and only a warning said so, exit 0. It is a failure now (what was written again,
    nothing more deleted), and the copy stays in the trash, restorable."""
    names = [".metadata", "__0_0.distcp", "meta.pt"]
    s3.put_many(
        {
            f"root/run/{step_name(0, step)}/{name}": _checkpoint(step + index)
            for step in (100, 200)
            for index, name in enumerate(names)
        }
    )
    quiet_from = time.time() + DIRECTORY_QUIET_SECONDS + 1
    wait_until(lambda: time.time() > quiet_from, timeout=90, what="the directories' quiet time")
    doomed = f"root/run/{step_name(0, 100)}"
    delete = S3Store.delete

    def the_second_marker_written_again(self: S3Store, key: str, *, tag: str) -> None:
        if key == f"{doomed}/meta.pt":
            s3.put(key, b"meta.pt of the re-save")  # (the writer's re-save in place, finishing)
        delete(self, key, tag=tag)

    policy = _policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    with monkeypatch.context() as patched:
        patched.setattr(S3Store, "delete", the_second_marker_written_again)
        code = main(["prune", f"{s3.url}/root", "--policy", str(policy)])

    assert code == 1
    left = {key for key in _checkpoint_keys(s3) if key.startswith(doomed + "/")}
    assert f"{doomed}/.metadata" not in left  # (the first marker went)
    assert f"{doomed}/__0_0.distcp" in left  # (nothing more of it)
    [entry] = _trash_list(s3)
    assert entry["original"] == f"run/{step_name(0, 100)}"
