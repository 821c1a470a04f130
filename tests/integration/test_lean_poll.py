"""The polling observer's lean memory of the tree (``LeanTree``): the events watchdog's snapshot diff
gave (created, modified, deleted, moved; files and directories), on real files, without following a
symlink, at any depth, and a root that vanishes said so."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from ckpt_watcher import observers
from ckpt_watcher.naming import DEFAULT_NAMING
from ckpt_watcher.observers import DeepSafePollingEmitter, DeepSafePollingObserver, LeanTree, UnwatchedOnce
from ckpt_watcher.scan import CompletenessCache, ScanOptions, scan_directory
from tests.support.hostile_trees import make_deep_directory, remove_deep


def _events(tree: LeanTree) -> set[tuple[str, str, str, str]]:
    """One poll's events, without a directory's own "modified" (its listing changed: as watchdog says
    it, and as the daemon ignores it)."""
    found: list[FileSystemEvent] = []
    tree.poll(found.append)
    return {
        (
            event.event_type,
            "directory" if event.is_directory else "file",
            os.fsdecode(event.src_path),
            os.fsdecode(event.dest_path),
        )
        for event in found
        if not (event.is_directory and event.event_type == "modified")
    }


@pytest.fixture
def tree(tmp_path: Path) -> LeanTree:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.ckpt").write_bytes(b"a")
    (tmp_path / "run" / "b.ckpt").write_bytes(b"b")
    lean = LeanTree(str(tmp_path), UnwatchedOnce("polling"), poll_interval=5.0)  # a full listing each 12th
    lean.poll(None)
    return lean


def test_nothing_changed_is_no_event(tree: LeanTree) -> None:
    assert _events(tree) == set()


def test_a_listing_and_the_daemons_records_share_one_string_per_name(tree: LeanTree, tmp_path: Path) -> None:
    """The listing interns its names, as the daemon's scan does for its records (the 100,000 names of a
    huge directory are then held once while a pass runs beside what a poll remembers)."""
    run = str(tmp_path / "run")
    remembered = list(tree.directories[run])
    assert sorted(remembered) == ["a.ckpt", "b.ckpt"]
    assert all(name is sys.intern(name) for name in remembered)
    cache = CompletenessCache()
    records = scan_directory(Path(run), Path(run), DEFAULT_NAMING, ScanOptions(), cache)
    by_name = {record.name: record for record in records}
    assert all(by_name[name].name is name for name in remembered)
    assert all(record.relative_path is record.name for record in records)  # the root's own group


def test_created_modified_and_deleted_files(tree: LeanTree, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "c.ckpt").write_bytes(b"c")
    (run / "a.ckpt").write_bytes(b"longer now")
    (run / "b.ckpt").unlink()

    assert _events(tree) == {
        ("created", "file", str(run / "c.ckpt"), ""),
        ("modified", "file", str(run / "a.ckpt"), ""),
        ("deleted", "file", str(run / "b.ckpt"), ""),
    }
    assert _events(tree) == set()


def test_a_rename_is_a_move_also_across_directories(tree: LeanTree, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "a.ckpt").rename(run / "a2.ckpt")
    (tmp_path / "other").mkdir()
    (run / "b.ckpt").rename(tmp_path / "other" / "b.ckpt")

    events = _events(tree)

    assert ("moved", "file", str(run / "a.ckpt"), str(run / "a2.ckpt")) in events
    assert ("moved", "file", str(run / "b.ckpt"), str(tmp_path / "other" / "b.ckpt")) in events
    assert ("created", "directory", str(tmp_path / "other"), "") in events


def test_a_directory_that_appears_or_vanishes_brings_its_files(tree: LeanTree, tmp_path: Path) -> None:
    new = tmp_path / "new"
    new.mkdir()
    (new / "x.ckpt").write_bytes(b"x")
    assert _events(tree) >= {
        ("created", "directory", str(new), ""),
        ("created", "file", str(new / "x.ckpt"), ""),
    }
    (new / "x.ckpt").unlink()
    new.rmdir()
    assert _events(tree) >= {
        ("deleted", "directory", str(new), ""),
        ("deleted", "file", str(new / "x.ckpt"), ""),
    }


def test_a_symlink_is_one_entry_never_walked(tree: LeanTree, tmp_path: Path) -> None:
    (tmp_path / "run" / "last.ckpt").symlink_to("/")
    events = _events(tree)
    assert events == {("created", "file", str(tmp_path / "run" / "last.ckpt"), "")}
    assert set(tree.directories) == {str(tmp_path), str(tmp_path / "run")}


def test_any_depth(tmp_path: Path) -> None:
    lean = LeanTree(str(tmp_path), UnwatchedOnce("polling"))
    lean.poll(None)
    make_deep_directory(tmp_path / "deep", 1500)
    try:
        events = _events(lean)  # no RecursionError; what is too long to reach is reported, not fatal
    finally:
        remove_deep(tmp_path / "deep")
    assert ("created", "directory", str(tmp_path / "deep"), "") in events


def test_a_vanished_root_raises_file_not_found(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    lean = LeanTree(str(root), UnwatchedOnce("polling"))
    lean.poll(None)
    root.rmdir()
    with pytest.raises(FileNotFoundError):
        lean.poll(lambda event: None)


def test_not_recursive_lists_only_the_top(tmp_path: Path) -> None:
    """A config file's directory is watched alone: its subdirectories are entries, never walked (a
    policy file beside a 100,000-checkpoint tree must not cost a second walk of that tree each poll)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.ckpt").write_bytes(b"a")
    lean = LeanTree(str(tmp_path), UnwatchedOnce("polling"), recursive=False)
    lean.poll(None)
    assert set(lean.directories) == {str(tmp_path)}
    (tmp_path / "run" / "b.ckpt").write_bytes(b"b")
    (tmp_path / "policy.yaml").write_text("save_top_k_checkpoints: 3\n")
    assert _events(lean) == {("created", "file", str(tmp_path / "policy.yaml"), "")}


