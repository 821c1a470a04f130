"""2. Reaction latency: from a writer's ``close()`` of a new checkpoint to the deletion it causes.

The policy keeps the newest 5 step checkpoints, so once 5 are there each new checkpoint ``i`` causes
exactly one deletion, that of checkpoint ``i - 5``. The writer notes the wall-clock time right after
each ``close()``; the deletion time is the ``timestamp`` of the daemon's ``checkpoint_deleted`` record
(written right after the unlink, microsecond resolution, same clock), which is more precise than
polling the file's existence from outside.
"""

from __future__ import annotations

import os
import random
import time
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
    sleep_until,
    step_name,
    write_checkpoint,
    write_policy,
)

KEEP = 5


@dataclass
class Mode:
    label: str
    options: list[str]
    poll_interval: float | None
    rename_from_outside: bool = False  # Lightning's atomic save: temp file elsewhere, then rename
    slow: bool = False  # waits out the settle time


@dataclass
class LatencyResult:
    mode: str
    kind: str
    events: int
    latencies: list[float]
    missing: int
    unexpected: int
    writing_seconds: float
    drain_seconds: float
    passes: int

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction)


INOTIFY = Mode("inotify (default settle)", [], None)
POLL = Mode("`--poll 1 --settle 0`", ["--poll", "1", "--settle", "0"], 1.0)
POLL_SETTLE = Mode("`--poll 1` (default settle 5 s)", ["--poll", "1"], 1.0, slow=True)
INOTIFY_RENAME = Mode(
    "inotify (default settle), renamed in from outside the watched tree", [], None, True, slow=True
)


def run_events(
    config: Config,
    mode: Mode,
    kind: str,
    events: int,
    intervals: list[float],
    name: str,
) -> LatencyResult:
    """Write ``KEEP + events`` checkpoints at the given intervals beside a daemon; measure each deletion."""
    base = fresh_directory(config.work_dir / "latency" / name)
    root = base / "run"
    root.mkdir()
    policy = write_policy(base / "policy.yaml", save_top_k_checkpoints=KEEP, save_top_k_best=KEEP)
    total = KEEP + events
    closes: dict[str, float] = {}
    names = [step_name(0, (index + 1) * 10) for index in range(total)]
    outside = fresh_directory(base / "tmp")  # same file system, outside the watched root
    with running_daemon(root, ["--policy", str(policy), *mode.options], base / "daemon.log") as daemon:
        daemon.wait_ready()
        time.sleep(0.5)  # let the start-up pass and the observer settle
        started = time.perf_counter()
        slot = started
        for index, file_name in enumerate(names):
            sleep_until(slot)
            if mode.rename_from_outside:
                write_checkpoint(outside / file_name)
                os.rename(outside / file_name, root / file_name)
                closes[file_name] = time.time()  # the moment it is in place, complete
            else:
                closes[file_name] = write_checkpoint(root / file_name)
            slot += intervals[index]
        writing = time.perf_counter() - started
        timeout = 30.0 + (mode.poll_interval or 0.0) * 3 + (10.0 if mode.slow else 0.0)
        deleted = daemon.wait_for_deletions(events, timeout=timeout)
        time.sleep(0.3 if mode.poll_interval is None else mode.poll_interval * 1.5)  # any extra deletion?
        deleted = daemon.events("checkpoint_deleted")
        passes = _passes_with_deletions(daemon)
    deleted_at = {Path(record["path"]).name: parse_timestamp(record["timestamp"]) for record in deleted}
    latencies: list[float] = []
    missing = 0
    for index in range(KEEP, total):
        victim = names[index - KEEP]
        if victim not in deleted_at:
            missing += 1
            continue
        latencies.append(deleted_at[victim] - closes[names[index]])
    expected = set(names[:events])
    unexpected = len([file_name for file_name in deleted_at if file_name not in expected])
    last_close = max(closes.values())
    drain = max(deleted_at.values()) - last_close if deleted_at else float("nan")
    return LatencyResult(mode.label, kind, events, latencies, missing, unexpected, writing, drain, passes)


def _passes_with_deletions(daemon: Daemon) -> int:
    return len(
        [
            record
            for record in daemon.events("pass_completed")
            if record.get("deleted") and record.get("trigger") == "event"
        ]
    )


def paced(config: Config, events: int, mean_interval: float, salt: int) -> list[float]:
    """Intervals between writes: uniform in [0.5, 1.5] x the mean, so writes fall at any phase of a poll."""
    generator = random.Random(config.seed + salt)  # noqa: S311  (timing jitter)
    return [generator.uniform(0.5, 1.5) * mean_interval for _ in range(KEEP + events)]


