"""The trash on real files in tmp_path: moves in (through delete.py), restores, purges, pins, the
budget's side of the contract, and the metadata read back. Hostile trash contents are in
tests/adversarial/test_trash.py, real processes in tests/integration/test_trash.py."""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ckpt_watcher import delete, trash_moves
from ckpt_watcher import trash as trash_module
from ckpt_watcher.budget import Reclaimable
from ckpt_watcher.delete import Outcome, apply_plan
from ckpt_watcher.filesystem import EntryStatus, rename_no_replace
from ckpt_watcher.plan import Action, Plan, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import TRASH_DIRECTORY_NAME
from ckpt_watcher.scan import ScanOptions, scan_tree
from ckpt_watcher.storage import StorageUnavailableError
from ckpt_watcher.trash import (
    FILES,
    INFO,
    RESTORED,
    RETRY_UNREAD_SECONDS,
    AtAGlance,
    IndexedEntry,
    RestoredPin,
    TrashEntry,
    TrashIndex,
    list_trash,
    locked,
    make_key,
    open_trash,
    stored_name,
    valid_relative_path,
)
from ckpt_watcher.trash_moves import (
    TrashTarget,
    purge,
    purge_due,
    purge_keys,
    reclaimable,
    restore,
    select_entries,
)
from ckpt_watcher.trash_pass import PURGE_RETRY_SECONDS, TrashPass
from tests.support.factories import step_name, write_checkpoint
from tests.support.pin_faults import failing_pin_reads
from tests.support.purge_times import purge_times_asked
from tests.support.stops import stop_as_it_begins

pytestmark = pytest.mark.timeout(120)

KEEP_ONE = Policy(save_top_k_checkpoints=1)
QUIET = ScanOptions(directory_quiet_seconds=0.0)
DAY = 86400
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [record for record in logs if record["event"] == name]


def plan_of(root: Path, policy: Policy = KEEP_ONE) -> Plan:
    return plan(scan_tree(root, policy.compiled_naming, QUIET).records, policy)


def trash_everything_but_the_newest(root: Path, *, grace: int = DAY, clock: float = NOW) -> list[Outcome]:
    target = TrashTarget(root, grace, clock=lambda: clock)
    return [result.outcome for result in apply_plan(plan_of(root), root, trash=target).results]


def digest(path: Path) -> dict[str, str]:
    """Every file below ``path`` (or the file itself) with the SHA-256 of its bytes."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(item.relative_to(path)): hashlib.sha256(item.read_bytes()).hexdigest()
        for item in sorted(path.rglob("*"))
        if item.is_file()
    }


def directory_checkpoint(path: Path, files: int = 3) -> Path:
    """A finished DeepSpeed-style directory checkpoint (``latest`` written last)."""
    (path / "checkpoint").mkdir(parents=True)
    for index in range(files):
        write_checkpoint(path / "checkpoint" / f"shard_{index}.pt", payload=bytes([index]) * 700)
    (path / "latest").write_text("checkpoint")
    return path


def steps(directory: Path, numbers: range) -> dict[str, dict[str, str]]:
    """Step checkpoints with distinct contents; their digests by name."""
    for step in numbers:
        write_checkpoint(directory / step_name(0, step), payload=f"weights of {step}".encode() * 50)
    return {step_name(0, step): digest(directory / step_name(0, step)) for step in numbers}


def metadata_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of each metadata file read from now on, in order."""
    reads: list[str] = []
    read_metadata = trash_module.read_metadata

    def counted(dir_fd: int, name: str) -> Any:
        reads.append(name)
        return read_metadata(dir_fd, name)

    monkeypatch.setattr(trash_module, "read_metadata", counted)
    return reads


def two_restored(root: Path) -> None:
    """Three step checkpoints in ``root``; the two older trashed, then restored at NOW (pinned a day)."""
    steps(root, range(100, 400, 100))
    trash_everything_but_the_newest(root)
    listing = list_trash(root)
    assert listing is not None
    restore(root, listing.entries, now=NOW)


# -- moving in --------------------------------------------------------------------------------------


def test_a_deletion_is_a_rename_into_the_trash_keeping_its_relative_path_and_reasons(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    run = tmp_path / "stage1" / "run"
    before = steps(run, range(100, 400, 100))
    inode = (run / step_name(0, 100)).stat().st_ino

    outcomes = trash_everything_but_the_newest(tmp_path)

    assert outcomes == [Outcome.TRASHED, Outcome.TRASHED]
    assert sorted(os.listdir(run)) == [step_name(0, 300)]
    key = make_key(NOW, inode)
    stored = tmp_path / ".ckpt-trash" / FILES / "stage1" / "run" / f"{step_name(0, 100)}@{key}"
    assert stored.stat().st_ino == inode  # the very file: renamed, never copied
    assert digest(stored) == before[step_name(0, 100)]
    info = json.loads((tmp_path / ".ckpt-trash" / INFO / f"{key}.json").read_text())
    assert info == {
        "original": f"stage1/run/{step_name(0, 100)}",
        "trashed_at": NOW,
        "grace_seconds": DAY,
        "reasons": ["outside newest 1 step checkpoints (#3)"],
        "bytes": stored.stat().st_size,
        "type": "file",
        "device": stored.stat().st_dev,
        "inode": inode,
        "mtime_ns": stored.stat().st_mtime_ns,  # a rename keeps it: part of what is checked later
    }
    [first, _] = events(logs, "checkpoint_trashed")
    assert first["path"] == str(run / step_name(0, 100))
    assert first["trash_path"] == str(stored)
    assert first["reasons"] == ["outside newest 1 step checkpoints (#3)"]
    assert first["bytes"] == stored.stat().st_size
    assert first["purge_at"] == "2027-01-16T08:00:00Z"
    assert events(logs, "checkpoint_deleted") == []


def test_the_same_name_trashed_twice_is_two_entries(tmp_path: Path) -> None:
    steps(tmp_path, range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    steps(tmp_path, range(100, 200, 100))  # the same name written again, and deleted again
    trash_everything_but_the_newest(tmp_path, clock=NOW + 60)

    listing = list_trash(tmp_path)

    assert listing is not None
    assert [(entry.original, entry.trashed_at) for entry in listing.entries] == [
        (step_name(0, 100), NOW),
        (step_name(0, 100), NOW + 60),
    ]


def test_a_directory_checkpoint_moves_whole_and_comes_back_whole(tmp_path: Path) -> None:
    old = directory_checkpoint(tmp_path / "run" / step_name(0, 100), files=5)
    directory_checkpoint(tmp_path / "run" / step_name(0, 200))
    before = digest(old)
    inode = old.stat().st_ino

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.TRASHED]
    assert not old.exists()
    listing = list_trash(tmp_path)
    assert listing is not None
    [entry] = listing.entries
    assert entry.is_directory
    assert entry.bytes == sum(
        path.stat().st_size
        for path in (tmp_path / ".ckpt-trash").rglob("*")
        if path.is_file() and "files" in path.parts
    )

    [result] = restore(tmp_path, listing.entries, now=NOW + 10)

    assert result.restored, result.problem
    assert old.stat().st_ino == inode
    assert digest(old) == before


def test_a_long_name_is_shortened_in_the_trash_and_restored_under_its_own_name(tmp_path: Path) -> None:
    huge_step = 10**220  # a width is a minimum: a step this long is a valid step name
    name = f"epoch=00-step={huge_step}-train.ckpt"
    write_checkpoint(tmp_path / name)
    write_checkpoint(tmp_path / f"epoch=00-step={huge_step + 1}-train.ckpt")

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.TRASHED]
    listing = list_trash(tmp_path)
    assert listing is not None
    [entry] = listing.entries
    assert len(entry.stored_name) == 255
    assert entry.stored_name.endswith(f"@{entry.key}")
    [result] = restore(tmp_path, listing.entries, now=NOW)
    assert result.restored, result.problem
    assert (tmp_path / name).is_file()