def test_a_directory_swapped_for_a_symlink_is_not_entered(tree: LeanTree, tmp_path: Path) -> None:
    """Listed as a directory, a symlink by the time it is opened: not followed (``O_NOFOLLOW``)."""
    run = tmp_path / "run"
    original = LeanTree._entries

    def swap_after_the_root(
        self: LeanTree, directory: str, descriptor: int
    ) -> tuple[dict[str, int], list[str]]:
        listed = original(self, directory, descriptor)
        if directory == str(tmp_path) and run.is_dir():
            run.rename(tmp_path / "elsewhere")
            run.symlink_to("/")
        return listed

    tree._entries = swap_after_the_root.__get__(tree)  # type: ignore[method-assign]
    tree.poll(lambda event: None)
    assert str(run) not in tree.directories
    assert not any(path.startswith(str(run) + os.sep) for path in tree.directories)


def test_the_polling_observer_keeps_a_watch_s_recursion(tmp_path: Path) -> None:
    observer = DeepSafePollingObserver(timeout=60)
    observer.schedule(FileSystemEventHandler(), str(tmp_path), recursive=False)
    (emitter,) = observer.emitters
    assert isinstance(emitter, DeepSafePollingEmitter)
    assert emitter._tree.recursive is False


# Skipping what cannot have changed: a recursive tree's directory whose own signature (inode, device,
# mtime, ctime) was the same at two polls in a row is not listed again, nor each of its entries stat'ed.


