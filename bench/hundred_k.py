"""10. 100,000 checkpoints against the floor: the rows of issue 16, each a ratio to a floor timed in
the same run.

The floor is what any Python tool pays: a stdlib script (``floor_walk`` below, run as its own
process) that ``scandir``s the same tree and reads each file's last 22 bytes. Each row runs
ckpt-watcher as a child process with the interpreter given (``--python``: so the same script measures
an older checkout, for the before/after table of BENCHMARKS.md):

- ``prune --dry-run --json`` and ``prune --dry-run`` (table) on 1 directory of N and on G x M;
- ``watch``'s start-up reconcile (spawn to READY=1), its ``checkpoint_detected`` info lines, and its
  resident memory after start-up; the watch rows use a keep-everything policy
  (``save_top_k_*: -1``: the steady state of a volume the daemon already keeps, nothing to delete);
- ``watch --poll 15``: resident memory and CPU per polling cycle (CPU over whole cycles after start-up);
- ``prune`` on an empty directory against
  ``python -c "import pydantic, structlog, yaml, watchdog.observers"``.

    python bench/hundred_k.py [--python PY] [--repeats 3] [--work-dir DIR] [--size large|smoke]

Run alone it prints one line of JSON per repeat (the raw figures) and the medians; ``run.py`` runs it
as section 10 with the current interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    CLOCK_TICKS,
    PYTHON,
    Config,
    Section,
    Target,
    cpu_ticks,
    linked_copy,
    markdown_table,
    median,
    parse_timestamp,
    percentile,
    run_measured,
    running_daemon,
    status_value,
    step_name,
    write_checkpoint,
    write_run,
)

FLOOR_SCRIPT = """
import os, sys
def walk(path):
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path)
            elif entry.is_file(follow_symlinks=False):
                with open(entry.path, "rb") as handle:
                    handle.seek(-22, 2)
                    handle.read(22)
walk(sys.argv[1])
"""
IMPORT_FLOOR = "import pydantic, structlog, yaml, watchdog.observers"
COMPILE_PACKAGE = (
    "import compileall, os, ckpt_watcher; "
    "compileall.compile_dir(os.path.dirname(ckpt_watcher.__file__), quiet=1)"
)
KEEP_ALL_POLICY = "save_top_k_checkpoints: -1\nsave_top_k_best: -1\n"
SIZES = {"large": (100_000, 2_000, 49), "smoke": (300, 6, 49)}
POLL_SECONDS = 15.0
# Polls let pass before the CPU is counted: the first ones list every directory in full, until its
# signature has been seen unchanged (LeanTree); the steady state is what a cycle costs.
WARM_UP_POLLS = 2


@dataclass(frozen=True)
class Trees:
    one: Path  # 1 directory of N checkpoints (+ last.ckpt)
    many: Path  # G directories of M checkpoints (+ last.ckpt each)
    empty: Path
    policy: Path  # keep everything (the watch rows)
    label_one: str
    label_many: str


def trees(work: Path, size: str) -> Trees:
    """The generated trees (made once, reused by later runs)."""
    single, groups, each = SIZES[size]
    one = work / f"one-{single}"
    many = work / f"many-{groups}x{each + 1}"
    if not one.exists():
        write_run(one, single - 1)
    if not many.exists():
        many.mkdir(parents=True)
        for run in range(groups):
            write_run(many / f"run-{run:04d}", each)
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    policy = work / "keep-all.yaml"
    policy.write_text(KEEP_ALL_POLICY)
    return Trees(one, many, empty, policy, f"1 x {single:,}", f"{groups:,} x {each + 1}")


def floor(tree: Path) -> float:
    """Seconds of the floor script on ``tree``, run once before untimed: the rows that follow find the
    tree in the page cache, so the floor must too (this machine's proactive reclaim, DAMON, drops pages
    left alone for a few minutes, and a cold floor of 1.5 to 14 s made every ratio look better)."""
    run_measured([PYTHON, "-c", FLOOR_SCRIPT, str(tree)])
    measured = run_measured([PYTHON, "-c", FLOOR_SCRIPT, str(tree)])
    if measured.returncode != 0:
        raise RuntimeError(f"the floor script failed on {tree}")
    return measured.seconds


def prune(python: str, tree: Path, *options: str) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one ``prune TREE --dry-run [options]``."""
    measured = run_measured([python, "-m", "ckpt_watcher", "prune", str(tree), "--dry-run", *options])
    if measured.returncode != 0:
        raise RuntimeError(f"prune {tree} {options} exited {measured.returncode}")
    return measured.seconds, measured.max_rss_kb / 1024


