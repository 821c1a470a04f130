"""11. Stopping: how long ``watch`` takes to exit after SIGTERM in the middle of a large start-up reconcile.

README promises that SIGTERM stops the daemon at the next deletion, even during the start-up reconcile
of a huge directory or the scan of one, and that it exits within 2 s. Here the daemon starts on a copy
of the largest run directory (the default policy deletes most of it) and is sent SIGTERM at several
moments of its start-up reconcile: during the scan, around the plan, during the deletions.
"""

from __future__ import annotations

import signal
import subprocess
import time

from benchlib import (
    Config,
    Section,
    Target,
    dataset,
    fresh_directory,
    linked_copy,
    markdown_table,
    milliseconds_text,
    running_daemon,
    seconds_text,
)

STOP_GOAL = 2.0  # seconds from SIGTERM to exit (README, "Signals")
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)  # of the time a whole start-up reconcile takes


def measure(config: Config) -> Section:
    size = max(config.sizes)
    source = dataset(config, size)
    work = fresh_directory(config.work_dir / "stop")
    root = linked_copy(source, work / "root")
    with running_daemon(root, ["--settle", "0"], work / "whole.log") as daemon:
        startup = daemon.wait_ready(timeout=600)
    config.log(f"stop: a whole start-up reconcile of {size:,} checkpoints takes {startup:.1f} s")
    rows = []
    slowest = 0.0
    for fraction in FRACTIONS:
        root = linked_copy(source, work / "root")
        delay = fraction * startup
        with running_daemon(root, ["--settle", "0"], work / f"stop-{fraction}.log") as daemon:
            time.sleep(delay)
            signalled = time.perf_counter()
            daemon.process.send_signal(signal.SIGTERM)
            try:
                code = daemon.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                code = None
            took = time.perf_counter() - signalled
            deleted = len(daemon.events("checkpoint_deleted"))
        slowest = max(slowest, took)
        rows.append(
            [
                f"{fraction:.0%} ({seconds_text(delay)})",
                milliseconds_text(took),
                "none (killed)" if code is None else str(code),
                f"{deleted:,}",
            ]
        )
    body = [
        f"A copy of the {size:,}-checkpoint run directory each time (hard links); the daemon with the "
        f"default policy, `--settle 0`. A whole start-up reconcile took {seconds_text(startup)} (spawn to "
        "READY=1); SIGTERM was sent at a fraction of that, and the time to exit measured from the signal.",
        markdown_table(["SIGTERM at", "exit after", "exit code", "deleted before the stop"], rows),
    ]
    if any(row[2] == str(-signal.SIGTERM) for row in rows):
        body.append(
            "Exit code -15: the signal came before the daemon had set its handlers (while Python was still "
            "importing its modules), so the signal's default action ended it, before anything was deleted."
        )
    return Section(
        title="11. Stopping during a large start-up reconcile",
        body=body,
        targets=[
            Target(
                f"SIGTERM during the start-up reconcile of {size:,} checkpoints: exits within 2 s",
                "< 2 s (slowest)",
                milliseconds_text(slowest),
                slowest < STOP_GOAL,
            )
        ],
        headline={"stop_slowest": milliseconds_text(slowest)},
    )
