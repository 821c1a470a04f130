"""6. The trash: what a deletion costs when it is a move into the trash, by checkpoint size.

A group holds the checkpoint under test (a complete zip archive of the given size, written for real,
or a directory checkpoint of many files) and a newer one; the policy keeps one, so the plan deletes
the one under test. The step timed is the one the daemon and ``prune`` run, ``delete.apply_group``
with the trash on (identity checks, metadata, the rename), in this process so the figure is not
drowned in a process start; then ``restore`` moves it back for the next repeat (a rename too). Last,
the entry is purged: that removal is what a deletion without a trash costs (the same ``unlink``, or
one per file of a directory checkpoint).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from benchlib import Config, Section, Target, filesystem_type, fresh_directory, markdown_table, median

from ckpt_watcher.delete import Outcome, apply_group
from ckpt_watcher.logs import configure_logging
from ckpt_watcher.plan import GroupPlan, plan
from ckpt_watcher.policy import Policy, TrashSettings
from ckpt_watcher.records import TRASH_DIRECTORY_NAME
from ckpt_watcher.scan import ScanOptions, scan_directory
from ckpt_watcher.trash import RESTORED, list_trash
from ckpt_watcher.trash_moves import TrashTarget, purge_keys, restore

POLICY = Policy(save_top_k_checkpoints=1, trash=TrashSettings(grace="1h"))
BLOCK = bytes(range(256)) * 4096  # 1 MiB of data that is not all zeros (no hole, no compression)
OLD = "epoch=00-step=000100-train.ckpt"
NEW = "epoch=00-step=000200-train.ckpt"


@dataclass(frozen=True)
class Timing:
    """One checkpoint's figures, in seconds."""

    label: str
    size: int
    moves: list[float]
    restores: list[float]
    purge: float


