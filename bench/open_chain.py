"""What a file's race-free open costs, against the floor of issue 16 (not a section of BENCHMARKS.md).

The scan reads each checkpoint's tail through a chain of system calls that never opens an entry that
is not a regular file, even one swapped in after it was looked at (`filesystem.open_handle`, then
`reopen_regular` through ``/proc/self/fd``; `tests/unit/test_scan.py` holds the scan to it). This times
that chain alone, with no Python of the product around it, beside two others, on the same files, in
interleaved rounds (each round runs all three in turn, so the machine's noise weighs on all alike):

* ``handle``: the scan's chain: ``O_PATH`` open, ``fstat``, re-open for reading through the
  ``/proc/self/fd`` directory, ``SEEK_HOLE``, the tail read, ``fstat``, two closes;
* ``direct``: the same checks on a file opened for reading at once (``O_NONBLOCK | O_NOCTTY |
  O_NOFOLLOW``, as GNU tar opens what it archives), kept only if ``fstat`` says it is a regular file.
  It would open a FIFO or a device put under the name between the listing and the open (then close
  it unread), which the ``handle`` chain never does;
* ``floor``: `hundred_k.py`'s floor in-process: ``scandir``, open by path, read the last 22 bytes.

Run: ``python bench/open_chain.py`` (the 1 x 100,000 tree of ``bench/hundred_k.py``, made if absent).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hundred_k import SIZES, trees

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_TAIL = 1 << 16  # integrity._TAIL_WINDOW: the scan reads up to this much of a file's end at once


def _tail(descriptor: int, size: int) -> None:
    os.lseek(descriptor, 0, os.SEEK_HOLE)
    start = max(0, size - _TAIL)
    os.pread(descriptor, size - start, start)


def handle_chain(directory: int, proc: int, names: list[str]) -> None:
    """The scan's chain (scan._Group.record_for, integrity.check_handle)."""
    for name in names:
        handle = os.open(name, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=directory)
        status = os.fstat(handle)
        descriptor = os.open(str(handle), _READ_FLAGS, dir_fd=proc)
        _tail(descriptor, status.st_size)
        os.fstat(descriptor)
        os.close(descriptor)
        os.close(handle)


def direct_chain(directory: int, proc: int, names: list[str]) -> None:
    """The same checks on a file opened for reading at once."""
    del proc
    for name in names:
        descriptor = os.open(name, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=directory)
        status = os.fstat(descriptor)
        _tail(descriptor, status.st_size)
        os.fstat(descriptor)
        os.close(descriptor)


def floor_chain(directory: int, proc: int, names: list[str]) -> None:
    """hundred_k.FLOOR_SCRIPT's work, in-process (its tree has no subdirectory)."""
    del proc, names
    with os.scandir(directory) as entries:  # a descriptor: entries are named, not pathed
        names_now = [entry.name for entry in entries if entry.is_file(follow_symlinks=False)]
    for name in names_now:
        with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=directory)) as file:
            file.seek(-22, 2)
            file.read(22)


CHAINS: dict[str, Callable[[int, int, list[str]], None]] = {
    "handle": handle_chain,
    "direct": direct_chain,
    "floor": floor_chain,
}


def measure(tree: Path, rounds: int) -> dict[str, float]:
    """The median seconds of each chain over ``rounds`` interleaved rounds (after one untimed round)."""
    directory = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = [name for name in os.listdir(directory) if not os.path.islink(os.path.join(tree, name))]
        seconds: dict[str, list[float]] = {name: [] for name in CHAINS}
        for round_number in range(rounds + 1):
            for name, chain in CHAINS.items():
                started = time.perf_counter()
                chain(directory, proc, names)
                if round_number:  # the first round warms the page cache and the dentries
                    seconds[name].append(time.perf_counter() - started)
    finally:
        os.close(proc)
        os.close(directory)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ckpt-watcher-bench/hundred-k"))
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    arguments.work_dir.mkdir(parents=True, exist_ok=True)
    tree = trees(arguments.work_dir, arguments.size).one
    figures = measure(tree, arguments.rounds)
    floor = figures["floor"]
    print(
        json.dumps(
            {
                "files": len(os.listdir(tree)),
                "rounds": arguments.rounds,
                **{f"{name}_seconds": round(value, 4) for name, value in figures.items()},
                **{f"{name}_ratio": round(value / floor, 3) for name, value in figures.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
