"""Hostile file trees for the adversarial tests, and the invariants checked after every command.

Builders make what an attacker (or an unlucky operator) can leave in a checkpoint directory: symlinks
in every position, FIFOs, sockets, device nodes, sparse and pre-sized files, non-UTF-8 and newline
names, deep nesting, bind mounts. ``tree_digest`` fingerprints a tree without following a symlink or
opening anything that is not a regular file, so "nothing outside the root changed" is one comparison.
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import socket
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_watcher.policy import DEFAULT_POLICY
from tests.support.cli import run_command
from tests.support.factories import backdate_tree, directory_checkpoint, step_name, zip_bytes

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
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def make_socket(path: Path) -> Path:
    """A bound Unix socket file (the socket itself is closed; the file stays)."""
    directory_fd = os.open(path.parent, _DIRECTORY_FLAGS)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # bound through /proc/self/fd: a socket path may be at most 107 bytes long
        server.bind(f"/proc/self/fd/{directory_fd}/{path.name}")
    finally:
        server.close()
        os.close(directory_fd)
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
        completed = run_command(["unshare", "--mount", "--propagation", "private", "true"], timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare is not usable: {error}"
    if completed.returncode != 0:
        return f"cannot make a mount namespace (needs root or CAP_SYS_ADMIN): {completed.stderr.strip()}"
    return None


def mount_namespace(mounts: Sequence[str]) -> list[str]:
    """A prefix that runs a command in a private mount namespace after the shell ``mounts`` commands
    (the same process: ``unshare`` and ``sh`` exec into it, so signals reach it directly). The mounts
    vanish with the namespace when the command ends, so a failed test leaves none behind."""
    script = "set -e\n" + "\n".join(mounts) + '\nexec "$@"\n'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def bind(source: Path, target: Path, *, read_only: bool = False) -> str:
    """The shell command that bind-mounts ``source`` on ``target`` (for ``mount_namespace``)."""
    command = f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}"
    if read_only:
        command += f"\nmount -o remount,bind,ro {shlex.quote(str(target))}"
    return command


def set_immutable(path: Path, immutable: bool = True, *, recursive: bool = False) -> bool:
    """``chattr +i`` (or ``-i``): even root cannot unlink an immutable file. False if unsupported."""
    options = ["-R"] if recursive else []
    return run_command(["chattr", *options, "+i" if immutable else "-i", str(path)]).returncode == 0


def remove_deep(path: Path) -> None:
    """Remove a tree of any depth (pytest's own clean-up recurses, and fails past ~1000 levels)."""
    run_command(["rm", "-rf", "--one-file-system", str(path)], timeout=300)


@dataclass
class HostileTree:
    """A generated tree: its root, the outside tree nothing may change, and what is known about it.

    ``must_survive`` (relative to ``root``) and ``outside_must_survive`` (relative to ``outside``) name,
    as ``tree_digest`` does, every entry that no command under ``DEFAULT_POLICY`` may change or remove.
    The builders record them as they make each entry, from what they made and the README's retention
    rules, never from a scan or a plan: the oracle that checks the code under test is not that code.
    """

    root: Path
    outside: Path
    mounts: list[str] = field(default_factory=list)
    mount_holders: list[Path] = field(default_factory=list)
    plain_group: Path | None = None
    must_survive: set[str] = field(default_factory=set)
    outside_must_survive: set[str] = field(default_factory=set)


def _newest_kept_count() -> int:
    """How many of a group's newest complete step checkpoints DEFAULT_POLICY keeps, by rule 1 (and 5:
    a group keeps at least its newest); 0 means all. Refuses a default policy that could evict a kept
    checkpoint for space, which would make the recorded survivors wrong."""
    assert DEFAULT_POLICY.max_size is None, "the oracle assumes no eviction for space"
    assert DEFAULT_POLICY.keep_free is None, "the oracle assumes no eviction for space"
    count = DEFAULT_POLICY.save_top_k_checkpoints
    return 0 if count == -1 else max(count, 1)


@dataclass
class Survivors:
    """The builders' record of what must survive: entries by themselves, and checkpoints whole (the
    path and everything below it, listed once the tree is built)."""

    root: Path
    paths: set[str] = field(default_factory=set)
    wholes: list[Path] = field(default_factory=list)

    def keep(self, *paths: Path) -> None:
        """These entries themselves (a directory's mode, a link's target, a file's bytes)."""
        self.paths.update(_relative(self.root, path) for path in paths)

    def keep_whole(self, *paths: Path) -> None:
        """These entries and everything below them (a checkpoint file or directory)."""
        self.wholes.extend(paths)

    def keep_newest(self, complete: Iterable[tuple[int, int, Path]]) -> None:
        """Of one group's complete step checkpoints, as ``(step, epoch, path)``, the ones the default
        policy keeps by count: ordered by (step, epoch) as numbers, as the README's rule 1 says."""
        ordered = sorted(complete, key=lambda checkpoint: checkpoint[:2], reverse=True)
        count = _newest_kept_count()
        self.keep_whole(*(path for _, _, path in (ordered[:count] if count else ordered)))

    def finish(self) -> set[str]:
        """Every recorded path, the whole checkpoints expanded (call once the tree is built)."""
        for whole in self.wholes:
            prefix = _relative(self.root, whole)
            self.paths.update(prefix + below for below in tree_digest(whole))
        return self.paths


def _relative(root: Path, path: Path) -> str:
    """``path`` named as ``tree_digest(root)`` names it: ``/a/b`` (``""`` for the root itself)."""
    relative = path.relative_to(root)  # raises for a path outside root: an oracle bug, not a pass
    return "" if relative == Path() else f"/{relative}"


def build_hostile_tree(
    root: Path, outside: Path, *, seed: int, with_mounts: bool, deepest: int = 1200
) -> HostileTree:
    """Everything an attacker or an unlucky operator can leave in a checkpoint tree, in a random mix.

    Symlinks in every position (a group, a checkpoint name, last.ckpt to ``/``, to a FIFO, dangling,
    looping, at the head of a chain longer than the recursion limit, inside a directory checkpoint),
    FIFOs, sockets, devices, sparse and pre-sized files, download markers, non-UTF-8 and newline names,
    deep nesting, a huge directory, and (``with_mounts``, for a private mount namespace) a bind mount
    inside a directory checkpoint. ``outside`` gets a sentinel tree the links and mounts point into.
    ``deepest`` is the depth of the deepest directory checkpoint.
    """
    chooser = random.Random(seed)  # noqa: S311  (a reproducible test tree, not a secret)
    make_sentinel(outside)
    make_fifo(outside / "pipe")
    (outside / "dataset").mkdir()
    (outside / "dataset" / "images.bin").write_bytes(b"i" * 2048)
    tree = HostileTree(root=root, outside=outside)
    survivors = Survivors(root)
    plain = root / "plain"
    plain.mkdir(parents=True)
    for step in range(100, 1000, 100):
        (plain / step_name(0, step)).write_bytes(zip_bytes(b"step %d" % step))
    survivors.keep_newest((step, 0, plain / step_name(0, step)) for step in range(100, 1000, 100))
    tree.plain_group = plain

    builders = [
        _symlinks_everywhere,
        _special_files,
        _downloads_in_progress,
        _awkward_names,
        _deep_nesting,
        _huge_directory,
        _directory_checkpoints_with_traps,
    ]
    chooser.shuffle(builders)
    for index, builder in enumerate(builders):
        group = root / f"group{index}-{builder.__name__.strip('_')}"
        group.mkdir()
        builder(group, outside, chooser, deepest, survivors)
    if with_mounts:
        holder = _directory_checkpoint(root / "mounted" / step_name(0, 100))
        (holder / "dataset").mkdir()
        for step in range(200, 900, 100):
            _directory_checkpoint(root / "mounted" / step_name(0, step))
        tree.mounts.append(
            f"mount --bind {shlex.quote(str(outside / 'dataset'))} {shlex.quote(str(holder / 'dataset'))}"
        )
        tree.mount_holders.append(holder)
        survivors.keep_whole(holder)  # the oldest, but it holds a mount point
        survivors.keep_newest((step, 0, holder.parent / step_name(0, step)) for step in range(100, 900, 100))
    backdate_tree(root)
    tree.must_survive = survivors.finish()
    tree.outside_must_survive = set(tree_digest(outside))  # everything outside the root
    return tree


def _symlinks_everywhere(
    group: Path, outside: Path, chooser: random.Random, deepest: int, survivors: Survivors
) -> None:
    del deepest
    for step in range(100, 800, 100):
        (group / step_name(1, step)).write_bytes(zip_bytes(b"x"))
    survivors.keep_newest((step, 1, group / step_name(1, step)) for step in range(100, 800, 100))
    os.symlink(outside, group / "linked-run")  # a group that is a symlink
    os.symlink(outside / "precious.ckpt", group / step_name(0, 100))
    os.symlink("/", group / "last.ckpt")
    os.symlink(outside / "pipe", group / "last-v1.ckpt")
    os.symlink(group / "nowhere", group / "last-v2.ckpt")
    os.symlink(step_name(0, 201), group / step_name(0, 200))  # a loop of two
    os.symlink(step_name(0, 200), group / step_name(0, 201))
    os.symlink(outside / "nested", group / step_name(0, 300))  # a checkpoint name for an outside directory
    os.symlink("/dev/zero", group / step_name(0, chooser.choice([400, 500])))
    chain = chooser.randint(1100, 1500)  # a chain of links longer than the recursion limit
    for index in range(chain):
        os.symlink(f"chain-{index + 1}" if index < chain - 1 else step_name(1, 100), group / f"chain-{index}")
    os.symlink("chain-0", group / "last-v3.ckpt")
    survivors.keep_whole(group / step_name(1, 100))  # the oldest, but what last-v3.ckpt links to
    survivors.keep(*(path for path in group.iterdir() if path.is_symlink()))  # every link itself


def _special_files(
    group: Path, outside: Path, chooser: random.Random, deepest: int, survivors: Survivors
) -> None:
    del deepest
    del outside
    (group / step_name(2, 900)).write_bytes(zip_bytes(b"newest"))
    survivors.keep_newest([(900, 2, group / step_name(2, 900))])
    survivors.keep(make_fifo(group / step_name(2, 100)), make_socket(group / step_name(2, 200)))
    if (device := make_device(group / step_name(2, 300))) is not None:
        survivors.keep(device)
    survivors.keep(make_fifo(group / f"{step_name(2, 400)}.aria2"))
    os.mkfifo(group / ".ckpt-watcher-deleting-i1-fifo")  # named like a removal's leftover: not one
    survivors.keep(group / ".ckpt-watcher-deleting-i1-fifo")
    if chooser.random() < 0.5:
        survivors.keep(make_fifo(group / "last.ckpt"))


def _downloads_in_progress(
    group: Path, outside: Path, chooser: random.Random, deepest: int, survivors: Survivors
) -> None:
    del deepest
    del outside
    for step in (100, 200):
        (group / step_name(3, step)).write_bytes(zip_bytes(b"complete"))
    survivors.keep_newest((step, 3, group / step_name(3, step)) for step in (100, 200))
    data = zip_bytes(os.urandom(64 << 10))
    sparse = make_sparse(group / step_name(3, 300), len(data), data[-4096:])
    (group / step_name(3, 400)).write_bytes(data)  # whole, but a download marker is beside it
    marker = group / f"{step_name(3, 400)}{chooser.choice(['.aria2', '.part', '.incomplete', '.st'])}"
    marker.write_bytes(b"")
    (group / step_name(3, 500)).write_bytes(data[: len(data) // 2])  # half written
    (group / f"{step_name(3, 600)}.tmp").write_bytes(data)  # an unrecognised name
    survivors.keep(sparse, group / step_name(3, 400), marker, group / step_name(3, 500))
    survivors.keep(group / f"{step_name(3, 600)}.tmp")


def _awkward_names(
    group: Path, outside: Path, chooser: random.Random, deepest: int, survivors: Survivors
) -> None:
    del deepest
    del outside, chooser
    for step in range(100, 800, 100):
        (group / step_name(4, step)).write_bytes(zip_bytes(b"y"))
    survivors.keep_newest((step, 4, group / step_name(4, step)) for step in range(100, 800, 100))
    raw = os.fsencode(group)
    for name in (b"epoch=04-step=000900-train\xff.ckpt", b"\xfe\xfd.ckpt", b"last\x80.ckpt"):
        with open(raw + b"/" + name, "wb") as stream:
            stream.write(zip_bytes(b"non-utf-8"))
        survivors.keep(Path(os.fsdecode(raw + b"/" + name)))  # no template matches
    newline = group / f"{step_name(4, 950)}\nepoch=04-step=000001-train.ckpt"
    newline.write_bytes(zip_bytes(b"newline"))
    survivors.keep(newline)  # no template matches
    odd = Path(os.fsdecode(raw + b"/run-\xff"))
    odd.mkdir()
    for step in range(100, 800, 100):
        (odd / step_name(4, step)).write_bytes(zip_bytes(b"z"))
    survivors.keep(odd)
    survivors.keep_newest((step, 4, odd / step_name(4, step)) for step in range(100, 800, 100))


def _deep_nesting(
    group: Path, outside: Path, chooser: random.Random, deepest: int, survivors: Survivors
) -> None:
    del outside
    current = group
    for level in range(chooser.randint(150, 250)):
        current = current / f"l{level}"
    current.mkdir(parents=True)
    for step in range(100, 800, 100):
        (current / step_name(5, step)).write_bytes(zip_bytes(b"deep"))
    survivors.keep_newest((step, 5, current / step_name(5, step)) for step in range(100, 800, 100))
    checkpoint = _directory_checkpoint(group / step_name(5, 100))
    make_deep_directory(checkpoint / "checkpoint" / "nested", depth=deepest)
    for step in range(200, 800, 100):
        _directory_checkpoint(group / step_name(5, step))
    survivors.keep_newest((step, 5, group / step_name(5, step)) for step in range(100, 800, 100))


def _huge_directory(
    group: Path, outside: Path, chooser: random.Random, deepest: int, survivors: Survivors
) -> None:
    del deepest
    del outside
    for index in range(3000):
        (group / f"event-{index:05d}.log").touch()
        survivors.keep(group / f"event-{index:05d}.log")  # no template matches
    steps = list(range(100, 3000, 100))
    chooser.shuffle(steps)
    for step in steps:
        (group / step_name(6, step)).write_bytes(zip_bytes(b"h"))
    survivors.keep_newest((step, 6, group / step_name(6, step)) for step in steps)


def _directory_checkpoints_with_traps(
    group: Path, outside: Path, chooser: random.Random, deepest: int, survivors: Survivors
) -> None:
    """Links, a FIFO and a hard link inside directory checkpoints: removing an old one removes them
    (never what they reach); the newest ones keep them."""
    del deepest
    for step in range(100, 800, 100):
        checkpoint = _directory_checkpoint(group / step_name(7, step))
        os.symlink(outside / "precious.ckpt", checkpoint / "checkpoint" / "link-to-file.pt")
        os.symlink(outside / "nested", checkpoint / "checkpoint" / "link-to-directory")
        make_fifo(checkpoint / "checkpoint" / "pipe")
        os.link(outside / "nested" / "data.bin", checkpoint / "checkpoint" / "hard-link.bin")
    survivors.keep_newest((step, 7, group / step_name(7, step)) for step in range(100, 800, 100))
    unfinished = _directory_checkpoint(group / step_name(7, 900), files=chooser.randint(1, 3))
    (unfinished / "latest").unlink()
    survivors.keep_whole(unfinished)  # the newest, but its writer has not written `latest`


def _directory_checkpoint(path: Path, files: int = 2) -> Path:
    return directory_checkpoint(path, {f"shard_{index}.pt": b"shard %d" % index for index in range(files)})
