"""scan.py on real files in tmp_path: download markers, the verdict cache, changed checkpoints,
symlinks judged without being followed, FIFOs, and directory checkpoints of any depth."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ckpt_watcher.integrity import COMPLETE
from ckpt_watcher.naming import DEFAULT_NAMING
from ckpt_watcher.policy import DEFAULT_POLICY
from ckpt_watcher.records import CheckpointRecord, EntryType, FileIdentity
from ckpt_watcher.scan import (
    CompletenessCache,
    ScanOptions,
    ScanProblem,
    ScanStopped,
    is_group_directory,
    scan_directory,
    scan_tree,
    walk_directories,
)
from tests.support.factories import (
    best_name,
    directory_checkpoint,
    make_record,
    step_name,
    write_checkpoint,
    write_truncated,
)
from tests.support.hostile_trees import make_deep_directory, make_device, make_fifo, make_socket, remove_deep
from tests.support.stops import StopAfter

pytestmark = pytest.mark.timeout(60)

NAMING = DEFAULT_POLICY.compiled_naming
QUIET = ScanOptions(directory_quiet_seconds=0.0)
DOWNLOAD_MARKERS = [".aria2", ".part", ".incomplete", ".crdownload", ".st", ".lftp-pget-status"]


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    with capture_logs():
        yield


def scan(
    directory: Path, options: ScanOptions = QUIET, cache: CompletenessCache | None = None
) -> dict[str, CheckpointRecord]:
    return {record.name: record for record in scan_directory(directory, directory, NAMING, options, cache)}


def backdate(path: Path) -> Path:
    """An hour old: past the few seconds in which a verdict is too racy to cache."""
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    return path


def one_shard_checkpoint(path: Path) -> Path:
    return directory_checkpoint(path, {"model.pt": b"m" * 300})


@pytest.mark.parametrize("suffix", DOWNLOAD_MARKERS)
def test_a_download_tool_marker_beside_a_checkpoint_makes_it_incomplete(tmp_path: Path, suffix: str) -> None:
    name = step_name(0, 100)
    write_checkpoint(tmp_path / name)
    one_shard_checkpoint(tmp_path / step_name(0, 200))
    (tmp_path / f"{name}{suffix}").write_bytes(b"download state")
    (tmp_path / f"{step_name(0, 200)}{suffix}").write_bytes(b"download state")

    records = scan(tmp_path)

    for checkpoint in (name, step_name(0, 200)):
        assert not records[checkpoint].complete, checkpoint
        assert f"{checkpoint}{suffix}" in str(records[checkpoint].incomplete_reason)


class OpenCounter:
    """Counts os.open calls that name one file (by any path ending in its name)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.count = 0
        real_open = os.open

        def counting_open(path: Any, *arguments: Any, **keywords: Any) -> int:
            if str(path).endswith(name):
                self.count += 1
            return real_open(path, *arguments, **keywords)

        monkeypatch.setattr(os, "open", counting_open)


def test_negative_verdicts_are_cached_by_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = backdate(write_truncated(tmp_path / step_name(0, 100)))
    cache = CompletenessCache()
    counter = OpenCounter(monkeypatch, broken.name)

    first = scan(tmp_path, cache=cache)[broken.name]
    opened_first = counter.count
    second = scan(tmp_path, cache=cache)[broken.name]

    assert opened_first >= 1
    assert counter.count == opened_first  # the second pass did not read the file again
    assert not first.complete
    assert second.incomplete_reason == first.incomplete_reason


@pytest.mark.parametrize("verify", ["zip", "crc"])
def test_a_complete_verdict_is_read_once_per_file_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: str
) -> None:
    """verify: crc reads the whole file once (README: its cost), then not again while the file's
    identity (device, inode, size, mtime) is unchanged; a change of identity reads it again."""
    path = backdate(write_checkpoint(tmp_path / step_name(0, 100), payload=b"weights" * 1000))
    cache = CompletenessCache()
    counter = OpenCounter(monkeypatch, path.name)
    options = ScanOptions(directory_quiet_seconds=0.0, verify=verify)

    assert scan(tmp_path, options, cache)[path.name].complete
    opened_first = counter.count
    for _ in range(3):
        assert scan(tmp_path, options, cache)[path.name].complete

    assert opened_first >= 1
    assert counter.count == opened_first, "a later pass read the unchanged file again"
    os.utime(path, (time.time() - 1800, time.time() - 1800))  # a new identity: judged again
    assert scan(tmp_path, options, cache)[path.name].complete
    assert counter.count > opened_first


