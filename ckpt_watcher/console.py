"""The console script (``ckpt-watcher``, ``python -m ckpt_watcher``): ``health`` answered at once,
everything else handed to ``cli``.

``health`` is a probe, run every few seconds by kubelet or the container runtime: it must not pay for
importing the daemon, which ``cli`` does at import (structlog and the reconcile core; pydantic, PyYAML,
watchdog and the rest only where a command uses them). So the command word is found here, with
nothing but the standard library, before ``cli`` is imported.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

# The options that come before the command and take a value (``cli.build_parser``).
_GLOBAL_OPTIONS_WITH_VALUES = frozenset({"--log-level"})


def command_position(arguments: Sequence[str]) -> int | None:
    """Where the command word (``health``, ``watch``, ...) is in the arguments, or None when an option
    before it (``--help``, ``--version``, a misspelt one) leaves that to ``cli``'s parser."""
    skip_value = False
    for position, argument in enumerate(arguments):
        if skip_value:
            skip_value = False
            continue
        if argument in _GLOBAL_OPTIONS_WITH_VALUES:
            skip_value = True
            continue
        if any(argument.startswith(option + "=") for option in _GLOBAL_OPTIONS_WITH_VALUES):
            continue
        if argument.startswith("-"):
            return None
        return position
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    position = command_position(arguments)
    if position is not None and arguments[position] == "health":
        from ckpt_watcher import health  # noqa: PLC0415  (the probe's fast path: standard library only)

        return health.main(arguments[position + 1 :])
    if position is not None and arguments[position] == "watch":
        # Block SIGHUP now: the supervisor collects it (a reload) once the daemon is up. Until then
        # its default action would end the process, and a reloader that signals a starting pod would.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from ckpt_watcher.cli import main as cli_main  # noqa: PLC0415  (imports the whole daemon)

    try:
        return cli_main(arguments)
    except BrokenPipeError:
        return reader_gone()


def reader_gone() -> int:
    """The exit code when what reads the output went away (``prune --json | head``): quietly, as
    SIGPIPE ends other tools, 128 + SIGPIPE. Standard output is pointed at /dev/null first, so the
    interpreter's last flush of it at exit fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE
