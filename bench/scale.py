"""1. One-shot scale: ``ckpt-watcher prune PATH --dry-run`` on generated run directories of growing size."""

from __future__ import annotations

from benchlib import (
    DAEMON,
    DATASET_DESCRIPTION,
    Config,
    Measured,
    Section,
    Target,
    dataset,
    fresh_directory,
    markdown_table,
    median,
    megabytes,
    run_measured,
    seconds_text,
)


def measure(config: Config) -> Section:
    section = Section("1. One-shot scale: `prune --dry-run`")
    empty = fresh_directory(config.work_dir / "empty-run")
    rows = []
    results: dict[int, tuple[float, float]] = {}
    previous: tuple[int, float] | None = None
    for count in [0, *config.sizes]:
        directory = empty if count == 0 else dataset(config, count)
        arguments = [*DAEMON, "prune", str(directory), "--dry-run"]
        run_measured(arguments)  # warm-up: page cache and .pyc files, not counted
        runs: list[Measured] = []
        for repeat in range(config.repeats):
            config.log(f"scale: prune --dry-run on {count:,} checkpoints, run {repeat + 1}/{config.repeats}")
            measured = run_measured(arguments)
            if measured.returncode != 0:
                raise RuntimeError(f"prune --dry-run exited {measured.returncode} on {directory}")
            runs.append(measured)
        wall = median([run.seconds for run in runs])
        cpu = median([run.user_seconds + run.system_seconds for run in runs])
        rss = median([float(run.max_rss_kb) for run in runs])
        results[count] = (wall, rss)
        per_checkpoint = f"{wall / count * 1e6:.1f} µs" if count else ""
        marginal = ""
        if previous is not None and count > previous[0]:
            marginal = f"{(wall - previous[1]) / (count - previous[0]) * 1e6:.1f} µs"
        rows.append(
            [
                f"{count:,}" if count else "0 (start-up only)",
                seconds_text(wall),
                f"{seconds_text(min(run.seconds for run in runs))} to "
                f"{seconds_text(max(run.seconds for run in runs))}",
                seconds_text(cpu),
                megabytes(rss),
                per_checkpoint,
                marginal,
            ]
        )
        previous = (count, wall)
    section.body.append(
        f"`python -m ckpt_watcher prune RUN --dry-run` (embedded default policy, stdout to `/dev/null`) as a "
        f"child process; wall time from spawn to exit, peak RSS from `wait4` (the child's `ru_maxrss`). "
        f"Median of {config.repeats} runs after one warm-up run (warm page cache). Run directories: "
        f"{DATASET_DESCRIPTION}. *µs/checkpoint* is wall time / checkpoints (start-up included); "
        f"*marginal* is "
        f"the extra time per extra checkpoint against the row above, which shows the shape of the cost curve."
    )
    section.body.append(
        markdown_table(
            [
                "checkpoints",
                "wall (median)",
                "wall (min to max)",
                "CPU (user+sys)",
                "peak RSS",
                "µs/checkpoint",
                "marginal µs/checkpoint",
            ],
            rows,
        )
    )
    for count, limit in ((10_000, 0.5), (100_000, 5.0)):
        if count in results:
            wall = results[count][0]
            section.targets.append(
                Target(f"dry-run, {count:,} checkpoints", f"< {limit:g} s", seconds_text(wall), wall < limit)
            )
            section.headline[f"dry-run {count:,}"] = seconds_text(wall)
        else:
            section.targets.append(Target(f"dry-run, {count:,} checkpoints", f"< {limit:g} s", "", None))
    if 100_000 in results:
        rss = results[100_000][1]
        section.targets.append(
            Target("peak RSS, dry-run of 100,000", "< 150 MB", megabytes(rss), rss * 1024 / 1e6 < 150)
        )
        section.headline["peak RSS 100,000"] = megabytes(rss)
    else:
        section.targets.append(Target("peak RSS, dry-run of 100,000", "< 150 MB", "", None))
    return section