@pytest.fixture
def stat_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names LeanTree ``lstat``s relative to an open directory (one per entry it looks at)."""
    calls: list[str] = []
    original = os.stat

    def counting(path: Any, *arguments: Any, **options: Any) -> os.stat_result:
        if options.get("dir_fd") is not None:
            calls.append(os.fsdecode(path))
        return original(path, *arguments, **options)

    monkeypatch.setattr(os, "stat", counting)
    return calls


@pytest.fixture
def forced_signatures(monkeypatch: pytest.MonkeyPatch) -> dict[int, tuple[int, int, int, int]]:
    """Directory inode -> the signature polls see for it (a file system whose timestamp did not tick:
    a change that leaves mtime and ctime as they were, which os.utime cannot do for the ctime)."""
    forced: dict[int, tuple[int, int, int, int]] = {}
    original = observers._directory_signature

    def signature(descriptor: int) -> tuple[int, int, int, int]:
        real = original(descriptor)
        return forced.get(real[0], real)

    monkeypatch.setattr(observers, "_directory_signature", signature)
    return forced


def _stable(tree: LeanTree) -> None:
    """One more poll that finds nothing changed: the next one may skip every directory."""
    assert _events(tree) == set()


def test_a_stable_directory_is_not_stat_ed_per_entry(
    tree: LeanTree, tmp_path: Path, stat_calls: list[str]
) -> None:
    """Listed in full until its signature was the same at two polls in a row; then only the
    subdirectories are stat'ed (as entries of their parent), never the files."""
    _events(tree)  # the same signatures as the first poll: listed in full once more
    assert sorted(stat_calls) == ["a.ckpt", "b.ckpt", "run"]
    stat_calls.clear()
    assert _events(tree) == set()
    assert stat_calls == ["run"]


def _create(run: Path) -> None:
    (run / "c.ckpt").write_bytes(b"c")


def _delete(run: Path) -> None:
    (run / "b.ckpt").unlink()


def _rename(run: Path) -> None:
    (run / "a.ckpt").rename(run / "a2.ckpt")


def _replace(run: Path) -> None:  # Lightning's atomic save: a new file renamed over the old one
    (run / "a.tmp").write_bytes(b"new a")
    (run / "a.tmp").replace(run / "a.ckpt")


def _add_subdirectory(run: Path) -> None:
    (run / "sub").mkdir()
    (run / "sub" / "x.ckpt").write_bytes(b"x")


def _symlink(run: Path) -> None:
    (run / "last.ckpt").symlink_to("b.ckpt")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_create, {("created", "file", "c.ckpt", "")}),
        (_delete, {("deleted", "file", "b.ckpt", "")}),
        (_rename, {("moved", "file", "a.ckpt", "a2.ckpt")}),
        (_replace, {("deleted", "file", "a.ckpt", ""), ("created", "file", "a.ckpt", "")}),
        (_add_subdirectory, {("created", "directory", "sub", ""), ("created", "file", "sub/x.ckpt", "")}),
        (_symlink, {("created", "file", "last.ckpt", "")}),
    ],
)
def test_a_change_to_a_stable_directory_s_listing_is_reported(
    tree: LeanTree,
    tmp_path: Path,
    change: Callable[[Path], None],
    expected: set[tuple[str, str, str, str]],
) -> None:
    run = tmp_path / "run"
    _stable(tree)
    change(run)
    relative = {
        (kind, what, os.path.relpath(source, run), os.path.relpath(destination, run) if destination else "")
        for kind, what, source, destination in _events(tree)
    }
    assert relative == expected
    assert _events(tree) == set()


def test_a_file_written_in_place_keeps_giving_modified_while_active(
    tree: LeanTree, tmp_path: Path, stat_calls: list[str]
) -> None:
    """A checkpoint written in place: "modified" at every poll while it changes, the directory's
    listing skipped; stat'ed once more after it stopped, then no longer."""
    run = tmp_path / "run"
    _stable(tree)
    (run / "c.ckpt").write_bytes(b"c")
    assert _events(tree) == {("created", "file", str(run / "c.ckpt"), "")}
    for size in range(2, 6):  # each poll finds it written since the last one
        (run / "c.ckpt").write_bytes(b"c" * size)
        stat_calls.clear()
        assert _events(tree) == {("modified", "file", str(run / "c.ckpt"), "")}
        if size > 2:  # (the first is listed in full: the directory's signature changed at the last poll)
            assert sorted(stat_calls) == ["c.ckpt", "run"]
    stat_calls.clear()
    assert _events(tree) == set()  # quiet for a whole poll: stat'ed this once more
    assert sorted(stat_calls) == ["c.ckpt", "run"]
    stat_calls.clear()
    assert _events(tree) == set()
    assert stat_calls == ["run"]


