"""``walk_tree``: os.walk's results at any depth, without recursion."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_watcher.observers import walk_tree
from tests.support.hostile_trees import make_deep_directory, remove_deep


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Directories, files, a symlink to a directory inside, one to a directory outside, a dangling one."""
    top = tmp_path / "top"
    for directory in ("a/b/c", "a/d", "e"):
        (top / directory).mkdir(parents=True)
    for file in ("a/x.ckpt", "a/b/c/y.ckpt", "e/z", "w"):
        (top / file).write_text(file)
    (tmp_path / "outside" / "inner").mkdir(parents=True)
    os.symlink(top / "a", top / "e" / "to-a")
    os.symlink(tmp_path / "outside", top / "to-outside")
    os.symlink(top / "nowhere", top / "dangling")
    return top


def _sorted(walk: Iterator[tuple[str, list[str], list[str]]]) -> list[tuple[str, list[str], list[str]]]:
    return sorted((directory, sorted(names), sorted(files)) for directory, names, files in walk)


@pytest.mark.parametrize("follow_symlinks", [False, True])
def test_it_walks_as_os_walk_does(tree: Path, follow_symlinks: bool) -> None:
    assert _sorted(walk_tree(str(tree), follow_symlinks=follow_symlinks)) == _sorted(
        os.walk(str(tree), followlinks=follow_symlinks)
    )


def test_it_walks_bytes_paths_as_os_walk_does(tree: Path) -> None:
    expected = [(os.fsdecode(top), names, files) for top, names, files in os.walk(os.fsencode(tree))]
    walked = [(os.fsdecode(top), names, files) for top, names, files in walk_tree(os.fsencode(tree))]
    assert sorted(map(repr, walked)) == sorted(map(repr, expected))


def test_it_visits_top_down_and_a_caller_may_prune(tree: Path) -> None:
    visited = []
    for directory, names, _ in walk_tree(str(tree)):
        visited.append(os.path.relpath(directory, tree))
        if directory == str(tree / "a"):
            names.remove("b")

    assert visited.index(".") < visited.index("a") < visited.index(os.path.join("a", "d"))
    assert os.path.join("a", "b") not in visited


def test_a_directory_it_cannot_list_is_reported_and_skipped(tmp_path: Path) -> None:
    errors: list[tuple[str, OSError]] = []
    missing = str(tmp_path / "missing")

    assert list(walk_tree(missing, on_error=lambda path, error: errors.append((path, error)))) == []
    assert [(path, type(error)) for path, error in errors] == [(missing, FileNotFoundError)]


@pytest.mark.timeout(120)
def test_it_walks_a_tree_far_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    depth = 1500
    make_deep_directory(tmp_path / "deep", depth=depth)
    try:  # (os.walk, which watchdog uses, raises RecursionError here on Python 3.11)
        walked = list(walk_tree(str(tmp_path / "deep")))
    finally:
        remove_deep(tmp_path / "deep")

    assert len(walked) == depth + 1
    assert all(files == ["f0"] for _, _, files in walked[:-1])
