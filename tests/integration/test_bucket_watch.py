"""``watch s3://...`` as a real process against a real S3 server (moto), through s3fs/botocore only.

Listing is the observer: a pass lists the prefix and reads only objects that changed. One watcher per
prefix (the lease): a second exits 2 naming the holder; one killed with SIGKILL is taken over once
its lease has expired. Faults: the server going away and coming back (a proxy in front of it is
stopped and started again, so the server keeps its objects), and a listing failing at its second page.
"""

from __future__ import annotations

import collections
import json
import signal
import socket
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.daemon import DaemonProcess, running_daemon, wait_until
from tests.support.factories import step_name, zip_bytes
from tests.support.s3_server import Bucket, FaultProxy, S3Server

pytestmark = pytest.mark.timeout(240)

ZIP = zip_bytes(b"weights" * 20)
LEASE = ".ckpt-watcher.lease"
LEASE_SECONDS = "20"


@contextmanager
def _watch(
    url: str, log_path: Path, *extra: str, environment: dict[str, str] | None = None
) -> Iterator[DaemonProcess]:
    arguments = ["watch", url, "--poll-interval", "0.5", "--settle", "0", *extra]
    with running_daemon(arguments, log_path, environment) as daemon:
        yield daemon


def _checkpoint(step: int) -> bytes:
    """A small complete checkpoint of its own (objects with the same bytes share an ETag)."""
    return zip_bytes(f"weights of step {step}".encode() * 20)


def _seed(bucket: Bucket, prefix: str, steps: range | list[int]) -> None:
    bucket.put_many({f"{prefix}/{step_name(0, step)}": _checkpoint(step) for step in steps})


def _names(bucket: Bucket, prefix: str) -> set[str]:
    return {key.removeprefix(f"{prefix}/") for key in bucket.raw_keys() if key.startswith(f"{prefix}/")}


def _checkpoints(steps: range | list[int]) -> set[str]:
    return {step_name(0, step) for step in steps}


