"""3. Footprint at rest: start-up time to READY=1, then CPU and memory of an idle ``watch``; and a check
that neither ``watch`` nor ``prune`` imports torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    CLOCK_TICKS,
    PYTHON,
    Config,
    Section,
    Target,
    cpu_ticks,
    dataset,
    fresh_directory,
    linked_copy,
    markdown_table,
    median,
    megabytes,
    run_measured,
    running_daemon,
    seconds_text,
    status_value,
    step_name,
    write_checkpoint,
    write_policy,
)

# Runs ckpt_watcher's own entry point, then records which modules the process ended up with.
PROBE = (
    "import json, sys\n"
    "from ckpt_watcher.cli import main\n"
    "code = main(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(json.dumps(sorted(sys.modules)))\n"
    "sys.exit(code)\n"
)


@dataclass
class Mode:
    label: str
    options: list[str]


INOTIFY = Mode("inotify", [])
POLL_DEFAULT = Mode("`--poll` (5 s)", ["--poll"])
POLL_ONE = Mode("`--poll 1`", ["--poll", "1"])


@dataclass
class Rest:
    mode: str
    seconds: float
    cpu_percent: float
    rss_kb: int
    rss_max_kb: int
    hwm_kb: int
    threads: int


def startup(config: Config, root: Path, policy: Path, mode: Mode) -> tuple[list[float], list[int]]:
    """Seconds from spawn to READY=1 (the start-up reconcile of the whole directory is done by then)."""
    times: list[float] = []
    peaks: list[int] = []
    for repeat in range(config.repeats):
        config.log(f"footprint: start-up of watch ({mode.label}), run {repeat + 1}/{config.repeats}")
        log = config.work_dir / "footprint" / f"startup-{repeat}.log"
        with running_daemon(root, ["--policy", str(policy), *mode.options], log) as daemon:
            times.append(daemon.wait_ready())
            peaks.append(status_value(daemon.pid, "VmHWM"))
    return times, peaks


def at_rest(config: Config, root: Path, policy: Path, mode: Mode) -> Rest:
    """CPU% (utime+stime ticks over the window) and RSS of an idle daemon after start-up."""
    config.log(f"footprint: {mode.label} at rest for {config.rest_seconds:g} s")
    log = config.work_dir / "footprint" / "rest.log"
    with running_daemon(root, ["--policy", str(policy), *mode.options], log) as daemon:
        daemon.wait_ready()
        time.sleep(min(5.0, config.rest_seconds))  # past the start-up pass and the first poll
        pid = daemon.pid
        ticks = cpu_ticks(pid)
        started = time.monotonic()
        rss_max = 0
        deadline = started + config.rest_seconds
        while time.monotonic() < deadline:
            rss_max = max(rss_max, status_value(pid, "VmRSS"))
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        elapsed = time.monotonic() - started
        used = (cpu_ticks(pid) - ticks) / CLOCK_TICKS
        rss = status_value(pid, "VmRSS")
        result = Rest(
            mode.label,
            elapsed,
            used / elapsed * 100,
            rss,
            max(rss_max, rss),
            status_value(pid, "VmHWM"),
            status_value(pid, "Threads"),
        )
        deleted = daemon.events("checkpoint_deleted")
        if deleted:
            raise RuntimeError(f"the keep-all daemon deleted {len(deleted)} files")
    return result


def torch_check(config: Config) -> list[list[str]]:
    """Run ``prune`` and ``watch`` (with a deletion) through cli.main; is torch in sys.modules?"""
    config.log("footprint: is torch imported by prune and watch?")
    base = fresh_directory(config.work_dir / "torch-check")
    root = base / "run"
    root.mkdir()
    for index in range(8):
        write_checkpoint(root / step_name(0, (index + 1) * 10))
    policy = write_policy(base / "policy.yaml", save_top_k_checkpoints=5)
    rows = []
    prune_modules = base / "prune-modules.json"
    measured = run_measured(
        [PYTHON, "-c", PROBE, str(prune_modules), "prune", str(root), "--policy", str(policy), "--dry-run"]
    )
    if measured.returncode != 0:
        raise RuntimeError(f"prune probe exited {measured.returncode}")
    rows.append(_modules_row("`prune --dry-run`", prune_modules))
    rows.append(_modules_row("`prune` (deleting)", _probe_prune(base, root, policy)))
    watch_modules = base / "watch-modules.json"
    command = (PYTHON, "-c", PROBE, str(watch_modules))
    with running_daemon(root, ["--policy", str(policy)], base / "watch.log", command=command) as daemon:
        daemon.wait_ready()
        write_checkpoint(root / step_name(0, 1000))
        daemon.wait_for_deletions(1, timeout=30)
        daemon.stop()
    rows.append(_modules_row("`watch` (start-up, an event, a deletion, SIGTERM)", watch_modules))
    return rows


def _probe_prune(base: Path, root: Path, policy: Path) -> Path:
    modules = base / "prune-delete-modules.json"
    measured = run_measured([PYTHON, "-c", PROBE, str(modules), "prune", str(root), "--policy", str(policy)])
    if measured.returncode != 0:
        raise RuntimeError(f"prune probe exited {measured.returncode}")
    return modules


def _modules_row(label: str, path: Path) -> list[str]:
    modules: list[str] = json.loads(path.read_text())
    heavy = [name for name in ("torch", "numpy", "pytorch_lightning", "lightning_fabric") if name in modules]
    torch_loaded = any(name == "torch" or name.startswith("torch.") for name in modules)
    return [label, "**yes**" if torch_loaded else "no", ", ".join(heavy) or "none", f"{len(modules)}"]


def measure(config: Config) -> Section:
    section = Section("3. Footprint at rest")
    source = dataset(config, config.rest_size)
    root = linked_copy(source, config.work_dir / "footprint" / "run")
    policy = write_policy(
        config.work_dir / "footprint" / "keep-all.yaml", save_top_k_checkpoints=-1, save_top_k_best=-1
    )
    startup_rows = []
    startup_medians: dict[str, float] = {}
    for mode in (INOTIFY, POLL_DEFAULT):
        times, peaks = startup(config, root, policy, mode)
        startup_medians[mode.label] = median(times)
        startup_rows.append(
            [
                mode.label,
                seconds_text(median(times)),
                f"{seconds_text(min(times))} to {seconds_text(max(times))}",
                megabytes(median(peaks)),
            ]
        )
    rests = [at_rest(config, root, policy, mode) for mode in (INOTIFY, POLL_DEFAULT, POLL_ONE)]
    torch_rows = torch_check(config)

    section.body.append(
        f"`python -m ckpt_watcher watch RUN --policy keep-all.yaml` as a child process on a run directory of "
        f"{config.rest_size:,} checkpoints (plus `last.ckpt`; a hard-linked copy of the one-shot benchmark's "
        f"directory) with a policy that keeps everything (`save_top_k_checkpoints: -1`, "
        f"`save_top_k_best: -1`), "
        f"so the directory stays at {config.rest_size:,} and nothing changes. Start-up: from spawn to the "
        f"`READY=1` datagram on a `NOTIFY_SOCKET` of the benchmark's own (sent after the start-up reconcile "
        f"has scanned and planned every file), median of {config.repeats}."
    )
    section.body.append(
        markdown_table(
            ["observer", "spawn → READY=1 (median)", "min to max", "peak RSS at READY (VmHWM)"], startup_rows
        )
    )
    section.body.append(
        f"At rest: after READY=1 and 5 s more, CPU = (utime + stime of all the daemon's threads, from "
        f"`/proc/PID/stat`) / wall time over {config.rest_seconds:g} s with no file activity; RSS from "
        f"`/proc/PID/status` (VmRSS sampled every second, VmHWM is the peak since spawn, i.e. the start-up "
        f"reconcile). The inotify daemon wakes once a second (root check, policy check) and rescans every "
        f"300 s (not within the window); a polling daemon lists and stats the whole tree every interval."
    )
    section.body.append(
        markdown_table(
            [
                "observer",
                "window",
                "CPU",
                "RSS (end)",
                "RSS (max sampled)",
                "VmHWM (peak since spawn)",
                "threads",
            ],
            [
                [
                    rest.mode,
                    f"{rest.seconds:.0f} s",
                    f"{rest.cpu_percent:.2f}%",
                    megabytes(rest.rss_kb),
                    megabytes(rest.rss_max_kb),
                    megabytes(rest.hwm_kb),
                    str(rest.threads),
                ]
                for rest in rests
            ],
        )
    )
    section.body.append(
        "Is torch imported? Each command run through `ckpt_watcher.cli.main` in a small wrapper "
        "(`python -c ...`) that writes `sorted(sys.modules)` when `main` returns (for `watch`: after "
        "start-up, one checkpoint event with a deletion, and SIGTERM)."
    )
    section.body.append(
        markdown_table(["command", "torch imported", "heavy modules", "modules loaded"], torch_rows)
    )

    inotify = rests[0]
    full_window = config.rest_seconds >= 60
    section.targets.append(
        Target(
            "at rest, inotify: CPU",
            "< 0.5%",
            f"{inotify.cpu_percent:.2f}% over {inotify.seconds:.0f} s ({config.rest_size:,} checkpoints)",
            inotify.cpu_percent < 0.5 if full_window else None,
        )
    )
    section.targets.append(
        Target(
            "at rest, inotify: RSS",
            "< 60 MB",
            f"{megabytes(inotify.rss_max_kb)} (peak at start-up {megabytes(inotify.hwm_kb)})",
            inotify.rss_max_kb * 1024 / 1e6 < 60,
        )
    )
    no_torch = all(row[1] == "no" for row in torch_rows)
    section.targets.append(
        Target(
            "torch never imported by `watch` or `prune`",
            "not in `sys.modules`",
            "not imported" if no_torch else "imported",
            no_torch,
        )
    )
    section.headline["at rest inotify CPU"] = f"{inotify.cpu_percent:.2f}%"
    section.headline["at rest inotify RSS"] = megabytes(inotify.rss_max_kb)
    section.headline["start-up to READY"] = seconds_text(startup_medians[INOTIFY.label])
    return section
