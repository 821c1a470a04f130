"""``ckpt-watcher health``: is the daemon's worker loop turning? Read from the age of its heartbeat file.

The probe of every deployment (Kubernetes startup and liveness probes, the image's ``HEALTHCHECK``)
runs this command, often every few seconds, so it imports only the standard library and the one
module that escapes a name for printing: never pydantic, structlog, yaml or watchdog (the console
script sends ``health`` here before ``cli`` is imported; ``console``). Exit codes: 0 fresh, 1 stale
(missing, too old, unreadable, or dated in the future), 2 usage error. One line on stdout says which.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckpt_watcher.records import display_name

EXIT_FRESH = 0
EXIT_STALE = 1
DEFAULT_MAX_AGE = 60.0


@dataclass(frozen=True)
class Verdict:
    """What the heartbeat says: the exit code and the one line that explains it."""

    exit_code: int
    line: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``health`` (the console script's fast path and ``cli``'s parser share them)."""
    parser.add_argument(
        "--heartbeat",
        type=Path,
        required=True,
        metavar="FILE",
        help="the file the daemon touches (watch --heartbeat FILE)",
    )
    parser.add_argument(
        "--max-age",
        type=_max_age,
        default=DEFAULT_MAX_AGE,
        metavar="SECONDS",
        help=f"stale when last touched longer ago than this (default: {DEFAULT_MAX_AGE:g})",
    )


def _max_age(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def check(heartbeat: Path, max_age: float, now: float | None = None) -> Verdict:
    """Fresh if ``heartbeat`` was touched at most ``max_age`` seconds before ``now`` (and not more than
    that after it: a file dated in the future says the clock moved, not that the loop turns)."""
    now = time.time() if now is None else now
    name = display_name(str(heartbeat))
    try:
        modified = os.stat(heartbeat).st_mtime
    except FileNotFoundError:
        return Verdict(
            EXIT_STALE,
            f"stale: {name} does not exist (the daemon has not finished its start-up pass, "
            "or is not running, or writes its heartbeat elsewhere)",
        )
    except OSError as error:
        return Verdict(EXIT_STALE, f"stale: cannot read {name}: {error.strerror or error}")
    age = now - modified
    limit = f"(max age {_duration(max_age)})"
    if age > max_age:
        return Verdict(EXIT_STALE, f"stale: {name} was last touched {_duration(age)} ago {limit}")
    if age < -max_age:
        return Verdict(
            EXIT_STALE, f"stale: {name} is dated {_duration(-age)} in the future (was the clock set back?)"
        )
    return Verdict(EXIT_FRESH, f"fresh: {name} was last touched {_duration(max(age, 0.0))} ago {limit}")


_UNITS = (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1))


def _duration(seconds: float) -> str:
    """``42 s``, ``2 min 5 s``, ``3 h 12 min``, ``4 d 2 h``: how stale, at a glance."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    for unit, size, smaller, smaller_size in _UNITS:
        if whole >= size:
            rest = (whole % size) // smaller_size
            return f"{whole // size} {unit}" + (f" {rest} {smaller}" if rest else "")
    return f"{whole} s"


def run(arguments: argparse.Namespace) -> int:
    """Print the verdict on the heartbeat named by the parsed arguments; its exit code."""
    verdict = check(arguments.heartbeat, arguments.max_age)
    print(verdict.line)
    return verdict.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``ckpt-watcher health ARGUMENTS`` (the arguments after ``health``); argparse exits 2 on misuse."""
    parser = argparse.ArgumentParser(
        prog="ckpt-watcher health",
        description="Exit 0 if the daemon's heartbeat file is fresh, 1 if it is stale or missing.",
    )
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