def test_a_quiet_file_written_in_place_is_seen_at_the_directory_s_next_change(
    tree: LeanTree, tmp_path: Path
) -> None:
    """The cost of skipping (documented): a file quiet for a whole poll and then rewritten in place, in
    a directory where nothing else changes, is seen when the directory next changes (or by the
    daemon's rescan, which stats everything)."""
    run = tmp_path / "run"
    _stable(tree)
    (run / "a.ckpt").write_bytes(b"rewritten")
    assert _events(tree) == set()
    (run / "c.ckpt").write_bytes(b"c")
    assert _events(tree) == {
        ("modified", "file", str(run / "a.ckpt"), ""),
        ("created", "file", str(run / "c.ckpt"), ""),
    }


def test_a_change_in_the_same_timestamp_tick_as_the_last_one_is_caught(
    tree: LeanTree,
    tmp_path: Path,
    forced_signatures: dict[int, tuple[int, int, int, int]],
    stat_calls: list[str],
) -> None:
    """A directory whose signature changed at poll N is listed in full at N+1 even if the signature is
    the same then: an entry made after N's listing, in the same tick, left mtime and ctime as they were."""
    run = tmp_path / "run"
    identity = run.stat().st_ino
    _stable(tree)
    (run / "c.ckpt").write_bytes(b"c")
    forced_signatures[identity] = (identity, run.stat().st_dev, 1, 1)  # what c.ckpt's creation set
    assert _events(tree) == {("created", "file", str(run / "c.ckpt"), "")}
    (run / "d.ckpt").write_bytes(b"d")  # same tick: the signature polls see stays the same
    stat_calls.clear()
    assert _events(tree) == {("created", "file", str(run / "d.ckpt"), "")}
    assert sorted(stat_calls) == ["a.ckpt", "b.ckpt", "c.ckpt", "d.ckpt", "run"]  # listed in full
    stat_calls.clear()
    assert _events(tree) == set()
    assert sorted(stat_calls) == ["d.ckpt", "run"]  # skipped now; d.ckpt stat'ed once more (active)


def test_an_active_entry_gone_from_a_skipped_directory_is_deleted(
    tree: LeanTree, tmp_path: Path, forced_signatures: dict[int, tuple[int, int, int, int]]
) -> None:
    """Found gone when stat'ed (its unlink in the same tick as the last change): a deletion, as a
    listing would have said, and no longer remembered."""
    run = tmp_path / "run"
    identity = run.stat().st_ino
    _stable(tree)
    forced_signatures[identity] = (identity, run.stat().st_dev, 1, 1)
    (run / "c.ckpt").write_bytes(b"c")
    assert _events(tree) == {("created", "file", str(run / "c.ckpt"), "")}
    (run / "c.ckpt").write_bytes(b"cc")
    assert _events(tree) == {("modified", "file", str(run / "c.ckpt"), "")}  # listed in full; active
    (run / "c.ckpt").unlink()
    assert _events(tree) == {("deleted", "file", str(run / "c.ckpt"), "")}  # skipped, c.ckpt stat'ed
    assert set(tree.directories[str(run)]) == {"a.ckpt", "b.ckpt"}
    assert _events(tree) == set()