# -- restoring --------------------------------------------------------------------------------------


def test_restore_brings_back_the_same_bytes_and_pins_them_for_the_grace(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    before = steps(tmp_path / "run", range(100, 600, 100))
    trash_everything_but_the_newest(tmp_path)
    listing = list_trash(tmp_path)
    assert listing is not None

    results = restore(tmp_path, listing.entries, now=NOW + 100)

    assert [result.restored for result in results] == [True] * 4
    assert {name: digest(tmp_path / "run" / name) for name in before} == before
    assert list_trash(tmp_path) is not None
    assert list_trash(tmp_path).entries == []  # type: ignore[union-attr]
    assert sorted(os.listdir(tmp_path / ".ckpt-trash" / FILES)) == []  # emptied mirror directories go
    index = TrashIndex(tmp_path)
    pinned = index.pinned_identities(NOW + 100 + DAY - 1)
    index.close()
    assert len(pinned) == 4
    assert all(reason.startswith("restored from the trash: pinned until ") for reason in pinned.values())
    [restored] = [
        record for record in events(logs, "checkpoint_restored") if record["path"].endswith(step_name(0, 100))
    ]
    assert restored["pinned_until"] == "2027-01-16T08:01:40Z"


def test_a_restored_checkpoint_is_kept_as_restored_until_its_pin_expires(tmp_path: Path) -> None:
    two_restored(tmp_path)
    index = TrashIndex(tmp_path)
    records = scan_tree(tmp_path, KEEP_ONE.compiled_naming, QUIET).records

    during = plan(records, KEEP_ONE, pinned_identities=index.pinned_identities(NOW + DAY - 1))
    after = plan(records, KEEP_ONE, pinned_identities=index.pinned_identities(NOW + DAY + 1))
    index.close()

    kept = {
        decision.record.name: decision.reasons
        for decision in during.decisions
        if decision.action is Action.KEEP
    }
    assert set(kept) == {step_name(0, step) for step in (100, 200, 300)}
    assert kept[step_name(0, 100)][-1] == "restored from the trash: pinned until 2027-01-16T08:00:00Z"
    assert [decision.record.name for decision in after.deletions] == [step_name(0, 100), step_name(0, 200)]


def test_restore_never_overwrites_and_says_so(tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
    steps(tmp_path, range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path)
    (tmp_path / step_name(0, 100)).write_bytes(b"a new file with the old name")
    listing = list_trash(tmp_path)
    assert listing is not None

    [result] = restore(tmp_path, listing.entries, now=NOW)

    assert not result.restored
    assert result.problem == f"{step_name(0, 100)} exists again; it is never overwritten (move it away first)"
    assert (tmp_path / step_name(0, 100)).read_bytes() == b"a new file with the old name"
    assert list_trash(tmp_path).entries == listing.entries  # type: ignore[union-attr]  # still restorable
    assert os.listdir(tmp_path / ".ckpt-trash" / RESTORED) == []  # no pin left for what was not restored
    [refused] = events(logs, "restore_refused")
    assert refused["error"] == result.problem


def test_a_directory_that_is_gone_is_made_again_on_restore(tmp_path: Path) -> None:
    run = tmp_path / "a" / "b"
    steps(run, range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path)
    (run / step_name(0, 200)).unlink()
    run.rmdir()
    (tmp_path / "a").rmdir()
    listing = list_trash(tmp_path)
    assert listing is not None

    [result] = restore(tmp_path, listing.entries, now=NOW)

    assert result.restored, result.problem
    assert (run / step_name(0, 100)).is_file()


SELECTIONS: list[tuple[list[str], float | None, bool, list[str]]] = [
    ([step_name(0, 100)], None, False, ["run/" + step_name(0, 100)]),
    (["run/*"], None, False, ["run/" + step_name(0, step) for step in (100, 200, 300)]),
    (["*step=0002*"], None, False, ["run/" + step_name(0, 200)]),
    ([], NOW + 150, False, ["run/" + step_name(0, step) for step in (200, 300)]),
    ([], None, True, ["run/" + step_name(0, step) for step in (100, 200, 300)]),
    (["run/*"], NOW + 250, False, ["run/" + step_name(0, 300)]),
    (["nothing-like-it"], None, False, []),
]


@pytest.mark.parametrize(("patterns", "since", "everything", "expected"), SELECTIONS)
def test_restore_selects_by_name_path_glob_and_time(
    patterns: list[str], since: float | None, everything: bool, expected: list[str]
) -> None:
    entries = [
        TrashEntry(
            make_key(NOW + step, step), f"run/{step_name(0, step)}", NOW + step, DAY, (), 1, False, 1, step
        )
        for step in (100, 200, 300)
    ]
    chosen = select_entries(entries, patterns, since=since, everything=everything)
    assert [entry.original for entry in chosen] == expected


def test_an_entry_is_also_named_by_its_key() -> None:
    entry = TrashEntry(make_key(NOW, 7), "run/x.ckpt", NOW, DAY, (), 1, False, 1, 7)
    assert select_entries([entry], [entry.key], since=None, everything=False) == [entry]


# -- purging ----------------------------------------------------------------------------------------


def test_only_entries_whose_grace_is_over_are_purged(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    steps(tmp_path / "run", range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, grace=60, clock=NOW)
    steps(tmp_path / "run", range(300, 400, 100))
    trash_everything_but_the_newest(tmp_path, grace=60, clock=NOW + 30)

    early = purge_due(tmp_path, now=NOW + 59)
    due = purge_due(tmp_path, now=NOW + 61)

    assert early.purged == []
    assert [entry.original for entry in due.purged] == [f"run/{step_name(0, 100)}"]
    listing = list_trash(tmp_path)
    assert listing is not None
    assert [entry.original for entry in listing.entries] == [f"run/{step_name(0, 200)}"]
    [purged] = events(logs, "checkpoint_purged")
    assert purged["path"] == str(tmp_path / "run" / step_name(0, 100))
    assert purged["why"] == "its grace is over"
    assert os.listdir(tmp_path / ".ckpt-trash" / "purging") == []


def test_a_purged_directory_checkpoint_is_removed_whole(tmp_path: Path) -> None:
    directory_checkpoint(tmp_path / step_name(0, 100), files=20)
    directory_checkpoint(tmp_path / step_name(0, 200))
    trash_everything_but_the_newest(tmp_path, grace=1)

    result = purge_due(tmp_path, now=NOW + 2)

    assert [entry.is_directory for entry in result.purged] == [True]
    assert result.bytes_purged > 20 * 700
    assert [path for path in (tmp_path / ".ckpt-trash").rglob("*") if not path.is_dir()] == []


def test_purge_leaves_restored_pins_until_they_expire(tmp_path: Path) -> None:
    steps(tmp_path, range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, grace=60)
    listing = list_trash(tmp_path)
    assert listing is not None
    restore(tmp_path, listing.entries, now=NOW)

    purge_due(tmp_path, now=NOW + 59)
    kept = os.listdir(tmp_path / ".ckpt-trash" / RESTORED)
    purge_due(tmp_path, now=NOW + 61)

    assert len(kept) == 1
    assert os.listdir(tmp_path / ".ckpt-trash" / RESTORED) == []


def test_a_half_done_purge_is_finished_by_the_next(tmp_path: Path) -> None:
    steps(tmp_path, range(100, 200, 100))
    trash = open_trash(tmp_path, create=True)
    assert trash is not None
    with trash:
        purging = trash.ensure("purging")
    leftover = tmp_path / ".ckpt-trash" / "purging" / make_key(NOW, 1)
    (leftover / "deep").mkdir(parents=True)
    (leftover / "deep" / "part").write_bytes(b"x")
    del purging

    purge_due(tmp_path, now=NOW)

    assert os.listdir(tmp_path / ".ckpt-trash" / "purging") == []


# -- the budget's side of the contract --------------------------------------------------------------


def test_one_reclaimable_per_entry_oldest_first_and_a_purge_of_the_chosen_keys(tmp_path: Path) -> None:
    steps(tmp_path, range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    steps(tmp_path, range(300, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW + 10)
    device = (tmp_path / ".ckpt-trash").stat().st_dev

    offered = reclaimable(tmp_path)

    assert [type(item) for item in offered] == [Reclaimable, Reclaimable]
    assert [(item.device, item.since) for item in offered] == [(device, NOW), (device, NOW + 10)]
    assert [item.bytes for item in offered] == [entry.bytes for entry in list_trash(tmp_path).entries]  # type: ignore[union-attr]
    result = purge_keys(tmp_path, [offered[0].key])
    assert [entry.key for entry in result.purged] == [offered[0].key]
    assert [item.key for item in reclaimable(tmp_path)] == [offered[1].key]


def test_a_root_without_a_trash_offers_nothing_and_purges_nothing(tmp_path: Path) -> None:
    assert reclaimable(tmp_path) == []
    assert purge_due(tmp_path).purged == []
    assert not (tmp_path / ".ckpt-trash").exists()  # looking never makes one


# -- the index a reconciler keeps -------------------------------------------------------------------


def test_the_index_reads_each_metadata_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = TrashIndex(tmp_path)
    index.start()
    assert index.bytes is None  # no trash yet
    steps(tmp_path, range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, grace=60)
    reads = metadata_reads(monkeypatch)

    index.refresh()
    index.refresh()
    index.close()

    assert len(reads) == 2
    listing = list_trash(tmp_path)
    assert listing is not None
    assert index.bytes == listing.bytes
    assert index.next_purge_at() == NOW + 60
    summary = index.summary()
    assert summary is not None
    assert (summary.entries, summary.oldest) == (2, listing.entries[0])


# -- the lock ---------------------------------------------------------------------------------------


def test_a_move_waits_for_the_lock_another_holder_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps(tmp_path, range(100, 300, 100))
    trash = open_trash(tmp_path, create=True)
    assert trash is not None
    busy = threading.Event()

    def flock(fd: int, operation: int) -> None:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            busy.set()  # the mover found the lock held
            raise

    monkeypatch.setattr(
        trash_module, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    )
    outcomes: list[list[Outcome]] = []
    mover = threading.Thread(target=lambda: outcomes.append(trash_everything_but_the_newest(tmp_path)))
    monkeypatch.setattr(trash_module, "LOCK_TIMEOUT", 20.0)
    with trash:
        with locked(trash):
            mover.start()
            assert busy.wait(30)
            assert (tmp_path / step_name(0, 100)).is_file()  # nothing moved while the lock is held
            assert outcomes == []
        mover.join(30)  # released, though this holder's trash stays open

    assert outcomes == [[Outcome.TRASHED]]
    assert not (tmp_path / step_name(0, 100)).exists()


def test_a_lock_held_too_long_fails_the_move_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps(tmp_path, range(100, 300, 100))
    monkeypatch.setattr(trash_module, "LOCK_TIMEOUT", 0.2)
    trash = open_trash(tmp_path, create=True)
    assert trash is not None
    with trash, locked(trash):
        outcomes = trash_everything_but_the_newest(tmp_path)

    assert outcomes == [Outcome.FAILED]
    assert (tmp_path / step_name(0, 100)).is_file()
    assert os.listdir(tmp_path / ".ckpt-trash" / INFO) == []


# -- what goes wrong during a move ------------------------------------------------------------------


def test_a_file_swapped_between_the_check_and_the_move_is_moved_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps(tmp_path, range(100, 300, 100))
    rename = rename_no_replace
    swapped: list[str] = []

    def swap_then_rename(
        source: str, destination: str, *, source_dir_fd: int, destination_dir_fd: int
    ) -> None:
        if not swapped:  # the trainer replaces the file by rename, just before the move
            replacement = tmp_path / "replacement"
            replacement.write_bytes(b"a newer file")
            os.replace(replacement, tmp_path / source)
            swapped.append(source)
        rename(source, destination, source_dir_fd=source_dir_fd, destination_dir_fd=destination_dir_fd)

    monkeypatch.setattr(trash_moves, "rename_no_replace", swap_then_rename)

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.CHANGED]
    assert (tmp_path / step_name(0, 100)).read_bytes() == b"a newer file"
    assert list_trash(tmp_path).entries == []  # type: ignore[union-attr]


def test_a_failed_rename_leaves_no_metadata_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps(tmp_path, range(100, 300, 100))

    def refuse(source: str, destination: str, *, source_dir_fd: int, destination_dir_fd: int) -> None:
        raise PermissionError(13, "Permission denied", source)

    monkeypatch.setattr(trash_moves, "rename_no_replace", refuse)

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.FAILED]
    assert (tmp_path / step_name(0, 100)).is_file()
    assert os.listdir(tmp_path / ".ckpt-trash" / INFO) == []


def _everything_below(path: Path) -> list[str]:
    return sorted(str(item.relative_to(path)) for item in path.rglob("*"))


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT])
def test_no_room_for_the_trash_record_deletes_at_once_and_leaves_nothing_in_the_trash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]], number: int
) -> None:
    """A full disk (or quota): the record cannot be written, nothing has moved. The deletion goes
    ahead at once, as on another mount, instead of failing on every pass while the disk stays full."""
    run = tmp_path / "stage1" / "run"
    steps(run, range(100, 300, 100))

    def full(fd: int, data: bytes) -> None:
        os.write(fd, data[:10])  # a write cut short, then nothing more goes
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(trash_module, "write_whole", full)

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.DELETED]
    assert sorted(os.listdir(run)) == [step_name(0, 200)]
    trash = tmp_path / ".ckpt-trash"
    assert _everything_below(trash / INFO) == []  # no record, not even its temporary
    assert _everything_below(trash / FILES) == []  # no mirror directory made for the move either
    [bypassed] = events(logs, "trash_bypassed")
    assert bypassed["path"] == str(run / step_name(0, 100))
    assert bypassed["error"] == f"no space for the trash record: {os.strerror(number)}"
    [deleted] = events(logs, "checkpoint_deleted")
    assert deleted["path"] == str(run / step_name(0, 100))
    assert events(logs, "checkpoint_delete_failed") == []