def measure(config: Config) -> Section:
    section = Section("2. Reaction latency of the daemon")
    results: list[LatencyResult] = []
    plans = [
        (INOTIFY, "paced", config.latency_events, 0.1),
        (POLL, "paced", config.latency_events, 0.25),
    ]
    if config.settle_events:
        plans.append((POLL_SETTLE, "paced", config.settle_events, 0.25))
        plans.append((INOTIFY_RENAME, "paced", config.settle_events, 0.25))
    for index, (mode, kind, events, mean) in enumerate(plans):
        config.log(f"latency: {mode.label}, {events} paced events (mean interval {mean:g} s)")
        intervals = paced(config, events, mean, index)
        results.append(run_events(config, mode, kind, events, intervals, f"paced-{index}"))
    for index, mode in enumerate((INOTIFY, POLL)):
        config.log(f"latency: {mode.label}, burst of {config.burst} checkpoints in 1 s")
        intervals = [1.0 / config.burst] * (KEEP + config.burst)
        results.append(run_events(config, mode, "burst", config.burst, intervals, f"burst-{index}"))

    section.body.append(
        "A writer process (the benchmark) writes complete checkpoints into a watched directory with "
        "`open`/`write`/`close`, as `torch.save` does, under a policy `save_top_k_checkpoints: 5`: after the "
        "first 5, each new checkpoint `i` causes exactly one deletion, of checkpoint `i - 5`. Latency = the "
        "`timestamp` of the daemon's `checkpoint_deleted` record for `i - 5` (UTC, microseconds, logged "
        "right "
        "after the unlink) minus the writer's `time.time()` right after `close()` of `i` — the daemon's own "
        "timestamp, which is more precise than polling the file's existence from outside (same host, same "
        "clock). Paced events come at random intervals (uniform 0.5-1.5 x the mean) so they fall at every "
        "phase of a poll cycle; the burst writes its checkpoints one per 1/N s for one second."
    )
    section.body.append(
        "Modes: inotify with the default `--settle 5` (a file whose writer was seen closing it bypasses the "
        "settle time); `--poll 1 --settle 0`, because the settle time is for files seen only by polling or a "
        "rescan (a file must have been unchanged that long) and would otherwise add its 5 s to every event, "
        "where the target is the poll interval + 100 ms; and, for reference, `--poll 1` with the default "
        "settle of 5 s, which is what a polling deployment gets unless it lowers `--settle`. The last paced "
        "row writes each checkpoint the way PyTorch Lightning 2.x saves (`_atomic_save` through fsspec): to "
        "a temporary file outside the watched directory (`tempfile.mkstemp()`, i.e. `$TMPDIR`), on the same "
        "file system here, then renamed into place. The *latency* there is from the rename."
    )
    rows = []
    for result in results:
        rows.append(
            [
                result.mode,
                f"{result.kind}, written over {result.writing_seconds:.2f} s",
                f"{result.events:,}",
                milliseconds_text(result.p(0.5)),
                milliseconds_text(result.p(0.95)),
                milliseconds_text(result.p(0.99)),
                milliseconds_text(max(result.latencies, default=float("nan"))),
                milliseconds_text(result.drain_seconds),
                f"{result.passes:,}",
                f"{result.missing} / {result.unexpected}",
            ]
        )
    section.body.append(
        markdown_table(
            [
                "mode",
                "events",
                "deletions measured",
                "p50",
                "p95",
                "p99",
                "max",
                "last close → last deletion",
                "passes that deleted",
                "missed / extra deletions",
            ],
            rows,
        )
    )
    section.body.append(
        "*passes that deleted*: event-triggered passes of the daemon that deleted something; in a burst the "
        "daemon batches events (a pass starts once events pause for 20 ms, or after at most 250 ms), so far "
        "fewer passes than checkpoints do the work. *missed / extra*: expected deletions that never came, "
        "and "
        "deletions of anything else (both must be 0)."
    )
    by_mode = {(result.mode, result.kind): result for result in results}
    renamed = by_mode.get((INOTIFY_RENAME.label, "paced"))
    if renamed is not None and renamed.p(0.5) > 1.0:
        section.body.append(
            "A checkpoint renamed in from outside the watched tree waits out the settle time: inotify "
            "reports only its `IN_MOVED_TO` (the `IN_MOVED_FROM` happened in an unwatched directory) and "
            "watchdog turns an unmatched `IN_MOVED_TO` into a plain *created* event, not a move into place, "
            "so the daemon treats the file like one still being written. This is how PyTorch Lightning "
            "saves when `$TMPDIR` is on the checkpoints' file system (see section 4 and the analysis at "
            "the end)."
        )
    inotify = by_mode[(INOTIFY.label, "paced")]
    poll = by_mode[(POLL.label, "paced")]
    section.targets.append(
        Target(
            "latency p99, inotify",
            "< 100 ms",
            milliseconds_text(inotify.p(0.99)),
            inotify.p(0.99) < 0.1 and inotify.missing == 0 and inotify.unexpected == 0,
        )
    )
    section.targets.append(
        Target(
            "latency p99, `--poll 1`",
            "< 1 s + 100 ms",
            f"{milliseconds_text(poll.p(0.99))} (with `--settle 0`)",
            poll.p(0.99) < 1.1 and poll.missing == 0 and poll.unexpected == 0,
        )
    )
    section.headline["latency p99 inotify"] = milliseconds_text(inotify.p(0.99))
    section.headline["latency p50 inotify"] = milliseconds_text(inotify.p(0.5))
    section.headline["latency p99 poll 1 s"] = milliseconds_text(poll.p(0.99))
    burst = by_mode[(INOTIFY.label, "burst")]
    section.headline["burst drain inotify"] = milliseconds_text(burst.drain_seconds)
    return section