def watch_start(python: str, tree: Path, policy: Path, log: Path) -> tuple[float, float, int]:
    """Seconds from spawn to READY=1 (the start-up reconcile done), RSS (MB) then, info lines logged
    about single checkpoints (``checkpoint_detected``)."""
    with running_daemon(
        tree, ["--policy", str(policy)], log, command=(python, "-m", "ckpt_watcher")
    ) as daemon:
        seconds = daemon.wait_ready(timeout=600)
        time.sleep(1.0)  # the observer's set-up after READY settles
        rss = status_value(daemon.pid, "VmRSS") / 1024
    detected = sum(b'"checkpoint_detected"' in line for line in log.read_bytes().splitlines())
    return seconds, rss, detected


def watch_poll(python: str, tree: Path, policy: Path, log: Path, cycles: int) -> tuple[float, float]:
    """``watch --poll 15``: CPU seconds per polling cycle, the average over whole cycles after start-up,
    and the peak RSS (MB, VmHWM) at the end.

    The window runs from the end of one poll that can be seen (>= 2 clock ticks) to the end of the
    first seen poll that ends at least ``cycles`` x 15 s later, and is divided by the cycles it spans
    (its length over 15 s, rounded). A version that lists every directory at every poll shows every
    poll; one that skips unchanged directories shows only its full listings (at least once a minute,
    LeanTree), so the window spans whole periods of skipped polls and the full listing that ends
    them. If no poll at all can be seen, the window is ``cycles`` x 15 s of time."""
    options = ["--policy", str(policy), "--poll", f"{POLL_SECONDS:g}"]
    with running_daemon(tree, options, log, command=(python, "-m", "ckpt_watcher")) as daemon:
        daemon.wait_ready(timeout=600)
        time.sleep(WARM_UP_POLLS * POLL_SECONDS + 5.0)
        seen = _after_next_poll(daemon.pid, within=6 * POLL_SECONDS)
        if seen is None:  # no poll costs enough to be seen
            before = cpu_ticks(daemon.pid)
            time.sleep(cycles * POLL_SECONDS)
            after, spanned = cpu_ticks(daemon.pid), cycles
        else:
            before = after = seen
            started = time.monotonic()
            while time.monotonic() - started < cycles * POLL_SECONDS:  # the end of a seen poll after it
                seen = _after_next_poll(daemon.pid, within=6 * POLL_SECONDS)
                if seen is None:
                    raise RuntimeError("a poll was seen, then none for six intervals")
                after = seen
            spanned = max(1, round((time.monotonic() - started) / POLL_SECONDS))
        used = (after - before) / CLOCK_TICKS
        peak = status_value(daemon.pid, "VmHWM") / 1024
    return used / spanned, peak


def _after_next_poll(pid: int, within: float = 2 * POLL_SECONDS) -> int | None:
    """Wait for the daemon's next poll to end; its CPU (clock ticks) then. A poll is the CPU climbing by
    at least 2 ticks in 0.1 s (an idle daemon uses far less); it has ended once the CPU has stayed
    flat for 0.5 s. None: no poll seen within ``within`` seconds (each costs less than 2 ticks)."""
    deadline = time.monotonic() + within
    last, busy, quiet_since = cpu_ticks(pid), False, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_ticks(pid)
        if now - last >= 2:
            busy, quiet_since = True, time.monotonic()
        elif now != last:
            quiet_since = time.monotonic()
        elif busy and time.monotonic() - quiet_since >= 0.5:
            return now
        last = now
    return None


START_UP_SAMPLES = 5


def start_up(python: str, empty: Path) -> tuple[float, float]:
    """``prune EMPTY --dry-run`` and the import floor, in seconds: the median of ``START_UP_SAMPLES``
    of each, taken in turns (one sample of ~0.15 s varied by a third from run to run)."""
    commands, imports = [], []
    command = [python, "-m", "ckpt_watcher", "prune", str(empty), "--dry-run"]
    for _ in range(START_UP_SAMPLES):
        commands.append(run_measured(command).seconds)
        imports.append(run_measured([python, "-c", IMPORT_FLOOR]).seconds)
    return statistics.median(commands), statistics.median(imports)


