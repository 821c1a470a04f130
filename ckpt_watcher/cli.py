"""Command line: ``watch`` (the daemon), ``prune`` (one-shot; ``--dry-run`` is the audit), ``inspect``,
``policy``, and the trash's ``trash list``, ``trash empty`` and ``restore``. The parser, ``main``, and
one short handler per command.

Exit codes: 0 success, 1 something failed (a deletion; for ``inspect``, a checkpoint it could not
read; for ``restore``, an entry it could not restore), 2 usage or policy error. Stdout carries only
the command's output (table or JSON); everything else is a structured log record on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import structlog

from ckpt_watcher import __version__, health, terminal
from ckpt_watcher.durations import DurationError, parse_duration
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.locations import LocationError, StorageURL, parse_location
from ckpt_watcher.lock import LockHeldError
from ckpt_watcher.logs import LEVELS, configure_logging, describe_os_error
from ckpt_watcher.memory import no_cyclic_collection
from ckpt_watcher.notify import Notifier
from ckpt_watcher.overrides import root_configs
from ckpt_watcher.plan import GroupPlan
from ckpt_watcher.policy import POLICY_DESCRIPTIONS, PolicyCheck, PolicyError
from ckpt_watcher.policy_file import InvalidPolicyFilesError, load_policy_logged
from ckpt_watcher.protection import command_line_pins, unreadable_configs
from ckpt_watcher.reconcile import OutputClosedError, PassResult, prune_once
from ckpt_watcher.records import display_name
from ckpt_watcher.report import (
    PlanJSONStream,
    TrashView,
    contents_document,
    policy_document,
    render_contents_table,
    render_json,
    render_policy,
    render_restore_results,
    render_trash_table,
    trash_list_document,
    write_plan_json,
    write_table,
)
from ckpt_watcher.sizes import human_bytes
from ckpt_watcher.terminal import PassProgress
from ckpt_watcher.trash import TrashEntry, TrashUnusableError, list_trash
from ckpt_watcher.trash_moves import PurgeResult, purge, restore, select_entries

if TYPE_CHECKING:
    from ckpt_watcher.metrics import MetricsAddress

EXIT_OK = 0
EXIT_DELETE_FAILED = 1
EXIT_UNREADABLE = 1  # inspect: a checkpoint could not be read
EXIT_NOT_RESTORED = 1  # restore: an entry could not be restored (or none matched)
EXIT_TRASH_FAILED = 1  # trash list|empty: the trash cannot be used, or an entry could not be purged
EXIT_USAGE = 2
DEFAULT_POLL_SECONDS = 5.0

logger = structlog.get_logger("ckpt_watcher.cli")


class UsageError(Exception):
    """A command line that cannot run; printed as one line, exit code 2."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse, with a hook that rewrites a command's arguments before parsing (old spellings)."""

    def __init__(self, *arguments: Any, rewrite: Any = None, **options: Any) -> None:
        super().__init__(*arguments, **options)
        self.rewrite = rewrite

    def parse_known_args(  # type: ignore[override]  # argparse's stub is overloaded
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        if self.rewrite is not None and args is not None:
            args = self.rewrite(list(args))
        return super().parse_known_args(args, namespace)


_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _poll_spellings(arguments: list[str]) -> list[str]:
    """``--poll SECONDS`` and ``--poll=SECONDS`` (the old spellings) mean ``--poll-interval SECONDS``.

    A number right after ``--poll`` is taken as its interval, as it always was; anything else after
    it is the next argument (``watch --poll PATH``), since ``--poll`` itself takes no value.
    """
    rewritten: list[str] = []
    for index, argument in enumerate(arguments):
        if argument == "--":
            return rewritten + arguments[index:]
        if argument.startswith("--poll="):
            rewritten.append("--poll-interval=" + argument.removeprefix("--poll="))
        elif argument == "--poll" and index + 1 < len(arguments) and _NUMBER.fullmatch(arguments[index + 1]):
            rewritten.append("--poll-interval")
        else:
            rewritten.append(argument)
    return rewritten


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; also used by tests to check deployment command lines."""
    parser = CommandLineParser(
        prog="ckpt-watcher",
        description="Keep a training run's checkpoint directory within a retention policy.",
    )
    parser.add_argument("--version", action="version", version=f"ckpt-watcher {__version__}")
    parser.add_argument(
        "--log-level", choices=LEVELS, default="info", help="least severe log records shown (default: info)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prune(commands)
    _add_watch(commands)
    _add_inspect(commands)
    _add_policy(commands)
    _add_health(commands)
    _add_trash(commands)
    _add_restore(commands)
    return parser


Commands: TypeAlias = "argparse._SubParsersAction[CommandLineParser]"


def _add_prune(commands: Commands) -> None:
    prune = commands.add_parser(
        "prune",
        help="apply the policy once (with --dry-run: show what would go, and why)",
        description="Scan PATH recursively, plan per the policy, and delete what it does not keep.",
    )
    prune.add_argument(
        "path", type=_location, metavar="PATH", help="checkpoint root directory, or a bucket URL (s3://...)"
    )
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
    prune.set_defaults(handler=run_prune)


def _add_watch(commands: Commands) -> None:  # long: one add_argument per option of watch, in --help order
    watch = commands.add_parser(
        "watch",
        rewrite=_poll_spellings,
        help="run the retention daemon on PATH until SIGTERM/SIGINT (SIGHUP reloads the policy)",
        description=(
            "Keep PATH within the policy while a trainer writes into it: reconcile at start-up, then "
            "re-plan each directory as checkpoints are closed or moved into place, with a full rescan "
            "every --rescan seconds."
        ),
    )
    watch.add_argument(
        "path",
        type=_location,
        metavar="PATH",
        help="checkpoint root directory (may not exist yet), or a bucket URL (s3://...; polled)",
    )
    watch.add_argument("--policy", type=Path, metavar="FILE", help="YAML policy, hot-reloaded on change")
    _add_protect_option(watch)
    polling = watch.add_mutually_exclusive_group()
    polling.add_argument(
        "--poll",
        action="store_const",
        const=DEFAULT_POLL_SECONDS,
        dest="poll",
        help=f"poll instead of inotify, for NFS/CIFS/Lustre/FUSE mounts (every {DEFAULT_POLL_SECONDS:g} s)",
    )
    polling.add_argument(
        "--poll-interval",
        type=_positive_float,
        dest="poll",
        metavar="SECONDS",
        help="poll every SECONDS (implies --poll; the old spelling --poll SECONDS still works)",
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
    _add_lease_option(watch)
    watch.add_argument(
        "--heartbeat",
        type=Path,
        metavar="FILE",
        help="touch FILE every few seconds from the worker loop (for a liveness probe)",
    )
    watch.add_argument(
        "--metrics",
        type=_metrics_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (PORT alone: every interface; "
        "needs the metrics extra)",
    )
    watch.set_defaults(handler=run_watch)


# `--lease-seconds` above it is refused: a watcher killed without releasing its lease holds it that long.
MAX_LEASE_SECONDS = 3600.0


def _add_lease_option(watch: argparse.ArgumentParser) -> None:
    watch.add_argument(
        "--lease-seconds",
        type=_lease_seconds,
        default=60.0,
        metavar="SECONDS",
        help="bucket roots: time to live of the single-instance lease, renewed every third of it; a "
        "watcher killed without releasing it is taken over this long after its last renewal (default: 60, "
        f"at most {MAX_LEASE_SECONDS:g})",
    )


def _add_inspect(commands: Commands) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="show what is inside checkpoints (epoch, step, resumability, callbacks, tensors)",
        description=(
            "Read each checkpoint with torch.load(mmap=True, weights_only=True): tensor data stays on disk "
            "and no pickle code runs. A directory gives one row per checkpoint in it."
        ),
    )
    inspect.add_argument(
        "paths", type=_location, nargs="+", metavar="PATH", help="checkpoint files or directories (or URLs)"
    )
    inspect.add_argument("--json", action="store_true", help="one JSON object per checkpoint, in a list")
    inspect.add_argument(
        "--unsafe",
        action="store_true",
        help="load objects the safe loader refuses (runs the checkpoint's pickle code: trusted files only)",
    )
    inspect.add_argument("--policy", type=Path, metavar="FILE", help="policy whose naming templates apply")
    inspect.set_defaults(handler=run_inspect)


def _add_policy(commands: Commands) -> None:
    policy = commands.add_parser(
        "policy",
        help="validate a policy file and print the effective policy, every key explained",
        description="Validate FILE (or the embedded default) and print every value, its origin and meaning.",
    )
    policy.add_argument("file", type=Path, nargs="?", metavar="FILE", help="YAML policy file")
    policy.add_argument("--json", action="store_true", help="print JSON instead of commented YAML")
    policy.set_defaults(handler=run_policy)


def _add_health(commands: Commands) -> None:
    """``health`` (the console script answers it without importing this module: ``console``)."""
    health_parser = commands.add_parser(
        "health",
        help="exit 0 if the daemon's heartbeat file is fresh, 1 if stale or missing (for probes)",
        description="Exit 0 if the daemon's heartbeat file is fresh, 1 if it is stale or missing.",
    )
    health.add_arguments(health_parser)
    health_parser.set_defaults(handler=health.run)


def _add_trash(commands: Commands) -> None:
    trash = commands.add_parser(
        "trash",
        help="list or empty the root's trash (see the policy key trash)",
        description="What the trash of a checkpoint root holds, or purge it now. Safe while the daemon runs.",
    )
    actions = trash.add_subparsers(dest="trash_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="what is in the trash: original path, when, size, why, when it will be purged"
    )
    listing.add_argument(
        "path", type=_location, metavar="PATH", help="checkpoint root directory, or a bucket URL (s3://...)"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    listing.set_defaults(handler=run_trash_list)
    empty = actions.add_parser("empty", help="purge the trash now (every entry, or the older ones)")
    empty.add_argument(
        "path", type=_location, metavar="PATH", help="checkpoint root directory, or a bucket URL (s3://...)"
    )
    empty.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="purge only entries trashed longer ago than DURATION (30s, 15m, 24h, 7d)",
    )
    empty.set_defaults(handler=run_trash_empty)


def _add_restore(commands: Commands) -> None:
    restore_parser = commands.add_parser(
        "restore",
        rewrite=_options_first,
        help="move checkpoints back from the trash (never overwriting); they stay pinned for the grace",
        description=(
            "Move trashed checkpoints back where they were. NAME_OR_GLOB matches an entry's path relative "
            "to PATH, its name, or its key (see trash list). A checkpoint whose name exists again is "
            "never overwritten: that entry is refused (exit 1). Safe while the daemon runs."
        ),
    )
    restore_parser.add_argument(
        "path", type=_location, metavar="PATH", help="checkpoint root directory, or a bucket URL (s3://...)"
    )
    restore_parser.add_argument("names", nargs="*", metavar="NAME_OR_GLOB", help="entries to restore")
    restore_parser.add_argument(
        "--since",
        type=_point_in_time,
        metavar="TIME",
        help="only entries trashed at or after TIME: ISO 8601 (2026-11-28T07:00, local time unless it "
        "says Z or +HH:MM) or a duration ago (2h)",
    )
    restore_parser.add_argument(
        "--all", action="store_true", help="every entry (with --since: every such entry)"
    )
    restore_parser.set_defaults(handler=run_restore)


def _options_first(arguments: list[str]) -> list[str]:
    """``restore PATH NAME --since 2h OTHER``: options may come between the names (argparse alone would
    take the names after an option for unknown arguments), so they are moved before them."""
    options: list[str] = []
    positionals: list[str] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument == "--":
            positionals.extend(arguments[index:])
            break
        if argument == "--since" and index + 1 < len(arguments):
            options.extend(arguments[index : index + 2])
            index += 2
            continue
        (options if argument.startswith("-") and argument != "-" else positionals).append(argument)
        index += 1
    return options + positionals


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except DurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _point_in_time(text: str) -> float:
    """``--since``: an ISO 8601 time (naive = local time) or a duration ago, as epoch seconds."""
    try:
        return time.time() - parse_duration(text)
    except DurationError:
        pass
    import datetime  # noqa: PLC0415  (restore --since only)

    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a time such as 2026-11-28T07:00 or a duration ago such as 2h, got {text!r}"
        ) from None
    return moment.timestamp()  # a naive time is taken as local time


def _add_protect_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protect",
        type=_location,
        action="append",
        default=[],
        metavar="PATH",
        help="never delete PATH, e.g. the ckpt_path given on the trainer's command line (repeatable)",
    )


def _metrics_address(text: str) -> MetricsAddress:
    from ckpt_watcher.metrics import parse_metrics_address  # noqa: PLC0415  (watch --metrics only)

    try:
        return parse_metrics_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _location(text: str) -> Path | StorageURL:
    """A path, or a bucket URL (``s3://bucket/prefix``; ``file://PATH`` is PATH)."""
    try:
        return parse_location(text)
    except LocationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _lease_seconds(text: str) -> float:
    """A lease's time to live: at most MAX_LEASE_SECONDS, since a watcher killed without releasing it
    holds its prefix (and another watcher's view of it as a nested one) that long."""
    value = _positive_float(text)
    if value > MAX_LEASE_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_LEASE_SECONDS:g} seconds, got {text!r} (a watcher killed without "
            "releasing its lease holds the prefix that long)"
        )
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
    arguments = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    configure_logging(arguments.log_level)
    try:
        _check_working_directory()
        handler = arguments.handler
        exit_code: int = handler(arguments)
    except PolicyError as error:
        print(f"ckpt-watcher: {error.render()}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidPolicyFilesError as many:
        for one in many.errors:
            print(f"ckpt-watcher: {one.render()}", file=sys.stderr)
        print("ckpt-watcher: nothing was deleted", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as error:
        print(f"ckpt-watcher: {error}", file=sys.stderr)
        return EXIT_USAGE
    return exit_code


def _check_working_directory() -> None:
    """Refuse, with one line, to start in a working directory that is gone (removed after the shell
    entered it): relative paths, and resume paths in training configs, are read relative to it."""
    try:
        os.getcwd()
    except OSError as error:
        raise UsageError(
            f"the working directory cannot be read ({describe_os_error(error)}): it was removed or "
            "may not be searched; start ckpt-watcher from a directory that exists "
            "(systemd: WorkingDirectory=)"
        ) from None


def _refuse_protected_urls(protect: Iterable[Path | StorageURL], root: Path) -> None:
    """A ``--protect`` URL under a local root is a UsageError (exit 2): it names an object, never a
    file under the root, so the checkpoint meant (on a bucket mounted there, say) would be deleted."""
    for item in protect:
        if isinstance(item, StorageURL):
            raise UsageError(
                f"--protect {item.text}: {display_name(str(root))} is a local directory; give the "
                "checkpoint's path under it, not a URL, which names no file there"
            )


def _refuse_beside_a_watcher(root: Path) -> None:
    """A ``prune`` that deletes does not run where a watcher holds the lock of the root or of a
    directory above it (``/proc/locks``: the directory's ``flock``, or a held lock file of lock.py's
    fallback): it would apply its own policy beside the watcher's, which would not know to leave the
    root to it (a prune takes no lock: nested.py) nor read the pins of the watcher's trash above it
    (exit 2; ``--dry-run`` runs beside it). It takes no lock itself, so a watcher (re)started during
    its pass is never turned away by it."""
    from ckpt_watcher.nested import read_other_locks, watcher_of  # noqa: PLC0415  (a real prune only)

    locks = read_other_locks()
    if not locks.by_inode:
        return  # (nobody else holds a lock: no directory is looked at)
    for directory in [root, *root.parents]:
        try:
            status = os.stat(directory)
        except OSError:
            if directory == root:
                return  # (the pass says what is wrong with the root)
            continue
        pid = watcher_of(str(directory), (status.st_dev, status.st_ino), locks, strict=directory != root)
        if pid is None:
            continue
        holder = f"pid {pid}" if pid > 0 else "pid unknown"
        above = "" if directory == root else f", which holds {display_name(str(root))}"
        raise UsageError(
            f"another ckpt-watcher is already pruning {display_name(str(directory))} ({holder}){above}: "
            "stop it before a prune that deletes (--dry-run runs beside it)"
        )


def resolve_root(path: Path) -> Path:
    """The canonical root directory the user named; nothing outside it is ever touched."""
    try:
        is_directory = path.is_dir()  # through links: a root may be a link to the volume
    except OSError as error:  # a directory on the way the user may not search (EACCES), say
        raise UsageError(
            f"{display_name(str(path))}: cannot look at it: {describe_os_error(error)}"
        ) from None
    if not is_directory:
        problem = "not a directory" if os.path.exists(path) else "no such directory"
        raise UsageError(f"{display_name(str(path))}: {problem}")
    return real_path(path)


def run_prune(arguments: argparse.Namespace) -> int:
    """``prune``: one strict reconcile pass (with --dry-run: nothing applied), as a table or JSON."""
    loaded = load_policy_logged(arguments.policy, when_invalid=_checks_made_later(arguments.path, prune=True))
    progress = PassProgress(terminal.current) if terminal.current is not None else None
    with no_cyclic_collection():
        if isinstance(arguments.path, StorageURL):
            from ckpt_watcher.bucket_commands import prune_bucket  # noqa: PLC0415  (fsspec: URLs only)

            result = prune_bucket(arguments, loaded)
        else:
            _refuse_protected_urls(arguments.protect, arguments.path)
            root = resolve_root(arguments.path)
            if not arguments.dry_run:
                _refuse_beside_a_watcher(root)
            stream = PlanJSONStream(sys.stdout, loaded) if arguments.json and arguments.dry_run else None
            result = prune_once(
                root,
                loaded,
                pins=command_line_pins(arguments.protect, Path.cwd()),
                settle_seconds=arguments.settle,
                dry_run=arguments.dry_run,
                working_directory=Path.cwd(),
                on_group=progress.update if progress is not None else None,
                group_sink=_stream_group(stream) if stream is not None else None,
            )
            if result.streamed and stream is not None:  # the groups are written: the rest of the document
                return _finish_stream(stream, result)
        if progress is not None:
            progress.finish()
        if result.storage_error is not None:
            return _stopped_by_storage(result.storage_error, result, dry_run=arguments.dry_run)
        trash = TrashView(result.trashing, result.trash, frozenset(result.evicted_at_once))
        if arguments.json:
            write_plan_json(
                sys.stdout,
                result.the_plan,
                loaded,
                arguments.dry_run,
                result.applied,
                result.sources,
                trash,
                space=result.space,
                budget_unmet_bytes=result.budget_unmet_bytes,
            )
        else:
            write_table(
                sys.stdout,
                result.the_plan,
                arguments.dry_run,
                result.applied,
                result.sources,
                trash,
                space=result.space,
            )
    return _prune_exit(result)


def _checks_made_later(location: Path | StorageURL, *, prune: bool) -> list[PolicyCheck]:
    """What ``prune`` (or ``watch``) checks of a valid root policy only later, made at once of one
    refused anyway, so that one message lists every problem: what a bucket refuses (``watch URL``,
    ``prune URL``) and the protect_from configs that cannot be read (``prune``, which stops at one;
    the daemon logs ``protection_rejected`` and goes on)."""
    if isinstance(location, StorageURL):
        from ckpt_watcher.bucket_commands import refusals_when_invalid  # noqa: PLC0415  (fsspec: URLs only)

        return [refusals_when_invalid(location)]
    if not prune:
        return []
    return [lambda partial: unreadable_configs(root_configs(partial))]


def _prune_exit(result: PassResult) -> int:
    """``prune``'s exit code; exit 1 comes with one line saying what failed (the records say which)."""
    failures = _prune_failures(result)
    if failures:
        print(f"ckpt-watcher: {failures}; the next run tries again", file=sys.stderr)
    return EXIT_DELETE_FAILED if failures else EXIT_OK


def _finish_stream(stream: PlanJSONStream, result: PassResult) -> int:
    """Write the rest of a dry run's streamed plan; the exit code."""
    stream.finish(result.summary, result.trash, result.space, result.budget_unmet_bytes, result.storage_error)
    if result.storage_error is not None:  # (the groups after it are not in the document)
        return _stopped_by_storage(result.storage_error, result, dry_run=True, shown=True)
    return _prune_exit(result)


def _stopped_by_storage(error: str, result: PassResult, *, dry_run: bool, shown: bool = False) -> int:
    """Say why the pass stopped (a bucket's listing, a pin of a restored checkpoint) and what it had
    done by then; exit 1 (a dry run's plan, ``shown`` as far as it went, stops there too)."""
    done = result.deleted + result.trashed + result.purged
    if dry_run:
        told = f"{'the plan stops there' if shown else 'no plan is shown'} (a dry run: nothing was deleted)"
    elif done:
        told = f"the pass stopped there ({done} deleted, trashed or purged before)"
    else:
        told = "nothing was deleted"
    print(f"ckpt-watcher: {error}; {told}", file=sys.stderr)
    return EXIT_DELETE_FAILED


def _prune_failures(result: PassResult) -> str:
    """What failed in a ``prune``, in words; empty if nothing did."""
    parts = []
    if result.failed:
        parts.append(f"{result.failed} deletion{'s' if result.failed != 1 else ''} failed")
    if result.leftovers_remaining:
        parts.append(f"{result.leftovers_remaining} interrupted removal(s) could not be finished")
    if result.failed_groups:
        parts.append(
            f"{len(result.failed_groups)} director{'ies' if len(result.failed_groups) != 1 else 'y'}"
            " could not be planned (group_failed)"
        )
    return ", ".join(parts)


def _stream_group(stream: PlanJSONStream) -> Callable[[GroupPlan, PassResult], None]:
    """A pass's group sink that writes each group's plan to ``stream`` as it is made."""

    def write(group: GroupPlan, result: PassResult) -> None:
        try:
            stream.group(group, result.sources.get(group.directory), result.trashing.get(group.directory))
        except BrokenPipeError as error:  # not one group's failure: the whole pass has no reader
            raise OutputClosedError(*error.args) from None

    return write


def run_policy(arguments: argparse.Namespace) -> int:
    """``policy``: validate and print the effective policy, each key with its origin and meaning."""
    loaded = load_policy_logged(arguments.file)
    if arguments.json:
        document = {
            **policy_document(loaded),
            "origins": dict(loaded.origins),
            "descriptions": POLICY_DESCRIPTIONS,
        }
        print(render_json(document))
    else:
        print(render_policy(loaded))
    return EXIT_OK


def run_watch(arguments: argparse.Namespace) -> int:
    """``watch``: run the daemon until a stop signal; a bad policy at start-up is exit 2."""
    from ckpt_watcher.daemon import Watcher  # noqa: PLC0415  (prune needs no watchdog)
    from ckpt_watcher.metrics import DaemonFigures, MetricsUnavailableError, start_metrics  # noqa: PLC0415  (watch only)
    from ckpt_watcher.place import WatchOptions  # noqa: PLC0415
    from ckpt_watcher.supervisor import supervise  # noqa: PLC0415

    loaded = load_policy_logged(
        arguments.policy, when_invalid=_checks_made_later(arguments.path, prune=False)
    )
    figures = DaemonFigures()
    try:
        metrics = start_metrics(arguments.metrics, figures) if arguments.metrics is not None else None
    except MetricsUnavailableError as error:
        raise UsageError(str(error)) from None
    try:
        if isinstance(arguments.path, StorageURL):
            from ckpt_watcher.bucket_commands import watch_bucket  # noqa: PLC0415  (fsspec: URLs only)

            return watch_bucket(arguments, loaded, figures)
        _refuse_protected_urls(arguments.protect, arguments.path)
        options = WatchOptions.from_arguments(
            arguments, root=arguments.path, poll=arguments.poll, rescan=arguments.rescan
        )
        watcher = Watcher(options, loaded, notifier=Notifier(), figures=figures)
        try:
            watcher.lock_now()
        except LockHeldError as error:
            raise UsageError(str(error)) from None
        return supervise(watcher)
    finally:
        if metrics is not None:
            metrics.close()


def run_inspect(arguments: argparse.Namespace) -> int:
    """``inspect``: one row (or JSON object) per checkpoint; exit 1 if any could not be read."""
    from ckpt_watcher.contents import inspect_paths  # noqa: PLC0415  (keeps torch off other commands)

    loaded = load_policy_logged(arguments.policy)
    if arguments.unsafe:
        logger.warning(
            "unsafe_load_enabled",
            detail="checkpoints the safe loader refuses will run their pickle code; trusted files only",
        )
    if any(isinstance(path, StorageURL) for path in arguments.paths):
        from ckpt_watcher.bucket_commands import inspect_locations  # noqa: PLC0415  (fsspec: URLs only)

        results = inspect_locations(
            arguments.paths, unsafe=arguments.unsafe, naming=loaded.policy.compiled_naming
        )
    else:
        results = inspect_paths(
            arguments.paths, unsafe=arguments.unsafe, naming=loaded.policy.compiled_naming
        )
    if arguments.json:
        print(render_json([contents_document(result) for result in results]))
    else:
        print(render_contents_table(results))
    return EXIT_OK if all(result.ok for result in results) else EXIT_UNREADABLE


def run_trash_list(arguments: argparse.Namespace) -> int:
    """``trash list``: every entry of the root's trash, oldest first."""
    if isinstance(arguments.path, StorageURL):
        from ckpt_watcher.bucket_commands import bucket_trash_list  # noqa: PLC0415  (fsspec: URLs only)

        code, text = bucket_trash_list(arguments.path, as_json=arguments.json)
        print(text, file=sys.stdout if code == EXIT_OK else sys.stderr)
        return code
    root = resolve_root(arguments.path)
    try:
        listing = list_trash(root)
    except TrashUnusableError as error:
        print(f"ckpt-watcher: {error}", file=sys.stderr)
        return EXIT_TRASH_FAILED
    if arguments.json:
        print(render_json(trash_list_document(root, listing)))
    elif listing is None:
        print(f"no trash in {display_name(str(root))}")
    else:
        print(render_trash_table(listing))
    return EXIT_OK


def _purge(location: Path | StorageURL, root: Path, cutoff: float | None, why: str) -> PurgeResult:
    """Purge a directory's trash, or a bucket's (TrashUnusableError if it cannot be listed)."""
    if isinstance(location, StorageURL):
        from ckpt_watcher.bucket_commands import bucket_trash_empty  # noqa: PLC0415  (fsspec: URLs only)

        result, problem = bucket_trash_empty(location, cutoff, why)
        if result is None:
            raise TrashUnusableError(problem)
        return result
    return purge(root, lambda entry: cutoff is None or entry.trashed_at <= cutoff, why=why)


def run_trash_empty(arguments: argparse.Namespace) -> int:
    """``trash empty``: purge every entry now (or those trashed longer ago than --older-than)."""
    root = (
        arguments.path.core_path if isinstance(arguments.path, StorageURL) else resolve_root(arguments.path)
    )
    cutoff = None if arguments.older_than is None else time.time() - arguments.older_than
    why = "trash empty" if cutoff is None else "trash empty --older-than"
    try:
        result = _purge(arguments.path, root, cutoff, why)
    except TrashUnusableError as error:
        print(f"ckpt-watcher: {error}", file=sys.stderr)
        return EXIT_TRASH_FAILED
    count = len(result.purged)
    line = f"purged {count} entr{'y' if count == 1 else 'ies'} ({human_bytes(result.bytes_purged)})"
    if result.failed:
        line += f"; {len(result.failed)} could not be removed (retried by the next purge)"
    print(line)
    return EXIT_TRASH_FAILED if result.failed else EXIT_OK


def run_restore(arguments: argparse.Namespace) -> int:
    """``restore``: move the entries named back where they were, pinned for their grace."""
    if arguments.all and arguments.names:
        raise UsageError("restore: give names (or globs), or --all, not both")
    if not (arguments.names or arguments.all or arguments.since is not None):
        raise UsageError(
            "restore: name the entries to restore (names or globs), or give --since TIME or --all"
        )
    if isinstance(arguments.path, StorageURL):
        return _restore_bucket(arguments)
    root = resolve_root(arguments.path)
    try:
        listing = list_trash(root)
    except TrashUnusableError as error:
        print(f"ckpt-watcher: {error}", file=sys.stderr)
        return EXIT_NOT_RESTORED
    patterns = [_relative_pattern(root, name) for name in arguments.names]
    entries: list[TrashEntry] = listing.entries if listing is not None else []
    chosen = select_entries(entries, patterns, since=arguments.since, everything=arguments.all)
    if not chosen:
        print(f"ckpt-watcher: nothing in the trash of {display_name(str(root))} matches", file=sys.stderr)
        return EXIT_NOT_RESTORED
    results = restore(root, chosen)
    print(render_restore_results(results))
    return EXIT_OK if all(result.restored for result in results) else EXIT_NOT_RESTORED


def _restore_bucket(arguments: argparse.Namespace) -> int:
    """``restore URL ...``: the entries named copied back (bucket_trash_moves.restore_stored)."""
    from ckpt_watcher.bucket_commands import bucket_restore  # noqa: PLC0415  (fsspec: URLs only)

    url: StorageURL = arguments.path
    patterns = [name.removeprefix(f"{url.text}/") for name in arguments.names]
    results, problem = bucket_restore(url, patterns, since=arguments.since, everything=arguments.all)
    if results is None:
        print(f"ckpt-watcher: {problem}", file=sys.stderr)
        return EXIT_NOT_RESTORED
    print(render_restore_results(results))
    return EXIT_OK if all(result.restored for result in results) else EXIT_NOT_RESTORED


def _relative_pattern(root: Path, name: str) -> str:
    """A name given as an absolute path below the root is matched as the path relative to it."""
    if os.path.isabs(name):
        relative = os.path.relpath(os.path.abspath(name), root)
        if not relative.startswith(".."):
            return relative
    return name
