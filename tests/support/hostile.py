"""Hostile inputs and bounded runs for the adversarial tests: doctored archives, odd names, memory limits.

Every run here is a real ``python -m ckpt_watcher`` process with a timeout; a memory case runs it
under ``resource.setrlimit(RLIMIT_AS, ...)`` set by a small wrapper just before ``exec``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

COMMAND_TIMEOUT = 120.0

# Sets RLIMIT_AS, then becomes the command (argv[2:]), so the limit covers the whole run.
_LIMIT_WRAPPER = textwrap.dedent(
    """
    import os, resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
    """
)

# Runs a command line of ckpt-watcher in-process, then appends its peak address space (bytes) to argv[1].
_PEAK_PROBE = textwrap.dedent(
    """
    import sys
    from ckpt_watcher.cli import main
    code = main(sys.argv[2:])
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmPeak:"))
    with open(sys.argv[1], "w") as out:
        out.write(str(peak))
    sys.exit(code)
    """
)


def strict_utf8_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process whose stdout and stderr refuse anything that is not UTF-8."""
    environment = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    environment.update(extra or {})
    return environment


def run_ckpt_watcher(
    arguments: Sequence[str],
    *,
    environment: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
    interpreter: Sequence[str] = (sys.executable,),
) -> subprocess.CompletedProcess[bytes]:
    """``python -m ckpt_watcher ARGUMENTS`` as a real process; output kept as bytes to check encodings.

    ``interpreter`` is what runs ``-m ckpt_watcher ...`` (e.g. a wrapper that sets a limit first).
    """
    return subprocess.run(
        [*interpreter, "-m", "ckpt_watcher", *arguments],
        capture_output=True,
        timeout=timeout,
        check=False,
        env=dict(environment) if environment is not None else None,
    )


def peak_address_space(arguments: Sequence[str], scratch: Path) -> int:
    """Peak virtual memory (VmPeak) of a process that ran ``ckpt-watcher ARGUMENTS`` in-process."""
    out = scratch / "peak.txt"
    subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(out), *arguments],
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return int(out.read_text())


def run_with_address_space_limit(
    arguments: Sequence[str], limit: int, *, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """``python -m ckpt_watcher ARGUMENTS`` with at most ``limit`` bytes of address space."""
    interpreter = [sys.executable, "-c", _LIMIT_WRAPPER, str(limit)]
    return run_ckpt_watcher(arguments, interpreter=interpreter, timeout=timeout)


def json_records(stderr: bytes) -> list[dict[str, Any]]:
    """The JSON log lines of a run (stderr is not a terminal, so every record is one JSON line)."""
    return [json.loads(line) for line in stderr.decode("utf-8").splitlines() if line.startswith("{")]


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