def test_a_cache_is_empty_until_it_holds_a_verdict_or_a_counted_file(tmp_path: Path) -> None:
    """``is_empty``, packed (after ``retain``) or not: a checkpoint too new to cache its verdict still
    counts as complete, so its cache is not empty (a change to it must still be noticed)."""
    racy = write_checkpoint(tmp_path / step_name(0, 100))  # just written: counted, verdict not stored
    settled = backdate(write_checkpoint(tmp_path / step_name(0, 200)))
    unknown = tmp_path / "notes.txt"
    unknown.write_text("not a checkpoint")
    # The clock a second after the racy file's mtime, however long the test took to get here.
    options = dataclasses.replace(QUIET, now=racy.stat().st_mtime + 1.0)
    for present, empty in (([unknown], True), ([racy], False), ([settled], False)):
        cache = CompletenessCache()
        assert cache.is_empty()
        records = [
            record
            for record in scan_directory(tmp_path, tmp_path, NAMING, options, cache)
            if record.path in present
        ]
        assert cache.is_empty() is False  # before retain: every file of the directory was judged
        cache.retain(records)
        assert cache.is_empty() is empty, present
        assert len(cache) == (1 if present == [settled] else 0)
        assert cache.is_empty() is empty  # unpacked by len() and still the same


def test_a_first_pass_asks_an_empty_cache_nothing_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (100, 200, 300):
        backdate(write_checkpoint(tmp_path / step_name(0, step)))
    cache = CompletenessCache()
    recalled: list[str] = []
    real_recall = CompletenessCache.recall

    def recall(self: CompletenessCache, path: Path | str, *arguments: Any) -> Any:
        recalled.append(os.fspath(path))
        return real_recall(self, path, *arguments)

    monkeypatch.setattr(CompletenessCache, "recall", recall)
    first = scan(tmp_path, cache=cache)
    assert recalled == []
    cache.retain(first.values())
    second = scan(tmp_path, cache=cache)
    assert sorted(Path(path).name for path in recalled) == sorted(first)  # the next pass recalls each
    assert second == first


def test_verdicts_that_depend_on_time_or_a_marker_are_not_cached(tmp_path: Path) -> None:
    name = step_name(0, 100)
    write_checkpoint(tmp_path / name)
    marker = tmp_path / f"{name}.aria2"
    marker.write_bytes(b"")
    cache = CompletenessCache()
    now = time.time()

    assert not scan(tmp_path, cache=cache)[name].complete
    marker.unlink()
    waiting = scan(tmp_path, ScanOptions(settle_seconds=60, now=now), cache)[name]
    assert not waiting.complete
    assert waiting.settles_at is not None
    assert scan(tmp_path, ScanOptions(settle_seconds=60, now=now + 120), cache)[name].complete


def test_a_verdict_reached_by_a_weaker_check_does_not_satisfy_a_stronger_one(tmp_path: Path) -> None:
    """Judged complete by `zip`, then the policy asks for `crc`: the file is read again."""
    path = write_checkpoint(tmp_path / step_name(0, 100), payload=b"right bytes" * 100)
    data = bytearray(path.read_bytes())
    position = data.find(b"right bytes")
    data[position : position + 5] = b"WRONG"  # same size, CRC no longer matches
    backdate(path)
    path.write_bytes(bytes(data))
    backdate(path)
    cache = CompletenessCache()

    assert scan(tmp_path, ScanOptions(verify="zip"), cache)[path.name].complete
    checked = scan(tmp_path, ScanOptions(verify="crc"), cache)[path.name]

    assert not checked.complete
    assert "CRC" in str(checked.incomplete_reason)


