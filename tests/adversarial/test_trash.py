"""A hostile trash: symlinks planted where the trash, its directories or an entry should be, metadata
that lies, FIFOs, groups on another mount. Nothing outside the root is ever followed, moved or removed,
and every command ends with a clear exit code."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli import assert_clean_exit, events, run_cli
from tests.support.factories import step_name, write_checkpoint
from tests.support.hostile_trees import (
    bind,
    make_sentinel,
    mount_namespace,
    mount_namespace_reason,
    tree_digest,
)

pytestmark = pytest.mark.timeout(240)

MOUNTS_UNAVAILABLE = mount_namespace_reason()
needs_mounts = pytest.mark.skipif(MOUNTS_UNAVAILABLE is not None, reason=str(MOUNTS_UNAVAILABLE))
TRASH = ".ckpt-trash"


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A tree outside the root that nothing may change, and its digest."""
    top = tmp_path / "outside"
    top.mkdir()
    return top, make_sentinel(top)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "root"
    (directory / "run").mkdir(parents=True)
    for step in range(100, 400, 100):
        write_checkpoint(directory / "run" / step_name(0, step), payload=f"step {step}".encode() * 40)
    return directory


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text("save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")
    return path


def trashed_root(root: Path, policy: Path) -> list[dict[str, object]]:
    """Trash two of the run's three checkpoints for real; the entries as ``trash list --json`` has them."""
    pruned = run_cli("prune", str(root), "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr
    entries = json.loads(run_cli("trash", "list", str(root), "--json").stdout)["entries"]
    assert len(entries) == 2
    return list(entries)


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_something_else_where_the_trash_should_be_keeps_every_checkpoint(
    root: Path, policy: Path, outside: tuple[Path, dict[str, str]], planted: str
) -> None:
    top, digest = outside
    if planted == "symlink":
        (root / TRASH).symlink_to(top)
    else:
        (root / TRASH).write_bytes(b"not a directory")
    before = tree_digest(root)

    pruned = run_cli("prune", str(root), "--policy", str(policy))
    listed = run_cli("trash", "list", str(root))
    emptied = run_cli("trash", "empty", str(root))
    restored = run_cli("restore", str(root), "--all")

    assert pruned.returncode == 1
    failures = events(pruned.stderr, "checkpoint_delete_failed")
    assert len(failures) == 2
    assert all("never followed" in str(record["error"]) for record in failures)
    for completed in (listed, emptied, restored):
        assert_clean_exit(completed, allowed=(1,))
        assert "not a directory" in completed.stderr
    assert tree_digest(root) == before  # every checkpoint kept, nothing made
    assert tree_digest(top) == digest


def test_a_symlink_planted_for_a_trash_directory_is_never_followed(
    root: Path, policy: Path, outside: tuple[Path, dict[str, str]]
) -> None:
    """``files/run`` swapped for a link to a directory outside holding look-alikes of the entries."""
    top, _ = outside
    entries = trashed_root(root, policy)
    mirror = root / TRASH / "files" / "run"
    for entry in entries:
        shutil.copy2(Path(str(entry["trash_path"])), top / Path(str(entry["trash_path"])).name)
    digest = tree_digest(top)
    shutil.rmtree(mirror)
    mirror.symlink_to(top)
    write_checkpoint(root / "run" / step_name(0, 400))  # the next prune would trash step 300 there

    listed = run_cli("trash", "list", str(root), "--json")
    restored = run_cli("restore", str(root), "--all")
    pruned = run_cli("prune", str(root), "--policy", str(policy))
    emptied = run_cli("trash", "empty", str(root))

    refusal = "files/run: not a directory (a symlink or a file is in its place; it is never followed)"
    assert_clean_exit(listed, allowed=(0,))  # listing reads info/ only
    assert_clean_exit(restored, allowed=(1,))
    assert all(line.endswith(refusal + ")") for line in restored.stdout.splitlines())
    # the move into the trash fails: the checkpoint is kept
    assert_clean_exit(pruned, allowed=(1,), explained=True)
    [failed] = events(pruned.stderr, "checkpoint_delete_failed")
    assert str(failed["error"]).endswith(refusal)
    assert (root / "run" / step_name(0, 300)).is_file()
    assert_clean_exit(emptied, allowed=(0,))
    dropped = events(emptied.stderr, "trash_entry_dropped")
    assert len(dropped) == 2
    assert all("nothing there is followed or removed" in str(record["detail"]) for record in dropped)
    assert tree_digest(top) == digest  # nothing outside read into the root, moved or removed
    assert mirror.is_symlink()


def test_an_entry_replaced_by_a_symlink_is_neither_restored_nor_followed_by_purge(
    root: Path, policy: Path, outside: tuple[Path, dict[str, str]]
) -> None:
    top, digest = outside
    entries = trashed_root(root, policy)
    stored = Path(str(entries[0]["trash_path"]))
    stored.unlink()
    stored.symlink_to(top / "precious.ckpt")

    restored = run_cli("restore", str(root), str(entries[0]["key"]))
    emptied = run_cli("trash", "empty", str(root))

    assert restored.returncode == 1
    assert "is not what was trashed" in restored.stdout
    assert not (root / str(entries[0]["original"])).exists()
    assert emptied.returncode == 0, emptied.stderr
    [dropped] = events(emptied.stderr, "trash_entry_dropped")
    assert "not what was trashed" in str(dropped["detail"])
    assert stored.is_symlink()  # left where it is, never removed through or as if it were the entry
    assert tree_digest(top) == digest


def test_symlinks_in_purging_and_inside_a_trashed_directory_are_removed_never_followed(
    root: Path, policy: Path, outside: tuple[Path, dict[str, str]]
) -> None:
    top, digest = outside
    checkpoint = root / "run" / "epoch=00-step=000050-train.ckpt"
    (checkpoint / "checkpoint").mkdir(parents=True)
    (checkpoint / "checkpoint" / "escape").symlink_to(top)
    (checkpoint / "checkpoint" / "escape-file").symlink_to(top / "precious.ckpt")
    (checkpoint / "latest").write_text("checkpoint")
    for item in [*checkpoint.rglob("*"), checkpoint]:
        os.utime(item, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    trashed = run_cli("prune", str(root), "--policy", str(policy))
    assert trashed.returncode == 0, trashed.stderr
    assert len(events(trashed.stderr, "checkpoint_trashed")) == 3
    (root / TRASH / "purging" / "planted").symlink_to(top)

    emptied = run_cli("trash", "empty", str(root))

    assert emptied.returncode == 0, emptied.stderr
    assert len(events(emptied.stderr, "checkpoint_purged")) == 3
    assert os.listdir(root / TRASH / "purging") == []
    assert [path for path in (root / TRASH).rglob("*") if not path.is_dir()] == []
    assert tree_digest(top) == digest


HOSTILE_METADATA: list[tuple[str, object]] = [
    ("escape", {"original": "../../outside/precious.ckpt"}),
    ("absolute", {"original": "/etc/passwd"}),
    ("into-a-trash", {"original": "run/.ckpt-trash/x.ckpt"}),
    ("dot-dot-inside", {"original": "run/../../x.ckpt"}),
    ("not-an-object", [1, 2, 3]),
    ("huge-numbers", {"inode": 2**80}),
    ("negative-bytes", {"bytes": -1}),
    ("nan-time", {"trashed_at": "nan"}),
    ("time-past-year-9999", {"trashed_at": 1e20}),  # OverflowError in every listing, once
    ("time-before-1970", {"trashed_at": -1e20}),  # and in the purge of a prune, too
]


@pytest.mark.parametrize(("case", "change"), HOSTILE_METADATA, ids=[case for case, _ in HOSTILE_METADATA])
def test_metadata_that_lies_is_skipped_by_every_command(
    root: Path, policy: Path, outside: tuple[Path, dict[str, str]], case: str, change: object
) -> None:
    top, digest = outside
    entries = trashed_root(root, policy)
    info = root / TRASH / "info" / f"{entries[0]['key']}.json"
    document = json.loads(info.read_text())
    info.write_text(json.dumps({**document, **change} if isinstance(change, dict) else change))
    before = tree_digest(root / "run")

    listed = run_cli("trash", "list", str(root), "--json")
    restored = run_cli("restore", str(root), "--all")
    emptied = run_cli("trash", "empty", str(root))

    listing = json.loads(listed.stdout)
    assert [problem["file"] for problem in listing["problems"]] == [info.name], case
    assert [entry["key"] for entry in listing["entries"]] == [entries[1]["key"]]
    assert restored.returncode == 0, restored.stderr  # the other entry came back, the bad one was never seen
    assert set(tree_digest(root / "run")) == set(before) | {f"/{Path(str(entries[1]['original'])).name}"}
    assert_clean_exit(emptied, allowed=(0,))
    assert info.exists()  # what cannot be read is never acted on
    assert tree_digest(top) == digest


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge", "directory"])
def test_metadata_that_is_not_a_small_regular_file_is_never_opened(
    root: Path, policy: Path, outside: tuple[Path, dict[str, str]], kind: str
) -> None:
    top, digest = outside
    entries = trashed_root(root, policy)
    info = root / TRASH / "info" / f"{entries[0]['key']}.json"
    document = info.read_text()
    info.unlink()
    if kind == "symlink":
        (top / "planted.json").write_text(document)
        digest = tree_digest(top)
        info.symlink_to(top / "planted.json")
    elif kind == "fifo":
        os.mkfifo(info)  # opening it for reading would block forever
    elif kind == "huge":
        info.write_text(document + " " * (1 << 20))
    else:
        info.mkdir()

    listed = run_cli("trash", "list", str(root), "--json", timeout=60)
    restored = run_cli("restore", str(root), "--all", timeout=60)

    assert_clean_exit(listed, allowed=(0,))
    assert [problem["file"] for problem in json.loads(listed.stdout)["problems"]] == [info.name]
    assert_clean_exit(restored, allowed=(0,))
    assert not (root / str(entries[0]["original"])).exists()
    assert tree_digest(top) == digest


@needs_mounts
@pytest.mark.parametrize("mount", ["bind", "tmpfs"])
def test_a_group_on_another_mount_is_deleted_at_once_and_the_log_says_why(
    tmp_path: Path, policy: Path, mount: str
) -> None:
    """A rename cannot leave a mount (EXDEV): such a group's deletions are deletions, as without a
    trash; a bind mount of the same file system too (same device, another mount). The bind mount is
    of the run directory on itself: one from outside the root is never pruned (group_outside_root)."""
    root = tmp_path / "root"
    group = root / "mounted"
    group.mkdir(parents=True)
    mounts = [bind(group, group)] if mount == "bind" else [f"mount -t tmpfs -o size=4m tmpfs {group}"]
    writer = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
        "from tests.support.factories import step_name, write_checkpoint;"
        "[write_checkpoint(Path(sys.argv[1]) / step_name(0, step)) for step in (100, 200, 300)]"
    )
    mounts.append(f"{sys.executable} -c '{writer}' {group} {Path.cwd()}")

    completed = run_cli(
        "prune", str(root), "--policy", str(policy), cwd=Path.cwd(), prefix=mount_namespace(mounts)
    )

    assert completed.returncode == 0, completed.stderr
    bypassed = events(completed.stderr, "trash_bypassed")
    deleted = events(completed.stderr, "checkpoint_deleted")
    assert len(bypassed) == 2
    assert len(deleted) == 2
    expected = "EXDEV" if mount == "bind" else "another file system"
    assert all(expected in str(record["error"]) for record in bypassed)
    assert events(completed.stderr, "checkpoint_trashed") == []


def test_restore_never_goes_through_a_symlink_where_the_run_directory_was(
    root: Path, policy: Path, outside: tuple[Path, dict[str, str]]
) -> None:
    top, digest = outside
    trashed_root(root, policy)
    shutil.rmtree(root / "run")
    (root / "run").symlink_to(top)

    restored = run_cli("restore", str(root), "--all")

    assert_clean_exit(restored, allowed=(1,))
    lines = restored.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("refused   run/") and "it is never followed" in line for line in lines)
    assert tree_digest(top) == digest  # nothing restored into the directory the link points at
    assert len(json.loads(run_cli("trash", "list", str(root), "--json").stdout)["entries"]) == 2


