"""6. Space pressure: from a growing checkpoint crossing ``keep_free`` to the first eviction it causes.

On a tmpfs mounted for the measurement (root needed; the section says so otherwise), the daemon keeps
``keep_free: 16MiB`` with old checkpoints it may evict. A writer grows a checkpoint far larger than the
ones before it (the first save of a new run, so the prediction expects only the newest checkpoint's
size), chunk by chunk. After each chunk it reads ``statvfs`` itself and notes when the free space
crosses the daemon's own threshold (``keep_free`` + what the save is still expected to need); it keeps
the file open and growing slowly until the daemon evicts, so the eviction answers the growing file
(the free-space check between passes), not its close. A random pause (0-1 s) after the first
chunk puts the crossing at any phase of the daemon's checks. Latency = the ``timestamp`` of the first
``checkpoint_deleted`` record after the crossing minus the writer's ``time.time()`` at the crossing.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    Config,
    Daemon,
    Section,
    Target,
    fresh_directory,
    markdown_table,
    milliseconds_text,
    parse_timestamp,
    percentile,
    running_daemon,
    step_name,
)

MIB = 1024 * 1024
DISK = 64 * MIB
KEEP_FREE = 16 * MIB
OLD = 8  # old checkpoints the daemon may evict (the newest of them it never does)
OLD_BYTES = 4 * MIB
CHUNK = 256 * 1024
FAST_SECONDS = 0.005  # per chunk until the crossing (~50 MiB/s)
SLOW_SECONDS = 0.05  # per chunk after it, until the daemon evicts (~5 MiB/s)
AFTER_CROSSING = 12 * MIB  # never write more past the crossing (keep_free is 16 MiB)


@dataclass
class Mode:
    label: str
    options: list[str]


MODES = (
    Mode("inotify (default settle)", []),
    Mode("`--poll 1 --settle 0`", ["--poll", "1", "--settle", "0"]),
)


@dataclass
class SpaceResult:
    mode: str
    latencies: list[float]
    missed: int
    lowest_free: int

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction)


def free_bytes(path: Path) -> int:
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


def _mount(mount: Path) -> str | None:
    """Mount the tmpfs; the reason it cannot be, or None."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    mount.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip()}"


def _old_checkpoints(directory: Path) -> None:
    """The old run, restored: OLD checkpoints of OLD_BYTES, written long ago."""
    data = _zip_of(OLD_BYTES)
    for index in range(OLD):
        path = directory / step_name(0, 100 * (index + 1))
        if not path.exists():
            path.write_bytes(data)
        stamp = time.time() - 3600 + index
        os.utime(path, (stamp, stamp))


