"""The inotify observer's watches, counted by the kernel (``/proc/self/fdinfo``): none in a trash."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEventHandler

from ckpt_watcher.inotify_observer import DeepSafeInotifyObserver
from ckpt_watcher.records import TRASH_DIRECTORY_NAME
from tests.support.daemon import wait_until

pytestmark = pytest.mark.timeout(60)


def _kernel_watches() -> int:
    """The inotify watches this process holds, as the kernel lists them."""
    count = 0
    for name in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{name}") as info:
                count += sum(1 for line in info if line.startswith("inotify wd:"))
        except OSError:
            continue  # (an fd closed meanwhile)
    return count


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A root with a run and a trash of directory checkpoints, watched by the daemon's observer; and
    the watches this process held before."""
    root = tmp_path / "root"
    (root / "run" / "checkpoint-100" / "zero").mkdir(parents=True)
    for number in range(3):
        (root / TRASH_DIRECTORY_NAME / f"entry{number}" / "checkpoint-1" / "zero").mkdir(parents=True)
    before = _kernel_watches()
    observer = DeepSafeInotifyObserver()
    observer.schedule(FileSystemEventHandler(), str(root), recursive=True)
    observer.start()
    try:
        yield root, before
    finally:
        observer.stop()
        observer.join()
    wait_until(lambda: _kernel_watches() == before, what="the observer's watches released")


def test_a_trash_takes_no_watch_nor_what_is_moved_or_made_in_it(observed: tuple[Path, int]) -> None:
    """A trash of directory checkpoints took a watch for each directory in it (from the limit new runs
    need), and each deletion moved the checkpoint's watches in with it."""
    root, before = observed
    watches = _kernel_watches()
    assert watches - before == 4  # the root, run, checkpoint-100 and its zero/

    checkpoint = root / "run" / "checkpoint-100"
    (root / TRASH_DIRECTORY_NAME / "entry3").mkdir()
    checkpoint.rename(root / TRASH_DIRECTORY_NAME / "entry3" / "checkpoint-100")  # trashed
    (root / TRASH_DIRECTORY_NAME / "entry4" / "made" / "here").mkdir(parents=True)
    wait_until(lambda: _kernel_watches() == watches - 2, what="the trashed checkpoint's watches gone")
    (root / "run" / "checkpoint-200" / "zero").mkdir(parents=True)  # a new save is watched

    wait_until(lambda: _kernel_watches() == watches, what="the new checkpoint's watches")