def test_watch_prunes_a_prefix_as_checkpoints_arrive_and_releases_its_lease(
    s3: Bucket, tmp_path: Path
) -> None:
    url = f"{s3.url}/run"
    _seed(s3, "run", range(100, 400, 100))
    with _watch(url, tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        assert _names(s3, "run") == _checkpoints(range(100, 400, 100)) | {LEASE}
        for step in range(400, 900, 100):
            s3.put(f"run/{step_name(0, step)}", _checkpoint(step))
        newest = _checkpoints(range(400, 900, 100))
        wait_until(lambda: _names(s3, "run") == newest | {LEASE}, what="the prefix pruned to the newest 5")
        assert daemon.stop() == 0
    deleted = [record["path"] for record in daemon.events("checkpoint_deleted")]
    assert sorted(deleted) == sorted(f"{url}/{step_name(0, step)}" for step in range(100, 400, 100))
    assert _names(s3, "run") == newest  # the lease was released
    assert [record["observer"] for record in daemon.events("watch_started")] == ["listing every 0.5 s"]


def test_an_unchanged_prefix_costs_its_listing_only(s3: Bucket, s3_server: S3Server, tmp_path: Path) -> None:
    """Each object is read once (one ranged GET of its tail: these are small); later passes over the
    unchanged prefix send one ListObjectsV2 each and nothing else (but the lease's renewals)."""
    url = f"{s3.url}/run"
    _seed(s3, "run", range(100, 600, 100))

    def requests() -> list[tuple[str, str]]:
        mine = f"/{s3.name}"
        return [
            (method, urllib.parse.unquote(target))
            for method, target, _ in s3_server.requests()
            if target.startswith((mine + "/", mine + "?"))
        ]

    with _watch(url, tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        passes = len(daemon.events("pass_completed"))
        daemon.wait_for("pass_completed", count=passes + 3)
        before = len(requests())
        passes = len(daemon.events("pass_completed"))
        daemon.wait_for("pass_completed", count=passes + 6)
        later = requests()[before:]
        assert daemon.stop() == 0

    object_reads = collections.Counter(
        target for method, target in requests() if method == "GET" and "list-type=2" not in target
    )
    assert sorted(object_reads) == sorted(
        f"/{s3.name}/run/{step_name(0, step)}" for step in range(100, 600, 100)
    )
    assert set(object_reads.values()) == {1}
    kinds = collections.Counter(
        "list"
        if method == "GET" and "list-type=2" in target
        else "lease"
        if target.endswith(LEASE)
        else method
        for method, target in later
    )
    assert set(kinds) <= {"list", "lease"}, later
    assert kinds["list"] >= 5


def test_a_second_watcher_on_the_same_prefix_exits_2_naming_the_holder(s3: Bucket, tmp_path: Path) -> None:
    url = f"{s3.url}/run"
    with _watch(url, tmp_path / "first.log") as first:
        first.wait_ready()

        second = run_cli("watch", url, "--poll-interval", "0.5", timeout=60)

        assert second.returncode == 2
        holder = f"held by host {socket.gethostname()}, pid {first.process.pid}"
        assert f"ckpt-watcher: another ckpt-watcher is already pruning {url} ({holder}" in second.stderr
        assert first.process.poll() is None
        assert first.stop() == 0


def test_a_watcher_killed_with_sigkill_is_taken_over_once_its_lease_expired(
    s3: Bucket, tmp_path: Path
) -> None:
    url = f"{s3.url}/run"
    _seed(s3, "run", range(100, 600, 100))
    # A time to live long enough that the second watcher below surely starts before it runs out.
    with _watch(url, tmp_path / "killed.log", "--lease-seconds", LEASE_SECONDS) as killed:
        killed.wait_ready()
        killed.stop(signal.SIGKILL)
    assert LEASE in _names(s3, "run")  # never released

    early = run_cli("watch", url, "--poll-interval", "0.5", "--lease-seconds", LEASE_SECONDS, timeout=60)
    assert early.returncode == 2
    assert f"pid {killed.process.pid}" in early.stderr

    _seed(s3, "run", range(600, 900, 100))
    lease = s3.filesystem.info(f"{s3.name}/run/{LEASE}")
    expiry = lease["LastModified"].timestamp() + float(LEASE_SECONDS)
    wait_until(lambda: time.time() > expiry + 1, timeout=30, what="the killed watcher's lease to expire")
    with _watch(url, tmp_path / "successor.log", "--lease-seconds", LEASE_SECONDS) as successor:
        taken = successor.wait_for("lease_taken_over")[0]
        assert taken["previous_holder"] == f"host {socket.gethostname()}, pid {killed.process.pid}"
        newest = _checkpoints(range(400, 900, 100))
        wait_until(lambda: _names(s3, "run") == newest | {LEASE}, what="the successor pruning")
        assert successor.stop() == 0


def test_the_server_stopping_and_coming_back_is_logged_waited_out_and_nothing_is_lost(
    s3: Bucket, s3_server: S3Server, tmp_path: Path
) -> None:
    url = f"{s3.url}/run"
    proxy = FaultProxy(s3_server.port, tmp_path / "proxy-control")
    proxy.start()
    try:
        _seed(s3, "run", range(100, 600, 100))
        environment = {"AWS_ENDPOINT_URL": proxy.endpoint}
        with _watch(url, tmp_path / "watch.log", environment=environment) as daemon:
            daemon.wait_ready()
            proxy.stop()
            _seed(s3, "run", range(600, 900, 100))  # written while the watcher cannot list the prefix

            failures = daemon.wait_for("storage_unavailable", count=3, timeout=60)
            assert [record["retry_in"] for record in failures[:3]] == [1.0, 2.0, 4.0]  # it backs off
            assert all(f"{url}" in record["path"] for record in failures)
            assert _names(s3, "run") == _checkpoints(range(100, 900, 100)) | {LEASE}  # nothing deleted
            assert not daemon.events("checkpoint_deleted")

            proxy.start()
            daemon.wait_for("storage_restored", timeout=60)
            newest = _checkpoints(range(400, 900, 100))
            wait_until(lambda: _names(s3, "run") == newest | {LEASE}, what="pruning once the server is back")
            assert daemon.stop() == 0
    finally:
        proxy.stop()


def _straddling_layout(keys_before: int) -> tuple[dict[str, bytes], str]:
    """1,001 keys in ``run/``: old checkpoint ``epoch=01-step=000001`` is the last key of the first
    listing page (1,000 keys, counting ``keys_before`` that sort first) and its ``.keep`` pin the first
    key of the second page. Planned from the first page alone, it would be deleted."""
    layout = {f"run/{step_name(0, 2000 + index)}": ZIP for index in range(999 - keys_before)}
    pinned = step_name(1, 1)
    layout[f"run/{pinned}"] = ZIP
    layout[f"run/{pinned}.keep"] = b""
    return layout, pinned


@pytest.mark.parametrize("command", ["prune", "watch"])
def test_a_listing_that_fails_mid_pagination_deletes_nothing(
    s3: Bucket, s3_server: S3Server, tmp_path: Path, command: str
) -> None:
    url = f"{s3.url}/run"
    layout, pinned = _straddling_layout(keys_before=1 if command == "watch" else 0)  # the lease sorts first
    s3.put_many(layout)
    proxy = FaultProxy(s3_server.port, tmp_path / "proxy-control")
    proxy.start()
    try:
        environment = {"AWS_ENDPOINT_URL": proxy.endpoint}
        planned = run_cli("prune", url, "--dry-run", "--json", environment=environment)
        assert planned.returncode == 0, planned.stderr
        entries = {
            entry["name"]: entry
            for group in json.loads(planned.stdout)["groups"]
            for entry in group["entries"]
        }
        assert entries[pinned]["action"] == "keep"
        assert entries[pinned]["reasons"] == [f"pinned by {pinned}.keep"]
        assert len([entry for entry in entries.values() if entry["action"] == "delete"]) >= 990
        proxy.fail_continuation(True)

        if command == "prune":
            pruned = run_cli("prune", url, environment=environment)
            assert pruned.returncode == 1
            assert pruned.stderr.rstrip().endswith("; nothing was deleted")
            assert "ListObjectsV2" in pruned.stderr
            assert "InternalError" in pruned.stderr
            assert pruned.stdout == ""
        else:
            with _watch(url, tmp_path / "watch.log", environment=environment) as daemon:
                daemon.wait_for("lease_taken")
                assert sorted(s3.raw_keys()).index(f"run/{pinned}.keep") == 1000  # on the second page
                failures = daemon.wait_for("storage_unavailable", count=2, timeout=60)
                assert "InternalError" in failures[0]["error"]
                assert not daemon.events("pass_completed")
                assert daemon.stop() == 0
        assert _names(s3, "run") == {key.removeprefix("run/") for key in layout}
    finally:
        proxy.stop()