def write_zip(path: Path, size: int) -> None:
    """A complete torch.save-like archive (stored members) of about ``size`` bytes, written for real."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("archive/data/0", "w", force_zip64=size >= 1 << 31) as member:
            remaining = size
            while remaining > 0:
                chunk = BLOCK[: min(remaining, len(BLOCK))]
                member.write(chunk)
                remaining -= len(chunk)
        archive.writestr("archive/data.pkl", b"weights")


def write_directory(path: Path, files: int) -> int:
    """A DeepSpeed-like directory checkpoint of ``files`` shards (``latest`` last); its bytes."""
    (path / "checkpoint").mkdir(parents=True)
    shard = io.BytesIO()
    with zipfile.ZipFile(shard, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data/0", BLOCK[: 64 * 1024])
    data = shard.getvalue()
    for index in range(files):
        (path / "checkpoint" / f"zero_pp_rank_{index}_mp_rank_00_optim_states.pt").write_bytes(data)
    (path / "latest").write_text("checkpoint")
    an_hour_ago = time.time() - 3600
    for item in [*path.rglob("*"), path]:
        os.utime(item, (an_hour_ago, an_hour_ago), follow_symlinks=False)
    return files * len(data)


def group_plan(root: Path, group: Path) -> GroupPlan:
    records = scan_directory(root, group, POLICY.compiled_naming, ScanOptions(directory_quiet_seconds=0.0))
    [planned] = plan(records, POLICY).groups
    assert [decision.record.name for decision in planned.deletions] == [OLD], planned
    return planned


def time_one(config: Config, root: Path, label: str, size: int, repeats: int) -> Timing:
    """Move the old checkpoint into the trash and back, once to warm up and ``repeats`` times measured;
    then move it in once more and purge it."""
    planned = group_plan(root, root / "run")
    target = TrashTarget(root, 3600)
    moves: list[float] = []
    restores: list[float] = []
    for repeat in range(repeats + 2):
        started = time.perf_counter()
        [result] = apply_group(planned, root, trash=target)
        moved = time.perf_counter() - started
        if result.outcome is not Outcome.TRASHED:
            raise RuntimeError(f"{label}: {result.outcome} {result.error}")
        listing = list_trash(root)
        assert listing is not None
        if repeat == repeats + 1:
            break  # the last move: its entry is purged below
        started = time.perf_counter()
        [back] = restore(root, listing.entries)
        restored = time.perf_counter() - started
        if not back.restored:
            raise RuntimeError(f"{label}: not restored: {back.problem}")
        _unpin(root)
        if repeat:  # the first is a warm-up (metadata blocks, the trash's directories made)
            moves.append(moved)
            restores.append(restored)
            config.log(f"trash: {label}, repeat {repeat}/{repeats}: moved in {moved * 1e3:.2f} ms")
    assert listing is not None
    started = time.perf_counter()
    purged = purge_keys(root, [entry.key for entry in listing.entries])
    seconds = time.perf_counter() - started
    if len(purged.purged) != 1:
        raise RuntimeError(f"{label}: purge {purged}")
    return Timing(label, size, moves, restores, seconds)


def _unpin(root: Path) -> None:
    """Drop the restore's pin (untimed), as the end of its grace would: a move re-checks the pins under
    the trash's lock and leaves a pinned checkpoint where it is, so the next measured move would not
    move it (the plan is made once, before the first move)."""
    for pin in (root / TRASH_DIRECTORY_NAME / RESTORED).iterdir():
        pin.unlink()


def human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.0f} {unit}"
    return f"{size} B"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def measure(config: Config) -> Section:
    section = Section("8. The trash: a deletion as a move, by checkpoint size")
    configure_logging("error", sys.stderr)  # the core runs in this process: its records are not output
    work = config.work_dir / "trash"
    timings: list[Timing] = []
    cases: list[tuple[str, int]] = [(f"file, {human(size)}", size) for size in config.trash_sizes]
    cases.append((f"directory, {config.trash_files:,} files", -config.trash_files))
    for label, wanted in cases:
        root = fresh_directory(work / "root")
        (root / "run").mkdir()
        config.log(f"trash: writing the {label} checkpoint")
        if wanted >= 0:
            write_zip(root / "run" / OLD, wanted)
            size = wanted
        else:
            size = write_directory(root / "run" / OLD, -wanted)
        write_zip(root / "run" / NEW, 4096)
        os.sync()  # what is measured is the move, not the write-back of what was just written
        timings.append(time_one(config, root, label, size, config.repeats))
        shutil.rmtree(root)
    rows = [
        [
            timing.label,
            human(timing.size),
            milliseconds(median(timing.moves)),
            f"{milliseconds(min(timing.moves))} to {milliseconds(max(timing.moves))}",
            milliseconds(median(timing.restores)),
            milliseconds(timing.purge),
        ]
        for timing in timings
    ]
    section.body.append(
        "A group holds the checkpoint under test (a complete zip archive of the given size, written for "
        "real, or a DeepSpeed-like directory checkpoint of many 64 KiB shards) and a newer one; the policy "
        "keeps one, so the plan deletes the one under test. Timed: the step `prune` and the daemon run, "
        "`delete.apply_group` with the trash on (the identity checks, the metadata, the rename), "
        "in-process so that a process start does not drown it; then `restore` moves it back (a rename "
        "too) for the next repeat. Last, the entry is purged: that removal is what the same deletion "
        f"costs without a trash. On {filesystem_type(work)}; median of {config.repeats} moves after a "
        "warm-up move; the purge is one run. A directory checkpoint's move includes the walk that "
        "refuses one holding a mount point (as before any deletion): it grows with its number of "
        "entries, not with its bytes."
    )
    section.body.append(
        markdown_table(
            [
                "checkpoint",
                "bytes",
                "move into the trash (median)",
                "move (min to max)",
                "restore (median)",
                "purge = deletion",
            ],
            rows,
        )
    )
    files = [timing for timing in timings if timing.label.startswith("file")]
    smallest, largest = files[0], files[-1]
    small, large = median(smallest.moves), median(largest.moves)
    met = large <= 2 * small + 0.001
    section.targets.append(
        Target(
            "a multi-GB checkpoint is trashed at the cost of a small one",
            "same cost, whatever the size",
            f"{human(largest.size)}: {milliseconds(large)}, {human(smallest.size)}: {milliseconds(small)}",
            met,
        )
    )
    section.headline["trash: move of the largest checkpoint"] = milliseconds(large)
    return section
