"""Run ``python -m ckpt_watcher ...`` as a real process and read what it wrote: the one runner of the tests.

``run_cli`` takes every variation a test needs, as options:

* ``environment``: added to the test's own (``STRICT_UTF8``: output that refuses anything not UTF-8);
* ``cwd``; ``timeout``: a deadline for a hang (exceeding it fails the test), never a measurement;
* ``memory``: RLIMIT_AS for the whole run, set by a small wrapper just before the command starts;
* ``prefix``: a command that runs the interpreter (``WITHOUT_READ_OVERRIDE``, a mount namespace);
* ``interpreter``: another way to start Python (one that emulates a file system, say);
* ``text=False``: stdout and stderr as the bytes written (to check their encoding).

``cli_command`` is the same command line for a process a test starts itself (a daemon), ``run_python``
runs a Python snippet the same way, and the readers below take what any of them wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

DEFAULT_TIMEOUT = 240.0  # a deadline for a hung command, generous for a loaded machine

# What a command that failed the user, rather than telling them why, prints.
TRACEBACK = "Traceback (most recent call last)"

# Drops the capabilities that let root read any directory, so a test run as root can stage an
# unreadable directory with chmod 000 (util-linux's setpriv).
WITHOUT_READ_OVERRIDE = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)

# The environment of a process whose stdout and stderr refuse anything that is not UTF-8.
STRICT_UTF8 = {"PYTHONIOENCODING": "utf-8:strict", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

# Sets RLIMIT_AS to argv[1], then becomes the rest of the command line, so the limit covers the run.
_MEMORY_LIMIT = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)

# Runs a command line of ckpt-watcher in-process, then writes its peak address space (bytes) to argv[1].
_PEAK_PROBE = textwrap.dedent(
    """
    import sys
    from ckpt_watcher.cli import main
    code = main(sys.argv[2:])
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmPeak:"))
    with open(sys.argv[1], "w") as out:
        out.write(str(peak))
    sys.exit(code)
    """
)

# Runs argv[1:] and prints its exit code, stdout and peak resident memory (of the child alone).
_RESIDENT_PROBE = textwrap.dedent(
    """
    import json, resource, subprocess, sys
    child = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"code": child.returncode, "peak": usage.ru_maxrss * 1024, "out": child.stdout}))
    """
)


def python_command(memory: int | None = None) -> list[str]:
    """The interpreter: ``python``, or with ``memory`` one that sets RLIMIT_AS first."""
    if memory is None:
        return [sys.executable]
    return [sys.executable, "-c", _MEMORY_LIMIT, str(memory)]


def cli_command(
    *arguments: str, memory: int | None = None, interpreter: Sequence[str] | None = None
) -> list[str]:
    """``python -m ckpt_watcher ARGUMENTS`` as an argument list (``interpreter`` instead of python)."""
    if interpreter is not None and memory is not None:
        raise ValueError("memory is set through the default interpreter only")
    return [
        *(interpreter if interpreter is not None else python_command(memory)),
        "-m",
        "ckpt_watcher",
        *arguments,
    ]


@overload
def run_command(
    command: Sequence[str],
    *,
    cwd: Path | None = ...,
    timeout: float = ...,
    environment: Mapping[str, str] | None = ...,
    text: Literal[True] = ...,
) -> subprocess.CompletedProcess[str]: ...


@overload
def run_command(
    command: Sequence[str],
    *,
    cwd: Path | None = ...,
    timeout: float = ...,
    environment: Mapping[str, str] | None = ...,
    text: Literal[False],
) -> subprocess.CompletedProcess[bytes]: ...


def run_command(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    environment: Mapping[str, str] | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[str] | subprocess.CompletedProcess[bytes]:
    """Any command, output captured, bounded in time; never raises on a non-zero exit code.

    ``environment`` is added to the test's own.
    """
    return subprocess.run(
        list(command),
        capture_output=True,
        text=text,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env={**os.environ, **(environment or {})},
    )


@overload
def run_cli(
    *arguments: str,
    cwd: Path | None = ...,
    timeout: float = ...,
    environment: Mapping[str, str] | None = ...,
    memory: int | None = ...,
    prefix: Sequence[str] = ...,
    interpreter: Sequence[str] | None = ...,
    text: Literal[True] = ...,
) -> subprocess.CompletedProcess[str]: ...


@overload
def run_cli(
    *arguments: str,
    cwd: Path | None = ...,
    timeout: float = ...,
    environment: Mapping[str, str] | None = ...,
    memory: int | None = ...,
    prefix: Sequence[str] = ...,
    interpreter: Sequence[str] | None = ...,
    text: Literal[False],
) -> subprocess.CompletedProcess[bytes]: ...


def run_cli(
    *arguments: str,
    cwd: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    environment: Mapping[str, str] | None = None,
    memory: int | None = None,
    prefix: Sequence[str] = (),
    interpreter: Sequence[str] | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[str] | subprocess.CompletedProcess[bytes]:
    """``ckpt-watcher ARGUMENTS`` in a child process; never raises on a non-zero exit code (see the
    module docstring for the options)."""
    command = [*prefix, *cli_command(*arguments, memory=memory, interpreter=interpreter)]
    if text:
        return run_command(command, cwd=cwd, timeout=timeout, environment=environment)
    return run_command(command, cwd=cwd, timeout=timeout, environment=environment, text=False)


def run_python(
    code: str,
    *arguments: str,
    memory: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = False,
    environment: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """A (dedented) Python snippet with ``arguments`` in ``sys.argv[1:]``, as ``run_cli`` runs the CLI.

    ``check``: a non-zero exit fails the test, with the snippet's stderr.
    """
    command = [*python_command(memory), "-c", textwrap.dedent(code), *arguments]
    completed = run_command(command, timeout=timeout, environment=environment)
    if check and completed.returncode != 0:
        raise AssertionError(f"the snippet exited {completed.returncode}:\n{completed.stderr[-4000:]}")
    return completed


def peak_address_space(arguments: Sequence[str], scratch: Path) -> int:
    """Peak virtual memory (VmPeak) of a process that ran ``ckpt-watcher ARGUMENTS`` in-process."""
    out = scratch / "peak.txt"
    run_command([sys.executable, "-c", _PEAK_PROBE, str(out), *arguments])
    return int(out.read_text())


def peak_resident_memory(command: Sequence[str]) -> tuple[int, int, str]:
    """Run ``command``; its exit code, peak resident memory in bytes (its own), and stdout."""
    completed = run_command([sys.executable, "-c", _RESIDENT_PROBE, *command])
    assert completed.returncode == 0, completed.stderr
    measured = json.loads(completed.stdout)
    return measured["code"], measured["peak"], measured["out"]


# -- reading what a command wrote ---------------------------------------------------------------------

NOT_JSON = "<not json>"


def log_records(stderr: str | bytes) -> list[dict[str, Any]]:
    """The JSON log records of a command's stderr, one a line (bytes are decoded strictly as UTF-8).

    A line that is not a JSON object is kept, as ``{"event": NOT_JSON, "line": ...}``.
    """
    text = stderr.decode("utf-8") if isinstance(stderr, bytes) else stderr
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        records.append(value if isinstance(value, dict) else {"event": NOT_JSON, "line": line})
    return records


def events(stderr: str | bytes, name: str) -> list[dict[str, Any]]:
    """The records of one event name in a command's stderr."""
    return [record for record in log_records(stderr) if record.get("event") == name]