def one_run(python: str, given: Trees, work: Path, poll_cycles: int) -> dict[str, float]:
    """Every figure once; each ratio against the floor measured just before it."""
    figures: dict[str, float] = {}
    # The package's .pyc files, as an installed package has them: where PYTHONDONTWRITEBYTECODE is set,
    # running it would not write them, and every run below would compile its modules again (~50 ms).
    run_measured([python, "-c", COMPILE_PACKAGE])
    run_measured([python, "-m", "ckpt_watcher", "prune", str(given.empty), "--dry-run"])  # page cache
    floor_one, floor_many = floor(given.one), floor(given.many)
    figures.update(floor_one=floor_one, floor_many=floor_many)
    seconds, rss = prune(python, given.one, "--json")
    figures.update(json_one=seconds, json_one_mb=rss, json_one_ratio=seconds / floor_one)
    seconds, rss = prune(python, given.many, "--json")
    figures.update(json_many=seconds, json_many_mb=rss, json_many_ratio=seconds / floor_many)
    seconds, rss = prune(python, given.one)
    figures.update(table_one=seconds, table_one_mb=rss, table_one_ratio=seconds / floor_one)
    seconds, rss, detected = watch_start(python, given.many, given.policy, work / "watch-many.log")
    figures.update(watch_many=seconds, watch_many_ratio=seconds / floor_many, watch_many_mb=rss)
    figures.update(watch_many_detected=detected)
    _, rss, _ = watch_start(python, given.one, given.policy, work / "watch-one.log")
    figures.update(watch_one_mb=rss)
    if poll_cycles:
        cpu, peak = watch_poll(python, given.one, given.policy, work / "poll-one.log", poll_cycles)
        figures.update(poll_cpu=cpu, poll_mb=peak)
    command, imports = start_up(python, given.empty)
    figures.update(empty=command, imports=imports, empty_ratio=command / imports)
    return figures


def event_latencies(python: str, tree: Path, work: Path, events: int) -> list[float]:
    """Event -> deletion: in a hard-linked copy of ``tree``, under a policy that keeps exactly the step
    checkpoints each group has, each new step checkpoint written into one group deletes its oldest one;
    seconds from the writer's close to the daemon's ``checkpoint_deleted`` timestamp, per event."""
    copy = linked_copy(tree, work / f"latency-{tree.name}")
    group = min((path for path in copy.iterdir() if path.is_dir()), default=copy)
    steps = sorted(path.name for path in group.iterdir() if path.name.endswith("-train.ckpt"))
    policy = work / f"latency-{tree.name}.yaml"
    policy.write_text(f"save_top_k_checkpoints: {len(steps)}\nsave_top_k_best: -1\n")
    step = int(steps[-1].split("step=")[1][:6])
    latencies = []
    command = (python, "-m", "ckpt_watcher")
    with running_daemon(
        copy, ["--policy", str(policy)], work / f"latency-{tree.name}.log", command=command
    ) as daemon:
        daemon.wait_ready(timeout=600)
        time.sleep(2.0)
        for event in range(events):
            step += 10
            written_at = write_checkpoint(group / step_name(0, step))
            deleted = daemon.wait_for_deletions(event + 1, timeout=60)
            if len(deleted) <= event:
                raise RuntimeError(f"no deletion for event {event} in {copy}")
            latencies.append(parse_timestamp(deleted[event]["timestamp"]) - written_at)
            time.sleep(0.2)
    return latencies


def latency_figures(python: str, small: Path, many: Path, work: Path, events: int) -> dict[str, float]:
    """p50, p99 and max on the small tree and the G x M tree, and the ratio of the p99s."""
    figures: dict[str, float] = {}
    for label, tree in (("small", small), ("many", many)):
        values = event_latencies(python, tree, work, events)
        figures.update(
            {
                f"latency_{label}_p50": percentile(values, 0.5),
                f"latency_{label}_p99": percentile(values, 0.99),
            }
        )
        figures[f"latency_{label}_max"] = max(values)
    figures["latency_ratio"] = figures["latency_many_p99"] / figures["latency_small_p99"]
    return figures


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: median([run[key] for run in runs if key in run]) for key in runs[0]}


ROWS = (  # (row, figure keys shown, target text, met(figures))
    ("`prune --dry-run --json`, 1 directory", ("json_one_ratio", "json_one_mb"), "≤ 3x floor, ≤ 100 MB"),
    (
        "`prune --dry-run --json`, G x M directories",
        ("json_many_ratio", "json_many_mb"),
        "≤ 3x floor, ≤ 100 MB",
    ),
    ("`prune --dry-run` (table), 1 directory", ("table_one_ratio", "table_one_mb"), "≤ 3x floor, ≤ 100 MB"),
    (
        "`watch` start-up reconcile, G x M",
        ("watch_many_ratio", "watch_many_detected"),
        "≤ 3x floor, 0 info lines per file",
    ),
    ("`watch` RSS after start-up, G x M / 1 x N", ("watch_many_mb", "watch_one_mb"), "≤ 80 MB both"),
    ("`watch --poll 15`, 1 x N: peak RSS, CPU per cycle", ("poll_mb", "poll_cpu"), "≤ 100 MB, ≤ 0.3 s"),
    ("`prune` on an empty directory / the imports", ("empty_ratio",), "≤ 1.25x"),
)


