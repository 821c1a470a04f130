"""What every benchmark shares: configuration, generated run directories, measured child processes,
a ``ckpt-watcher watch`` daemon with a NOTIFY_SOCKET of our own, ``/proc`` readers, statistics and
markdown tables. Standard library only (with the tests' own NotifySocket, which is too), so the scripts run
from a fresh clone with ``.[test]`` installed.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PYTHON = sys.executable
REPOSITORY = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:  # run as `python bench/run.py`: the tests' helpers are importable
    sys.path.append(str(REPOSITORY))

from tests.support.notify_socket import NotifySocket  # noqa: E402  (needs the path above)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DAEMON = (PYTHON, "-m", "ckpt_watcher")

# The run directories: a checkpoint every 10 optimizer steps, 2,000 steps (200 checkpoints) per
# epoch, every 10th checkpoint a "best" one (validation every 100 steps), plus last.ckpt.
STEP_INTERVAL = 10
STEPS_PER_EPOCH = 2000
BEST_EVERY = 10
DATASET_DESCRIPTION = (
    "one directory per size, written by `bench/benchlib.py`: a checkpoint every 10 steps, "
    "9 of 10 step checkpoints (`epoch=EE-step=SSSSSS-train.ckpt`) and 1 of 10 best checkpoints "
    "(`best_20261128_epoch=EE_step=SSSSSS_loss=L.LLLL.ckpt`), 200 checkpoints (2,000 steps) per epoch, "
    "plus `last.ckpt`; each file a small complete zip archive laid out like torch.save's (the default "
    "templates, so every name is parsed and every file's zip structure is checked)"
)


@dataclass
class Config:
    """How big and how long each benchmark is (``--smoke`` / ``--quick`` / full)."""

    preset: str
    work_dir: Path
    sizes: list[int]
    repeats: int
    latency_events: int
    settle_events: int
    burst: int
    rest_size: int
    rest_seconds: float
    train_steps: int
    train_warmup: int
    train_repeats: int
    space_trials: int = 2
    trash_sizes: list[int] = field(default_factory=lambda: [4096, 1 << 20])
    trash_files: int = 50
    bucket_objects: int = 10_000
    seed: int = 20261128

    def log(self, message: str) -> None:
        """Progress on stderr; stdout carries only the markdown."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """One target of the issue: what was asked, what was measured, whether it held."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "not measured"
        return "**met**" if self.met else "**missed**"


@dataclass
class Section:
    """One measurement's markdown (title, prose, tables) and the targets it decides."""

    title: str
    body: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    headline: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        return "\n\n".join([f"## {self.title}", *self.body])


# -- statistics and tables -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``fraction`` in [0, 1]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    numeric = [
        any(row[index] for row in text_rows)
        and all(_looks_numeric(row[index]) for row in text_rows if row[index])
        for index in range(len(headers))
    ]
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---:" if flag else "---" for flag in numeric) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in text_rows)
    return "\n".join(lines)


def _looks_numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("x", "").replace("%", "").replace("*", "").strip()
    for unit in (" ms", " s", " MB", " µs", " KiB", "/s"):
        stripped = stripped.removesuffix(unit)
    try:
        float(stripped.split(" ")[0])
    except ValueError:
        return False
    return True


def seconds_text(value: float) -> str:
    """``0.412 s`` / ``12.3 ms`` as fits."""
    if math.isnan(value):
        return "n/a"
    if value < 1.0:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def milliseconds_text(value: float) -> str:
    """Always in ms, for latency columns."""
    return "n/a" if math.isnan(value) else f"{value * 1000:.1f} ms"


def megabytes(kilobytes: float) -> str:
    """KiB (as /proc and getrusage give them) in MB (10^6 bytes)."""
    return f"{kilobytes * 1024 / 1e6:.1f} MB"


# -- the machine -----------------------------------------------------------------------------------


