"""Command line: ``watch`` (the daemon), ``prune`` (one-shot; ``--dry-run`` is the audit), ``inspect``,
``policy``.

Exit codes: 0 success, 1 some deletion failed, 2 usage or policy error. Stdout carries only the
command's output (table or JSON); everything else is a structured log record on stderr.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ckpt_watcher import __version__
from ckpt_watcher.delete import apply_plan, finish_leftovers
from ckpt_watcher.lock import LockHeldError
from ckpt_watcher.logs import LEVELS, configure_logging
from ckpt_watcher.notify import Notifier
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.plan import plan
from ckpt_watcher.policy import LoadedPolicy, PolicyError, load_policy
from ckpt_watcher.protection import ProtectionError, ProtectionRegistry, command_line_pins, identities_of
from ckpt_watcher.report import (
    contents_document,
    plan_document,
    policy_document,
    render_contents_table,
    render_json,
    render_policy,
    render_table,
)
from ckpt_watcher.scan import ScanOptions, ScanResult, scan_tree

if TYPE_CHECKING:
    from ckpt_watcher.daemon import Watcher

EXIT_OK = 0
EXIT_DELETE_FAILED = 1
EXIT_USAGE = 2
DEFAULT_POLL_SECONDS = 5.0
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_HANDLED_SIGNALS = _STOP_SIGNALS | {signal.SIGHUP}

logger = structlog.get_logger("ckpt_watcher.cli")


class UsageError(Exception):
    """A command line that cannot run; printed as one line, exit code 2."""


class ManyPolicyErrors(Exception):  # noqa: N818  (a group of PolicyError)
    """Several policy files (root and per-run overrides) with problems; all are shown, exit code 2."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(error) for error in errors))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; also used by tests to check deployment command lines."""
    parser = argparse.ArgumentParser(
        prog="ckpt-watcher",
        description="Keep a training run's checkpoint directory within a retention policy.",
    )
    parser.add_argument("--version", action="version", version=f"ckpt-watcher {__version__}")
    parser.add_argument(
        "--log-level", choices=LEVELS, default="info", help="least severe log records shown (default: info)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = commands.add_parser(
        "prune",
        help="apply the policy once (with --dry-run: show what would go, and why)",
        description="Scan PATH recursively, plan per the policy, and delete what it does not keep.",
    )
    prune.add_argument("path", type=Path, metavar="PATH", help="checkpoint root directory")
    prune.add_argument("--policy", type=Path, metavar="FILE", help="YAML policy (default: embedded)")
    prune.add_argument("--dry-run", action="store_true", help="change nothing; print the plan")
    _add_protect_option(prune)
    prune.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    prune.add_argument(
        "--settle",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="treat files modified less than SECONDS ago as still being written (default: 0)",
    )

    watch = commands.add_parser(
        "watch",
        help="run the retention daemon on PATH until SIGTERM/SIGINT (SIGHUP reloads the policy)",
        description=(
            "Keep PATH within the policy while a trainer writes into it: reconcile at start-up, then "
            "re-plan each directory as checkpoints are closed or moved into place, with a full rescan "
            "every --rescan seconds. Write the options after PATH when --poll takes no value."
        ),
    )
    watch.add_argument(
        "path", type=Path, metavar="PATH", help="checkpoint root directory (may not exist yet)"
    )
    watch.add_argument("--policy", type=Path, metavar="FILE", help="YAML policy, hot-reloaded on change")
    _add_protect_option(watch)
    watch.add_argument(
        "--poll",
        nargs="?",
        const=DEFAULT_POLL_SECONDS,
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="poll instead of inotify, for NFS/CIFS/Lustre/FUSE mounts "
        f"(default interval {DEFAULT_POLL_SECONDS:g} s)",
    )
    watch.add_argument(
        "--settle",
        type=_non_negative_float,
        default=5.0,
        metavar="SECONDS",
        help="a file found by polling or a rescan counts only once unchanged this long (default: 5)",
    )
    watch.add_argument(
        "--rescan",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="full rescan interval; events are hints, the rescan is the truth (default: 300)",
    )
    watch.add_argument(
        "--heartbeat",
        type=Path,
        metavar="FILE",
        help="touch FILE every few seconds from the worker loop (for a liveness probe)",
    )

    inspect = commands.add_parser(
        "inspect",
        help="show what is inside checkpoints (epoch, step, resumability, callbacks, tensors)",
        description=(
            "Read each checkpoint with torch.load(mmap=True, weights_only=True): tensor data stays on disk "
            "and no pickle code runs. A directory gives one row per checkpoint in it."
        ),
    )
    inspect.add_argument(
        "paths", type=Path, nargs="+", metavar="PATH", help="checkpoint files or directories"
    )
    inspect.add_argument("--json", action="store_true", help="one JSON object per checkpoint, in a list")
    inspect.add_argument(
        "--unsafe",
        action="store_true",
        help="load objects the safe loader refuses (runs the checkpoint's pickle code: trusted files only)",
    )
    inspect.add_argument("--policy", type=Path, metavar="FILE", help="policy whose naming templates apply")

    policy = commands.add_parser(
        "policy",
        help="validate a policy file and print the effective policy",
        description="Validate FILE (or the embedded default) and print every value and its origin.",
    )
    policy.add_argument("file", type=Path, nargs="?", metavar="FILE", help="YAML policy file")
    policy.add_argument("--json", action="store_true", help="print JSON instead of commented YAML")
    return parser


