"""Byte budgets on a bucket root (issue 14): ``max_size`` works there exactly as on a directory (the
same eviction order, the same reasons, ``budget_unmet`` where it cannot be met), and ``keep_free``,
which has no meaning on a bucket, is refused wherever it is set: in the root policy (exit 2) and in a
per-run ``.ckpt-watcher.yaml`` object (an invalid per-run policy: ``prune`` exits 2 and deletes
nothing; the daemon blocks that group with ``group_blocked`` and prunes the others)."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import events, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import best_name, step_name, zip_bytes
from tests.support.s3_server import Bucket

pytestmark = pytest.mark.timeout(180)

KIB = 1024


def _payload(step: int, size: int) -> bytes:
    """A checkpoint of about ``size`` bytes, its bytes its own (no two objects share an ETag)."""
    return zip_bytes(random.Random(step).randbytes(size))  # noqa: S311  (test data, not secrets)


def _budget_layout() -> dict[str, bytes]:
    """Two runs of ~10 KiB checkpoints: step checkpoints, best ones, a ``last.ckpt``."""
    layout: dict[str, bytes] = {}
    for run in ("a", "b"):
        for step in range(100, 900, 100):
            layout[f"{run}/{step_name(0, step)}"] = _payload(step, 10 * KIB)
        for epoch, (step, loss) in enumerate([(150, 0.9), (350, 0.5), (550, 0.7)]):
            layout[f"{run}/{best_name(epoch, step, loss)}"] = _payload(step + 1, 10 * KIB)
        layout[f"{run}/last.ckpt"] = _payload(999, 10 * KIB)
    return layout


def _decisions(stdout: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each entry's (action, reasons) by its path relative to the root."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for group in json.loads(stdout)["groups"]:
        for entry in group["entries"]:
            relative = entry["path"].rsplit("/", 2)
            found["/".join(relative[-2:])] = (entry["action"], tuple(entry["reasons"]))
    return found


def _unmet(stderr: str) -> list[tuple[str, int, int]]:
    return sorted(
        (record["directory"].rsplit("/", 1)[-1], record["unmet_bytes"], record["limit_bytes"])
        for record in events(stderr, "budget_unmet")
    )


@pytest.mark.parametrize("max_size", ["35KiB", "0"])
def test_max_size_on_a_bucket_decides_as_on_a_directory(s3: Bucket, tmp_path: Path, max_size: str) -> None:
    """The same layout as files and as objects, ``max_size`` on (and overridden per run): the same
    decisions and reasons (eviction order: top-k steps oldest first, then best worst first; never the
    last, its rank-1 best or the newest), the same ``budget_unmet`` where it cannot be met, and the
    same checkpoints left after a real prune."""
    layout = _budget_layout()
    directory = tmp_path / "root"
    for relative, data in layout.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_bytes(data)
    s3.put_many({f"root/{relative}": data for relative, data in layout.items()})
    override = b"max_size: 45KiB\n"
    (directory / "b" / ".ckpt-watcher.yaml").write_bytes(override)
    s3.put("root/b/.ckpt-watcher.yaml", override)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: -1\nmax_size: {max_size}\n")
    url = f"{s3.url}/root"

    local_dry = run_cli("prune", str(directory), "--policy", str(policy), "--dry-run", "--json")
    bucket_dry = run_cli("prune", url, "--policy", str(policy), "--dry-run", "--json")
    assert local_dry.returncode == 0, local_dry.stderr
    assert bucket_dry.returncode == 0, bucket_dry.stderr
    local, bucket = _decisions(local_dry.stdout), _decisions(bucket_dry.stdout)
    assert bucket == local
    evicted = {path for path, (action, reasons) in bucket.items() if action == "delete"}
    assert all(bucket[path][1][0].startswith("evicted for space: group over max_size") for path in evicted)
    assert bucket["a/last.ckpt"][0] == "keep"
    assert bucket[f"a/{step_name(0, 800)}"][0] == "keep"  # the newest: its last way to resume
    assert bucket[f"a/{best_name(1, 350, 0.5)}"][0] == "keep"  # the rank-1 best
    if max_size == "35KiB":
        # Run a: 12 checkpoints of ~10 KiB in 35 KiB: every step but the newest (oldest first), then
        # the best ones worst first, down to the never-evicted three.
        assert {f"a/{step_name(0, step)}" for step in range(100, 800, 100)} <= evicted
        assert {f"a/{best_name(0, 150, 0.9)}", f"a/{best_name(2, 550, 0.7)}"} <= evicted
    assert _unmet(bucket_dry.stderr) == _unmet(local_dry.stderr)
    assert bool(_unmet(bucket_dry.stderr)) == (max_size == "0")

    local_pruned = run_cli("prune", str(directory), "--policy", str(policy))
    bucket_pruned = run_cli("prune", url, "--policy", str(policy))
    assert local_pruned.returncode == 0, local_pruned.stderr
    assert bucket_pruned.returncode == 0, bucket_pruned.stderr
    on_disk = {str(path.relative_to(directory)) for path in directory.rglob("*.ckpt")}
    in_bucket = {key.removeprefix("root/") for key in s3.raw_keys() if key.endswith(".ckpt")}
    assert in_bucket == on_disk == set(layout) - evicted
    deleted: list[dict[str, Any]] = events(bucket_pruned.stderr, "checkpoint_deleted")
    assert sorted(record["path"].removeprefix(f"{url}/") for record in deleted) == sorted(evicted)


def test_keep_free_in_a_per_run_object_is_refused_by_prune(s3: Bucket) -> None:
    s3.put_many({f"root/run/{step_name(0, step)}": _payload(step, KIB) for step in range(100, 900, 100)})
    s3.put("root/run/.ckpt-watcher.yaml", b"keep_free: 10GiB\n")

    result = run_cli("prune", f"{s3.url}/root")

    assert result.returncode == 2
    assert f"invalid policy {s3.url}/root/run/.ckpt-watcher.yaml" in result.stderr
    assert "At 'keep_free': a bucket has no free space to keep" in result.stderr
    assert "Traceback" not in result.stderr
    assert len([key for key in s3.raw_keys() if key.endswith(".ckpt")]) == 8  # nothing deleted


def test_keep_free_in_a_per_run_object_blocks_its_group_in_the_daemon(s3: Bucket, tmp_path: Path) -> None:
    """The run whose object asks for keep_free keeps everything (``group_blocked``, the file rejected);
    another run beside it is pruned as usual."""
    steps = range(100, 900, 100)
    runs = ("asks", "plain")
    s3.put_many({f"root/{run}/{step_name(0, step)}": _payload(step, KIB) for run in runs for step in steps})
    s3.put("root/asks/.ckpt-watcher.yaml", b"keep_free: 10%\n")
    arguments = ["watch", f"{s3.url}/root", "--poll-interval", "0.5", "--settle", "0"]

    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_ready()

        def pruned() -> bool:
            return len([key for key in s3.raw_keys() if key.startswith("root/plain/")]) == 5

        wait_until(pruned, what="the plain run pruned to its newest 5")
        daemon.wait_for("group_blocked")
        assert daemon.stop() == 0

    assert len([key for key in s3.raw_keys() if key.startswith("root/asks/") and key.endswith(".ckpt")]) == 8
    blocked = daemon.events("group_blocked")
    assert [record["directory"] for record in blocked] == [f"{s3.url}/root/asks"]
    rejected = daemon.events("policy_rejected")
    assert any("At 'keep_free'" in " ".join(map(str, record.values())) for record in rejected)
    deleted = {record["path"].rsplit("/", 2)[-2] for record in daemon.events("checkpoint_deleted")}
    assert deleted == {"plain"}


def test_an_edit_of_the_root_policy_asking_keep_free_is_refused_by_the_daemon(
    s3: Bucket, tmp_path: Path
) -> None:
    """A running ``watch URL`` whose policy file is edited to ask for keep_free (with a stricter count):
    the edit is refused (``policy_rejected``), the last good policy stays in force, nothing more is
    deleted."""
    steps = range(100, 900, 100)
    s3.put_many({f"root/run/{step_name(0, step)}": _payload(step, KIB) for step in steps})
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 6\n")
    arguments = ["watch", f"{s3.url}/root", "--policy", str(policy), "--poll-interval", "0.5"]
    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        wait_until(lambda: len(_checkpoint_keys(s3)) == 6, what="the run pruned to its newest 6")
        policy.write_text("save_top_k_checkpoints: 1\nkeep_free: 10GiB\n")
        daemon.send(signal.SIGHUP)
        (rejected,) = daemon.wait_for("policy_rejected")
        passes = len(daemon.events("pass_completed"))
        daemon.wait_for("pass_completed", count=passes + 2)
        assert daemon.stop() == 0
    assert "At 'keep_free'" in json.dumps(rejected)
    assert len(_checkpoint_keys(s3)) == 6


def _checkpoint_keys(s3: Bucket) -> set[str]:
    return {key for key in s3.raw_keys() if key.endswith(".ckpt")}
