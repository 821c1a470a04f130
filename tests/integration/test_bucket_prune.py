"""``prune s3://...`` decides and deletes exactly as ``prune DIRECTORY`` on the same layout.

One layout (tests/support/layouts.py: the seed's names, ``-vN`` versions, steps past 999,999, unknown
names, a file whose tail is not a zip end record, a legacy non-zip file, a ``.keep`` pin, per-run
policies, directory checkpoints) is written as files under a directory and as objects under a prefix
of a bucket on a real S3 server (moto, through s3fs). The directory checkpoints are written first;
both copies are then left until their quiet time (30 s) has passed, so they count on both sides.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from tests.support.cli import events, run_cli
from tests.support.daemon import wait_until
from tests.support.factories import step_name, zip_bytes
from tests.support.layouts import directory_checkpoints, file_checkpoints, write_files
from tests.support.s3_server import Bucket, S3Server, environment

pytestmark = pytest.mark.timeout(240)

PREFIX = "checkpoints"
UNKNOWN = ("unknown name: matches no checkpoint template",)

# What the policy decides for the layout (the embedded default; stage2 and stage3 keep 1 step).
EXPECTED: list[tuple[str, str, tuple[str, ...]]] = [
    ("README.txt", "skip", UNKNOWN),
    ("big/epoch=100-step=1001000-train.ckpt", "keep", ("newest 5 step checkpoints (#1 of 5)",)),
    ("big/epoch=100-step=1000500-train.ckpt", "keep", ("newest 5 step checkpoints (#2 of 5)",)),
    ("big/epoch=100-step=1000000-train.ckpt", "keep", ("newest 5 step checkpoints (#3 of 5)",)),
    ("big/epoch=99-step=999500-train.ckpt", "keep", ("newest 5 step checkpoints (#4 of 5)",)),
    ("big/epoch=99-step=999000-train.ckpt", "keep", ("newest 5 step checkpoints (#5 of 5)",)),
    ("big/epoch=99-step=998500-train.ckpt", "delete", ("outside newest 5 step checkpoints (#6)",)),
    ("stage1/last.ckpt", "keep", ("last checkpoint: the resume point, always kept",)),
    (
        "stage1/best_20261128_epoch=03_step=003500_loss=0.3987.ckpt",
        "keep",
        ("top 3 best (rank 1, loss=0.3987)",),
    ),
    (
        "stage1/best_20261128_epoch=01_step=002000_loss=0.4410.ckpt",
        "keep",
        ("top 3 best (rank 2, loss=0.4410)",),
    ),
    (
        "stage1/best_20261128_epoch=00_step=001000_loss=0.6123.ckpt",
        "keep",
        ("top 3 best (rank 3, loss=0.6123)",),
    ),
    (
        "stage1/best_20261128_epoch=02_step=003000_loss=nan.ckpt",
        "delete",
        ("outside top 3 best (rank 4, loss=nan)",),
    ),
    ("stage1/epoch=04-step=004000-train.ckpt", "keep", ("newest 5 step checkpoints (#1 of 5)",)),
    ("stage1/epoch=03-step=003500-train-v2.ckpt", "keep", ("newest 5 step checkpoints (#2 of 5)",)),
    ("stage1/epoch=03-step=003500-train-v1.ckpt", "keep", ("newest 5 step checkpoints (#3 of 5)",)),
    ("stage1/epoch=03-step=003500-train.ckpt", "keep", ("newest 5 step checkpoints (#4 of 5)",)),
    ("stage1/epoch=03-step=003000-train.ckpt", "keep", ("newest 5 step checkpoints (#5 of 5)",)),
    ("stage1/epoch=02-step=002500-train.ckpt", "delete", ("outside newest 5 step checkpoints (#6)",)),
    ("stage1/epoch=02-step=002000-train.ckpt", "delete", ("outside newest 5 step checkpoints (#7)",)),
    ("stage1/epoch=01-step=001500-train.ckpt", "delete", ("outside newest 5 step checkpoints (#8)",)),
    ("stage1/epoch=01-step=001000-train.ckpt", "keep", ("pinned by epoch=01-step=001000-train.ckpt.keep",)),
    ("stage1/epoch=00-step=000500-train.ckpt", "delete", ("outside newest 5 step checkpoints (#10)",)),
    ("stage1/Epoch=00-step=000700-train.ckpt", "skip", UNKNOWN),
    (
        "stage1/epoch=00-step=000100-train.ckpt",
        "skip",
        ("not a zip archive (a legacy torch.save file or not a checkpoint)",),
    ),
    ("stage1/epoch=00-step=000600-train.ckpt.tmp", "skip", UNKNOWN),
    ("stage1/epoch=01-step=001000-train.ckpt.keep", "skip", UNKNOWN),
    (
        "stage1/epoch=04-step=004500-train.ckpt",
        "skip",
        ("no end-of-central-directory record: still being written or truncated",),
    ),
    ("stage1/hparams.yaml", "skip", UNKNOWN),
    ("stage2/epoch=00-step=000300-train.ckpt", "keep", ("newest 1 step checkpoints (#1 of 1)",)),
    ("stage2/epoch=00-step=000200-train.ckpt", "delete", ("outside newest 1 step checkpoints (#2)",)),
    ("stage2/epoch=00-step=000100-train.ckpt", "delete", ("outside newest 1 step checkpoints (#3)",)),
    ("stage2/.ckpt-watcher.yaml", "skip", UNKNOWN),
    ("stage3/epoch=00-step=000200-train.ckpt", "keep", ("newest 1 step checkpoints (#1 of 1)",)),
    ("stage3/epoch=00-step=000100-train.ckpt", "delete", ("outside newest 1 step checkpoints (#2)",)),
    ("stage3/.ckpt-watcher.yaml", "skip", UNKNOWN),
    (
        "stage3/epoch=00-step=000300-train.ckpt",
        "skip",
        (
            "directory checkpoint: no completion marker yet (DeepSpeed 'latest', Lightning FSDP 'meta.pt', "
            "torch.distributed.checkpoint '.metadata', Hugging Face 'trainer_state.json')",
        ),
    ),
]
DELETED = {path for path, action, _ in EXPECTED if action == "delete"}
LAYOUT = {**directory_checkpoints(), **file_checkpoints()}
REMAINING = {key for key in LAYOUT if not any(key == path or key.startswith(f"{path}/") for path in DELETED)}


@dataclass(frozen=True)
class Roots:
    """The same layout twice: under a directory and under a bucket prefix."""

    directory: Path
    bucket: Bucket

    def root(self, where: str) -> str:
        return str(self.directory) if where == "directory" else f"{self.bucket.url}/{PREFIX}"

    def remaining(self, where: str) -> set[str]:
        if where == "bucket":
            return {key.removeprefix(f"{PREFIX}/") for key in self.bucket.raw_keys()}
        return {
            str(Path(directory, name).relative_to(self.directory))
            for directory, _, names in os.walk(self.directory)
            for name in names
        }


@pytest.fixture(scope="module")
def roots(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roots]:
    """Both copies, written directory checkpoints first, once their quiet time has passed."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment(s3_server.endpoint).items():
            patch.setenv(name, value)
        bucket = Bucket(s3_server.endpoint).create()
        directory = tmp_path_factory.mktemp("layout") / PREFIX
        write_files(directory, directory_checkpoints())
        bucket.put_many({f"{PREFIX}/{key}": data for key, data in directory_checkpoints().items()})
        quiet_from = time.time() + DIRECTORY_QUIET_SECONDS + 1
        write_files(directory, file_checkpoints())
        bucket.put_many({f"{PREFIX}/{key}": data for key, data in file_checkpoints().items()})
        # A key a path cannot name (an empty component): only a bucket can hold it; never touched.
        bucket.put_raw(f"{PREFIX}/stage1//odd.ckpt", LAYOUT["stage1/last.ckpt"])
        wait_until(lambda: time.time() > quiet_from, timeout=90, what="the directory checkpoints' quiet time")
        yield Roots(directory, bucket)