def _add_protect_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protect",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="never delete PATH, e.g. the ckpt_path given on the trainer's command line (repeatable)",
    )


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    arguments = build_parser().parse_args(argv)
    configure_logging(arguments.log_level)
    try:
        if arguments.command == "prune":
            return run_prune(arguments)
        if arguments.command == "policy":
            return run_policy(arguments)
        if arguments.command == "watch":
            return run_watch(arguments)
        if arguments.command == "inspect":
            return run_inspect(arguments)
    except PolicyError as error:
        print(f"ckpt-watcher: {error.render()}", file=sys.stderr)
        return EXIT_USAGE
    except ManyPolicyErrors as many:
        for one in many.errors:
            print(f"ckpt-watcher: {one.render()}", file=sys.stderr)
        print("ckpt-watcher: nothing was deleted", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as error:
        print(f"ckpt-watcher: {error}", file=sys.stderr)
        return EXIT_USAGE
    raise AssertionError(f"unhandled command {arguments.command}")


def load_policy_logged(path: Path | None) -> LoadedPolicy:
    """Load the policy and log its warnings (such as a misspelt key)."""
    loaded = load_policy(path)
    for warning in loaded.warnings:
        logger.warning("policy_warning", source=loaded.source_label, message=warning)
    return loaded


def resolve_root(path: Path) -> Path:
    """The canonical root directory the user named; nothing outside it is ever touched."""
    if not path.exists():
        raise UsageError(f"{path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory")
    return Path(os.path.realpath(path))


def log_scan_warnings(scan: ScanResult) -> None:
    """Warn about what the scan could not read and about names that look wrong."""
    for problem in scan.problems:
        logger.warning("scan_problem", path=str(problem.path), error=problem.message)
    for record in scan.records:
        if record.note:
            logger.warning(
                "checkpoint_suspicious",
                path=str(record.path),
                detail=f"{record.note}; kept",
            )


def run_prune(arguments: argparse.Namespace) -> int:
    """``prune``: scan, plan, and delete (or, with --dry-run, only show)."""
    # A one-shot run builds a few objects per checkpoint, none of them cyclic garbage; the cyclic
    # collector would only traverse them again and again (a quarter of the time at 100k checkpoints).
    collector_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _prune(arguments)
    finally:
        if collector_was_enabled:
            gc.enable()


def _prune(arguments: argparse.Namespace) -> int:
    loaded = load_policy_logged(arguments.policy)
    root = resolve_root(arguments.path)
    tree = PolicyTree(root, loaded, strict=True)

    def options_for(directory: Path) -> ScanOptions:
        effective = tree.for_directory(directory)
        verify = (effective.policy if effective is not None else loaded.policy).verify
        return ScanOptions(settle_seconds=arguments.settle, verify=verify)

    scan = scan_tree(root, tree.naming_for, options_for=options_for)
    log_scan_warnings(scan)
    effective = {directory: tree.for_directory(directory) for directory in scan.directories}
    if tree.errors:
        raise ManyPolicyErrors(tree.errors)
    group_policies = {directory: value.policy for directory, value in effective.items() if value is not None}
    configs: dict[Path, str] = {}
    for value in effective.values():
        if value is not None:
            configs.update(value.protect_from)
    registry = ProtectionRegistry(Path.cwd())
    try:
        registry.refresh(configs, strict=True)
    except ProtectionError as error:
        raise ManyPolicyErrors([PolicyError("protect_from", [f"At 'protect_from': {error}"])]) from None
    pins = {**command_line_pins(arguments.protect, Path.cwd()), **registry.pins()}
    the_plan = plan(scan.records, loaded.policy, pins, group_policies, pinned_identities=identities_of(pins))
    sources = {directory: value.sources for directory, value in effective.items() if value is not None}
    leftovers = (
        []
        if arguments.dry_run
        else [result for directory in scan.directories for result in finish_leftovers(root, directory)]
    )
    applied = None if arguments.dry_run else apply_plan(the_plan, root)
    if arguments.json:
        print(render_json(plan_document(the_plan, loaded, arguments.dry_run, applied, sources)))
    else:
        print(render_table(the_plan, arguments.dry_run, applied, sources))
    if (applied is not None and applied.failed) or any(not result.removed for result in leftovers):
        return EXIT_DELETE_FAILED
    return EXIT_OK


def run_policy(arguments: argparse.Namespace) -> int:
    """``policy``: validate and print the effective policy."""
    loaded = load_policy_logged(arguments.file)
    if arguments.json:
        print(render_json({**policy_document(loaded), "origins": dict(loaded.origins)}))
    else:
        print(render_policy(loaded))
    return EXIT_OK


def run_watch(arguments: argparse.Namespace) -> int:
    """``watch``: run the daemon until a stop signal; a bad policy at start-up is exit 2."""
    from ckpt_watcher.daemon import Watcher, WatchOptions  # noqa: PLC0415  (prune need not load watchdog)

    loaded = load_policy_logged(arguments.policy)
    options = WatchOptions(
        root=arguments.path,
        policy_path=arguments.policy,
        poll_interval=arguments.poll,
        settle_seconds=arguments.settle,
        rescan_seconds=arguments.rescan,
        heartbeat=arguments.heartbeat,
        protect=tuple(arguments.protect),
    )
    watcher = Watcher(options, loaded, notifier=Notifier())
    try:
        watcher.lock_now()
    except LockHeldError as error:
        raise UsageError(str(error)) from None
    return supervise(watcher)


def supervise(watcher: Watcher) -> int:
    """Run the worker in its own thread; the main thread takes signals synchronously.

    The handled signals are blocked in every thread and collected with ``sigtimedwait``, so no handler
    ever runs inside a lock, and SIGTERM works the same when this process is PID 1 in a container.
    The first SIGTERM/SIGINT stops after the group in hand; a second one exits at once.
    """
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    try:
        worker = threading.Thread(target=watcher.run, name="ckpt-watcher-worker")
        worker.start()
        stopping = False
        while worker.is_alive():
            received = signal.sigtimedwait(_HANDLED_SIGNALS, 0.2)
            if received is None:
                continue
            name = signal.Signals(received.si_signo).name
            if received.si_signo == signal.SIGHUP:
                logger.info("reload_requested", signal=name)
                watcher.request_reload()
            elif stopping:
                logger.warning("forced_exit", signal=name, detail="second stop signal; exiting at once")
                os._exit(128 + received.si_signo)
            else:
                stopping = True
                logger.info("stop_requested", signal=name)
                watcher.notifier.stopping()
                watcher.request_stop()
        worker.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return watcher.exit_code


def run_inspect(arguments: argparse.Namespace) -> int:
    """``inspect``: one row (or JSON object) per checkpoint; exit 1 if any could not be read."""
    from ckpt_watcher.contents import inspect_paths  # noqa: PLC0415  (keeps torch off other commands)

    loaded = load_policy_logged(arguments.policy)
    if arguments.unsafe:
        logger.warning(
            "unsafe_load_enabled",
            detail="checkpoints the safe loader refuses will run their pickle code; trusted files only",
        )
    results = inspect_paths(arguments.paths, unsafe=arguments.unsafe, naming=loaded.policy.compiled_naming)
    if arguments.json:
        print(render_json([contents_document(result) for result in results]))
    else:
        print(render_contents_table(results))
    return EXIT_OK if all(result.ok for result in results) else EXIT_DELETE_FAILED
