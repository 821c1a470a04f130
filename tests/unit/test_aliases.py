"""aliases.py: which mounts show a directory from outside the root (a mount table as text), which
paths are one directory (identities), and what AliasGuard keeps whole and warns about, pass by pass
(statuses given by the test: the real bind mounts are in tests/integration/test_bind_mounts.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import LogCapture

from ckpt_watcher import aliases
from ckpt_watcher.aliases import AliasGuard, Mount, aliases_of, mounts_from_outside, parse_mount_table
from ckpt_watcher.filesystem import EntryStatus
from tests.support.logs import logged

TABLE = b"""\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
45 22 0:40 / /t rw,relatime - tmpfs tmpfs rw,size=16384k
46 45 0:40 /ck/run1 /t/ck/alias rw,relatime - tmpfs tmpfs rw,size=16384k
47 45 0:40 /other/run /t/ck/run2 rw,relatime - tmpfs tmpfs rw,size=16384k
48 45 0:41 / /t/ck/nested rw,relatime - tmpfs tmpfs rw,size=4096k
49 45 0:40 /ck/with\\040space /t/ck/with\\040space rw - tmpfs tmpfs rw
"""


def test_the_mount_table_is_read_with_its_escapes() -> None:
    mounts = parse_mount_table(TABLE + b"garbage\n\n")

    assert mounts[0] == Mount(22, "8:1", "/", "/", "ext4")  # (after its optional field "shared:1")
    assert mounts[1] == Mount(45, "0:40", "/", "/t", "tmpfs")
    assert mounts[5] == Mount(49, "0:40", "/ck/with space", "/t/ck/with space", "tmpfs")
    assert mounts[1].device_number == os.makedev(0, 0x28)
    assert len(mounts) == 6


def test_a_bind_mount_of_a_directory_from_outside_the_root_is_outside_and_the_others_are_not() -> None:
    """run2 shows /t/other/run; the alias and the self-bind show the root's own directories (told by
    identity instead); the tmpfs is a volume mounted only in the root; the root's own mount does not
    count."""
    found = mounts_from_outside("/t/ck", 45, parse_mount_table(TABLE))

    assert found == {"/t/ck/run2": "/t/other/run"}


def test_without_the_root_s_mount_id_the_deepest_mount_above_it_is_its_own() -> None:
    assert mounts_from_outside("/t/ck", None, parse_mount_table(TABLE)) == {"/t/ck/run2": "/t/other/run"}


def test_a_file_system_mounted_twice_does_not_make_a_bind_of_the_root_s_own_directory_outside() -> None:
    """The disk is also at /mnt/host: a run directory bind-mounted on itself is still the root's own."""
    mounts = [
        Mount(1, "8:1", "/", "/"),
        Mount(2, "8:1", "/", "/mnt/host"),
        Mount(3, "8:1", "/data/ck/run", "/data/ck/run"),
        Mount(4, "8:1", "/scratch/run", "/data/ck/imported"),
    ]

    assert mounts_from_outside("/data/ck", 1, mounts) == {"/data/ck/imported": "/scratch/run"}


def test_in_a_container_a_volume_mounted_only_in_the_root_is_its_own() -> None:
    """Kubernetes: the root and a nested volume are directories of the node's disk the pod cannot see
    elsewhere; /etc/hosts is another file of that disk."""
    kubelet = "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~empty-dir"
    mounts = [
        Mount(10, "0:60", "/", "/"),
        Mount(11, "8:1", f"{kubelet}/ckpts", "/ckpts"),
        Mount(12, "8:1", f"{kubelet}/scratch", "/ckpts/run2"),
        Mount(13, "8:1", "/var/lib/kubelet/pods/uid/etc-hosts", "/etc/hosts"),
    ]

    assert mounts_from_outside("/ckpts", 11, mounts) == {}


def test_a_directory_of_another_file_system_shown_outside_the_root_too_is_outside() -> None:
    mounts = [
        Mount(1, "8:1", "/", "/"),
        Mount(2, "8:17", "/", "/mnt/e"),
        Mount(3, "8:17", "/runs/7", "/data/ck/run7"),
        Mount(4, "8:33", "/", "/data/ck/volume"),
    ]

    assert mounts_from_outside("/data/ck", 1, mounts) == {"/data/ck/run7": "/mnt/e/runs/7"}


def test_two_paths_with_one_identity_are_aliases_of_each_other() -> None:
    found = aliases_of(
        [("/r", (1, 2)), ("/r/a", (1, 3)), ("/r/b", (1, 3)), ("/r/c", (2, 3)), ("/r/d", (1, 3))]
    )

    assert found == {"/r/a": "/r/b", "/r/b": "/r/a", "/r/d": "/r/a"}


def _status(inode: int, *, mount_id: int = 7, mount_root: bool = False) -> EntryStatus:
    return EntryStatus(1, inode, 0o40755, 0, 0, mount_id, mount_root)


@pytest.fixture
def reads() -> list[str]:
    """The roots the mount table was read for (``aliases._read_mounts``, as the ``statuses`` fixture
    fakes it)."""
    return []


