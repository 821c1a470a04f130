"""Run the ckpt-watcher benchmarks and write their tables to BENCHMARKS.md.

    python bench/run.py                 # the full run (~15 min on 2 cores): writes BENCHMARKS.md
    python bench/run.py --quick         # smaller sizes and shorter windows (~4 min)
    python bench/run.py --smoke --output /tmp/b.md   # seconds: keeps the scripts working (CI)
    python bench/run.py --only scale,baseline --sizes 1000,10000

Prints the markdown on stdout and writes it to --output (default: BENCHMARKS.md in the repository for
a full run, WORK_DIR/BENCHMARKS-PRESET.md otherwise, so a quick run never overwrites the real figures).
Generated run directories are cached in --work-dir and reused by later runs.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import baseline
import bucket
import footprint
import hundred_k
import interference
import latency
import probes
import scale
import space
import stop
import trash
from benchlib import REPOSITORY, Config, Section, machine_description, markdown_table

SECTIONS: dict[str, Callable[[Config], Section]] = {
    "scale": scale.measure,
    "latency": latency.measure,
    "footprint": footprint.measure,
    "interference": interference.measure,
    "baseline": baseline.measure,
    "probes": probes.measure,
    "space": space.measure,
    "trash": trash.measure,
    "bucket": bucket.measure,
    "hundred_k": hundred_k.measure,
    "stop": stop.measure,
}

PRESETS: dict[str, dict[str, object]] = {
    "full": {
        "sizes": [1_000, 10_000, 100_000],
        "repeats": 5,
        "latency_events": 300,
        "settle_events": 30,
        "burst": 1_000,
        "rest_size": 10_000,
        "rest_seconds": 60.0,
        "train_steps": 8_000,
        "train_warmup": 50,
        "train_repeats": 5,
        "space_trials": 30,
        "trash_sizes": [4 << 10, 256 << 20, 4 << 30],
        "trash_files": 2_000,
    },
    "quick": {
        "sizes": [1_000, 10_000],
        "repeats": 3,
        "latency_events": 100,
        "settle_events": 10,
        "burst": 1_000,
        "rest_size": 10_000,
        "rest_seconds": 15.0,
        "train_steps": 4_000,
        "train_warmup": 50,
        "train_repeats": 3,
        "space_trials": 10,
        "trash_sizes": [4 << 10, 256 << 20, 1 << 30],
        "trash_files": 1_000,
        "bucket_objects": 2_000,
    },
    "smoke": {
        "sizes": [100, 300],
        "repeats": 1,
        "latency_events": 6,
        "settle_events": 0,
        "burst": 40,
        "rest_size": 300,
        "rest_seconds": 1.0,
        "train_steps": 40,
        "train_warmup": 10,
        "train_repeats": 1,
        "space_trials": 2,
        "trash_sizes": [4 << 10, 8 << 20],
        "trash_files": 50,
        "bucket_objects": 300,
    },
}

ANALYSIS = Path(__file__).resolve().parent / "analysis.md"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="smaller sizes, shorter windows")
    preset.add_argument("--smoke", action="store_true", help="tiny sizes: checks the scripts work (seconds)")
    parser.add_argument("--only", help=f"comma-separated sections to run (of {', '.join(SECTIONS)})")
    parser.add_argument(
        "--sizes", help="checkpoint counts of the one-shot and baseline runs, e.g. 1000,10000"
    )
    parser.add_argument("--repeats", type=int, help="runs per timing (the median is reported)")
    parser.add_argument("--latency-events", type=int, help="events per latency mode")
    parser.add_argument(
        "--settle-events", type=int, help="events of the slow latency modes (settle time); 0 skips them"
    )
    parser.add_argument("--burst", type=int, help="checkpoints written in the one-second burst")
    parser.add_argument("--rest-size", type=int, help="checkpoints in the at-rest directory")
    parser.add_argument("--rest-seconds", type=float, help="at-rest measurement window")
    parser.add_argument("--train-steps", type=int, help="training steps per interference run")
    parser.add_argument("--train-repeats", type=int, help="pairs of interference runs")
    parser.add_argument("--space-trials", type=int, help="growing checkpoints per space-pressure mode")
    parser.add_argument("--bucket-objects", type=int, help="objects in the bucket benchmark's prefix")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/ckpt-watcher-bench"),
        help="where run directories are generated (cached) and runs happen (default: %(default)s)",
    )
    parser.add_argument("--output", type=Path, help="markdown file to write")
    return parser.parse_args(argv)


def build_config(arguments: argparse.Namespace) -> Config:
    preset = "smoke" if arguments.smoke else "quick" if arguments.quick else "full"
    values = dict(PRESETS[preset])
    if arguments.sizes:
        values["sizes"] = [
            int(size.replace("_", "").replace(",", "")) for size in arguments.sizes.split(",") if size
        ]
    overrides = {
        "repeats": arguments.repeats,
        "latency_events": arguments.latency_events,
        "settle_events": arguments.settle_events,
        "burst": arguments.burst,
        "rest_size": arguments.rest_size,
        "rest_seconds": arguments.rest_seconds,
        "train_steps": arguments.train_steps,
        "train_repeats": arguments.train_repeats,
        "space_trials": arguments.space_trials,
        "bucket_objects": arguments.bucket_objects,
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    work_dir = arguments.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    return Config(preset=preset, work_dir=work_dir, **values)  # type: ignore[arg-type]


def render(
    config: Config,
    sections: list[Section],
    command: str,
    started: datetime.datetime,
    seconds: float,
    load: str,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `bench/run.py` ({config.preset} run) on {started:%Y-%m-%d %H:%M} UTC, in "
        f"{seconds / 60:.1f} min:",
        "",
        "```sh",
        command,
        "```",
        "",
        "Timings are medians of several runs; every comparison is a ratio of figures measured in the same "
        "run. "
        "The daemon always runs as a real child process (`python -m ckpt_watcher ...`). Reproduce with the "
        'command above from a clone with `pip install -e ".[test]"` (see the README\'s *Benchmarks*).',
        "",
        "## Machine",
        "",
        markdown_table(["", ""], [*machine_description(config.work_dir), ("load average", load)]),
        "",
        "## Targets",
        "",
        "Targets of the issue, on this machine.",
        "",
        markdown_table(
            ["target", "goal", "measured", "verdict"],
            [
                [target.name, target.goal, target.measured, target.verdict]
                for section in sections
                for target in section.targets
            ],
        ),
        "",
    ]
    for section in sections:
        lines.extend([section.markdown(), ""])
    if config.preset == "full" and ANALYSIS.exists():
        lines.extend([ANALYSIS.read_text().strip(), ""])
    return "\n".join(lines)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine skews the figures)."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    config = build_config(arguments)
    names = list(SECTIONS) if not arguments.only else [name.strip() for name in arguments.only.split(",")]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    output = arguments.output
    if output is None:
        output = (
            REPOSITORY / "BENCHMARKS.md"
            if config.preset == "full" and not arguments.only
            else (config.work_dir / f"BENCHMARKS-{config.preset}.md")
        )
    shown = [
        part
        for index, part in enumerate(argv)
        if part != "--output" and argv[index - 1 : index] != ["--output"]
    ]
    command = "python bench/run.py" + "".join(f" {shlex.quote(part)}" for part in shown if part)
    started = datetime.datetime.now(datetime.UTC)
    load_at_start = load_average()
    clock = time.monotonic()
    config.log(f"{config.preset} run of {', '.join(names)}; work directory {config.work_dir}")
    sections = []
    for name in names:
        section_started = time.monotonic()
        sections.append(SECTIONS[name](config))
        config.log(f"{name} done in {time.monotonic() - section_started:.0f} s")
    load = f"{load_at_start} at the start, {load_average()} at the end (1, 5, 15 min)"
    text = render(config, sections, command, started, time.monotonic() - clock, load)
    output.write_text(text)
    print(text)
    config.log(f"wrote {output}")
    headline = {key: value for section in sections for key, value in section.headline.items()}
    for key, value in headline.items():
        config.log(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
