"""The trash under space pressure, on a real file system (a tmpfs mounted for each test): the trash is
emptied first, oldest first, before any kept checkpoint is evicted for ``keep_free``; a checkpoint
evicted for ``keep_free`` is deleted at once (in the trash it would still hold its bytes), one evicted
for ``max_size`` goes to the trash (the trash does not count toward a group's ``max_size``)."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import events, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import step_name, zip_bytes
from tests.support.tmpfs import MIB, free_bytes, mounted_tmpfs

pytestmark = pytest.mark.timeout(180)

CHECKPOINT_BYTES = 3 * MIB
TRASH = ".ckpt-trash"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs holding the checkpoint root ``ckpt``."""
    with mounted_tmpfs(tmp_path / "disk", 32 * MIB) as mount:
        root = mount / "ckpt"
        root.mkdir()
        yield root


def write_steps(directory: Path, step_numbers: list[int], age: float = 1000) -> list[str]:
    """Complete step checkpoints of ~3 MiB, the first written ``age`` seconds ago, each next one later."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index, step in enumerate(step_numbers):
        path = directory / step_name(0, step)
        path.write_bytes(zip_bytes(bytes(CHECKPOINT_BYTES)))
        stamp = time.time() - age + index
        os.utime(path, (stamp, stamp))
        names.append(path.name)
    return names


def trashed(root: Path) -> list[str]:
    """The original paths of the trash's entries, oldest first (from its info/ records)."""
    info = root / TRASH / "info"
    records = [json.loads(path.read_text()) for path in info.iterdir()] if info.is_dir() else []
    return [record["original"] for record in sorted(records, key=lambda record: record["trashed_at"])]


def policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_the_trash_is_emptied_oldest_first_before_any_kept_checkpoint_is_evicted(
    disk: Path, tmp_path: Path
) -> None:
    run = disk / "run"
    written = write_steps(run, [100, 200, 300, 400, 500, 600])
    counted = policy(tmp_path, "save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\n")
    first = run_cli("prune", str(disk), "--policy", str(counted))
    assert first.returncode == 0, first.stderr
    assert trashed(disk) == [f"run/{name}" for name in written[:4]]
    assert {path.name for path in run.iterdir()} == set(written[4:])

    # keep_free + the next save (one more checkpoint) is now a little more than what is free: the
    # oldest trash entry is enough, and nothing kept is touched.
    free = free_bytes(disk)
    keep_free = free - CHECKPOINT_BYTES + MIB
    pressed = policy(tmp_path, f"save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\nkeep_free: {keep_free}\n")
    dry = run_cli("prune", str(disk), "--policy", str(pressed), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    (space,) = json.loads(dry.stdout)["space"]
    assert space["evicted"] == 0
    assert len(space["reclaimed"]) == 1
    assert trashed(disk) == [f"run/{name}" for name in written[:4]]  # a dry run purges nothing

    pruned = run_cli("prune", str(disk), "--policy", str(pressed))
    assert pruned.returncode == 0, pruned.stderr
    assert trashed(disk) == [f"run/{name}" for name in written[1:4]]  # the oldest entry went
    assert [Path(record["path"]).name for record in events(pruned.stderr, "checkpoint_purged")] == [
        written[0]
    ]
    assert {path.name for path in run.iterdir()} == set(written[4:])
    assert not events(pruned.stderr, "checkpoint_deleted")
    assert free_bytes(disk) >= keep_free + CHECKPOINT_BYTES


def test_under_more_pressure_the_whole_trash_goes_then_evictions_are_deleted_at_once(
    disk: Path, tmp_path: Path
) -> None:
    run = disk / "run"
    written = write_steps(run, [100, 200, 300, 400, 500, 600, 700])
    counted = policy(tmp_path, "save_top_k_checkpoints: 4\ntrash:\n  grace: 1h\n")
    assert run_cli("prune", str(disk), "--policy", str(counted)).returncode == 0
    assert len(trashed(disk)) == 3

    # Enough pressure for the whole trash (3 checkpoints) and one kept checkpoint more.
    free = free_bytes(disk)
    keep_free = free + 3 * CHECKPOINT_BYTES + CHECKPOINT_BYTES // 2 - CHECKPOINT_BYTES  # + next save
    pressed = policy(tmp_path, f"save_top_k_checkpoints: 4\ntrash:\n  grace: 1h\nkeep_free: {keep_free}\n")
    dry = run_cli("prune", str(disk), "--policy", str(pressed), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    evicted_rows = [line for line in dry.stdout.splitlines() if "evicted for space: " in line]
    assert [row.split()[0] for row in evicted_rows] == ["delete"], "an eviction is a deletion, not trash"

    pruned = run_cli("prune", str(disk), "--policy", str(pressed))
    assert pruned.returncode == 0, pruned.stderr
    assert trashed(disk) == []
    purged = [Path(record["path"]).name for record in events(pruned.stderr, "checkpoint_purged")]
    assert purged == written[:3]
    deleted = events(pruned.stderr, "checkpoint_deleted")
    assert [Path(record["path"]).name for record in deleted] == [written[3]]
    assert deleted[0]["reasons"][0].startswith("evicted for space: ")
    assert not events(pruned.stderr, "checkpoint_trashed")
    assert free_bytes(disk) >= keep_free + CHECKPOINT_BYTES


def test_a_max_size_eviction_goes_to_the_trash(disk: Path, tmp_path: Path) -> None:
    run = disk / "run"
    written = write_steps(run, [100, 200, 300, 400])
    capped = policy(
        tmp_path, f"save_top_k_checkpoints: -1\nmax_size: {3 * CHECKPOINT_BYTES + MIB}\ntrash:\n  grace: 1h\n"
    )
    pruned = run_cli("prune", str(disk), "--policy", str(capped))
    assert pruned.returncode == 0, pruned.stderr
    moved = events(pruned.stderr, "checkpoint_trashed")
    assert [Path(record["path"]).name for record in moved] == [written[0]]
    assert moved[0]["reasons"][0].startswith("evicted for space: group over max_size")
    assert trashed(disk) == [f"run/{written[0]}"]
    again = run_cli("prune", str(disk), "--policy", str(capped), "--dry-run")
    assert "evicted for space" not in again.stdout  # the trash does not count toward max_size


def test_the_daemon_empties_the_trash_first_and_the_writer_never_runs_out_of_space(
    disk: Path, tmp_path: Path
) -> None:
    run = disk / "run"
    config = policy(
        tmp_path, "save_top_k_checkpoints: 2\nsave_top_k_best: 0\ntrash:\n  grace: 1h\nkeep_free: 8MiB\n"
    )
    with running_daemon(
        ["watch", str(disk), "--policy", str(config), "--settle", "0"], tmp_path / "daemon.log"
    ) as daemon:
        daemon.wait_ready()
        for step in range(100, 1100, 100):  # 10 x 3 MiB through a 32 MiB disk that keeps 8 MiB free
            run.mkdir(exist_ok=True)
            temporary = disk / f".partial-{step}"
            temporary.write_bytes(zip_bytes(bytes(CHECKPOINT_BYTES)))  # raises ENOSPC if the disk is full
            temporary.rename(run / step_name(0, step))
            wait_until(
                lambda: free_bytes(disk) >= 8 * MIB + CHECKPOINT_BYTES,
                what="room for the next save, keep_free included",
            )
        assert daemon.stop() == 0
    purged = daemon.events("checkpoint_purged")
    evicted = [
        record
        for record in daemon.events("checkpoint_deleted")
        if record["reasons"][0].startswith("evicted for space: ")
    ]
    assert purged, "space pressure purged the trash"
    assert evicted == [], "nothing kept was evicted while the trash held bytes to give"
    assert {path.name for path in run.iterdir()} == {step_name(0, 900), step_name(0, 1000)}


def _fill_leaving_one_page(disk: Path) -> None:
    """Fill the file system, then free exactly one page: a later write of several pages comes back
    short (the kernel writes what fits and reports the count, with no error)."""
    filler = disk.parent / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(descriptor, bytes(4096))
    except OSError:
        pass
    os.ftruncate(descriptor, os.fstat(descriptor).st_size - 4096)
    os.close(descriptor)


def test_a_trash_record_cut_short_by_a_full_disk_never_strands_a_checkpoint(
    disk: Path, tmp_path: Path
) -> None:
    """A record whose write came back short was renamed into place and the checkpoint moved in after
    it: "trashed", yet unreadable, so no command could list, restore or purge it. The record is now
    written whole or not at all; with no room for it nothing is moved, and the checkpoint is deleted
    at once (``trash_bypassed``), as a full disk is pruned without a trash."""
    deep = "é" * 127  # legal, but each component is ~760 bytes of ensure_ascii JSON: a record > 4 KiB
    run = disk.joinpath(*[deep] * 6)
    names = write_steps_small(run, [100, 200])
    trash_policy = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash:\n  grace: 1d\n")
    _fill_leaving_one_page(disk)

    pruned = run_cli("prune", str(disk), "--policy", str(trash_policy))
    listed = run_cli("trash", "list", str(disk), "--json")

    assert pruned.returncode == 0, pruned.stderr
    assert not events(pruned.stderr, "checkpoint_delete_failed")
    (bypassed,) = events(pruned.stderr, "trash_bypassed")
    assert bypassed["error"] == "no space for the trash record: No space left on device"
    assert [Path(record["path"]).name for record in events(pruned.stderr, "checkpoint_deleted")] == names[:1]
    assert {path.name for path in run.iterdir()} == set(names[1:])
    document = json.loads(listed.stdout)
    assert document["problems"] == []
    assert document["entries"] == []
    files = disk / TRASH / "files"
    assert not files.exists() or not any(path.is_file() for path in files.rglob("*"))


def _save_until_the_disk_is_full(path: Path) -> None:
    """A trainer's save that hit ENOSPC: as much of a checkpoint as fit, left incomplete."""
    failure: int | None = None
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(descriptor, bytes(MIB)) > 0:
            pass
    except OSError as error:
        failure = error.errno
    finally:
        os.close(descriptor)
    assert failure == errno.ENOSPC
    assert free_bytes(path.parent) == 0


@pytest.mark.parametrize("budget", ["keep_free: 1MiB\n", ""], ids=["keep_free", "no_budget"])
def test_a_full_disk_with_a_trash_is_pruned_like_any_other(tmp_path: Path, budget: str) -> None:
    """A save filled the disk. The count rules drop steps 100 and 200 and keep 300 and 400; there is no
    room for a trash record, so the first goes at once (trash_bypassed) instead of failing, and a kept
    checkpoint is never evicted in place of the ones the count rules dropped."""
    with mounted_tmpfs(tmp_path / "small", 16 * MIB) as mount:
        root = mount / "ckpt"
        run = root / "run"
        written = write_steps(run, [100, 200, 300, 400])
        (run / "last.ckpt").symlink_to(written[-1])
        _save_until_the_disk_is_full(run / step_name(0, 500))
        rules = policy(tmp_path, f"save_top_k_checkpoints: 2\n{budget}trash:\n  grace: 1h\n")

        pruned = run_cli("prune", str(root), "--policy", str(rules))
        listed = run_cli("trash", "list", str(root), "--json")

        assert pruned.returncode == 0, pruned.stderr
        assert {path.name for path in run.iterdir()} == {*written[2:], "last.ckpt", step_name(0, 500)}
        assert not events(pruned.stderr, "checkpoint_delete_failed")
        (bypassed,) = events(pruned.stderr, "trash_bypassed")
        assert Path(bypassed["path"]).name == written[0]
        assert bypassed["error"] == "no space for the trash record: No space left on device"
        deleted = events(pruned.stderr, "checkpoint_deleted")
        assert [Path(record["path"]).name for record in deleted] == [written[0]]
        assert not any(record["reasons"][0].startswith("evicted for space") for record in deleted)
        # The trash holds whole entries only: each record names a file that is there, and each file
        # there has its record (the second deletion had room once the first freed some).
        document = json.loads(listed.stdout)
        assert document["problems"] == []
        assert [entry["original"] for entry in document["entries"]] == [f"run/{written[1]}"]
        files = [path for path in (root / TRASH / "files").rglob("*") if path.is_file()]
        assert [path.name.split("@")[0] for path in files] == [written[1]]


def test_no_kept_checkpoint_is_evicted_while_the_deletions_the_count_rules_planned_fail(
    tmp_path: Path,
) -> None:
    """A save filled the disk, and the count rules' deletions of steps 100 and 200 fail (a file where
    the trash should be). keep_free would evict step 300, a checkpoint the count rules keep, in their
    place: it stays (eviction_held), on every pass while they fail; once they can go, they do."""
    with mounted_tmpfs(tmp_path / "small", 16 * MIB) as mount:
        root = mount / "ckpt"
        run = root / "run"
        written = write_steps(run, [100, 200, 300, 400])
        (run / "last.ckpt").symlink_to(written[-1])
        (root / TRASH).write_bytes(b"")  # in the trash's place: every move into it fails
        _save_until_the_disk_is_full(run / step_name(0, 500))
        rules = policy(tmp_path, "save_top_k_checkpoints: 2\nkeep_free: 1MiB\ntrash:\n  grace: 1h\n")
        everything = {*written, "last.ckpt", step_name(0, 500)}

        for _ in range(2):  # the next pass tries again, and holds again
            pruned = run_cli("prune", str(root), "--policy", str(rules))

            assert pruned.returncode == 1, pruned.stderr  # the failures say so
            assert {path.name for path in run.iterdir()} == everything
            failed = events(pruned.stderr, "checkpoint_delete_failed")
            assert [Path(record["path"]).name for record in failed] == written[:2]
            assert not events(pruned.stderr, "checkpoint_deleted")
            (held,) = events(pruned.stderr, "eviction_held")
            assert held["level"] == "warning"
            assert (held["path"], held["failed"], held["kept"]) == (str(root), 2, 1)
            assert held["checkpoints"] == [str(run / written[2])]

        (root / TRASH).unlink()
        pruned = run_cli("prune", str(root), "--policy", str(rules))

        assert pruned.returncode == 0, pruned.stderr
        assert {path.name for path in run.iterdir()} == everything - set(written[:2])
        assert not events(pruned.stderr, "eviction_held")


def write_steps_small(directory: Path, step_numbers: list[int]) -> list[str]:
    """Small complete step checkpoints (~3 KiB: they fit where the record does not), old enough."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for step in step_numbers:
        path = directory / step_name(0, step)
        path.write_bytes(zip_bytes(b"w" * 3000))
        stamp = time.time() - 1000 + step / 100
        os.utime(path, (stamp, stamp))
        names.append(path.name)
    return names


def test_a_dry_run_counts_deletions_into_the_trash_as_freeing_nothing(disk: Path, tmp_path: Path) -> None:
    """The dry run once counted the checkpoints it would move into the trash as freed ("met"), while the
    real run, finding them still on the disk, then purged one of them ("its space was needed"). The dry
    run now shows that purge, and the real run does what it showed."""
    run = disk / "run"
    written = write_steps(run, [100, 200, 300, 400, 500, 600])
    keep_free = free_bytes(disk) - CHECKPOINT_BYTES + MIB  # + the next save: 1 MiB short as it is
    pressed = policy(tmp_path, f"save_top_k_checkpoints: 3\ntrash:\n  grace: 1h\nkeep_free: {keep_free}\n")

    dry = run_cli("prune", str(disk), "--policy", str(pressed), "--dry-run", "--json")
    shown = run_cli("prune", str(disk), "--policy", str(pressed), "--dry-run")
    pruned = run_cli("prune", str(disk), "--policy", str(pressed))

    assert dry.returncode == 0, dry.stderr
    (space,) = json.loads(dry.stdout)["space"]
    assert space["short_bytes"] > 0
    assert (space["evicted"], space["reclaimed"], space["unmet_bytes"]) == (0, [f"run/{written[0]}"], 0)
    assert ": met" not in shown.stdout.splitlines()[0]
    assert "short, would take 1 trash entry (" in shown.stdout.splitlines()[0]
    assert pruned.returncode == 0, pruned.stderr
    moved = [Path(record["path"]).name for record in events(pruned.stderr, "checkpoint_trashed")]
    purged = [Path(record["path"]).name for record in events(pruned.stderr, "checkpoint_purged")]
    assert (moved, purged) == (written[:3], written[:1])
    assert not events(pruned.stderr, "checkpoint_deleted")
    assert trashed(disk) == [f"run/{name}" for name in written[1:3]]


def test_a_dry_run_counts_deletions_that_bypass_the_trash_as_freed(disk: Path, tmp_path: Path) -> None:
    """A group on another mount than the trash has its deletions removed at once (trash_bypassed): they
    free their bytes on its file system, in the dry run as in the real run."""
    with mounted_tmpfs(disk / "other", 16 * MIB) as other:
        written = write_steps(other, [100, 200, 300, 400])
        keep_free = free_bytes(other) - CHECKPOINT_BYTES + MIB  # short until two deletions are done
        pressed = policy(
            tmp_path, f"save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\nkeep_free: {keep_free}\n"
        )

        dry = run_cli("prune", str(disk), "--policy", str(pressed), "--dry-run", "--json")
        pruned = run_cli("prune", str(disk), "--policy", str(pressed))

        assert dry.returncode == 0, dry.stderr
        (space,) = [item for item in json.loads(dry.stdout)["space"] if item["path"].endswith("/other")]
        assert (space["short_bytes"], space["evicted"], space["reclaimed"]) == (0, 0, [])
        assert pruned.returncode == 0, pruned.stderr
        assert len(events(pruned.stderr, "trash_bypassed")) == 2
        deleted = [Path(record["path"]).name for record in events(pruned.stderr, "checkpoint_deleted")]
        assert sorted(deleted) == written[:2]
        assert not events(pruned.stderr, "checkpoint_purged")