def met(figures: dict[str, float]) -> dict[str, bool | None]:
    """Each row's verdict on these figures (None: not measured)."""

    def has(*keys: str) -> bool:
        return all(key in figures for key in keys)

    return {
        ROWS[0][0]: figures["json_one_ratio"] <= 3 and figures["json_one_mb"] <= 100,
        ROWS[1][0]: figures["json_many_ratio"] <= 3 and figures["json_many_mb"] <= 100,
        ROWS[2][0]: figures["table_one_ratio"] <= 3 and figures["table_one_mb"] <= 100,
        ROWS[3][0]: figures["watch_many_ratio"] <= 3 and figures["watch_many_detected"] == 0,
        ROWS[4][0]: figures["watch_many_mb"] <= 80 and figures["watch_one_mb"] <= 80,
        ROWS[5][0]: (figures["poll_mb"] <= 100 and figures["poll_cpu"] <= 0.3) if has("poll_mb") else None,
        ROWS[6][0]: figures["empty_ratio"] <= 1.25,
    }


def shown(key: str, value: float) -> str:
    if key.endswith("_ratio"):
        return f"{value:.2f}x"
    if key.endswith("_mb"):
        return f"{value:.0f} MB"
    if key == "poll_cpu":
        return f"{value:.2f} s CPU"
    if key.endswith("_detected"):
        return f"{value:,.0f} detection lines"
    return f"{value:.3g}"


def measure(config: Config) -> Section:
    """Section 10 of run.py: the current interpreter, ``config.repeats`` runs (smoke: tiny trees)."""
    section = Section("10. 100,000 checkpoints against the floor")
    size = "smoke" if config.preset == "smoke" else "large"
    given = trees(config.work_dir / "hundred-k", size)
    cycles = 0 if config.preset == "smoke" else 2
    runs = []
    working_directory = Path.cwd()
    os.chdir(config.work_dir)  # `python -m` in the children imports from their working directory
    try:
        for repeat in range(config.repeats):
            config.log(f"hundred_k: run {repeat + 1}/{config.repeats} ({size})")
            runs.append(one_run(PYTHON, given, config.work_dir, cycles))
    finally:
        os.chdir(working_directory)
    figures = medians(runs)
    verdicts = met(figures)
    rows = []
    for name, keys, goal in ROWS:
        row = name.replace("G x M", given.label_many).replace("1 x N", given.label_one)
        measured = ", ".join(shown(key, figures[key]) for key in keys if key in figures) or "not measured"
        rows.append([row, measured, goal])
        section.targets.append(Target(row, goal, measured, verdicts[name]))
    section.body.append(
        f"Median of {config.repeats} runs; each ratio is against the floor (scandir + the last 22 bytes of "
        f"each file, a stdlib script) timed in the same run: {figures['floor_one']:.2f} s on "
        f"{given.label_one}, {figures['floor_many']:.2f} s on {given.label_many}. See `bench/hundred_k.py`."
    )
    section.body.append(markdown_table(["row", "measured", "target"], rows))
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=PYTHON, help="the interpreter whose ckpt-watcher is measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll-cycles", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ckpt-watcher-bench/hundred-k"))
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument(
        "--latency-events", type=int, default=0, help="only the event -> deletion row, with this many events"
    )
    arguments = parser.parse_args()
    arguments.work_dir.mkdir(parents=True, exist_ok=True)
    # Children inherit the working directory, and `python -m` imports from it first: from a checkout,
    # --python would run that checkout's ckpt_watcher, not its own.
    os.chdir(arguments.work_dir)
    given = trees(arguments.work_dir, arguments.size)
    if arguments.latency_events:
        small = arguments.work_dir / "small-100"
        if not small.exists():
            write_run(small, 99)
            an_hour_ago = time.time() - 3600  # settled long ago, as the generated trees are
            for path in small.iterdir():
                os.utime(path, (an_hour_ago, an_hour_ago))
        figures = latency_figures(
            arguments.python, small, given.many, arguments.work_dir, arguments.latency_events
        )
        print(json.dumps(figures))
        return 0
    runs = []
    for _ in range(arguments.repeats):
        runs.append(one_run(arguments.python, given, arguments.work_dir, arguments.poll_cycles))
        print(json.dumps(runs[-1]), flush=True)
    figures = medians(runs)
    print(json.dumps({"median_of": len(runs), **figures}))
    for name, verdict in met(figures).items():
        print(f"{name}: {'met' if verdict else 'not measured' if verdict is None else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
