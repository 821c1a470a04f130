"""``keep_free`` on btrfs (a loop device made for each test): an unlink frees its space only at the next
transaction commit, so ``statvfs`` read right after a deletion still shows the space missing. The
daemon's own deletion starts a pass (its event) and ``prune`` reads the free space after its count-rule
deletions: each must credit what it released and not seen yet, not evict again for the same shortfall.

The file system is mounted with ``commit=300`` so that no commit happens while a test looks (the
stale reading is what is tested, whatever the machine's speed). Skipped without root or
``mkfs.btrfs``. No test measures time."""

from __future__ import annotations

import datetime
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.btrfs import mounted_btrfs
from tests.support.cli import events, run_cli
from tests.support.daemon import running_daemon
from tests.support.factories import step_name, zip_bytes
from tests.support.tmpfs import MIB, free_bytes

pytestmark = pytest.mark.timeout(180)

SIZE = 16 * MIB
STEPS = [100 * (index + 1) for index in range(8)]


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 300 MiB btrfs on a loop device, holding the checkpoint root ``ckpt``."""
    with mounted_btrfs(tmp_path, options="commit=300") as mount:
        root = mount / "ckpt"
        root.mkdir()
        yield root


def checkpoints(run: Path) -> int:
    """Eight complete step checkpoints of 16 MiB, written long ago, ``last.ckpt`` to the newest; the
    bytes the newest takes (the next save is expected as large)."""
    run.mkdir()
    data = zip_bytes(os.urandom(SIZE))  # not compressible
    for index, step in enumerate(STEPS):
        path = run / step_name(0, step)
        path.write_bytes(data)
        stamp = time.time() - 3600 + index
        os.utime(path, (stamp, stamp))
    (run / "last.ckpt").symlink_to(step_name(0, STEPS[-1]))
    os.sync()  # committed: the free space read now is the real one
    return len(data)


def left(run: Path) -> list[str]:
    return sorted(path.name for path in run.iterdir() if path.name.startswith("epoch="))


def test_the_daemon_evicts_once_for_a_shortfall_btrfs_shows_freed_only_at_its_commit(
    btrfs: Path, tmp_path: Path
) -> None:
    """One eviction makes the room; its own deletion's event starts a pass that reads the same stale
    free space: it credits the bytes just released and evicts nothing more."""
    run = btrfs / "run"
    size = checkpoints(run)
    keep_free = free_bytes(btrfs) - size + MIB  # + the next save (as large): 1 MiB short
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: 20\nkeep_free: {keep_free}\n")
    arguments = ["--log-level", "debug", "watch", str(btrfs), "--policy", str(policy)]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        evicted = daemon.wait_for("checkpoint_deleted")
        # The pass its deletion's event started (a deletion that frees space one can see starts one
        # too): done, with whatever it decided.
        daemon.wait_for("pass_completed", lambda record: record["trigger"] == "event")
        assert daemon.stop() == 0
    assert [Path(str(record["path"])).name for record in evicted] == [step_name(0, 100)]
    assert len(daemon.events("checkpoint_deleted")) == 1, [
        Path(str(record["path"])).name for record in daemon.events("checkpoint_deleted")
    ]
    assert left(run) == [step_name(0, step) for step in STEPS[1:]]
    credited = daemon.events("free_space_credited")
    assert credited, "the pass after the eviction planned with the bytes it released"
    assert credited[0]["credited_bytes"] == os.path.getsize(run / step_name(0, 200))  # each the same size
    assert credited[0]["level"] == "info"  # it spared a checkpoint


def test_prune_counts_what_its_count_rules_just_deleted_though_btrfs_does_not_show_it_yet(
    btrfs: Path, tmp_path: Path
) -> None:
    """``save_top_k_checkpoints: 4`` deletes four checkpoints; what they free (not yet shown by
    ``statvfs``) makes keep_free hold: nothing is evicted."""
    run = btrfs / "run"
    size = checkpoints(run)
    keep_free = free_bytes(btrfs) + size  # + the next save: short by 2 checkpoints until 4 are deleted
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: 4\nkeep_free: {keep_free}\n")

    completed = run_cli("prune", str(btrfs), "--policy", str(policy))

    assert completed.returncode == 0, completed.stderr
    reasons = [record["reasons"][0] for record in events(completed.stderr, "checkpoint_deleted")]
    assert len(reasons) == 4
    assert all(reason.startswith("outside newest 4 step checkpoints") for reason in reasons), reasons
    assert left(run) == [step_name(0, step) for step in STEPS[4:]]
    assert events(completed.stderr, "budget_unmet") == []


def test_the_daemon_does_not_evict_for_trash_it_just_purged_that_btrfs_shows_freed_only_later(
    btrfs: Path, tmp_path: Path
) -> None:
    """A trash entry is reclaimed for a shortfall, before any kept checkpoint: its purge frees space
    btrfs shows only at its commit. The next passes (a change in the run, the free-space checks)
    credit what the purge released and evict no kept checkpoint for the same shortfall."""
    run = btrfs / "run"
    size = checkpoints(run)
    trashing = tmp_path / "trashing.yaml"
    trashing.write_text("save_top_k_checkpoints: 7\ntrash: {grace: 1h}\n")
    moved = run_cli("prune", str(btrfs), "--policy", str(trashing))
    assert moved.returncode == 0, moved.stderr
    assert len(events(moved.stderr, "checkpoint_trashed")) == 1  # a rename: it frees nothing yet
    os.sync()
    keep_free = free_bytes(btrfs) - size + MIB  # + the next save (as large): 1 MiB short
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: 20\nkeep_free: {keep_free}\ntrash: {{grace: 1h}}\n")
    arguments = ["--log-level", "debug", "watch", str(btrfs), "--policy", str(policy)]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        assert len(daemon.events("checkpoint_purged")) == 1  # the start-up pass took the trash first
        noted = datetime.datetime.now(datetime.UTC)
        (run / "notes.txt").write_text("a change in the run starts a pass\n")
        daemon.wait_for(
            "pass_completed",
            lambda record: (
                record["trigger"] == "event" and datetime.datetime.fromisoformat(record["timestamp"]) >= noted
            ),
        )
        assert daemon.stop() == 0
    deleted = [Path(str(record["path"])).name for record in daemon.events("checkpoint_deleted")]
    assert deleted == []
    assert left(run) == [step_name(0, step) for step in STEPS[1:]]
    credited = daemon.events("free_space_credited")
    assert credited, "the pass after the purge planned with the bytes it released"
    assert credited[-1]["credited_bytes"] >= size


def test_prune_counts_what_a_group_without_keep_free_deleted_on_a_disk_another_keeps_free(
    btrfs: Path, tmp_path: Path
) -> None:
    """Run ``b`` has no keep_free and deletes four checkpoints by count; run ``a``, on the same disk,
    keeps free space by its own file. What ``b`` freed (not yet shown by ``statvfs``) counts for
    ``a``: nothing is evicted."""
    run_b = btrfs / "b"
    size = checkpoints(run_b)
    run_a = btrfs / "a"
    run_a.mkdir()
    for step in (100, 200):
        shutil.copyfile(run_b / step_name(0, step), run_a / step_name(0, step))
    os.sync()
    keep_free = free_bytes(btrfs) + size  # + the next save: short by 2 checkpoints until b deletes 4
    (run_a / ".ckpt-watcher.yaml").write_text(f"keep_free: {keep_free}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 4\n")

    completed = run_cli("prune", str(btrfs), "--policy", str(policy))

    assert completed.returncode == 0, completed.stderr
    deleted = events(completed.stderr, "checkpoint_deleted")
    assert [Path(str(record["path"])).parent.name for record in deleted] == ["b"] * 4
    assert all(record["reasons"][0].startswith("outside newest 4") for record in deleted)
    assert sorted(path.name for path in run_a.iterdir() if path.name.startswith("epoch=")) == [
        step_name(0, 100),
        step_name(0, 200),
    ]
    assert events(completed.stderr, "budget_unmet") == []
