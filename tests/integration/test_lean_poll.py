"""The polling observer's lean memory of the tree (``LeanTree``): the events watchdog's snapshot diff
gave (created, modified, deleted, moved; files and directories), on real files, without following a
symlink, at any depth, and a root that vanishes said so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from ckpt_watcher.observers import DeepSafePollingEmitter, DeepSafePollingObserver, LeanTree, UnwatchedOnce
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
    lean = LeanTree(str(tmp_path), UnwatchedOnce("polling"))
    lean.poll(None)
    return lean


def test_nothing_changed_is_no_event(tree: LeanTree) -> None:
    assert _events(tree) == set()


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