@pytest.fixture
def statuses(monkeypatch: pytest.MonkeyPatch, reads: list[str]) -> dict[str, EntryStatus]:
    """What ``statx`` and ``lstat`` say of each path (nothing is stat'ed); the mount table holds mount
    7, where nothing is outside the root."""
    table: dict[str, EntryStatus] = {}
    monkeypatch.setattr(aliases, "_status", table.get)

    def identity(path: str) -> tuple[int, int] | None:
        status = table.get(path)
        return None if status is None else (status.device, status.inode)

    def read(root: str) -> tuple[dict[str, str], set[int]]:
        reads.append(root)
        return {}, {7}

    monkeypatch.setattr(aliases, "_identity", identity)
    monkeypatch.setattr(aliases, "_read_mounts", read)
    return table


def test_both_paths_of_one_directory_and_everything_below_are_kept_whole_with_one_warning_a_pass(
    statuses: dict[str, EntryStatus], captured: LogCapture
) -> None:
    root = Path("/r")
    statuses.update({"/r": _status(1), "/r/keep/run": _status(2), "/r/scratch/run": _status(2)})
    statuses.update({"/r/keep": _status(3), "/r/scratch": _status(4), "/r/scratch/run/sub": _status(5)})
    guard = AliasGuard()
    for _ in range(2):
        guard.begin_pass()
        assert list(guard.walk(root, map(Path, statuses))) == list(map(Path, statuses))

        kept = {path: guard.kept_whole(root, Path(path)) for path in statuses}

        assert kept["/r"] == kept["/r/keep"] == kept["/r/scratch"] == {}
        assert kept["/r/keep/run"] == {
            Path("/r/keep/run"): "kept whole: the same directory as scratch/run (a bind mount)"
        }
        assert kept["/r/scratch/run"] == {
            Path("/r/scratch/run"): "kept whole: the same directory as keep/run (a bind mount)"
        }
        below = kept["/r/scratch/run/sub"]  # below an alias (shown by a bind mount that is not recursive)
        assert below == {
            Path("/r/scratch/run/sub"): "kept whole: the same directory as keep/run (a bind mount)"
        }
    warnings = logged(captured, "group_aliased")
    assert [(entry["directory"], entry["same_as"]) for entry in warnings] == [
        ("/r/keep/run", "/r/scratch/run")
    ] * 2


def test_an_event_pass_finds_a_group_that_is_another_path_of_a_directory_the_walk_saw(
    statuses: dict[str, EntryStatus], captured: LogCapture
) -> None:
    root = Path("/r")
    statuses.update({"/r": _status(1), "/r/run": _status(2), "/r/other": _status(3)})
    guard = AliasGuard()
    guard.begin_pass()
    list(guard.walk(root, map(Path, statuses)))
    statuses["/r/alias"] = _status(2)  # mounted since, on a mount the walk saw (no table read)
    statuses["/r/reused"] = _status(3)
    statuses["/r/other"] = _status(9)  # that directory was replaced: inode 3 is another one now

    guard.begin_pass()
    assert guard.kept_whole(root, Path("/r/alias")) == {
        Path("/r/alias"): "kept whole: the same directory as run (a bind mount)"
    }
    assert guard.kept_whole(root, Path("/r/reused")) == {}
    assert guard.kept_whole(root, Path("/r/run")) != {}  # what an event pass found holds until a full walk
    assert len(logged(captured, "group_aliased")) == 1

    guard.begin_pass()
    del statuses["/r/alias"]
    list(guard.walk(root, map(Path, statuses)))
    assert guard.kept_whole(root, Path("/r/run")) == {}  # the alias is gone


def test_a_mount_from_outside_is_kept_whole_and_a_mount_made_since_the_walk_reads_the_table_again(
    statuses: dict[str, EntryStatus], reads: list[str], monkeypatch: pytest.MonkeyPatch, captured: LogCapture
) -> None:
    def read(root: str) -> tuple[dict[str, str], set[int]]:
        reads.append(root)
        return {"/r/imported": "/elsewhere/run"}, {7, 8}

    monkeypatch.setattr(aliases, "_read_mounts", read)
    root = Path("/r")
    statuses.update({"/r": _status(1), "/r/imported": _status(2, mount_id=8, mount_root=True)})
    statuses.update({"/r/imported/run": _status(3, mount_id=8), "/r/mine": _status(4)})
    guard = AliasGuard()
    guard.begin_pass()
    list(guard.walk(root, map(Path, statuses)))

    assert guard.kept_whole(root, Path("/r/imported/run")) == {
        Path("/r/imported/run"): "kept whole: a mount of /elsewhere/run, outside the root"
    }
    assert guard.kept_whole(root, Path("/r/imported")) != {}
    assert guard.kept_whole(root, Path("/r/mine")) == {}
    assert [(entry["directory"], entry["outside"]) for entry in logged(captured, "group_outside_root")] == [
        ("/r/imported", "/elsewhere/run")
    ]
    assert reads == ["/r"]  # once a walk

    guard.begin_pass()
    statuses["/r/mine/sub"] = _status(5)  # an event pass's new group on a mount the table had
    guard.kept_whole(root, Path("/r/mine/sub"))
    assert reads == ["/r"]
    statuses["/r/new"] = _status(6, mount_id=9, mount_root=True)  # on a mount made since the walk
    guard.kept_whole(root, Path("/r/new"))
    assert reads == ["/r", "/r"]