def test_a_not_recursive_tree_is_never_skipped(tmp_path: Path, stat_calls: list[str]) -> None:
    """The policy file's directory: an in-place edit of a quiet policy file hot-reloads at the next poll."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 3\n")
    (tmp_path / "notes.txt").write_text("n")
    lean = LeanTree(str(tmp_path), UnwatchedOnce("polling"), recursive=False)
    lean.poll(None)
    for _ in range(3):
        stat_calls.clear()
        assert _events(lean) == set()
        assert sorted(stat_calls) == ["notes.txt", "policy.yaml"]
    policy.write_text("save_top_k_checkpoints: 30\n")
    assert _events(lean) == {("modified", "file", str(policy), "")}


def test_a_deeper_directory_changes_alone(tree: LeanTree, tmp_path: Path, stat_calls: list[str]) -> None:
    """Skipping the parent still walks into each subdirectory, which has its own signature."""
    (tmp_path / "run" / "deeper").mkdir()
    _events(tree)
    _stable(tree)
    _stable(tree)
    (tmp_path / "run" / "deeper" / "x.ckpt").write_bytes(b"x")
    stat_calls.clear()
    assert _events(tree) == {("created", "file", str(tmp_path / "run" / "deeper" / "x.ckpt"), "")}
    assert sorted(stat_calls) == ["deeper", "run", "x.ckpt"]


@pytest.mark.parametrize(
    ("poll_interval", "full_listings"), [(None, 1), (15.0, 1), (2.0, 1), (1.0, 2), (0.5, 4), (0.3, 7)]
)
def test_short_polls_trust_a_signature_only_after_a_timestamp_tick(
    tmp_path: Path, stat_calls: list[str], poll_interval: float | None, full_listings: int
) -> None:
    """Polls closer than a timestamp tick (2 s on FAT): the full listing that makes a signature
    trusted comes at least a tick after the first poll that saw it, counted in polls."""
    (tmp_path / "a.ckpt").write_bytes(b"a")
    lean = LeanTree(str(tmp_path), UnwatchedOnce("polling"), poll_interval=poll_interval)
    lean.poll(None)
    listed_in_full = []
    for _ in range(full_listings + 2):
        stat_calls.clear()
        assert _events(lean) == set()
        listed_in_full.append(stat_calls == ["a.ckpt"])
    assert listed_in_full == [True] * full_listings + [False, False]


def test_the_polling_emitter_gives_its_interval(tmp_path: Path) -> None:
    observer = DeepSafePollingObserver(timeout=0.5)
    observer.schedule(FileSystemEventHandler(), str(tmp_path), recursive=True)
    (emitter,) = observer.emitters
    assert isinstance(emitter, DeepSafePollingEmitter)
    assert emitter._tree.trusted_after == 4


def test_a_skipped_poll_remembers_what_a_full_listing_would(tree: LeanTree, tmp_path: Path) -> None:
    """The entries stat'ed in a skipped directory (an active file, a subdirectory) get the very values a
    full listing gives them (the two spell the same rule)."""
    run = tmp_path / "run"
    (run / "sub").mkdir()
    (run / "c.ckpt").write_bytes(b"c")
    _events(tree)
    for size in (2, 3):  # the second of these polls skips the listing and stats c.ckpt and sub
        (run / "c.ckpt").write_bytes(b"c" * size)
        (run / "sub" / f"{size}.ckpt").write_bytes(b"x")
        assert ("modified", "file", str(run / "c.ckpt"), "") in _events(tree)
    fresh = LeanTree(str(tmp_path), UnwatchedOnce("polling"))
    fresh.poll(None)
    assert tree.directories == fresh.directories


def test_a_skipped_directory_is_still_listed_in_full_once_a_minute(
    tmp_path: Path, stat_calls: list[str], forced_signatures: dict[int, tuple[int, int, int, int]]
) -> None:
    """On a file system whose directory timestamps do not follow the listing (a FUSE mount: here a
    signature forced to stay the same), a new file is still found by the full listing that comes at
    least every FULL_LISTING_SECONDS: at 15 s polls, every fourth poll."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "a.ckpt").write_bytes(b"a")
    forced_signatures[run.stat().st_ino] = (run.stat().st_ino, 0, 0, 0)
    lean = LeanTree(str(tmp_path), UnwatchedOnce("polling"), poll_interval=15.0)
    assert lean.skips_allowed == 3
    lean.poll(None)
    _stable(lean)  # listed in full with the same signature: trusted from the next poll on
    (run / "b.ckpt").write_bytes(b"b")  # unseen while skipped: the forced signature does not change
    for _ in range(lean.skips_allowed):
        stat_calls.clear()
        assert _events(lean) == set()
        assert "a.ckpt" not in stat_calls
    assert _events(lean) == {("created", "file", str(run / "b.ckpt"), "")}  # the full listing
    stat_calls.clear()
    assert _events(lean) == set()
    assert "a.ckpt" not in stat_calls  # skipped again


def test_the_full_listing_period_follows_the_poll_interval() -> None:
    unwatched = UnwatchedOnce("polling")
    assert LeanTree("/", unwatched, poll_interval=5.0).skips_allowed == 11
    assert LeanTree("/", unwatched, poll_interval=60.0).skips_allowed == 0
    assert LeanTree("/", unwatched, poll_interval=120.0).skips_allowed == 0