def _zip_of(size: int) -> bytes:
    """A complete checkpoint-like zip archive of about ``size`` bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", bytes(max(0, size - 200)))
    return buffer.getvalue()


def _trial(daemon: Daemon, root: Path, index: int, pause: float) -> tuple[float | None, int]:
    """Grow one checkpoint past the threshold; the latency to the first eviction (None: none came).

    ``pause`` (after the first chunk) puts the crossing at a random phase of the daemon's checks.
    """
    seen = len(daemon.events("checkpoint_deleted"))
    run = fresh_directory(root / f"new-{index}")
    path = run / step_name(0, 100)
    expected = OLD_BYTES  # no earlier checkpoint in this run: as large as the newest one written
    crossed_at: float | None = None
    crossed_written = 0
    written = 0
    lowest = free_bytes(root)
    chunk = os.urandom(CHUNK)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(descriptor, chunk)
        written += CHUNK
        time.sleep(pause)
        while True:
            os.write(descriptor, chunk)
            written += CHUNK
            free = free_bytes(root)
            lowest = min(lowest, free)
            if crossed_at is None and free < KEEP_FREE + max(0, expected - written):
                crossed_at = time.time()
                crossed_written = written
            if crossed_at is not None and (
                len(daemon.events("checkpoint_deleted")) > seen or written - crossed_written >= AFTER_CROSSING
            ):
                break
            time.sleep(SLOW_SECONDS if crossed_at is not None else FAST_SECONDS)
    finally:
        os.close(descriptor)
    deleted = daemon.wait_for_deletions(seen + 1, timeout=10.0)[seen:]
    shutil.rmtree(run)
    if crossed_at is None or not deleted:
        return None, lowest
    return parse_timestamp(deleted[0]["timestamp"]) - crossed_at, lowest


def _settle(root: Path) -> None:
    """Restore the old run and let the daemon see it and go quiet (its passes take milliseconds; its
    checks between passes come every second while anything is being written)."""
    _old_checkpoints(root / "old")
    time.sleep(1.5)


def run_mode(config: Config, mode: Mode, mount: Path, trials: int, name: str) -> SpaceResult:
    root = fresh_directory(mount / name)
    (root / "old").mkdir()
    _old_checkpoints(root / "old")
    policy = mount.parent / f"{name}-policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: -1\nkeep_free: {KEEP_FREE}\n")
    latencies: list[float] = []
    missed = 0
    lowest = DISK
    pauses = random.Random(config.seed + len(name))  # noqa: S311  (timing jitter)
    with running_daemon(
        root, ["--policy", str(policy), *mode.options], mount.parent / f"{name}.log"
    ) as daemon:
        daemon.wait_ready()
        for index in range(trials):
            _settle(root)
            latency, low = _trial(daemon, root, index, pauses.uniform(0.0, 1.0))
            lowest = min(lowest, low)
            if latency is None:
                missed += 1
            else:
                latencies.append(latency)
    shutil.rmtree(root)
    return SpaceResult(mode.label, latencies, missed, lowest)


def measure(config: Config) -> Section:
    section = Section("7. Space pressure: reaction to a growing checkpoint")
    mount = config.work_dir / "space" / "mnt"
    if os.path.ismount(mount):  # left by an interrupted run
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
    fresh_directory(mount.parent)
    reason = _mount(mount)
    if reason is not None:
        section.body.append(f"Not measured: {reason}.")
        section.targets.append(
            Target("space pressure: crossing to first eviction, p99", "< 1.1 s", reason, None)
        )
        return section
    try:
        results = []
        for index, mode in enumerate(MODES):
            config.log(f"space: {mode.label}, {config.space_trials} growing checkpoints")
            results.append(run_mode(config, mode, mount, config.space_trials, f"mode-{index}"))
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, check=False)
    section.body.append(
        f"On a {DISK // MIB} MiB tmpfs, the daemon keeps `keep_free: 16MiB` (policy "
        "`save_top_k_checkpoints: -1`, so only space evicts) beside an old run of "
        f"{OLD} checkpoints of {OLD_BYTES // MIB} MiB it may evict. A writer grows a checkpoint in a new run "
        f"directory in {CHUNK // 1024} KiB chunks (~50 MiB/s) until the free space crosses the daemon's own "
        "threshold (`keep_free` + what the save is still expected to need: the newest checkpoint's size "
        "minus what is written), then keeps it open and growing slowly (~5 MiB/s) until the first "
        "eviction, so the eviction answers the growing file and not its close; a random pause (0-1 s) "
        "after its first chunk puts the crossing at any phase of the daemon's once-a-second checks. "
        "Latency = the "
        "`timestamp` of the daemon's first `checkpoint_deleted` after the crossing minus the writer's "
        "`time.time()` when its own `statvfs` first showed the crossing. The daemon reads `statvfs` after "
        "every pass and, while a checkpoint is being written, every second between passes; with `--poll` "
        "the polling observer's events for the growing file also start passes. Between trials the old "
        "run is restored and the daemon left to go quiet."
    )
    rows = [
        [
            result.mode,
            f"{len(result.latencies) + result.missed:,}",
            milliseconds_text(result.p(0.5)),
            milliseconds_text(result.p(0.95)),
            milliseconds_text(result.p(0.99)),
            milliseconds_text(max(result.latencies, default=float("nan"))),
            f"{result.missed}",
            f"{result.lowest_free / MIB:.1f} MiB",
        ]
        for result in results
    ]
    section.body.append(
        markdown_table(
            ["mode", "trials", "p50", "p95", "p99", "max", "no eviction", "lowest free seen by the writer"],
            rows,
        )
    )
    section.body.append(
        "*no eviction*: trials in which no eviction came although the writer crossed the threshold and "
        "went on writing 12 MiB (must be 0). *lowest free*: the least free space the writer's own "
        "`statvfs` ever showed (keep_free is 16 MiB; the writer never got near `ENOSPC`)."
    )
    for result in results:
        section.targets.append(
            Target(
                f"space pressure p99, {result.mode}",
                "< 1.1 s (the check interval + 100 ms)",
                milliseconds_text(result.p(0.99)),
                result.p(0.99) < 1.1 and result.missed == 0,
            )
        )
        section.headline[f"space pressure p99 {result.mode}"] = milliseconds_text(result.p(0.99))
    return section