def test_no_room_to_make_the_trash_deletes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    steps(tmp_path, range(100, 300, 100))

    def full(path: object, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(os, "mkdir", full)

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.DELETED]
    assert sorted(os.listdir(tmp_path)) == [step_name(0, 200)]
    [bypassed] = events(logs, "trash_bypassed")
    assert bypassed["error"].startswith("no space for the trash: cannot make ")


def test_no_room_in_the_trash_for_the_move_itself_deletes_at_once_without_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    """The record fits, the rename does not (a directory that must grow on a full disk): the record
    is taken back and the checkpoint, still where it was, is deleted at once."""
    steps(tmp_path, range(100, 300, 100))

    def full(source: str, destination: str, *, source_dir_fd: int, destination_dir_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), source)

    monkeypatch.setattr(trash_moves, "rename_no_replace", full)

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.DELETED]
    assert sorted(os.listdir(tmp_path)) == [".ckpt-trash", step_name(0, 200)]
    assert os.listdir(tmp_path / ".ckpt-trash" / INFO) == []
    [bypassed] = events(logs, "trash_bypassed")
    assert bypassed["error"].startswith("no space in the trash to move it in: ")


def test_a_record_that_cannot_be_written_for_another_reason_fails_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    steps(tmp_path, range(100, 300, 100))

    def broken(fd: int, data: bytes) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(trash_module, "write_whole", broken)

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.FAILED]
    assert (tmp_path / step_name(0, 100)).is_file()
    assert os.listdir(tmp_path / ".ckpt-trash" / INFO) == []
    assert events(logs, "trash_bypassed") == []


def test_purge_with_a_stop_set_ends_before_the_next_entry(tmp_path: Path) -> None:
    steps(tmp_path, range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, grace=1)
    stop = threading.Event()
    stop.set()

    result = purge(tmp_path, lambda entry: True, why="test", stop=stop)

    assert result.interrupted
    assert result.purged == []


def test_a_stop_during_the_removal_of_a_purged_entry_leaves_it_for_the_next_purge(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory_checkpoint(tmp_path / step_name(0, 100), files=20)
    directory_checkpoint(tmp_path / step_name(0, 200))
    trash_everything_but_the_newest(tmp_path, grace=1)
    stop = threading.Event()
    stop_as_it_begins(monkeypatch, delete, "remove_tree", stop)

    result = purge_due(tmp_path, now=NOW + 2, stop=stop)

    assert result.interrupted
    assert (result.purged, result.failed) == ([], [])
    [key] = os.listdir(tmp_path / ".ckpt-trash" / "purging")
    assert len(list((tmp_path / ".ckpt-trash" / "purging" / key / "checkpoint").iterdir())) == 20
    [interrupted] = events(logs, "removal_interrupted")
    assert interrupted["path"] == str(tmp_path / step_name(0, 100))
    assert interrupted["left_as"] == str(tmp_path / ".ckpt-trash" / "purging" / key)
    assert events(logs, "checkpoint_purged") == events(logs, "trash_purge_failed") == []

    monkeypatch.undo()
    purge_due(tmp_path, now=NOW + 3)  # out of restore's reach: finished by the next purge

    assert os.listdir(tmp_path / ".ckpt-trash" / "purging") == []
    assert events(logs, "trash_purge_failed") == []


def test_a_stop_while_a_half_done_purge_is_finished_leaves_it_for_the_next(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = open_trash(tmp_path, create=True)
    assert trash is not None
    with trash:
        trash.ensure("purging")
    leftover = tmp_path / ".ckpt-trash" / "purging" / make_key(NOW, 1)
    (leftover / "deep").mkdir(parents=True)
    (leftover / "deep" / "part").write_bytes(b"x")
    stop = threading.Event()
    stop_as_it_begins(monkeypatch, delete, "remove_tree", stop)

    purge_due(tmp_path, now=NOW, stop=stop)

    assert (leftover / "deep" / "part").exists()
    assert [record["left_as"] for record in events(logs, "removal_interrupted")] == [str(leftover)]
    assert events(logs, "trash_purge_failed") == []
    monkeypatch.undo()
    purge_due(tmp_path, now=NOW)
    assert os.listdir(tmp_path / ".ckpt-trash" / "purging") == []


def _status(mode: int, *, inode: int = 7, size: int = 1000, mtime_ns: int = 5) -> EntryStatus:
    return EntryStatus(device=1, inode=inode, mode=mode, size=size, mtime_ns=mtime_ns)


MATCHES: list[tuple[str, bool, EntryStatus, bool]] = [
    ("the file", False, _status(stat.S_IFREG | 0o644), True),
    ("the directory", True, _status(stat.S_IFDIR | 0o755, size=4096, mtime_ns=9), True),
    ("a symlink on a reused inode", False, _status(stat.S_IFLNK | 0o777), False),
    ("a file where a directory was", True, _status(stat.S_IFREG | 0o644), False),
    ("a directory where a file was", False, _status(stat.S_IFDIR | 0o755), False),
    ("a file of another size", False, _status(stat.S_IFREG | 0o644, size=999), False),
    # touched in the trash (a scratch file system's "touch your files" routine): still the entry
    ("the file, touched since", False, _status(stat.S_IFREG | 0o644, mtime_ns=6), True),
    ("another inode", False, _status(stat.S_IFREG | 0o644, inode=8), False),
    ("a FIFO", False, _status(stat.S_IFIFO | 0o644), False),
]


@pytest.mark.parametrize(
    ("case", "directory", "status", "expected"), MATCHES, ids=[case for case, *_ in MATCHES]
)
def test_only_the_very_entry_that_was_trashed_matches(
    case: str, directory: bool, status: EntryStatus, expected: bool
) -> None:
    entry = TrashEntry("k", "run/x.ckpt", NOW, DAY, (), 1000, directory, 1, 7, None if directory else 5)
    assert entry.matches(status) is expected, case


def test_a_purge_that_keeps_failing_is_retried_later_not_at_once(tmp_path: Path) -> None:
    """A daemon whose purge fails (here: a file where ``purging/`` should be) must not retry on every
    turn of its loop: the next purge of what is still due waits PURGE_RETRY_SECONDS."""
    steps(tmp_path, range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, grace=1, clock=time.time() - 10)  # due since 9 s
    purging = tmp_path / ".ckpt-trash" / "purging"
    purging.rmdir()
    purging.write_bytes(b"in the way")
    trash = TrashPass(tmp_path)
    trash.begin(purge=False, dry_run=True)  # a look, no purge
    trash.end()
    assert trash.is_due(time.time())  # the entry's grace is over: a purge is due

    result = trash.begin(purge=True, dry_run=False)
    trash.end()

    assert result is not None
    assert len(result.failed) == 1
    assert not trash.is_due(time.time())
    assert trash.is_due(time.time() + PURGE_RETRY_SECONDS + 1)
    deadline = trash.deadline()
    assert deadline is not None
    assert deadline >= time.monotonic() + PURGE_RETRY_SECONDS - 5


_NAME_CHARACTERS = st.characters(codec="utf-8", exclude_characters="/\0") | st.sampled_from(
    [os.fsdecode(bytes([byte])) for byte in range(0x80, 0x100)]  # bytes that are not UTF-8
)


@given(name=st.text(_NAME_CHARACTERS, min_size=1, max_size=300), inode=st.integers(0, 2**64 - 1))
def test_a_stored_name_is_one_valid_file_name_ending_with_its_key(name: str, inode: int) -> None:
    key = make_key(NOW, inode)
    stored = stored_name(name, key)
    encoded = os.fsencode(stored)
    assert len(encoded) <= 255
    assert stored.endswith(f"@{key}")
    assert b"/" not in encoded
    assert b"\0" not in encoded
    assert trash_module.KEY_PATTERN.fullmatch(key)


@given(
    st.lists(st.sampled_from(["run", "..", ".", "", ".ckpt-trash", "a b", "x.ckpt"]), min_size=1, max_size=6)
)
def test_a_relative_path_is_valid_only_if_it_stays_in_the_root_and_out_of_every_trash(
    parts: list[str],
) -> None:
    text = "/".join(parts)
    expected = all(part not in {"..", ".", "", ".ckpt-trash"} for part in parts)
    assert valid_relative_path(text) is expected
    assert valid_relative_path("/" + text) is False


def test_the_pass_offers_its_entries_to_a_budget_and_purges_the_chosen_ones(tmp_path: Path) -> None:
    steps(tmp_path, range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    trash = TrashPass(tmp_path)
    trash.begin(purge=False, dry_run=True)

    offered = trash.reclaimable()
    on_disk = reclaimable(tmp_path)
    result = trash.reclaim([offered[0].key])
    left = trash.reclaimable()
    trash.end()

    assert list(offered) == on_disk  # what the pass remembers is what the trash holds
    assert [item.since for item in offered] == [NOW, NOW]
    assert [entry.key for entry in result.purged] == [offered[0].key]
    assert list(left) == [offered[1]]
    assert reclaimable(tmp_path) == list(left)


def test_the_pass_makes_its_offer_once_a_look_not_at_each_question(tmp_path: Path) -> None:
    """keep_free asks the trash what it may reclaim every second: the offer was made anew each time,
    one object per entry (5% of a core at rest with 100,000 in the trash). Now once per look; moves
    made since are in the next offer."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    trash = TrashPass(tmp_path)
    trash.begin(purge=False, dry_run=True)

    first = trash.reclaimable()
    again = trash.reclaimable()
    steps(tmp_path / "b", range(100, 300, 100))
    target = trash.target(DAY)  # this pass's own moves: the next offer looks at the trash again
    assert target is not None
    apply_plan(plan_of(tmp_path / "b"), tmp_path / "b", trash=target)
    after_moves = trash.reclaimable()
    trash.end()

    assert again is first
    assert len(first) == 2
    assert len(after_moves) == 3
    assert list(after_moves) == reclaimable(tmp_path)


def test_where_a_directory_cannot_be_locked_a_lock_file_in_the_trash_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS emulates flock with POSIX locks, which refuse a directory (EBADF): the lock file is used."""
    steps(tmp_path, range(100, 300, 100))
    locked_kinds: list[str] = []

    def flock(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        locked_kinds.append("file")
        fcntl.flock(fd, operation)

    monkeypatch.setattr(
        trash_module, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    )

    assert trash_everything_but_the_newest(tmp_path) == [Outcome.TRASHED]
    assert locked_kinds == ["file"]
    assert (tmp_path / ".ckpt-trash" / "lock").is_file()


_GOOD_ENTRY = {
    "original": "run/x.ckpt",
    "trashed_at": NOW,
    "grace_seconds": 60,
    "reasons": [],
    "bytes": 1,
    "type": "file",
    "device": 1,
    "inode": 7,
}


@pytest.mark.parametrize(
    "value",
    [10**400, -(10**400), float("nan"), float("inf"), -1, 253_402_300_800, True, "1", None],
    ids=["huge", "huge-negative", "nan", "inf", "negative", "after-9999", "bool", "text", "missing"],
)
def test_a_record_whose_time_is_not_a_time_is_refused_never_raised_past_its_reader(value: object) -> None:
    """A time no float holds (a 400-digit integer) raised OverflowError, which the readers did not
    catch: one forged record stopped every pass (and `trash list`, `prune`) for good."""
    with pytest.raises(ValueError, match="is not a time"):
        TrashEntry.from_document("k", {**_GOOD_ENTRY, "trashed_at": value})
    with pytest.raises(ValueError, match="is not a time"):
        RestoredPin.from_document("k", {"original": "run/x.ckpt", "device": 1, "inode": 7, "until": value})


def test_a_forged_record_is_a_listed_problem_and_the_others_are_still_read(tmp_path: Path) -> None:
    steps(tmp_path, range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path)
    info = tmp_path / ".ckpt-trash" / INFO
    forged, intact = sorted(info.iterdir())
    document = json.loads(forged.read_text())
    forged.write_text(json.dumps({**document, "trashed_at": 10**400}))

    listing = list_trash(tmp_path)

    assert listing is not None
    assert [entry.key for entry in listing.entries] == [intact.name.removesuffix(".json")]
    assert listing.problems == [(forged.name, "'trashed_at' is not a time")]


def test_a_trash_record_leaves_no_cyclic_garbage(tmp_path: Path) -> None:
    """A pass runs with cyclic collection off (memory.py): a record that left a reference cycle per
    checkpoint moved (the indented json.dumps's pure-Python encoder did, ~5 KB) made 100,000 moves
    in one pass peak at 500 MB."""
    document = {"original": "run/x.ckpt", "trashed_at": 1.5, "reasons": ["outside newest 5 (#6)"], "bytes": 7}
    descriptor = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        for index in range(50):
            trash_module.write_metadata(descriptor, f"key-{index}", document)
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()
        os.close(descriptor)
    assert json.loads((tmp_path / "key-7.json").read_text()) == document


def test_the_index_works_out_the_next_purge_once_a_look_not_at_every_question(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon asks when the next purge is due at every turn of its loop: the index sorted all its
    entries at each question (~11% of a core at rest with 100,000 in the trash). Now once a look;
    what it answers follows every look (a grace shorter than the oldest entry's counts)."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, grace=DAY, clock=NOW)
    index = TrashIndex(tmp_path)
    index.refresh()
    asked = purge_times_asked(monkeypatch, IndexedEntry)

    answers = {index.next_purge_at() for _ in range(100)}

    assert answers == {NOW + DAY}
    assert len(asked) == 2  # the two entries, once
    steps(tmp_path / "b", range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, grace=60, clock=NOW + 10)  # later, with a shorter grace
    assert index.next_purge_at() == NOW + DAY  # not looked at again yet
    index.refresh()
    assert index.next_purge_at() == NOW + 70
    assert (index.bytes, len(index.entries)) == (sum(entry.bytes for entry in index.entries), 3)
    summary = index.summary()
    index.close()
    assert summary is not None
    assert summary.oldest is not None
    assert (summary.entries, summary.oldest.key) == (3, index.entries[0].key)
    assert [entry.trashed_at for entry in index.entries] == [NOW, NOW, NOW + 10]  # oldest first


def test_the_index_keeps_no_entry_whole_and_reads_the_oldest_again_for_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that had trashed 100,000 checkpoints held every entry whole (its original path, its
    reasons), ~87 MB for the whole grace period. The index now keeps the key, device, bytes and times;
    the summary's oldest entry is read whole again, only when it is another entry than last time (one
    gone since the look is passed over)."""
    steps(tmp_path / "a", range(100, 500, 100))
    trash_everything_but_the_newest(tmp_path, grace=DAY, clock=NOW)
    listing = list_trash(tmp_path)
    assert listing is not None
    assert len(listing.entries) == 3
    index = TrashIndex(tmp_path)
    index.start()
    index.refresh()
    reads = metadata_reads(monkeypatch)

    assert index.entries == tuple(
        IndexedEntry(entry.key, entry.device, entry.bytes, entry.trashed_at, entry.grace_seconds)
        for entry in listing.entries
    )
    first = [index.summary() for _ in range(3)]
    assert [summary.oldest if summary else None for summary in first] == [listing.entries[0]] * 3
    assert listing.entries[0].reasons  # whole: its reasons and original path, as its metadata says
    assert reads == [f"{listing.entries[0].key}.json"]  # once, not at each summary

    purge_keys(tmp_path, [listing.entries[0].key])  # the oldest goes
    index.refresh()
    (tmp_path / TRASH_DIRECTORY_NAME / INFO / f"{listing.entries[1].key}.json").unlink()  # after the look
    reads.clear()
    summary = index.summary()
    index.close()

    assert summary is not None
    assert (summary.entries, summary.oldest) == (2, listing.entries[2])  # the one gone is passed over
    assert reads == [f"{entry.key}.json" for entry in listing.entries[1:]]


def listings_of_the_trash(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each directory listing made from now on (``os.scandir`` of a descriptor), in order."""
    listed: list[int] = []
    scandir = os.scandir

    def counted(path: Any) -> Any:
        listed.append(path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    return listed


def test_an_unchanged_trash_is_not_listed_again_once_its_last_change_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing 100,000 entries took ~0.3 s at every look, twice a pass. A look now lists ``info/``
    only if its stat changed since a look made well after its last change; a change another process
    makes is seen at the next look, and a forced look lists whatever the stat says."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    monkeypatch.setattr(trash_module, "RACY_SECONDS", -1.0)  # every change counts as old enough
    index = TrashIndex(tmp_path)
    index.start()
    listed = listings_of_the_trash(monkeypatch)

    index.refresh()
    index.refresh()
    index.refresh()
    assert len(listed) == 1
    assert len(index.entries) == 2

    steps(tmp_path / "b", range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW + 10)  # another process's move
    listed.clear()
    index.refresh()
    index.refresh()
    assert len(listed) == 1
    assert len(index.entries) == 3

    index.refresh(force=True)
    index.close()
    assert len(listed) == 2


@given(
    entries=st.lists(
        st.builds(
            IndexedEntry,
            key=st.text("0123456789abcdef", min_size=1, max_size=4),
            device=st.just(1),
            bytes=st.integers(0, 10**6),
            trashed_at=st.sampled_from([NOW, NOW + 1, NOW + 2.5]),
            grace_seconds=st.integers(0, DAY),
        ),
        max_size=20,
        unique_by=lambda entry: entry.key,
    )
)
def test_a_glance_answers_as_its_entries_sorted_do(entries: list[IndexedEntry]) -> None:
    """The oldest entry, bytes and first end of a grace are worked out without a sort (a look at
    100,000 entries sorted them all); they are what the sorted entries give, and all of them oldest
    first is the same tuple at each question."""
    ordered = sorted(entries, key=lambda entry: (entry.trashed_at, entry.key))

    glance = AtAGlance(entries, lambda entry: entry)

    assert glance.oldest == (ordered[0] if ordered else None)
    assert (glance.count, glance.bytes) == (len(entries), sum(entry.bytes for entry in entries))
    assert glance.next_purge_at == min((entry.purge_at for entry in entries), default=None)
    assert glance.oldest_first == tuple(ordered)
    assert glance.oldest_first is glance.oldest_first
    assert glance.oldest == (ordered[0] if ordered else None)


CHANGED_AT = 1_700_000_000.0  # the emulated file system's last change to info/ (epoch seconds)


def a_stat_that_never_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``info/`` as a file system whose directory times never show a change (whole-second times and
    changes within one second, or a FUSE mount that keeps them): only a listing sees one."""
    stamp = (1, 2, 4096, 2, int(CHANGED_AT * 1e9), int(CHANGED_AT * 1e9))
    monkeypatch.setattr(trash_module, "_directory_stamp", lambda dir_fd: None if dir_fd is None else stamp)


@pytest.mark.parametrize(("seconds_after_the_change", "listed"), [(0.0, 2), (1.9, 2), (2.1, 1), (3600.0, 1)])
def test_a_look_made_within_racy_seconds_of_the_last_change_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds_after_the_change: float, listed: int
) -> None:
    """A change within the same tick of the file system's clock as the last one leaves the stat as it
    was: a look made less than RACY_SECONDS after the directory's last change lists it again at the
    next; one made later is trusted until the stat changes."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    a_stat_that_never_changes(monkeypatch)
    index = TrashIndex(tmp_path, clock=lambda: CHANGED_AT + seconds_after_the_change)
    index.start()
    listings = listings_of_the_trash(monkeypatch)

    index.refresh()
    index.refresh()
    index.close()

    assert len(listings) == listed


def test_what_this_process_moves_in_or_purges_is_seen_whatever_the_stat_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass's own purges must leave the index (else the next purge is due at once, again and again)
    and its own moves be in the offer to keep_free (else it evicts a kept checkpoint while the trash
    could give the space): they are listed whatever the directory's stat says."""
    steps(tmp_path / "a", range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, grace=1, clock=time.time() - 10)  # due since 9 s
    a_stat_that_never_changes(monkeypatch)
    monkeypatch.setattr(trash_module, "RACY_SECONDS", -1.0)  # every look trusted: only what forces lists
    trash = TrashPass(tmp_path)

    result = trash.begin(purge=False, dry_run=False)  # the first look: the grace is over, a purge
    trash.end()

    assert result is not None
    assert len(result.purged) == 1
    assert trash.index.entries == ()
    assert not trash.is_due(time.time())

    steps(tmp_path / "b", range(100, 400, 100))
    trash.begin(purge=False, dry_run=False)  # an event's pass
    assert list(trash.reclaimable()) == []
    apply_plan(plan_of(tmp_path / "b"), tmp_path / "b", trash=trash.target(DAY))  # its moves
    offered = trash.reclaimable()
    trash_bytes, summary = trash.end()

    assert len(offered) == 2
    assert summary is not None
    assert (summary.entries, trash_bytes) == (2, sum(item.bytes for item in offered))


def test_only_a_full_pass_or_the_first_looks_at_the_trash_before_its_deletions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass's look at the trash stood between an event and its deletions (~0.3 s with 100,000
    entries). Any pass but the first and the full ones now goes by the previous pass's look at its
    end."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    monkeypatch.setattr(trash_module, "RACY_SECONDS", 10 * DAY)  # no stat is trusted: only the rule
    trash = TrashPass(tmp_path)
    listings = listings_of_the_trash(monkeypatch)

    counts = []
    for full in (False, False, True):  # the first, an event's, a full one
        before = len(listings)
        trash.begin(purge=full, dry_run=True)
        counts.append(len(listings) - before)
        trash.end()

    assert counts == [1, 0, 1]


def test_a_listing_that_fails_keeps_what_was_known_and_is_made_again_at_the_next_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look whose listing fails keeps the entries (and pins) known before, and is no reason to
    trust the directory's stat: the next look lists it, and sees what changed meanwhile."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    a_stat_that_never_changes(monkeypatch)
    monkeypatch.setattr(trash_module, "RACY_SECONDS", -1.0)  # every look trusted
    index = TrashIndex(tmp_path)
    index.start()
    index.refresh()
    assert len(index.entries) == 2
    steps(tmp_path / "b", range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW + 10)  # another process's move
    metadata_files = trash_module.metadata_files

    def failing(dir_fd: int | None, *, versioned: bool = False) -> list[tuple[str, int]]:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(trash_module, "metadata_files", failing)
    index.refresh(force=True)
    assert len(index.entries) == 2
    monkeypatch.setattr(trash_module, "metadata_files", metadata_files)
    index.refresh()
    index.close()

    assert len(index.entries) == 3


def test_a_name_listed_twice_does_not_hide_one_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory listing that races a rename may give a name twice; counting the known names listed
    must not then miss one that went."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    index = TrashIndex(tmp_path)
    index.start()
    index.refresh()
    first, second = index.entries
    metadata_files = trash_module.metadata_files

    def listed_twice_and_one_gone(dir_fd: int | None, *, versioned: bool = False) -> list[tuple[str, int]]:
        listed = [
            item for item in metadata_files(dir_fd, versioned=versioned) if item[0] != f"{second.key}.json"
        ]
        return listed + listed

    monkeypatch.setattr(trash_module, "metadata_files", listed_twice_and_one_gone)
    index.refresh(force=True)
    index.close()

    assert index.entries == (first,)


def test_a_restored_checkpoint_stays_pinned_when_the_pins_cannot_be_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing of ``restored/`` that failed (EIO, too many open files) forgot every pin: for that
    pass, a restored checkpoint was planned as if never restored, and the policy could take it again.
    When in doubt, keep: the pins known before stay in force."""
    two_restored(tmp_path)
    index = TrashIndex(tmp_path)
    pinned = index.pinned_identities(NOW + 1)
    assert len(pinned) == 2

    def failing(dir_fd: int | None, *, versioned: bool = False) -> list[tuple[str, int]]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(trash_module, "metadata_files", failing)
    still = index.pinned_identities(NOW + 1)
    index.close()

    assert still == pinned
    assert index.pins_in_doubt == ".ckpt-trash/restored/ cannot be listed: Too many open files"


def failing_once(
    monkeypatch: pytest.MonkeyPatch, error: OSError, *, names_ending: str = ".json"
) -> list[str]:
    """``read_metadata`` failing with ``error`` the first time each file whose name ends so is read
    (then reading it); the names it failed for."""
    failed: list[str] = []
    read_metadata = trash_module.read_metadata

    def flaky(dir_fd: int, name: str) -> Any:
        if name.endswith(names_ending) and name not in failed:
            failed.append(name)
            raise error
        return read_metadata(dir_fd, name)

    monkeypatch.setattr(trash_module, "read_metadata", flaky)
    return failed


def test_an_entry_that_could_not_be_read_is_read_again_at_the_next_full_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    """An I/O error, or a file another user's ``prune`` wrote with mode 600, is no verdict on what the
    file says: it was remembered as unreadable until the daemon restarted, so its bytes were missing
    from the trash's figures and from what ``keep_free`` may reclaim (a kept checkpoint evicted while
    the trash had the space). A full pass's look (``retry``) reads it again once RETRY_UNREAD_SECONDS
    are over; the looks before do not (100,000 such files would cost a failed open each, at every
    pass, or every second of keep_free's passes). Said once."""
    steps(tmp_path / "a", range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    failed = failing_once(monkeypatch, OSError(errno.EIO, "Input/output error"))
    reads = metadata_reads(monkeypatch)
    now = [NOW]
    index = TrashIndex(tmp_path, clock=lambda: now[0])
    index.start()
    index.refresh(retry=True)
    assert len(failed) == 2
    assert len(index.entries) == 0
    index.refresh(force=True)  # this process's own change, say: listed, but not read again
    now[0] += RETRY_UNREAD_SECONDS - 1
    index.refresh(retry=True)  # a full pass, too soon
    assert len(reads) == 2
    assert len(index.entries) == 0
    now[0] += 1
    index.refresh(retry=True)
    index.close()

    assert len(reads) == 4
    assert len(index.entries) == 2
    problems = events(logs, "trash_problem")
    assert [record["path"].rsplit("/", 1)[-1] for record in problems] == sorted(failed)
    assert {record["detail"] for record in problems} == {"not read now; read again at the next full pass"}


def test_a_malformed_entry_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a metadata file says cannot change under its inode (written whole, then renamed into place):
    one that is not an entry is not read again at each look."""
    steps(tmp_path / "a", range(100, 300, 100))
    trash_everything_but_the_newest(tmp_path, clock=NOW)
    (tmp_path / TRASH_DIRECTORY_NAME / "info" / "20261129T000000.000000Z-i1.json").write_text("{")
    reads = metadata_reads(monkeypatch)
    index = TrashIndex(tmp_path)
    index.start()
    index.refresh()
    index.refresh(force=True)
    index.close()

    assert reads.count("20261129T000000.000000Z-i1.json") == 1
    assert len(index.entries) == 1


def test_a_pin_that_could_not_be_read_is_in_doubt_until_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin that could not be read once was remembered as unreadable: its restored checkpoint was
    planned as never restored until the daemon restarted, and the policy took it again. The look says
    the pins are in doubt (the pass deletes nothing more: trash_pass), and reads it at the next look."""
    two_restored(tmp_path)
    failed = failing_once(monkeypatch, OSError(errno.EIO, "Input/output error"))
    index = TrashIndex(tmp_path)
    first = index.pinned_identities(NOW + 1)
    assert len(failed) == 2
    assert first == {}
    assert (
        index.pins_in_doubt == f".ckpt-trash/restored/{sorted(failed)[0]} cannot be read: Input/output error"
    )
    second = index.pinned_identities(NOW + 1)
    index.close()

    assert len(second) == 2
    assert index.pins_in_doubt is None


def test_a_pass_that_cannot_read_a_pin_deletes_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trash's part of a pass: a pin in doubt is StorageUnavailableError, which ends the pass before
    the group's plan (reconcile.py), and the next pass reads it."""
    two_restored(tmp_path)
    failing_once(monkeypatch, OSError(errno.EMFILE, "Too many open files"))
    keeper = TrashPass(tmp_path)
    keeper.begin(purge=False, dry_run=True)
    with pytest.raises(StorageUnavailableError, match="a pin of a restored checkpoint is unknown"):
        keeper.pinned_identities()
    pinned = keeper.pinned_identities()
    keeper.end()

    assert len(pinned) == 2


def _plan_then_restore(root: Path) -> Plan:
    """Three step checkpoints; the plan that trashes the two older is made, then (before it is applied)
    a ``prune`` trashes them and a ``restore`` puts them back: the same files, pinned."""
    steps(root, range(100, 400, 100))
    planned = plan_of(root)
    trash_everything_but_the_newest(root)
    listing = list_trash(root)
    assert listing is not None
    restore(root, listing.entries, now=time.time())
    return planned


def test_a_checkpoint_restored_since_it_was_planned_is_not_trashed_again(tmp_path: Path) -> None:
    """The check made under the trash's lock, at the move: the pins as they are then."""
    planned = _plan_then_restore(tmp_path)
    results = apply_plan(planned, tmp_path, trash=TrashTarget(tmp_path, DAY)).results

    assert [result.outcome for result in results] == [Outcome.CHANGED] * 2
    assert len(list(tmp_path.glob("*.ckpt"))) == 3


@pytest.mark.parametrize(
    ("case", "outcome", "why"),
    [
        ("a pin unreadable", Outcome.FAILED, "a pin of a restored checkpoint cannot be read"),
        ("restored/ unreadable", Outcome.FAILED, "the pins of restored checkpoints cannot be read"),
        ("restored/ world-writable", Outcome.CHANGED, None),
    ],
)
def test_a_move_keeps_the_checkpoint_when_the_pins_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, outcome: Outcome, why: str | None
) -> None:
    """A pin that could not be read at the move (EIO), or a ``restored/`` refused, was no pin at all: a
    checkpoint restored since it was planned was trashed again. A pin that cannot be read may be this
    checkpoint's: kept (FAILED, saying why), as every deletion that cannot be checked is. A
    ``restored/`` refused as writable by every user is read anyway: its pin keeps the checkpoint."""
    planned = _plan_then_restore(tmp_path)
    if case == "a pin unreadable":
        failing_once(monkeypatch, OSError(errno.EIO, "Input/output error"))
    elif case == "restored/ unreadable":
        _refusing(monkeypatch, "restored", errno.EIO)
    else:
        (tmp_path / TRASH_DIRECTORY_NAME / "restored").chmod(0o777)
    results = apply_plan(planned, tmp_path, trash=TrashTarget(tmp_path, DAY)).results

    assert [result.outcome for result in results] == [outcome] * 2
    if why is not None:
        assert all(why in str(result.error) for result in results)
    assert len(list(tmp_path.glob("*.ckpt"))) == 3


def test_a_pin_the_pass_read_that_cannot_be_read_again_at_the_move_keeps_only_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin the pass had read, failing at the move's own check (an EIO since): every move of the
    root was kept (FAILED), pass after pass, though the pass knew what that file says (it cannot
    change under its inode). The move goes by the pass's read: its checkpoint is kept, the others are
    trashed. A pin the pass never read still keeps every move (it may be any checkpoint's)."""
    two_restored(tmp_path)
    steps(tmp_path, range(400, 600, 100))
    planned = plan_of(tmp_path)  # (no pins: 100 to 400 go)
    keeper = TrashPass(tmp_path)
    keeper.begin(purge=False, dry_run=False)
    assert len(keeper.pinned_identities()) == 2
    pins = failing_pin_reads(monkeypatch)
    pins.failing = True
    results = apply_plan(planned, tmp_path, trash=keeper.target(DAY)).results

    outcomes = {result.decision.record.step: result.outcome for result in results}
    assert outcomes == {
        100: Outcome.CHANGED,
        200: Outcome.CHANGED,
        300: Outcome.TRASHED,
        400: Outcome.TRASHED,
    }
    pins.failing = False
    listing = list_trash(tmp_path)
    assert listing is not None
    restore(tmp_path, [entry for entry in listing.entries if entry.original == step_name(0, 300)])
    pins.failing = True
    results = apply_plan(plan_of(tmp_path), tmp_path, trash=keeper.target(DAY)).results
    keeper.end()

    assert [result.decision.record.step for result in results] == [100, 200, 300]
    assert all(result.outcome is Outcome.FAILED for result in results)
    assert all("a pin of a restored checkpoint cannot be read" in str(result.error) for result in results)
    assert {step_name(0, step) for step in (100, 200, 300, 500)} <= set(os.listdir(tmp_path))


def test_a_pin_written_again_on_the_same_inode_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index knew a pin by its name and inode. A pin removed and written again under its name (a
    ``restore`` tried again after one that failed) may get the freed inode back on ext4, so the index
    kept what the old file said (expired) while the new one pins its checkpoint for a day, and a
    move's check that could not read it went by the old one. Staged here by writing the file again
    in place (the same inode for sure): the index and the move's check both see the new pin."""
    now = time.time()
    steps(tmp_path, range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path, clock=now - 10)
    listing = list_trash(tmp_path)
    assert listing is not None
    entry = next(item for item in listing.entries if item.original == step_name(0, 100))
    restore(tmp_path, [entry], now=now - 2 * DAY)  # pinned until a day ago
    keeper = TrashPass(tmp_path)
    keeper.begin(purge=False, dry_run=False)
    assert keeper.pinned_identities() == {}  # (read: expired)
    pin_path = tmp_path / TRASH_DIRECTORY_NAME / RESTORED / f"{entry.key}.json"
    inode = pin_path.stat().st_ino
    time.sleep(0.02)  # (a change time of its own, even on a coarse clock)
    pin = RestoredPin(entry.key, entry.original, entry.device, entry.inode, now + DAY)
    with pin_path.open("r+b") as handle:
        handle.truncate()
        handle.write(trash_module.record_bytes(pin.document()))
    assert pin_path.stat().st_ino == inode

    pinned = keeper.pinned_identities()
    pins = failing_pin_reads(monkeypatch)
    pins.failing = True
    results = apply_plan(plan_of(tmp_path), tmp_path, trash=keeper.target(DAY)).results
    keeper.end()

    assert pinned == {(entry.device, entry.inode): pin.reason}
    outcomes = {result.decision.record.step: result.outcome for result in results}
    assert outcomes == {100: Outcome.CHANGED}  # (planned without the pins; kept by the new one)
    assert (tmp_path / step_name(0, 100)).exists()


def _refusing(monkeypatch: pytest.MonkeyPatch, name: str, error: int) -> None:
    """``os.open`` of ``name`` (relative to a directory descriptor) fails with ``error``."""
    real_open = os.open

    def refusing(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == name and dir_fd is not None:
            raise OSError(error, os.strerror(error))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", refusing)


@pytest.mark.parametrize("case", ["world-writable", "unreadable", "another user's, mode 700"])
def test_a_refused_trash_has_its_pins_read_anyway_in_doubt_if_it_cannot_be_or_none_if_it_is_not_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]], case: str
) -> None:
    """A ``.ckpt-trash`` refused as a whole was taken for no trash, so its pins for none: made writable
    by every user (``chmod -R o+w``), the restored checkpoints were planned as never restored. Its pins
    are now read anyway (one there can only keep more; none there, none to keep: a mount that shows
    every directory as 0777 is still pruned). One that cannot be read at all (EIO) puts the pins in
    doubt, those known before kept. One another user made, mode 700 (a squatter in a root every user
    may write to), holds none of this tool's restores: no pins and no doubt, so it cannot stop all
    pruning."""
    two_restored(tmp_path)
    keeper = TrashPass(tmp_path)
    keeper.begin(purge=True, dry_run=True)
    pinned = keeper.pinned_identities()
    keeper.end()
    assert len(pinned) == 2
    trash = tmp_path / TRASH_DIRECTORY_NAME
    if case == "world-writable":
        trash.chmod(0o777)
    elif case == "unreadable":
        _refusing(monkeypatch, TRASH_DIRECTORY_NAME, errno.EIO)
    else:
        os.chown(trash, 12345, -1)
        trash.chmod(0o700)
        _refusing(monkeypatch, TRASH_DIRECTORY_NAME, errno.EACCES)  # (as for any user but its owner)
    keeper.begin(purge=True, dry_run=True)
    if case == "world-writable":
        assert keeper.pinned_identities() == pinned
        assert keeper.index.pins_in_doubt is None
        problems = events(logs, "trash_problem")
        assert "writable by every user" in problems[-1]["error"]
        assert "its pins are read anyway" in problems[-1]["detail"]
    elif case == "unreadable":
        with pytest.raises(StorageUnavailableError, match="Input/output error"):
            keeper.pinned_identities()
        assert keeper.index.pinned_identities(NOW + 1) == pinned  # (those known stay)
    else:
        assert keeper.pinned_identities() == {}
        assert "owned by uid 12345" in events(logs, "trash_problem")[-1]["error"]
    keeper.end()


def test_a_restored_directory_that_cannot_be_made_is_no_doubt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trash without ``restored/`` (nothing ever restored) on a full disk: making it fails, and a
    move took that for a ``restored/`` it could not read and kept the checkpoint, so a full disk was
    no longer pruned. Nothing is there: no pin, and the move goes on."""
    steps(tmp_path, range(100, 400, 100))
    trash_everything_but_the_newest(tmp_path)
    (tmp_path / TRASH_DIRECTORY_NAME / "restored").rmdir()
    steps(tmp_path, range(400, 500, 100))
    make_directory = os.mkdir

    def full(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if str(path) == "restored":
            raise OSError(errno.ENOSPC, "No space left on device")
        make_directory(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", full)
    results = apply_plan(plan_of(tmp_path), tmp_path, trash=TrashTarget(tmp_path, DAY)).results

    assert [result.outcome for result in results] == [Outcome.TRASHED]


def test_metadata_is_readable_by_every_user_whatever_the_umask(tmp_path: Path) -> None:
    """A ``restore`` run by a user with umask 077 wrote its pin mode 600: a daemon running as another
    user could not read it, and (the pin in doubt) pruned nothing more. Entries and pins are 0644."""
    previous = os.umask(0o077)
    try:
        two_restored(tmp_path)
    finally:
        os.umask(previous)
    trash = tmp_path / TRASH_DIRECTORY_NAME
    pins = list((trash / "restored").glob("*.json"))

    assert len(pins) == 2
    assert {stat.S_IMODE(path.stat().st_mode) for path in pins} == {0o644}


def test_a_root_that_is_not_there_has_no_pins_and_no_doubt(tmp_path: Path) -> None:
    """A root that cannot be opened because it does not exist (gone meanwhile, or a store's path the
    local trash was asked about) has no trash: its pins are none, not in doubt."""
    keeper = TrashPass(tmp_path / "gone")
    keeper.begin(purge=True, dry_run=True)
    pinned = keeper.pinned_identities()
    keeper.end()

    assert pinned == {}
    assert keeper.index.pins_in_doubt is None