def _decisions(document: dict[str, Any], root: str) -> list[dict[str, Any]]:
    """Every entry with its path relative to the root (the rest of each entry as the JSON has it)."""
    found = []
    for group in document["groups"]:
        for entry in group["entries"]:
            relative = entry["path"].removeprefix(root.rstrip("/") + "/")
            found.append({**entry, "path": relative})
    return found


def _dry_run(root: str) -> list[dict[str, Any]]:
    result = run_cli("prune", root, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    return _decisions(json.loads(result.stdout), root)


def test_a_bucket_prefix_gets_the_plan_of_a_directory_with_the_same_layout(roots: Roots) -> None:
    on_disk = _dry_run(roots.root("directory"))
    in_bucket = _dry_run(roots.root("bucket"))

    assert in_bucket == on_disk  # every field: kind, type, epoch, step, metric, version, bytes, reasons
    assert [(entry["path"], entry["action"], tuple(entry["reasons"])) for entry in in_bucket] == EXPECTED


@pytest.mark.parametrize("where", ["directory", "bucket"])
def test_dry_run_changes_nothing_then_prune_deletes_exactly_the_plan(roots: Roots, where: str) -> None:
    root = roots.root(where)
    before = roots.remaining(where)
    dry = _dry_run(root)
    assert [(entry["path"], entry["action"], tuple(entry["reasons"])) for entry in dry] == EXPECTED
    assert roots.remaining(where) == before

    result = run_cli("prune", root, "--json")

    assert result.returncode == 0, result.stderr
    entries = _decisions(json.loads(result.stdout), root)
    assert {entry["path"] for entry in entries if entry.get("outcome") == "deleted"} == DELETED
    assert {entry["path"] for entry in entries if entry.get("outcome") not in (None, "deleted")} == set()
    logged = {
        record["path"].removeprefix(root + "/") for record in events(result.stderr, "checkpoint_deleted")
    }
    assert logged == DELETED
    assert roots.remaining(where) == REMAINING | ({"stage1//odd.ckpt"} if where == "bucket" else set())


def test_a_directory_checkpoint_in_a_bucket_loses_its_marker_first(roots: Roots, s3_server: S3Server) -> None:
    """Ran after the prune above: the server's request log shows the deletion manifest written, the
    ``latest`` marker deleted, then the other objects in one DeleteObjects batch, then the manifest."""
    doomed = f"/{roots.bucket.name}/{PREFIX}/stage3/epoch=00-step=000100-train.ckpt"
    requests = [
        (method, urllib.parse.unquote(target), status) for method, target, status in s3_server.requests()
    ]
    touching = [
        (method, target)
        for method, target, _ in requests
        if method in {"PUT", "POST", "DELETE"}
        and (target.startswith(doomed + "/") or target.startswith(f"/{roots.bucket.name}?delete"))
    ]
    manifest = ("PUT", f"{doomed}/.ckpt-watcher-deleting")
    assert manifest in touching
    touching = touching[touching.index(manifest) :]  # before it: the test writing the layout
    assert touching == [
        ("PUT", f"{doomed}/.ckpt-watcher-deleting"),
        ("DELETE", f"{doomed}/latest"),
        ("POST", f"/{roots.bucket.name}?delete"),
        ("DELETE", f"{doomed}/.ckpt-watcher-deleting"),
    ]


def test_a_key_no_path_can_name_is_never_touched_and_reported(roots: Roots) -> None:
    result = run_cli("prune", roots.root("bucket"), "--json")

    assert result.returncode == 0, result.stderr
    problems = events(result.stderr, "scan_problem")
    assert [problem["error"] for problem in problems] == [
        f"{roots.bucket.url}/{PREFIX}/stage1//odd.ckpt: a key that no path names exactly "
        "(an empty, '.' or '..' component); never touched"
    ]
    assert f"{PREFIX}/stage1//odd.ckpt" in roots.bucket.raw_keys()


def test_a_directory_checkpoint_with_a_shard_still_uploading_never_pushes_out_a_complete_one(
    s3: Bucket, tmp_path: Path
) -> None:
    """Step 200's marker is there (DeepSpeed's rank 0 writes `latest` before the other ranks are done)
    and nothing new was listed for the quiet time, but its rank 1 shard is a multipart upload still in
    progress, which no listing shows: step 200 is not complete, so the complete step 100 stays."""
    old, new = step_name(0, 100), step_name(0, 200)
    shard = zip_bytes(b"weights" * 100)
    s3.put_many(
        {
            f"root/run/{old}/zero/rank0.pt": shard,
            f"root/run/{old}/zero/rank1.pt": shard,
            f"root/run/{old}/latest": b"global_step100",
            f"root/run/{new}/zero/rank0.pt": shard,
            f"root/run/{new}/latest": b"global_step200",
        }
    )
    uploading = f"root/run/{new}/zero/rank1.pt"
    upload = s3.filesystem.call_s3("create_multipart_upload", Bucket=s3.name, Key=uploading)
    s3.filesystem.call_s3(
        "upload_part",
        Bucket=s3.name,
        Key=uploading,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * (5 << 20),
    )
    time.sleep(DIRECTORY_QUIET_SECONDS + 1)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")

    pruned = run_cli("prune", f"{s3.url}/root", "--policy", str(policy), "--dry-run", "--json")
    deleted = run_cli("prune", f"{s3.url}/root", "--policy", str(policy))

    entries = {
        entry["name"]: entry for group in json.loads(pruned.stdout)["groups"] for entry in group["entries"]
    }
    assert entries[new]["action"] == "skip"
    assert "a multipart upload in progress under it" in entries[new]["reasons"][0]
    assert entries[old]["action"] == "keep"
    assert deleted.returncode == 0, deleted.stderr
    assert f"root/run/{old}/latest" in s3.raw_keys()