def assert_clean_exit(
    completed: subprocess.CompletedProcess[str] | subprocess.CompletedProcess[bytes],
    allowed: Sequence[int] = (0, 1, 2),
    *,
    explained: bool = False,
) -> None:
    """The command exited 0, 1 or 2 (or as ``allowed``), with no traceback.

    ``explained``: a non-zero exit also comes with exactly one line on stderr that is not a JSON log
    record, and it is a ``ckpt-watcher: `` message (a multi-line policy error is not one line: leave
    ``explained`` off where one is expected).
    """
    stderr = (
        completed.stderr if isinstance(completed.stderr, str) else completed.stderr.decode(errors="replace")
    )
    assert completed.returncode in allowed, (completed.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    if explained and completed.returncode != 0:
        messages = [record["line"] for record in log_records(stderr) if record["event"] == NOT_JSON]
        assert len(messages) == 1, (completed.returncode, messages[-20:], stderr[-3000:])
        assert messages[0].startswith("ckpt-watcher: "), (completed.returncode, messages)


def prune_entries(
    completed: subprocess.CompletedProcess[str], *, exit_code: int | None = None
) -> dict[str, dict[str, Any]]:
    """The entries of a ``prune --json`` document, by name (after checking ``exit_code``, if given)."""
    if exit_code is not None:
        assert completed.returncode == exit_code, completed.stderr
    document = json.loads(completed.stdout)
    return {entry["name"]: entry for group in document["groups"] for entry in group["entries"]}


def imported_modules(stderr: str) -> set[str]:
    """The modules a process run with ``PYTHONPROFILEIMPORTTIME=1`` (``-X importtime``) imported."""
    modules: set[str] = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                modules.add(name)
    return modules