def machine_description(work_dir: Path) -> list[tuple[str, str]]:
    """CPU, cores, RAM, kernel, Python, the work directory's file system, versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for package in ("ckpt-watcher", "watchdog", "pydantic", "structlog", "torch", "pytorch-lightning"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return [
        ("ckpt-watcher", package_revision()),
        ("CPU", cpu),
        ("cores", f"{os.cpu_count()} logical ({len(os.sched_getaffinity(0))} usable by this process)"),
        ("RAM", memory),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("work directory", f"`{work_dir}` on {filesystem_type(work_dir)}"),
        ("packages", ", ".join(versions)),
    ]


def package_revision() -> str:
    """The git commit of the package measured, and whether ckpt_watcher/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPOSITORY), "log", "-1", "--format=%h (%cd)", "--date=format:%Y-%m-%d %H:%M"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPOSITORY), "status", "--porcelain", "--", "ckpt_watcher"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (", with uncommitted changes in `ckpt_watcher/`" if dirty else "")


def filesystem_type(path: Path) -> str:
    """The type of the file system ``path`` is on, from /proc/mounts (longest mount point that holds it)."""
    resolved = str(path.resolve())
    best = ("", "unknown", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            device, mount_point, kind = parts[0], parts[1].replace("\\040", " "), parts[2]
            inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best[0]):
                best = (mount_point, kind, device)
    except OSError:
        return "unknown"
    return f"{best[1]} (`{best[2]}` mounted at `{best[0]}`)"


# -- checkpoint-like files and generated run directories -------------------------------------------


def checkpoint_bytes(payload: bytes = b"weights") -> bytes:
    """A small complete zip archive laid out like torch.save's (as tests/support/factories.py makes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", payload)
    return buffer.getvalue()


CHECKPOINT = checkpoint_bytes()


def step_name(epoch: int, step: int) -> str:
    """A default-template step checkpoint name."""
    return f"epoch={epoch:02d}-step={step:06d}-train.ckpt"


def best_name(epoch: int, step: int, loss: float) -> str:
    """A default-template best checkpoint name."""
    return f"best_20261128_epoch={epoch:02d}_step={step:06d}_loss={loss:.4f}.ckpt"


def run_names(count: int, seed: int = 7) -> list[str]:
    """The names of a generated run directory of ``count`` checkpoints (not counting last.ckpt)."""
    generator = random.Random(seed)  # noqa: S311  (names, not secrets)
    names = []
    for index in range(count):
        step = (index + 1) * STEP_INTERVAL
        epoch = step // STEPS_PER_EPOCH
        if (index + 1) % BEST_EVERY == 0:
            loss = 2.0 / (1 + step / 5000) + generator.uniform(0, 0.05)  # improving, noisy
            names.append(best_name(epoch, step, loss))
        else:
            names.append(step_name(epoch, step))
    return names


def write_run(directory: Path, count: int) -> None:
    """Write a generated run directory of ``count`` checkpoints plus last.ckpt."""
    directory.mkdir(parents=True)
    for name in run_names(count):
        (directory / name).write_bytes(CHECKPOINT)
    (directory / "last.ckpt").write_bytes(CHECKPOINT)


def dataset(config: Config, count: int) -> Path:
    """The cached run directory of ``count`` checkpoints under the work directory (made once).

    Benchmarks that delete work on a hard-linked copy (``linked_copy``), never on this directory.
    """
    root = config.work_dir / "datasets"
    directory = root / f"run-{count}"
    done = root / f"run-{count}.done"
    if done.exists() and directory.is_dir():
        return directory
    if directory.exists():
        shutil.rmtree(directory)
    config.log(f"generating a run directory of {count:,} checkpoints in {directory}")
    started = time.monotonic()
    write_run(directory, count)
    done.write_text(f"{count}\n")
    config.log(f"  generated in {time.monotonic() - started:.1f} s")
    return directory


def linked_copy(source: Path, destination: Path) -> Path:
    """A copy of ``source`` made of hard links (cheap; deleting a link leaves the source intact)."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--link", str(source), str(destination)], check=True)
    return destination


def write_checkpoint(path: Path, data: bytes = CHECKPOINT) -> float:
    """Write a complete checkpoint the way torch.save does (open, write, close); the time after close."""
    with path.open("wb") as handle:
        handle.write(data)
    return time.time()


