"""A Hugging Face Trainer's output directory synced to a bucket prefix keeps its best checkpoint.

``checkpoint-N/`` prefixes whose ``trainer_state.json`` (written last) names ``best_model_checkpoint``:
as on disk, the checkpoint the newest one names is kept (README, rule 6), a cut ``trainer_state.json``
keeps its checkpoint from counting, and the object is read once: later passes over the unchanged prefix
make list requests only. Each prefix is left until its quiet time (30 s) has passed, so it counts.
"""

from __future__ import annotations

import collections
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from tests.support.cli import events, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.s3_server import Bucket, S3Server, environment

pytestmark = pytest.mark.timeout(240)

LEASE = ".ckpt-watcher.lease"
KEEP_ONE = "save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n"
BEST_REASON = "best_model_checkpoint in checkpoint-2000/trainer_state.json (Hugging Face)"
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
# Each checkpoint's best, as the Trainer writes it (a path): checkpoint-1000 is the run's best.
BESTS = {500: None, 1000: "checkpoint-500", 1500: "checkpoint-1000", 2000: "checkpoint-1000"}
_UPLOADS = re.compile(r"[?&]uploads(?:[=&]|$)")


def _trainer_state(step: int, best: str | None) -> bytes:
    state = {"global_step": step, "best_model_checkpoint": best and f"/trainer/mount/output/{best}"}
    return (json.dumps(state, indent=2) + "\n").encode()


def _output_directory(prefix: str, bests: dict[int, str | None]) -> dict[str, bytes]:
    """A Trainer's ``checkpoint-N/`` directories as objects under ``prefix``."""
    layout: dict[str, bytes] = {}
    for step, best in bests.items():
        for name in FILES:
            layout[f"{prefix}/checkpoint-{step}/{name}"] = b"x" * 100
        layout[f"{prefix}/checkpoint-{step}/trainer_state.json"] = _trainer_state(step, best)
    return layout