def test_a_checkpoint_that_changes_after_it_counted_is_logged_and_judged_again(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / step_name(0, 100), payload=b"first" * 100)
    old_size = path.stat().st_size
    cache = CompletenessCache()
    assert scan(tmp_path, cache=cache)[path.name].complete
    with path.open("r+b") as stream:  # rewritten in place (same inode), half of it for now
        stream.truncate(old_size // 2)

    with capture_logs() as logs:
        again = scan(tmp_path, cache=cache)[path.name]

    assert not again.complete
    changed = [record for record in logs if record["event"] == "checkpoint_changed"]
    assert len(changed) == 1
    assert changed[0]["old_bytes"] == old_size
    assert changed[0]["new_bytes"] == old_size // 2
    with capture_logs() as logs:
        scan(tmp_path, cache=cache)
    assert not [record for record in logs if record["event"] == "checkpoint_changed"]  # logged once


def test_last_link_judged_by_its_targets_record_in_the_same_group(tmp_path: Path) -> None:
    """A directory checkpoint still inside its quiet time is not complete, and neither is a link to it."""
    fresh = one_shard_checkpoint(tmp_path / step_name(0, 200))
    truncated = write_truncated(tmp_path / step_name(0, 100))
    os.symlink(fresh.name, tmp_path / "last.ckpt")
    os.symlink(truncated.name, tmp_path / "last-v1.ckpt")

    records = scan(tmp_path, ScanOptions(directory_quiet_seconds=3600))

    assert not records[fresh.name].complete
    assert not records["last.ckpt"].complete
    assert records["last.ckpt"].incomplete_reason == records[fresh.name].incomplete_reason
    assert records["last-v1.ckpt"].incomplete_reason == records[truncated.name].incomplete_reason
    assert records["last.ckpt"].link_target == fresh


def test_a_link_to_a_directory_outside_its_group_is_never_walked(tmp_path: Path) -> None:
    """`last.ckpt -> /` used to walk the whole file system on every pass; the target's atime tells."""
    outside = one_shard_checkpoint(tmp_path / "outside" / "somewhere")
    if os.statvfs(outside).f_flag & os.ST_NOATIME:
        pytest.skip("this file system does not record access times")
    ancient = 1_000_000_000
    for directory in (outside, outside / "checkpoint"):
        os.utime(directory, ns=(ancient, directory.stat().st_mtime_ns))
    group = tmp_path / "run"
    group.mkdir()
    write_checkpoint(group / step_name(0, 100))
    os.symlink(outside, group / "last.ckpt")
    os.symlink("/", group / "last-v1.ckpt")

    records = scan(group)

    assert not records["last.ckpt"].complete
    assert "directory" in str(records["last.ckpt"].incomplete_reason)
    assert records["last.ckpt"].bytes == 0
    assert records["last-v1.ckpt"].link_target == Path("/")
    for directory in (outside, outside / "checkpoint"):
        assert directory.stat().st_atime_ns == ancient, f"{directory} was listed"


def test_a_link_to_a_regular_file_elsewhere_is_judged_by_a_bounded_open(tmp_path: Path) -> None:
    elsewhere = write_checkpoint(tmp_path / "other-run" / step_name(0, 100))
    group = tmp_path / "run"
    group.mkdir()
    os.symlink(elsewhere, group / "last.ckpt")

    assert scan(group)["last.ckpt"].complete


def test_fifos_sockets_and_devices_with_checkpoint_names_never_hang_a_scan(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    group = tmp_path / "run"
    group.mkdir()
    make_fifo(group / step_name(0, 100))
    make_socket(group / step_name(0, 200))
    device = make_device(group / step_name(0, 300))
    os.symlink(make_fifo(outside / "pipe"), group / step_name(0, 400))
    os.symlink(outside / "pipe", group / "last.ckpt")
    os.symlink("/dev/zero", group / "last-v1.ckpt")
    write_checkpoint(group / step_name(0, 500))

    records = scan(group)

    assert records[step_name(0, 500)].complete
    expected = {step_name(0, 100), step_name(0, 200), step_name(0, 400), "last.ckpt", "last-v1.ckpt"}
    if device is not None:
        expected.add(device.name)
    for name in expected:
        assert not records[name].complete, name
    assert records[step_name(0, 100)].entry_type is EntryType.OTHER
    assert "not a regular file" in str(records["last.ckpt"].incomplete_reason)
    assert stat.S_ISFIFO(os.stat(outside / "pipe").st_mode)


def test_a_directory_checkpoint_deeper_than_path_max_is_summed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    checkpoint = one_shard_checkpoint(tmp_path / step_name(0, 100))
    request.addfinalizer(lambda: remove_deep(tmp_path))  # pytest's clean-up recurses
    make_deep_directory(checkpoint / "checkpoint" / "nested", depth=2200)  # ~4.4 KB of path

    record = scan(tmp_path)[checkpoint.name]

    assert record.complete, record.incomplete_reason
    level_bytes = sum(len(b"level %d\n" % level) for level in range(2200))
    assert (
        record.bytes
        == (checkpoint / "checkpoint" / "model.pt").stat().st_size + len("checkpoint") + level_bytes
    )


def test_the_trash_is_never_walked_nor_scanned_at_any_depth(tmp_path: Path) -> None:
    """A root's ``.ckpt-trash`` and one deeper (the trash of another root below this one) hold
    checkpoint names, but are never groups and never records: nothing in them is planned."""
    for trash in (tmp_path / ".ckpt-trash", tmp_path / "run" / ".ckpt-trash"):
        write_checkpoint(trash / "files" / step_name(0, 100))
        write_checkpoint(trash / step_name(0, 200))
    write_checkpoint(tmp_path / "run" / step_name(0, 300))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".ckpt-trash").symlink_to(tmp_path / ".ckpt-trash")

    result = scan_tree(tmp_path, DEFAULT_NAMING)

    assert result.directories == [tmp_path, tmp_path / "other", tmp_path / "run"]
    assert [record.relative_path for record in result.records] == [f"run/{step_name(0, 300)}"]


def test_a_checkpoint_counted_at_its_close_stays_counted_until_it_changes(tmp_path: Path) -> None:
    """Closed by its writer, it counts at once; a pass that another event brings before the settle
    time is over (the daemon's own deletion, say) does not take that back, while the file is the same.
    Written to again (a new identity), it waits out the settle time as any file being written."""
    path = write_checkpoint(tmp_path / step_name(0, 100))
    cache = CompletenessCache()
    now = time.time()
    settling = ScanOptions(settle_seconds=60, now=now, directory_quiet_seconds=0.0)

    closed = dataclasses.replace(settling, closed_paths=frozenset({path}))
    assert scan(tmp_path, closed, cache)[path.name].complete
    assert scan(tmp_path, settling, cache)[path.name].complete
    cache.retain(scan_directory(tmp_path, tmp_path, NAMING, settling, cache))  # packed between passes
    assert scan(tmp_path, settling, cache)[path.name].complete

    with path.open("ab") as stream:
        stream.write(b"more")
    again = scan(tmp_path, dataclasses.replace(settling, now=time.time()), cache)[path.name]
    assert not again.complete
    assert again.settles_at is not None
    assert not scan(tmp_path, settling, CompletenessCache())[path.name].complete  # nothing remembered


@pytest.mark.parametrize(
    "directory", [Path("/ckpt/run"), Path("/"), Path("."), Path("runs/a"), Path("/s3:/bucket/run")]
)
def test_a_records_path_text_is_the_text_of_its_path(directory: Path) -> None:
    """Records hold their directory and name; the path's text made without a Path (cache keys, logs)
    is exactly what pathlib makes of them."""
    record = make_record(step_name(0, 100), directory)
    assert record.path == directory / record.name
    assert record.path_text == str(record.path)
    assert record.directory is directory


def mixed_group(tmp_path: Path) -> Path:
    """A group holding one of each kind of entry a scan meets."""
    group = tmp_path / "run"
    write_checkpoint(backdate_later := group / step_name(1, 1500, version=2), b"w" * 50)
    backdate(backdate_later)
    backdate(write_checkpoint(group / best_name(0, 500, 0.4125)))
    backdate(write_truncated(group / step_name(0, 1000)))
    backdate(write_checkpoint(group / "notes.txt"))
    (group / "empty.ckpt").touch()
    backdate(group / "empty.ckpt")
    write_checkpoint(group / (step_name(2, 2000) + ".tmp"))
    write_checkpoint(group / step_name(3, 3000))  # young: still settling
    backdate(one_shard_checkpoint(group / step_name(4, 4000)))
    make_fifo(group / step_name(5, 5000))
    os.symlink(step_name(1, 1500, version=2), group / "last.ckpt")
    (group / "plain-subdirectory").mkdir()
    return group


def test_a_scans_record_says_each_field_by_name(tmp_path: Path) -> None:
    group = mixed_group(tmp_path)
    name = step_name(1, 1500, version=2)
    status = os.stat(group / name)

    record = scan(group)[name]

    assert (record.directory, record.name, record.relative_path) == (group, name, name)
    assert (record.kind.value, record.entry_type, record.bytes) == ("step", EntryType.FILE, status.st_size)
    assert record.identity == FileIdentity(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    assert (record.complete, record.incomplete_reason, record.note) == (True, None, None)
    assert record.settles_at is None
    assert (record.epoch, record.step, record.version, record.date) == (1, 1500, 2, None)
    assert (record.metric_name, record.metric, record.metric_text) == (None, None, None)
    assert record.link_target is None
    best = scan(group)[best_name(0, 500, 0.4125)]
    assert (best.kind.value, best.date, best.metric_name, best.metric, best.metric_text) == (
        "best",
        "20261128",
        "loss",
        0.4125,
        "0.4125",
    )
    young = scan(group, ScanOptions(settle_seconds=60.0, directory_quiet_seconds=0.0))[step_name(3, 3000)]
    assert not young.complete
    assert young.settles_at is not None
    assert scan(group)["last.ckpt"].link_target == group / name


def test_a_one_shot_scan_and_a_daemons_scan_make_the_same_records(tmp_path: Path) -> None:
    """prune (no cache) and the daemon's first pass (an empty cache) take each entry's O_PATH handle
    first; a daemon whose cache knows other files stats by name first: the same entries give the
    same records either way."""
    group = mixed_group(tmp_path)
    options = ScanOptions(settle_seconds=60.0, directory_quiet_seconds=0.0, now=time.time())
    knows_others = CompletenessCache()
    knows_others.store(FileIdentity(0, 0, 1, 0), "zip", COMPLETE)

    one_shot = scan(group, options)
    daemons = scan(group, options, knows_others)
    assert scan(group, options, CompletenessCache()) == one_shot

    assert one_shot == daemons
    assert len(one_shot) == 10  # all but the plain subdirectory
    assert not one_shot[step_name(3, 3000)].complete  # still settling
    assert not one_shot[step_name(0, 1000)].complete
    assert one_shot[step_name(5, 5000)].entry_type is EntryType.OTHER


def test_a_file_swapped_for_a_fifo_after_its_handle_is_never_opened_for_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the handle closes: the entry is a regular file when looked at, a FIFO when read. The
    handle holds the inode that was looked at; a FIFO put under the name afterwards is never opened."""
    group = tmp_path / "run"
    name = step_name(0, 100)
    backdate(write_checkpoint(group / name))
    real_fstat = os.fstat
    swapped: list[str] = []

    def swap_after_the_handle(descriptor: int) -> os.stat_result:
        status = real_fstat(descriptor)
        if not swapped and stat.S_ISREG(status.st_mode):
            os.unlink(group / name)
            make_fifo(group / name)
            swapped.append(name)
        return status

    monkeypatch.setattr(os, "fstat", swap_after_the_handle)
    record = scan(group)[name]
    monkeypatch.undo()

    assert swapped == [name]
    assert record.complete  # the inode looked at, read through its handle, not the FIFO now there
    assert stat.S_ISFIFO(os.stat(group / name).st_mode)


def test_the_walk_tells_a_directory_it_cannot_list_from_one_that_is_no_directory_any_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is below a directory that cannot be listed (EACCES) is unknown, not gone; one replaced by
    a file since it was found (ENOTDIR) is gone. Both are problems; only the first is ``unlisted``."""
    for name in ("private/run", "replaced", "open/run"):
        (tmp_path / name).mkdir(parents=True)
    failures = {
        str(tmp_path / "private"): PermissionError(13, "Permission denied"),
        str(tmp_path / "replaced"): NotADirectoryError(20, "Not a directory"),
    }
    scandir = os.scandir

    def failing(path: Any) -> Any:
        if str(path) in failures:
            raise failures[str(path)]
        return scandir(path)

    monkeypatch.setattr("ckpt_watcher.scan.os.scandir", failing)
    problems: list[ScanProblem] = []

    walked = set(walk_directories(tmp_path, DEFAULT_NAMING, problems))

    assert walked == {tmp_path / name for name in (".", "private", "replaced", "open", "open/run")}
    assert {(problem.path.name, problem.unlisted) for problem in problems} == {
        ("private", True),
        ("replaced", False),
    }


def test_a_group_that_cannot_be_looked_at_is_not_taken_for_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "run")
    answers = {name: is_group_directory(tmp_path / name) for name in ("run", "file", "link", "gone")}
    lstat = os.lstat

    def unsearchable(path: Any, *arguments: Any, **keywords: Any) -> Any:
        if str(path) == str(tmp_path / "run"):
            raise PermissionError(13, "Permission denied")  # a directory above it made private
        return lstat(path, *arguments, **keywords)

    monkeypatch.setattr("ckpt_watcher.scan.os.lstat", unsearchable)

    assert answers == {"run": True, "file": False, "link": False, "gone": False}
    assert is_group_directory(tmp_path / "run") is None


def test_a_stop_during_the_walk_of_a_directory_checkpoint_ends_the_scan(tmp_path: Path) -> None:
    """The walk that sizes a directory checkpoint looks at the stop too: a DeepSpeed checkpoint of
    300,000 files took seconds to walk, during which a SIGTERM waited."""
    shards = {f"shard_{index:03d}.pt": b"s" for index in range(2 * 256)}
    directory_checkpoint(tmp_path / step_name(0, 100), shards)
    stop = StopAfter(looks=2)  # the scan's look before the entry, the walk's first: the stop comes after

    with pytest.raises(ScanStopped):
        scan_directory(tmp_path, tmp_path, NAMING, QUIET, stop=stop)

    assert stop.looks > 2
