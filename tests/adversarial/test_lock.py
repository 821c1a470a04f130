"""The single-instance lock cannot be disabled by what someone plants in or beside the root.

On local file systems the root directory itself is locked (``flock`` on a read-only directory fd), so
nothing planted under any name matters. Where directory locks are refused (NFS emulates ``flock``
with POSIX locks, which need a file open for writing: EBADF on a directory), a lock file is used; the
cases here emulate that by refusing ``flock`` on directories, as such a mount does. A lock that
cannot be taken is an error (exit 2), never a warning the daemon runs on after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_watcher.records import display_name
from tests.support.cli import STRICT_UTF8, cli_command, run_cli, run_command
from tests.support.daemon import running_daemon
from tests.support.hostile import NO_DIRECTORY_LOCKS, emulated_without_directory_locks

pytestmark = pytest.mark.timeout(120)

SECOND_INSTANCE_TIMEOUT = 30.0


def _second_instance(root: Path, *, directory_locks: bool = True) -> subprocess.CompletedProcess[str]:
    """``watch ROOT`` that must refuse to start; one that runs instead fails the test."""
    interpreter = None if directory_locks else emulated_without_directory_locks()
    try:
        return run_cli("watch", str(root), interpreter=interpreter, timeout=SECOND_INSTANCE_TIMEOUT)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else ""
        pytest.fail(f"the second instance ran instead of refusing to start:\n{stderr[-4000:]}")


def test_a_dangling_symlink_planted_as_the_lock_file_does_not_disable_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / ".ckpt-watcher.lock").symlink_to(tmp_path / "nowhere")

    with running_daemon(["watch", str(root)], tmp_path / "first.log") as first:
        first.wait_ready()
        second = _second_instance(root)

        assert second.returncode == 2
        assert f"another ckpt-watcher is already pruning {root} (pid {first.process.pid})" in second.stderr
        assert first.process.poll() is None
        assert first.events("watch_lock_unavailable") == []


def test_the_lock_leaves_no_file_in_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()

    with running_daemon(["watch", str(root)], tmp_path / "first.log") as first:
        first.wait_ready()

        assert os.listdir(root) == []
        assert sorted(os.listdir(tmp_path)) == ["first.log", "first.stdout", "root"]


def test_without_directory_locks_the_lock_file_is_beside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    beside = tmp_path / ".root.ckpt-watcher.lock"

    with running_daemon(
        ["watch", str(root)],
        tmp_path / "first.log",
        command=cli_command(interpreter=emulated_without_directory_locks()),
    ) as first:
        first.wait_ready()
        second = _second_instance(root, directory_locks=False)

        assert second.returncode == 2
        assert f"another ckpt-watcher is already pruning {root} (pid {first.process.pid})" in second.stderr
        assert beside.read_text() == f"{first.process.pid}\n"
        assert os.listdir(root) == []
        assert first.events("watch_lock_unavailable") == []


@pytest.mark.parametrize("planted", ["dangling-symlink", "symlink-to-a-file", "directory", "fifo"])
def test_an_unusable_lock_file_is_an_error_not_a_warning(tmp_path: Path, planted: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    beside = tmp_path / ".root.ckpt-watcher.lock"
    if planted == "dangling-symlink":
        beside.symlink_to(tmp_path / "nowhere")
    elif planted == "symlink-to-a-file":
        (tmp_path / "elsewhere").write_text("")
        beside.symlink_to(tmp_path / "elsewhere")
    elif planted == "directory":
        beside.mkdir()
    else:
        os.mkfifo(beside)

    second = _second_instance(root, directory_locks=False)

    assert second.returncode == 2
    assert f"ckpt-watcher: cannot take the single-instance lock on {root}: " in second.stderr
    assert "Traceback" not in second.stderr
    assert os.listdir(root) == []


def test_a_root_that_is_a_mount_point_keeps_its_lock_file_inside(tmp_path: Path) -> None:
    """Beside the root would be another file system (the pod's own, not the shared volume)."""
    root = tmp_path / "volume"
    root.mkdir()
    probe = f"""
import os, sys
{NO_DIRECTORY_LOCKS}
from pathlib import Path
from ckpt_watcher.lock import DirectoryLock, LockHeldError
root = Path(sys.argv[1])
lock = DirectoryLock(root)
lock.acquire()
try:
    DirectoryLock(root).acquire()
except LockHeldError as error:
    print(lock.path, error.pid == os.getpid(), sorted(os.listdir(root)), sorted(os.listdir(root.parent)))
"""
    command = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"', "sh"]
    completed = run_command([*command, str(root), sys.executable, "-c", probe, str(root)], timeout=60)
    if completed.returncode != 0 and "mount" in completed.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {completed.stderr.strip()}")

    assert completed.returncode == 0, completed.stderr
    assert (
        completed.stdout.split("\n")[0] == f"{root}/.ckpt-watcher.lock True ['.ckpt-watcher.lock'] ['volume']"
    )


def test_the_lock_message_escapes_the_root(tmp_path: Path) -> None:
    root = tmp_path / os.fsdecode(b"root-\xff\nforged line")
    root.mkdir()
    with running_daemon(["watch", str(root)], tmp_path / "first.log") as first:
        first.wait_ready()

        second = run_cli("watch", str(root), timeout=60, environment=STRICT_UTF8, text=False)

    assert second.returncode == 2
    stderr = second.stderr.decode("utf-8", "strict")
    assert stderr.count("\n") == 1
    assert f"already pruning {display_name(str(root))} (pid {first.process.pid})" in stderr