def test_a_restored_pin_until_past_year_9999_is_a_trash_problem_not_a_failed_pass(
    root: Path, policy: Path
) -> None:
    """A forged ``restored/<KEY>.json`` with ``until: 1e20`` made every group of every pass fail
    (OverflowError formatting the reason), and it was never tidied away: retention stopped."""
    trashed_root(root, policy)
    assert run_cli("restore", str(root), "--all").returncode == 0
    pins = sorted((root / TRASH / "restored").iterdir())
    assert pins
    for pin in pins:
        pin.write_text(json.dumps({**json.loads(pin.read_text()), "until": 1e20}))

    pruned = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json")

    assert_clean_exit(pruned, allowed=(0,))
    assert not events(pruned.stderr, "group_failed")
    summary = json.loads(pruned.stdout)["summary"]
    assert (summary["kept"], summary["trashed"]) == (1, 2), summary  # the forged pins are not in force


def test_entries_touched_in_the_trash_stay_restorable(root: Path, policy: Path) -> None:
    """A scratch file system's "touch your files or lose them" routine changes a trashed file's mtime:
    restore refused it, and a purge then dropped its record and left its bytes, unaccounted for."""
    entries = trashed_root(root, policy)
    for path in (root / TRASH / "files" / "run").iterdir():
        os.utime(path)

    restored = run_cli("restore", str(root), "--all")

    assert restored.returncode == 0, restored.stdout + restored.stderr
    names = {path.name for path in (root / "run").iterdir()}
    assert {Path(str(entry["original"])).name for entry in entries} <= names
    assert json.loads(run_cli("trash", "list", str(root), "--json").stdout)["entries"] == []


