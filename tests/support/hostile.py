"""Hostile inputs for the adversarial tests: doctored archives, odd names, a file system without
directory locks. (They run the CLI with ``tests.support.cli.run_cli``.)"""

from __future__ import annotations

import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def is_clean_text(text: str) -> bool:
    """Valid Unicode (no lone surrogate) with no control character: safe on one line of any UTF-8 output."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(character) < 0x20 or 0x7F <= ord(character) < 0xA0 for character in text)


def rewrite_archive(
    source: Path,
    destination: Path,
    transform: Callable[[zipfile.ZipInfo, bytes], tuple[zipfile.ZipInfo, bytes] | None],
) -> Path:
    """Copy a torch.save archive member by member; ``transform`` may change a member or drop it (None)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as rewritten:
        for info in original.infolist():
            changed = transform(info, original.read(info))
            if changed is not None:
                rewritten.writestr(*changed)
    return destination


def replace_pickle(source: Path, destination: Path, pickle_bytes: bytes) -> Path:
    """The archive with its ``data.pkl`` replaced (stored, as torch.save writes it)."""

    def transform(info: zipfile.ZipInfo, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        if info.filename.endswith("/data.pkl"):
            return info, pickle_bytes
        return info, data

    return rewrite_archive(source, destination, transform)


def deflate_bomb(source: Path, destination: Path, expanded_bytes: int) -> Path:
    """The archive with ``data.pkl`` deflated and padded with zeros to ``expanded_bytes``.

    The pickle itself still ends at its STOP opcode, so the file loads; decompressing it takes
    ``expanded_bytes`` of memory from a file about a thousandth of that size.
    """
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as rewritten:
        for info in original.infolist():
            data = original.read(info)
            if not info.filename.endswith("/data.pkl"):
                rewritten.writestr(info, data)
                continue
            bomb = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with rewritten.open(bomb, "w", force_zip64=True) as member:
                member.write(data)
                remaining = expanded_bytes - len(data)
                while remaining > 0:
                    member.write(chunk[: min(remaining, len(chunk))])
                    remaining -= len(chunk)
    return destination


# Refuses flock() on directories the way an NFS mount does (flock is emulated with POSIX locks there,
# which need a file open for writing): EBADF. Plain files lock as usual.
NO_DIRECTORY_LOCKS = textwrap.dedent(
    """
    import errno as _errno, fcntl as _fcntl, os as _os, stat as _stat
    _real_flock = _fcntl.flock
    def _flock(file, operation):
        descriptor = file if isinstance(file, int) else file.fileno()
        if _stat.S_ISDIR(_os.fstat(descriptor).st_mode):
            raise OSError(_errno.EBADF, _os.strerror(_errno.EBADF))
        return _real_flock(file, operation)
    _fcntl.flock = _flock
    """
)

_WITHOUT_DIRECTORY_LOCKS = NO_DIRECTORY_LOCKS + textwrap.dedent(
    """
    import runpy, sys
    sys.argv = sys.argv[1:]  # ["-m", "ckpt_watcher", ...] -> run that module as python would
    module = sys.argv.pop(1)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)


def emulated_without_directory_locks() -> list[str]:
    """An interpreter command (followed by ``-m ckpt_watcher ...``) on which directory flocks fail."""
    return [sys.executable, "-c", _WITHOUT_DIRECTORY_LOCKS]
