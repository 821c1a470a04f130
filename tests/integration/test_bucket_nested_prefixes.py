"""Nested bucket roots: ``watch s3://b/run`` beside ``watch s3://b/run/stage1`` against a real S3
server (moto). The outer watcher, and ``prune`` (dry run too), keep whole a sub-prefix whose lease
another watcher holds (bucket_nested.py); an expired lease keeps nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.cli import prune_entries, run_cli
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.factories import step_name, zip_bytes
from tests.support.s3_server import Bucket

pytestmark = pytest.mark.timeout(240)

LEASE = ".ckpt-watcher.lease"
KEEP_ALL = "save_top_k_checkpoints: -1\nsave_top_k_best: 0\nsave_every_n_epochs: 0\n"
KEEP_ONE = "save_top_k_checkpoints: 1\nsave_top_k_best: 0\nsave_every_n_epochs: 0\n"
STEPS = range(100, 600, 100)


def _policy(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _seed(bucket: Bucket, prefix: str) -> None:
    checkpoints = {
        f"{prefix}/{step_name(0, step)}": zip_bytes(f"step {step}".encode() * 20) for step in STEPS
    }
    bucket.put_many(checkpoints)


def _checkpoints(bucket: Bucket, prefix: str) -> list[str]:
    names = (key.removeprefix(f"{prefix}/") for key in bucket.raw_keys() if key.startswith(f"{prefix}/"))
    return sorted(name for name in names if "/" not in name and name.endswith(".ckpt"))


@contextmanager
def _watch(url: str, policy: Path, log_path: Path) -> Iterator[DaemonProcess]:
    arguments = ["watch", url, "--policy", str(policy), "--poll-interval", "0.5", "--settle", "0"]
    with running_daemon(arguments, log_path) as daemon:
        daemon.wait_ready(timeout=60)
        yield daemon
        assert daemon.stop() == 0


def test_the_outer_watcher_keeps_whole_the_prefix_whose_lease_the_inner_one_holds(
    s3: Bucket, tmp_path: Path
) -> None:
    _seed(s3, "run/stage1")
    _seed(s3, "run/stage2")
    keep_all, keep_one = _policy(tmp_path, "all", KEEP_ALL), _policy(tmp_path, "one", KEEP_ONE)

    with (
        _watch(f"{s3.url}/run/stage1", keep_all, tmp_path / "inner.log") as inner,
        _watch(f"{s3.url}/run", keep_one, tmp_path / "outer.log") as outer,
    ):
        warnings = outer.events("group_watched_elsewhere")

    assert _checkpoints(s3, "run/stage1") == [step_name(0, step) for step in STEPS]
    assert _checkpoints(s3, "run/stage2") == [step_name(0, 500)]  # the outer pruned its own group
    assert {(entry["directory"], entry["pid"]) for entry in warnings} == {
        (f"{s3.url}/run/stage1", inner.process.pid)
    }


def _lease(ttl_seconds: float) -> bytes:
    return json.dumps({"host": "gpu-7", "pid": 4242, "token": "t", "ttl_seconds": ttl_seconds}).encode()


@pytest.mark.parametrize(
    ("lease", "reason"),
    [
        (_lease(3600), "watched by another ckpt-watcher (host gpu-7, pid 4242; its lease expires in"),
        (b"not a lease", "watched by another ckpt-watcher (an unreadable lease object;"),  # 60 s
    ],
)
def test_prune_keeps_a_prefix_with_an_unexpired_lease_and_its_dry_run_says_why(
    s3: Bucket, tmp_path: Path, lease: bytes, reason: str
) -> None:
    _seed(s3, "run/stage1")
    s3.put(f"run/stage1/{LEASE}", lease)
    arguments = ["prune", f"{s3.url}/run", "--policy", str(_policy(tmp_path, "one", KEEP_ONE)), "--json"]

    dry_run = prune_entries(run_cli(*arguments, "--dry-run"), exit_code=0)
    pruned = prune_entries(run_cli(*arguments), exit_code=0)

    for entries in (dry_run, pruned):
        checkpoints = [entry for name, entry in entries.items() if name.endswith(".ckpt")]
        assert [entry["action"] for entry in checkpoints] == ["keep"] * len(STEPS)
        assert all(reason in " ".join(entry["reasons"]) for entry in checkpoints)
    assert _checkpoints(s3, "run/stage1") == [step_name(0, step) for step in STEPS]


def test_an_expired_lease_keeps_nothing_while_one_beside_it_keeps_its_prefix(
    s3: Bucket, tmp_path: Path
) -> None:
    """A crashed inner watcher's lease expires: this root's policy applies there again."""
    _seed(s3, "run/crashed")
    _seed(s3, "run/live")
    s3.put(f"run/crashed/{LEASE}", _lease(0.001))
    s3.put(f"run/live/{LEASE}", _lease(3600))
    # The store's clock has whole seconds (Last-Modified and Date): within the second of its PUT the
    # lease cannot be told expired, and is rightly held. Past it, it has expired by any clock.
    time.sleep(2)

    pruned = run_cli("prune", f"{s3.url}/run", "--policy", str(_policy(tmp_path, "one", KEEP_ONE)))

    assert pruned.returncode == 0, pruned.stderr
    assert _checkpoints(s3, "run/crashed") == [step_name(0, 500)]
    assert _checkpoints(s3, "run/live") == [step_name(0, step) for step in STEPS]