def _cut(layout: dict[str, bytes], key: str) -> dict[str, bytes]:
    whole = layout[key]
    return {**layout, key: whole[: len(whole) // 2]}


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> Iterator[Bucket]:
    """``hf`` and ``watched``: an output directory whose best is checkpoint-1000; ``cut``: one whose
    checkpoint-1000 has a cut trainer_state.json. Yielded once their quiet time has passed."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment(s3_server.endpoint).items():
            patch.setenv(name, value)
        bucket = Bucket(s3_server.endpoint).create()
        cut = _output_directory("cut", {500: None, 1000: "checkpoint-500"})
        bucket.put_many(
            {
                **_output_directory("hf", BESTS),
                **_output_directory("watched", BESTS),
                **_cut(cut, "cut/checkpoint-1000/trainer_state.json"),
            }
        )
        quiet_from = time.time() + DIRECTORY_QUIET_SECONDS + 1
        wait_until(lambda: time.time() > quiet_from, timeout=90, what="the checkpoints' quiet time")
        yield bucket


def _policy(tmp_path: Path) -> str:
    policy = tmp_path / "keep-one.yaml"
    policy.write_text(KEEP_ONE)
    return str(policy)


def _entries(stdout: str) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for group in json.loads(stdout)["groups"] for entry in group["entries"]}


def _checkpoints(bucket: Bucket, prefix: str) -> set[str]:
    return {key.split("/")[1] for key in bucket.raw_keys() if key.startswith(f"{prefix}/checkpoint-")}


def test_prune_keeps_the_checkpoint_the_newest_trainer_state_calls_the_best(
    bucket: Bucket, tmp_path: Path
) -> None:
    url = f"{bucket.url}/hf"
    policy = _policy(tmp_path)

    planned = run_cli("prune", url, "--policy", policy, "--dry-run", "--json")

    assert planned.returncode == 0, planned.stderr
    entries = _entries(planned.stdout)
    assert {name: entry["action"] for name, entry in entries.items()} == {
        "checkpoint-2000": "keep",
        "checkpoint-1500": "delete",
        "checkpoint-1000": "keep",
        "checkpoint-500": "delete",
    }
    assert entries["checkpoint-1000"]["reasons"] == [BEST_REASON]
    assert _checkpoints(bucket, "hf") == {f"checkpoint-{step}" for step in BESTS}

    pruned = run_cli("prune", url, "--policy", policy, "--json")

    assert pruned.returncode == 0, pruned.stderr
    assert _checkpoints(bucket, "hf") == {"checkpoint-1000", "checkpoint-2000"}
    assert _entries(pruned.stdout)["checkpoint-1000"]["reasons"] == [BEST_REASON]
    deleted = {record["path"] for record in events(pruned.stderr, "checkpoint_deleted")}
    assert deleted == {f"{url}/checkpoint-500", f"{url}/checkpoint-1500"}


def test_a_cut_trainer_state_keeps_its_checkpoint_from_counting(bucket: Bucket, tmp_path: Path) -> None:
    url = f"{bucket.url}/cut"

    planned = run_cli("prune", url, "--policy", _policy(tmp_path), "--dry-run", "--json")

    assert planned.returncode == 0, planned.stderr
    entries = _entries(planned.stdout)
    assert entries["checkpoint-1000"]["action"] == "skip"
    assert entries["checkpoint-1000"]["reasons"] == [
        "directory checkpoint: its trainer_state.json, written last, is not whole JSON: truncated"
    ]
    assert entries["checkpoint-500"]["action"] == "keep"  # the newest complete one
    warnings = events(planned.stderr, "checkpoint_suspicious")
    assert [record["path"] for record in warnings] == [f"{url}/checkpoint-1000"]


def test_a_watched_output_directory_reads_each_trainer_state_once(
    bucket: Bucket, s3_server: S3Server, tmp_path: Path
) -> None:
    """The first pass reads each trainer_state.json once and keeps the best; later passes over the
    unchanged prefix list it (ListObjectsV2, and ListMultipartUploads: a directory checkpoint would
    count) and renew the lease, and nothing else."""
    url = f"{bucket.url}/watched"
    mine = f"/{bucket.name}/watched"

    def requests() -> list[tuple[str, str]]:
        return [
            (method, urllib.parse.unquote(target))
            for method, target, _ in s3_server.requests()
            if target.startswith(f"/{bucket.name}?") or target.startswith(f"{mine}/")
        ]

    start = len(requests())
    arguments = ["watch", url, "--policy", _policy(tmp_path), "--poll-interval", "0.5", "--settle", "0"]
    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        wait_until(  # once the daemon has seen each directory unchanged for its quiet time (30 s)
            lambda: _checkpoints(bucket, "watched") == {"checkpoint-1000", "checkpoint-2000"},
            timeout=DIRECTORY_QUIET_SECONDS + 60,
            what="the prefix pruned to its newest checkpoint and its best",
        )
        passes = len(daemon.events("pass_completed"))
        daemon.wait_for("pass_completed", count=passes + 3)
        before = len(requests())
        passes = len(daemon.events("pass_completed"))
        daemon.wait_for("pass_completed", count=passes + 6)
        later = requests()[before:]
        assert daemon.stop() == 0

    state_reads = collections.Counter(
        target
        for method, target in requests()[start:]
        if method == "GET" and target.endswith("trainer_state.json")
    )
    assert state_reads == {f"{mine}/checkpoint-{step}/trainer_state.json": 1 for step in BESTS}
    kinds = collections.Counter(
        "list"
        if method == "GET" and ("list-type=2" in target or _UPLOADS.search(target))
        else "lease"
        if target.endswith(LEASE)
        else method
        for method, target in later
    )
    assert set(kinds) <= {"list", "lease"}, later
    assert kinds["list"] >= 5
    assert _checkpoints(bucket, "watched") == {"checkpoint-1000", "checkpoint-2000"}