INTRUDER = 41002


def _as_intruder(action: Callable[[], object]) -> None:
    """Run ``action`` in a child process as another user (uid and gid ``INTRUDER``); it must succeed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        try:
            os.setgid(INTRUDER)
            os.setuid(INTRUDER)
            action()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="another user is needed: root makes one with setuid")
@pytest.mark.parametrize("planted", [".ckpt-trash", ".ckpt-trash/files/run"])
def test_a_trash_another_user_made_first_in_a_shared_root_is_refused(policy: Path, planted: str) -> None:
    """A shared root others may write to (mode 1777, as scratch space often is): another user makes
    the trash, or a directory in it, before the first deletion. Checkpoints moved in would be theirs
    to remove, and entries they forged would be restored as someone's last.ckpt: the trash is
    refused (the deletions fail, everything is kept) and the log says whose it is."""
    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="shared-root-"))  # pytest's tmp_path is root's only
    try:
        top.chmod(0o755)
        shared = top / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        run = shared / "run"
        for step in range(100, 400, 100):
            write_checkpoint(run / step_name(0, step), payload=f"step {step}".encode() * 40)
        _as_intruder(lambda: os.makedirs(shared / planted))

        pruned = run_cli("prune", str(shared), "--policy", str(policy))
        remaining = sorted(path.name for path in run.iterdir())
    finally:
        shutil.rmtree(top)

    assert_clean_exit(pruned, allowed=(1,))
    assert remaining == [step_name(0, step) for step in range(100, 400, 100)]
    failures = events(pruned.stderr, "checkpoint_delete_failed")
    assert failures
    assert all(f"owned by uid {INTRUDER}" in record["error"] for record in failures)


def test_a_trash_writable_by_every_user_is_refused(root: Path, policy: Path) -> None:
    (root / TRASH).mkdir()
    (root / TRASH).chmod(0o777)

    pruned = run_cli("prune", str(root), "--policy", str(policy))

    assert_clean_exit(pruned, allowed=(1,))
    assert len(list((root / "run").iterdir())) == 3
    assert all(
        "writable by every user" in record["error"]
        for record in events(pruned.stderr, "checkpoint_delete_failed")
    )
