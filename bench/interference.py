"""4. Interference: steps per second of a tiny Lightning training that checkpoints every step, alone,
with the daemon pruning beside it, and, as a control, with a minimal deleter doing the same deletions.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    CLOCK_TICKS,
    PYTHON,
    REPOSITORY,
    Config,
    Section,
    Target,
    cpu_ticks,
    fresh_directory,
    markdown_table,
    median,
    running_daemon,
    write_policy,
)

TRAINING = REPOSITORY / "bench" / "train_steps.py"
ALONE, DAEMON, DELETER = "alone", "with daemon", "with minimal deleter"
ARMS = (ALONE, DAEMON, DELETER)

# The control: the same deletions with next to no CPU and no scanning, parsing or logging. Every
# 0.25 s (the daemon's longest batching delay) it lists the directory and unlinks every step checkpoint
# but the newest 5 by step number. Runs until killed.
MINIMAL_DELETER = """
import os, re, sys, time
directory = sys.argv[1]
step = re.compile(r"epoch=[0-9]+-step=([0-9]+)-train[.]ckpt")
while True:
    found = sorted((int(m.group(1)), name) for name in os.listdir(directory) if (m := step.fullmatch(name)))
    for _, name in found[:-5]:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    time.sleep(0.25)
"""


@dataclass
class Run:
    arm: str
    steps_per_second: float
    checkpoints_left: int
    deleted: int
    helper_cpu_seconds: float


def train(config: Config, directory: Path, result: Path) -> dict[str, float]:
    completed = subprocess.run(
        [
            PYTHON,
            str(TRAINING),
            str(directory),
            "--steps",
            str(config.train_steps),
            "--warmup",
            str(config.train_warmup),
            "--result",
            str(result),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"training failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    data: dict[str, float] = json.loads(result.read_text())
    return data


def one_run(config: Config, index: int, arm: str) -> Run:
    base = fresh_directory(config.work_dir / "interference" / f"run-{index}")
    directory = base / "checkpoints"
    directory.mkdir()
    result = base / "result.json"
    config.log(f"interference: run {index + 1}, {arm}")
    os.sync()  # the previous run's files are written back now, not during this run
    time.sleep(0.0 if config.preset == "smoke" else 1.0)
    if arm == ALONE:
        data = train(config, directory, result)
        return Run(arm, data["steps_per_second"], int(data["checkpoints_left"]), 0, 0.0)
    if arm == DELETER:
        helper = subprocess.Popen([PYTHON, "-c", MINIMAL_DELETER, str(directory)])
        try:
            ticks = cpu_ticks(helper.pid)
            data = train(config, directory, result)
            used = (cpu_ticks(helper.pid) - ticks) / CLOCK_TICKS
        finally:
            helper.terminate()
            helper.wait(timeout=10)
        deleted = config.train_steps - len(list(directory.glob("*.ckpt")))
        return Run(arm, data["steps_per_second"], int(data["checkpoints_left"]), deleted, used)
    policy = write_policy(base / "policy.yaml", save_top_k_checkpoints=5, save_top_k_best=3)
    with running_daemon(directory, ["--policy", str(policy)], base / "daemon.log") as daemon:
        daemon.wait_ready()
        ticks = cpu_ticks(daemon.pid)
        data = train(config, directory, result)
        used = (cpu_ticks(daemon.pid) - ticks) / CLOCK_TICKS
        daemon.stop()
        deleted = len(daemon.events("checkpoint_deleted"))
    return Run(arm, data["steps_per_second"], int(data["checkpoints_left"]), deleted, used)


def measure(config: Config) -> Section:
    section = Section("4. Interference with training")
    runs: list[Run] = []
    triplets: list[dict[str, Run]] = []
    for repeat in range(config.train_repeats):
        order = ARMS[repeat % 3 :] + ARMS[: repeat % 3]  # each arm goes first, second and third in turn
        triplet = {}
        for arm in order:
            run = one_run(config, len(runs), arm)
            runs.append(run)
            triplet[arm] = run
        triplets.append(triplet)
    rates = {arm: median([run.steps_per_second for run in runs if run.arm == arm]) for arm in ARMS}
    ratio = rates[DAEMON] / rates[ALONE]
    control = rates[DELETER] / rates[ALONE]
    daemon_ratios = [t[DAEMON].steps_per_second / t[ALONE].steps_per_second for t in triplets]
    control_ratios = [t[DELETER].steps_per_second / t[ALONE].steps_per_second for t in triplets]
    alone_rates = [run.steps_per_second for run in runs if run.arm == ALONE]
    section.body.append(
        f"`bench/train_steps.py`: PyTorch Lightning fitting a linear regression (batch 8, 1 torch thread) "
        f"with one `ModelCheckpoint(every_n_train_steps=1, save_top_k=-1)` writing default-template step "
        f"checkpoints, {config.train_steps:,} steps, of which the first {config.train_warmup} are not timed; "
        f"steps/s in the steady state as the training itself measures it (interpreter and import time do "
        f"not count). The compute per step is negligible, so checkpoint I/O is most of each step and a new "
        f"checkpoint appears every ~1.2 ms: far more work per second of training for the daemon (one "
        f"deletion per step) than a real run gives it. Three arms: *alone*; *with daemon*: `watch "
        f"CHECKPOINTS --policy P` with the default options (keep the newest 5 step checkpoints), started and "
        f"READY before the training starts; *with minimal deleter*, a control: a Python loop that every "
        f"0.25 s lists the directory and unlinks all but the newest 5 step checkpoints — the same "
        f"deletions without scanning, checking, planning or logging. {config.train_repeats} rounds of the "
        f"three, each arm first, second and third in turn; `sync` and 1 s of quiet before every run."
    )
    rows = [
        [
            str(number + 1),
            run.arm,
            f"{run.steps_per_second:.1f}",
            f"{run.checkpoints_left:,}",
            f"{run.deleted:,}" if run.arm != ALONE else "",
            f"{run.helper_cpu_seconds:.2f} s" if run.arm != ALONE else "",
        ]
        for number, run in enumerate(runs)
    ]
    section.body.append(
        markdown_table(
            ["run", "arm", "steps/s", "checkpoints left", "deleted beside", "CPU of the deleting process"],
            rows,
        )
    )
    section.body.append(
        markdown_table(
            ["", "steps/s (median)", "ratio to alone (medians)", "ratio per round (min to median to max)"],
            [
                [ALONE, f"{rates[ALONE]:.1f}", "", ""],
                [DAEMON, f"{rates[DAEMON]:.1f}", f"**{ratio:.3f}**", _spread(daemon_ratios)],
                [DELETER, f"{rates[DELETER]:.1f}", f"{control:.3f}", _spread(control_ratios)],
            ],
        )
    )
    section.body.append(
        f"Run-to-run spread of *alone* in this run: {min(alone_rates):.1f} to {max(alone_rates):.1f} "
        f"steps/s ({(max(alone_rates) - min(alone_rates)) / median(alone_rates) * 100:.0f}% of the median), "
        f"on a shared 2-vCPU virtual machine: a ratio is only meaningful against that spread and against "
        f"the control's."
    )
    left = median([float(run.checkpoints_left) for run in runs if run.arm == DAEMON])
    if left > 100:
        section.body.append(
            f"The daemon fell behind: {left:,.0f} checkpoints (median) were still there when the training "
            f"ended. Lightning saves through fsspec into a temporary file in `$TMPDIR` and renames it into "
            f"place; if the daemon counts such a file only after the settle time (5 s; see section 2), "
            f"thousands wait in the directory and every pass lists and checks them again."
        )
    else:
        section.body.append(
            f"The daemon kept up: {left:,.0f} checkpoints (median) were left when the training ended "
            f"(written within the last fraction of a second)."
        )
    section.targets.append(
        Target(
            "interference ratio (steps/s with / without)",
            "≥ 0.99",
            f"{ratio:.3f} (control, minimal deleter: {control:.3f})",
            ratio >= 0.99,
        )
    )
    section.headline["interference ratio"] = f"{ratio:.3f} (minimal deleter: {control:.3f})"
    return section


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} to {median(values):.3f} to {max(values):.3f}"