def write_policy(path: Path, **keys: int) -> Path:
    """A YAML policy of the given retention keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}: {value}\n" for key, value in keys.items()))
    return path


# -- measured child processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One child process: wall time, its own peak RSS (getrusage of that child), exit code."""

    seconds: float
    max_rss_kb: int
    returncode: int
    user_seconds: float
    system_seconds: float


def run_measured(
    arguments: Sequence[str],
    *,
    cwd: Path | None = None,
    environment: dict[str, str] | None = None,
    stdout: int | None = subprocess.DEVNULL,
) -> Measured:
    """Run ``arguments`` to completion; time it and read its rusage with wait4 (peak RSS of that child)."""
    env = dict(os.environ)
    env.update(environment or {})
    started = time.perf_counter()
    process = subprocess.Popen(
        list(arguments), cwd=cwd, env=env, stdout=stdout, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Measured(seconds, usage.ru_maxrss, process.returncode, usage.ru_utime, usage.ru_stime)


# -- /proc -----------------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all its threads) in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from state


def status_value(pid: int, key: str) -> int:
    """A numeric field of /proc/PID/status (VmRSS, VmHWM in kB; Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# -- the daemon ------------------------------------------------------------------------------------


class Daemon:
    """``python -m ckpt_watcher watch ROOT ...`` as a real child process, JSON logs on stderr to a file."""

    def __init__(
        self,
        root: Path,
        options: Sequence[str],
        log_path: Path,
        *,
        command: Sequence[str] = DAEMON,
    ) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._socket_directory = Path(tempfile.mkdtemp(prefix="ckw-notify-"))
        self.notify = NotifySocket(self._socket_directory / "notify.sock")
        env = {
            key: value for key, value in os.environ.items() if key not in {"WATCHDOG_USEC", "WATCHDOG_PID"}
        }
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        self._log_file = log_path.open("wb")
        self._offset = 0
        self._pending = b""
        self._records: list[dict[str, Any]] = []
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            [*command, "watch", str(root), *options],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait for READY=1; return the seconds from spawn to its arrival."""
        if not self.notify.wait_ready(timeout) or self.notify.ready_at is None:
            raise RuntimeError(f"no READY=1 within {timeout:g} s:\n{self.log_path.read_text()[-4000:]}")
        return self.notify.ready_at - self.started_at

    def records(self) -> list[dict[str, Any]]:
        """Every complete JSON line logged so far (read incrementally)."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        data = self._pending + data
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    self._records.append(json.loads(line))
                except json.JSONDecodeError:
                    self._records.append({"event": "<not json>", "line": line.decode("utf-8", "replace")})
        return self._records

    def events(self, name: str) -> list[dict[str, Any]]:
        return [record for record in self.records() if record.get("event") == name]

    def wait_for_deletions(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until ``count`` checkpoint_deleted records are logged (or the timeout); return them."""
        deadline = time.monotonic() + timeout
        while True:
            deleted = self.events("checkpoint_deleted")
            if len(deleted) >= count or time.monotonic() > deadline:
                return deleted
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.process.returncode}):\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; kill if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self._log_file.close()
        self.notify.close()
        shutil.rmtree(self._socket_directory, ignore_errors=True)


@contextmanager
def running_daemon(
    root: Path, options: Sequence[str], log_path: Path, *, command: Sequence[str] = DAEMON
) -> Iterator[Daemon]:
    """A daemon that is always stopped at the end of the block."""
    daemon = Daemon(root, options, log_path, command=command)
    try:
        yield daemon
    finally:
        daemon.close()


def parse_timestamp(text: str) -> float:
    """structlog's ISO UTC timestamp (``2026-11-28T07:41:43.611037Z``) as POSIX seconds."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def fresh_directory(path: Path) -> Path:
    """An empty directory at ``path`` (whatever was there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def sleep_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``deadline`` (spinning the last half millisecond)."""
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return
        if remaining > 0.0005:
            time.sleep(remaining - 0.0005)
