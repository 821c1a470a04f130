"""Hostile file trees for the adversarial tests, and the invariants checked after every command.

Builders make what an attacker (or an unlucky operator) can leave in a checkpoint directory: symlinks
in every position, FIFOs, sockets, device nodes, sparse and pre-sized files, non-UTF-8 and newline
names, deep nesting, bind mounts. ``tree_digest`` fingerprints a tree without following a symlink or
opening anything that is not a regular file, so "nothing outside the root changed" is one comparison.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import stat
import subprocess
import sys
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

PYTHON = sys.executable
COMMAND_TIMEOUT = 120.0
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def tree_digest(top: Path) -> dict[str, str]:
    """Every entry below ``top`` (itself included): its type, mode, and content hash or link target.

    Never follows a symlink and never opens a FIFO, socket or device; works at any depth (the walk
    is relative to open directories, so no path grows past PATH_MAX).
    """
    digest: dict[str, str] = {}
    pending: list[tuple[int | None, str, str]] = [(None, str(top), "")]
    while pending:
        parent_fd, name, relative = pending.pop()
        status = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        mode = status.st_mode
        label = f"{stat.S_IFMT(mode):o} {stat.S_IMODE(mode):o}"
        if stat.S_ISLNK(mode):
            digest[relative] = f"{label} -> {os.readlink(name, dir_fd=parent_fd)!r}"
        elif stat.S_ISREG(mode):
            digest[relative] = f"{label} {status.st_size} {_file_hash(parent_fd, name)}"
        elif stat.S_ISDIR(mode):
            digest[relative] = label
            directory_fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent_fd)
            for child in sorted(os.listdir(directory_fd)):
                pending.append((os.dup(directory_fd), child, f"{relative}/{child}"))
            os.close(directory_fd)
        else:
            digest[relative] = f"{label} rdev={status.st_rdev}"
        if parent_fd is not None:
            os.close(parent_fd)
    return digest


def _file_hash(parent_fd: int | None, name: str) -> str:
    file_descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    hasher = hashlib.sha256()
    try:
        while chunk := os.read(file_descriptor, 1 << 20):
            hasher.update(chunk)
    finally:
        os.close(file_descriptor)
    return hasher.hexdigest()[:16]


def make_sentinel(top: Path) -> dict[str, str]:
    """A small tree outside the root that nothing may change; returns its digest."""
    (top / "nested" / "deeper").mkdir(parents=True)
    (top / "precious.ckpt").write_bytes(b"precious" * 100)
    (top / "nested" / "data.bin").write_bytes(os.urandom(4096))
    (top / "nested" / "deeper" / "shard.pt").write_bytes(b"shard" * 50)
    os.symlink("../precious.ckpt", top / "nested" / "link")
    return tree_digest(top)


def make_deep_directory(top: Path, depth: int, *, leaf_files: int = 1) -> None:
    """``top/d/d/d/...`` ``depth`` levels deep with a file at every level, built relative to open
    directories (the full path is far longer than PATH_MAX)."""
    top.mkdir(parents=True, exist_ok=True)
    current = os.open(top, _DIRECTORY_FLAGS)
    try:
        for level in range(depth):
            for index in range(leaf_files):
                file_descriptor = os.open(
                    f"f{index}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=current
                )
                os.write(file_descriptor, b"level %d\n" % level)
                os.close(file_descriptor)
            os.mkdir("d", dir_fd=current)
            child = os.open("d", _DIRECTORY_FLAGS, dir_fd=current)
            os.close(current)
            current = child
    finally:
        os.close(current)


def make_fifo(path: Path) -> Path:
    """A named pipe with no writer: opening it for reading blocks forever."""
    os.mkfifo(path)
    return path


def make_socket(path: Path) -> Path:
    """A bound Unix socket file (the socket itself is closed; the file stays)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    finally:
        server.close()
    return path


def make_device(path: Path) -> Path | None:
    """A character device node like /dev/zero (endless zeros when read); None if mknod is refused."""
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except OSError:
        return None
    return path


def make_sparse(path: Path, size: int, tail: bytes = b"") -> Path:
    """A file of ``size`` bytes that is one hole except ``tail`` written at its very end."""
    with path.open("wb") as stream:
        stream.truncate(size)
        if tail:
            stream.seek(size - len(tail))
            stream.write(tail)
    return path


def mount_namespace_reason() -> str | None:
    """None if this process may make bind mounts in a private mount namespace, else why not."""
    try:
        completed = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare is not usable: {error}"
    if completed.returncode != 0:
        return f"cannot make a mount namespace (needs root or CAP_SYS_ADMIN): {completed.stderr.strip()}"
    return None


def in_mount_namespace(
    mounts: Sequence[str],
    command: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a private mount namespace after the shell ``mounts`` commands.

    The mounts vanish with the namespace when the command ends, so a failed test leaves none behind.
    """
    script = "set -e\n" + "\n".join(mounts) + "\nexec " + shlex.join(command) + "\n"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def bind(source: Path, target: Path, *, read_only: bool = False) -> str:
    """The shell command that bind-mounts ``source`` on ``target`` (for ``in_mount_namespace``)."""
    command = f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}"
    if read_only:
        command += f"\nmount -o remount,bind,ro {shlex.quote(str(target))}"
    return command


def prune_command(*arguments: str) -> list[str]:
    """``python -m ckpt_watcher prune ...`` as an argument list."""
    return [PYTHON, "-m", "ckpt_watcher", "prune", *arguments]


def run_prune(*arguments: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``prune`` as a real process, bounded in time."""
    return subprocess.run(
        prune_command(*arguments), capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_clean_exit(
    completed: subprocess.CompletedProcess[str], allowed: Sequence[int] = (0, 1, 2)
) -> None:
    """Every command exits 0, 1 or 2, with no traceback."""
    assert completed.returncode in allowed, (completed.returncode, completed.stderr[-3000:])
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]


def json_records(stderr: str) -> list[dict[str, object]]:
    """The JSON log records in a command's stderr (other lines are ignored)."""
    import json

    records = []
    for line in stderr.splitlines():
        with suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                records.append(value)
    return records


def events(stderr: str, event: str) -> list[dict[str, object]]:
    """The log records of one event name."""
    return [record for record in json_records(stderr) if record.get("event") == event]


def set_immutable(path: Path, immutable: bool = True, *, recursive: bool = False) -> bool:
    """``chattr +i`` (or ``-i``): even root cannot unlink an immutable file. False if unsupported."""
    options = ["-R"] if recursive else []
    completed = subprocess.run(
        ["chattr", *options, "+i" if immutable else "-i", str(path)], capture_output=True, check=False
    )
    return completed.returncode == 0


def remove_deep(path: Path) -> None:
    """Remove a tree of any depth (pytest's own clean-up recurses, and fails past ~1000 levels)."""
    subprocess.run(
        ["rm", "-rf", "--one-file-system", str(path)], capture_output=True, check=False, timeout=300
    )


def limited(command: Sequence[str], address_space: int) -> list[str]:
    """``command`` (a Python one: ``[python, -m, ...]``) run under RLIMIT_AS = ``address_space`` bytes."""
    setup = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space})); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    return [command[0], "-c", setup, *command[1:]]


def run_limited(
    command: Sequence[str], address_space: int, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a Python command bounded in memory (RLIMIT_AS) and time."""
    return subprocess.run(
        limited(command, address_space), capture_output=True, text=True, timeout=timeout, check=False
    )


def prune_entries(completed: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    """Entries of a ``prune --json`` document by name."""
    import json

    document = json.loads(completed.stdout)
    return {entry["name"]: entry for group in document["groups"] for entry in group["entries"]}
