"""filesystem.py: only regular files are opened, walks stop at mounts even without statx, and at a stop
request."""

from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ckpt_watcher.filesystem import (
    STOP_CHECKED_EVERY,
    NotRegularFileError,
    PathResolver,
    WalkStopped,
    _unescape_octal,
    open_regular,
    real_path,
    remove_tree,
    summarize_tree,
)
from tests.support.cli import run_command
from tests.support.hostile_trees import (
    bind,
    make_fifo,
    make_sentinel,
    mount_namespace,
    mount_namespace_reason,
)
from tests.support.stops import StopAfter

pytestmark = pytest.mark.timeout(60)


def test_open_regular_refuses_everything_but_a_regular_file(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_bytes(b"data")
    fifo = make_fifo(tmp_path / "pipe")
    os.symlink(regular, tmp_path / "link")
    os.symlink(fifo, tmp_path / "link-to-pipe")

    file_descriptor, status = open_regular(str(regular))
    try:
        assert os.read(file_descriptor, 10) == b"data"
        assert status.st_size == 4
    finally:
        os.close(file_descriptor)
    for path, follow in [
        (fifo, False),
        (tmp_path / "link", False),
        (tmp_path / "link-to-pipe", True),
        (tmp_path, False),
    ]:
        with pytest.raises(NotRegularFileError):
            open_regular(str(path), follow_symlinks=follow)
    followed, _ = open_regular(str(tmp_path / "link"), follow_symlinks=True)
    os.close(followed)


def test_mountinfo_escapes_are_undone() -> None:
    assert _unescape_octal(rb"/data/with\040space\011tab\134back") == b"/data/with space\ttab\\back"


def test_summary_of_a_plain_tree(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"1" * 10)
    (tmp_path / "a" / "b" / "two").write_bytes(b"2" * 20)
    os.symlink("/", tmp_path / "a" / "root-link")

    summary = summarize_tree(str(tmp_path))

    assert summary.bytes == 30
    assert summary.mount_points == []
    assert summary.top_entries == {"a"}


def _shards(top: Path, directories: int = 4, files: int = 1000) -> int:
    """A DeepSpeed-like tree of many small files; how many files it has."""
    for index in range(directories):
        (top / "checkpoint" / f"d{index}").mkdir(parents=True)
        for number in range(files):
            (top / "checkpoint" / f"d{index}" / f"f{number}").touch()
    return directories * files


def _files_below(top: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(top))


def test_remove_tree_stops_midway_once_asked_and_leaves_the_rest(tmp_path: Path) -> None:
    total = _shards(tmp_path / "doomed")
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(WalkStopped):
            remove_tree("doomed", dir_fd=parent, stop=StopAfter(3))
        remaining = _files_below(tmp_path / "doomed")

        removal = remove_tree("doomed", dir_fd=parent)  # what a later pass does with the leftover
    finally:
        os.close(parent)

    assert 0 < remaining < total  # some removed, the rest left under the name it was handed
    assert removal.removed
    assert not (tmp_path / "doomed").exists()


def test_remove_tree_with_a_stop_already_set_removes_nothing(tmp_path: Path) -> None:
    total = _shards(tmp_path / "doomed", directories=2, files=10)
    stop = threading.Event()
    stop.set()
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(WalkStopped):
            remove_tree("doomed", dir_fd=parent, stop=stop)
    finally:
        os.close(parent)

    assert _files_below(tmp_path / "doomed") == total


def test_a_stop_never_set_is_looked_at_once_a_directory_and_every_so_many_entries(tmp_path: Path) -> None:
    total = _shards(tmp_path / "doomed")
    never = StopAfter(looks=10**9)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        summarize_tree("doomed", dir_fd=parent, stop=never)
        walked = never.looks
        removal = remove_tree("doomed", dir_fd=parent, stop=never)
    finally:
        os.close(parent)

    assert removal.removed
    directories = 6  # doomed, checkpoint, d0..d3
    assert 0 < walked <= total // STOP_CHECKED_EVERY + directories
    assert 0 < never.looks - walked <= total // STOP_CHECKED_EVERY + directories


def test_summarize_tree_stops_once_asked(tmp_path: Path) -> None:
    _shards(tmp_path / "tree", directories=2, files=10)

    with pytest.raises(WalkStopped):
        summarize_tree(str(tmp_path / "tree"), stop=StopAfter(2))


@pytest.mark.skipif(mount_namespace_reason() is not None, reason=str(mount_namespace_reason()))
@pytest.mark.parametrize("with_statx", [True, False], ids=["statx", "mountinfo"])
def test_a_bind_mount_of_the_same_file_system_is_found(tmp_path: Path, with_statx: bool) -> None:
    """Same st_dev: statx's mount identity finds it, and without statx (older kernels) mountinfo does."""
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "dataset").mkdir(parents=True)
    (checkpoint / "weights.pt").write_bytes(b"w" * 100)
    outside = tmp_path / "outside"
    outside.mkdir()
    make_sentinel(outside)
    snippet = textwrap.dedent(
        """
        import json, sys
        from ckpt_watcher import filesystem
        if sys.argv[2] == "no-statx":
            filesystem._statx_function.cache_clear()
            filesystem._statx_function = lambda: None
        summary = filesystem.summarize_tree(sys.argv[1])
        print(json.dumps({"mounts": summary.mount_points, "bytes": summary.bytes}))
        """
    )
    completed = run_command(
        [
            *mount_namespace([bind(outside, checkpoint / "dataset")]),
            *[sys.executable, "-c", snippet, str(checkpoint), "statx" if with_statx else "no-statx"],
        ],
        cwd=Path.cwd(),
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == {"mounts": ["dataset"], "bytes": 100}


@pytest.mark.skipif(mount_namespace_reason() is not None, reason=str(mount_namespace_reason()))
def test_a_directory_that_is_itself_a_mount_point_is_found(tmp_path: Path) -> None:
    group = tmp_path / "run"
    (group / "checkpoint").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    make_sentinel(outside)
    snippet = textwrap.dedent(
        """
        import json, os, sys
        from ckpt_watcher import filesystem
        parent = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
        print(json.dumps(filesystem.summarize_tree("checkpoint", dir_fd=parent).mount_points))
        """
    )
    completed = run_command(
        [*mount_namespace([bind(outside, group / "checkpoint")]), sys.executable, "-c", snippet, str(group)],
        cwd=Path.cwd(),
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == ["."]


@pytest.fixture
def links(tmp_path: Path) -> Path:
    """Relative, absolute, dangling, looping and chained symlinks, and ``..`` through a link."""
    (tmp_path / "real" / "inner").mkdir(parents=True)
    (tmp_path / "real" / "file").write_text("x")
    os.symlink("real", tmp_path / "relative")
    os.symlink(tmp_path / "real" / "file", tmp_path / "absolute")
    os.symlink("nowhere", tmp_path / "dangling")
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    os.symlink("relative/inner", tmp_path / "chain-1")
    os.symlink("chain-1/..", tmp_path / "chain-2")
    return tmp_path


REAL_PATH_CASES = [
    "real/file",
    "relative",
    "relative/file",
    "absolute",
    "dangling",
    "dangling/below",
    "loop-a",
    "loop-a/below",
    "chain-2/file",
    "relative/../absolute",
    "missing/../relative/./inner/",
    ".",
]


@pytest.mark.parametrize("name", REAL_PATH_CASES)
def test_real_path_resolves_as_os_path_realpath(links: Path, name: str) -> None:
    assert real_path(links / name) == Path(os.path.realpath(links / name))
    assert real_path(str(links / name)) == Path(os.path.realpath(links / name))


def test_one_resolver_for_many_paths_resolves_each_as_os_path_realpath(links: Path) -> None:
    """Except that a link inside a loop may resolve to the other link of the loop (neither exists)."""
    resolver = PathResolver()
    names = [*REAL_PATH_CASES, *reversed(REAL_PATH_CASES), "loop-b", "chain-1", "chain-2"]
    for name in names:
        resolved = resolver.resolve(links / name)
        if name.startswith("loop-"):
            below = name.removeprefix("loop-a").removeprefix("loop-b")
            assert resolved in {links / f"loop-a{below}", links / f"loop-b{below}"}, name
        else:
            assert resolved == Path(os.path.realpath(links / name)), name


def test_real_path_of_a_relative_name_starts_at_the_working_directory(
    links: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(links)
    assert real_path("relative/file") == links / "real" / "file"


def test_real_path_follows_a_chain_of_links_far_longer_than_the_recursion_limit(tmp_path: Path) -> None:
    """os.path.realpath (Python 3.11) recurses once per link: a chain of 1,500 raised RecursionError
    in every command that resolves a link in the tree (a ``last.ckpt`` at its head, say)."""
    (tmp_path / "target.ckpt").write_text("x")
    for index in range(1500):
        os.symlink(f"link-{index + 1}" if index < 1499 else "target.ckpt", tmp_path / f"link-{index}")

    assert real_path(tmp_path / "link-0") == tmp_path / "target.ckpt"


def test_nothing_in_the_package_resolves_paths_with_os_path_realpath() -> None:
    """Every resolution goes through ``real_path`` (a recursive one is one symlink chain from a crash)."""
    package = Path(__file__).parents[2] / "ckpt_watcher"
    users = [
        f"{source.name}:{node.lineno}"
        for source in sorted(package.glob("*.py"))
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "realpath"
    ]
    assert users == []


def test_one_resolver_resolves_each_link_of_a_chain_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every link of a chain listed and resolved (a directory's links are): N link reads, not N²."""
    (tmp_path / "target.ckpt").write_text("x")
    for index in range(300):
        os.symlink(f"link-{index + 1}" if index < 299 else "target.ckpt", tmp_path / f"link-{index}")
    reads: list[str] = []
    real_readlink = os.readlink

    def counting_readlink(path: str) -> str:
        reads.append(path)
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", counting_readlink)
    resolver = PathResolver()

    targets = {resolver.resolve(tmp_path / f"link-{index}") for index in range(300)}

    assert targets == {tmp_path / "target.ckpt"}
    assert len(reads) == 300
