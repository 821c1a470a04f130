"""The only module that removes files: applies a plan's deletions, refusing anything that changed.

Each group directory is opened component by component from the root with ``O_NOFOLLOW``, so no
symlink is ever traversed and nothing outside the root is reachable. An entry is unlinked relative
to that directory only if it is still the very regular file that was planned (device, inode, size,
mtime), checked again once it is renamed out of the way, so a file renamed onto its name in between
is put back, never removed. A directory checkpoint is removed iteratively and relative to open
directories, never leaving its own mount (see filesystem.py), and never at all if it holds a mount
point. A file already gone is fine; a failure (a removal that stopped halfway included) is a FAILED
result, logged, and the rest of the plan goes on: no exception leaves this module's public functions.

With the trash on, a group is applied with a ``TrashMover`` (trash.py): after the same checks, the
checkpoint is moved into the trash instead of removed; where it cannot be (another mount, or no
space for its trash record on a full disk), it is removed as before and ``trash_bypassed`` says why.
What the trash holds is removed here too (``remove_trashed``, ``remove_name``,
``remove_empty_directory``), so this stays the one module that removes anything.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from ckpt_watcher.filesystem import (
    EntryStatus,
    Removal,
    WalkStopped,
    remove_tree,
    rename_no_replace,
    status_at,
    summarize_tree,
)
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.plan import PIN_SUFFIX, Decision, GroupPlan, Plan
from ckpt_watcher.records import (
    DELETING_PREFIX,
    EntryType,
    FileIdentity,
    display_name,
    metric_for_json,
)

logger = structlog.get_logger("ckpt_watcher.delete")

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Outcome(enum.StrEnum):
    """What happened to one planned deletion."""

    DELETED = "deleted"
    TRASHED = "trashed"
    ALREADY_GONE = "already_gone"
    CHANGED = "changed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DeletionResult:
    """One planned deletion and its outcome."""

    decision: Decision
    outcome: Outcome
    error: str | None = None


@dataclass
class ApplyResult:
    """Outcomes of applying a plan; ``failed`` means the exit code is 1."""

    results: list[DeletionResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def deleted(self) -> list[DeletionResult]:
        """Files actually removed."""
        return [result for result in self.results if result.outcome is Outcome.DELETED]

    @property
    def failed(self) -> list[DeletionResult]:
        """Deletions that raised an error (permission, read-only file system, ...)."""
        return [result for result in self.results if result.outcome is Outcome.FAILED]

    @property
    def bytes_freed(self) -> int:
        """Bytes of the files removed."""
        return sum(result.decision.record.bytes for result in self.deleted)

    @property
    def trashed(self) -> list[DeletionResult]:
        """Files moved into the trash (restorable until they are purged)."""
        return [result for result in self.results if result.outcome is Outcome.TRASHED]

    @property
    def bytes_trashed(self) -> int:
        """Bytes of the files moved into the trash."""
        return sum(result.decision.record.bytes for result in self.trashed)


class MoveOutcome(enum.Enum):
    """What a move into the trash did."""

    MOVED = "moved"
    BYPASSED = "bypassed"  # cannot be moved (another mount, no space for its record): removed at once
    GONE = "gone"
    CHANGED = "changed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Move:
    """A move into the trash, and why when it did not happen."""

    outcome: MoveOutcome
    detail: str | None = None


class TrashMover(Protocol):
    """Moves one checkpoint of an open group directory into the trash (trash.py's ``TrashTarget``)."""

    def move_in(self, directory_fd: int, decision: Decision) -> Move:
        """Move the checkpoint ``decision`` names, already checked to be the planned one; never raises."""
        ...


def apply_plan(
    plan: Plan, root: Path, stop: threading.Event | None = None, *, trash: TrashMover | None = None
) -> ApplyResult:
    """Delete what ``plan`` says to, group by group; ``stop`` is checked between two deletions.

    A group left half pruned by a stop is fine: the next pass plans it again. Never raises: every
    failure is a FAILED result, logged as ``checkpoint_delete_failed``. With ``trash``, deletions are
    moves into the trash.
    """
    result = ApplyResult()
    for group in plan.groups:
        if not group.deletions:
            continue
        if stop is not None and stop.is_set():
            break
        result.results.extend(apply_group(group, root, stop=stop, trash=trash))
    result.interrupted = len(result.results) < len(plan.deletions)
    return result


def apply_group(
    group: GroupPlan,
    root: Path,
    *,
    stop: threading.Event | None = None,
    trash: TrashMover | None = None,
    progress: Callable[[], None] | None = None,
) -> list[DeletionResult]:
    """Delete one group's planned files; never partially refuses the group for one bad file.

    With ``stop``, the deletions end as soon as it is set: one result per deletion done. A directory
    checkpoint is left as it is if the stop comes while it is walked before its rename, and as its
    leftover (``removal_interrupted``, finished by ``finish_leftovers``) if it comes during its
    removal; neither has a result. With ``trash``, each is moved into the trash instead (removed at
    once where it cannot be). ``progress`` is called after each (the daemon's keep-alive).
    """
    deletions = group.deletions
    if not deletions:
        return []
    try:
        directory_fd = open_below_root(root, group.directory)
    except FileNotFoundError:
        return [_gone(decision) for decision in deletions]
    except OSError as error:
        message = describe_os_error(error)
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            message = "a component of the directory is now a symlink or not a directory"
        return [_failed(decision, message) for decision in deletions]
    except ValueError as error:
        return [_failed(decision, str(error)) for decision in deletions]
    except Exception as error:
        return [_failed(decision, _unexpected(error)) for decision in deletions]
    try:
        return _delete_each(directory_fd, deletions, trash, stop, progress)
    finally:
        os.close(directory_fd)


def _delete_each(
    directory_fd: int,
    deletions: Sequence[Decision],
    trash: TrashMover | None,
    stop: threading.Event | None,
    progress: Callable[[], None] | None,
) -> list[DeletionResult]:
    """``_delete_guarded`` each, until ``stop`` is set; ``progress`` after each."""
    results: list[DeletionResult] = []
    for decision in deletions:
        if stop is not None and stop.is_set():
            break
        try:
            results.append(_delete_guarded(directory_fd, decision, trash, stop))
        except WalkStopped:
            break
        if progress is not None:
            progress()
    return results


def _delete_guarded(
    directory_fd: int, decision: Decision, trash: TrashMover | None, stop: threading.Event | None
) -> DeletionResult:
    """``_delete_one``, with any unexpected exception turned into a logged failure (WalkStopped, the
    stop asked for, goes through)."""
    try:
        return _delete_one(directory_fd, decision, trash, stop)
    except WalkStopped:
        raise
    except Exception as error:
        return _failed(decision, _unexpected(error))


def open_below_root(root: Path, directory: Path) -> int:
    """Open ``directory`` by walking from ``root`` one component at a time, never through a symlink."""
    relative = os.path.relpath(directory, root)
    parts = [] if relative == "." else relative.split(os.sep)
    if any(part in {"..", ""} for part in parts) or not directory.is_absolute():
        raise ValueError(f"{directory} is outside the root {root}; refusing to delete there")
    current = os.open(root, _DIRECTORY_FLAGS)
    try:
        for part in parts:
            child = os.open(part, _DIRECTORY_FLAGS, dir_fd=current)
            os.close(current)
            current = child
    except BaseException:
        os.close(current)
        raise
    return current


def _delete_one(
    directory_fd: int, decision: Decision, trash: TrashMover | None, stop: threading.Event | None
) -> DeletionResult:
    record = decision.record
    name = record.name
    try:
        status = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return _gone(decision)
    except OSError as error:
        return _failed(decision, describe_os_error(error))
    now_identity = FileIdentity.of_stat(status)
    expected_type = stat.S_ISDIR if record.entry_type is EntryType.DIRECTORY else stat.S_ISREG
    if not expected_type(status.st_mode) or now_identity != record.identity:
        return _changed(decision)
    if record.entry_type is EntryType.DIRECTORY:
        return _remove_directory(directory_fd, decision, trash, stop)
    if trash is not None:
        moved = _move_to_trash(trash, directory_fd, decision)
        if moved is not None:
            return moved
    return _unlink_checked(directory_fd, decision)


def pinned_since(directory_fd: int, name: str) -> tuple[Outcome, str] | None:
    """Why ``name`` must be kept though it was planned: a ``NAME.keep`` pin there now (CHANGED), or
    one that cannot be looked for (FAILED); None to go on. One touched after the plan was made (a
    keep_free eviction is applied at the end of its pass, from a plan seconds old on a large tree)
    must still keep it, so this is asked right before the rename that removes or trashes it (after a
    directory's walk, under the trash's lock). A directory under that name is no pin, as for the
    planner (scan.py makes no record of it)."""
    try:
        status = os.lstat(name + PIN_SUFFIX, dir_fd=directory_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            return None  # (no pin can have that name)
        return Outcome.FAILED, f"its .keep pin cannot be looked for: {describe_os_error(error)}"
    if stat.S_ISDIR(status.st_mode):
        return None
    return Outcome.CHANGED, f"pinned by {name}{PIN_SUFFIX} since it was planned"


def _kept_by_pin(directory_fd: int, decision: Decision) -> DeletionResult | None:
    """``pinned_since`` as this module's result (logged), or None."""
    found = pinned_since(directory_fd, decision.record.name)
    if found is None:
        return None
    outcome, why = found
    return _changed(decision, f"{why}; kept") if outcome is Outcome.CHANGED else _failed(decision, why)


def _unlink_checked(directory_fd: int, decision: Decision) -> DeletionResult:
    """Unlink a planned file only once it is out of the way and proved the file planned.

    A check by name and an unlink by name are two calls: a writer renaming a new file onto the name
    in between (a re-save of the same step) would lose it. So the file is first renamed to its
    leftover name (never replacing anything), what landed there is checked, and only that is
    unlinked; anything else is put back under its name, kept. A crash in between leaves a leftover
    that ``finish_leftovers`` removes only if its inode is the one its name carries."""
    record = decision.record
    assert record.identity is not None  # checked by _delete_one
    kept = _kept_by_pin(directory_fd, decision)
    if kept is not None:
        return kept
    doomed = leftover_name(record.name, record.identity.inode)
    try:
        rename_no_replace(record.name, doomed, source_dir_fd=directory_fd, destination_dir_fd=directory_fd)
    except FileNotFoundError:
        return _gone(decision)
    except OSError as error:
        return _failed(decision, describe_os_error(error))
    try:
        landed = os.stat(doomed, dir_fd=directory_fd, follow_symlinks=False)
        planned = stat.S_ISREG(landed.st_mode) and FileIdentity.of_stat(landed) == record.identity
        if planned:
            os.unlink(doomed, dir_fd=directory_fd)
            return _deleted(decision)
    except FileNotFoundError:
        return _gone(decision)
    except OSError as error:
        return _put_back(directory_fd, decision, doomed, _failed(decision, describe_os_error(error)))
    return _put_back(directory_fd, decision, doomed, None)


def _put_back(
    directory_fd: int, decision: Decision, doomed: str, failure: DeletionResult | None
) -> DeletionResult:
    """Rename what is under ``doomed`` back to the record's name: it was not the checkpoint planned
    (``failure`` None: CHANGED), or it could not be removed (``failure``). If the name is taken again,
    it stays under ``doomed``, never removed (its inode is not the one the name carries), and says so."""
    try:
        rename_no_replace(
            doomed, decision.record.name, source_dir_fd=directory_fd, destination_dir_fd=directory_fd
        )
    except OSError as error:
        kept_as = display_name(str(decision.record.path.parent / doomed))
        logger.warning(
            "checkpoint_changed",
            path=display_name(str(decision.record.path)),
            detail=f"not put back under its name ({describe_os_error(error)}); kept as {kept_as}",
        )
        return failure or DeletionResult(decision, Outcome.CHANGED)
    return failure or _changed(decision)


def _deleted(decision: Decision) -> DeletionResult:
    record = decision.record
    logger.info(
        "checkpoint_deleted",
        path=display_name(str(record.path)),
        kind=record.kind.value,
        epoch=record.epoch,
        step=record.step,
        metric=metric_for_json(record),
        bytes=record.bytes,
        reasons=list(decision.reasons),
    )
    return DeletionResult(decision, Outcome.DELETED)


def _move_to_trash(trash: TrashMover, directory_fd: int, decision: Decision) -> DeletionResult | None:
    """Move a checked checkpoint into the trash; None when it must be removed at once instead."""
    move = trash.move_in(directory_fd, decision)
    if move.outcome is MoveOutcome.MOVED:
        return DeletionResult(decision, Outcome.TRASHED)
    if move.outcome is MoveOutcome.GONE:
        return _gone(decision)
    if move.outcome is MoveOutcome.CHANGED:
        return _changed(decision, move.detail or _NOT_AS_PLANNED)
    if move.outcome is MoveOutcome.FAILED:
        return _failed(decision, f"not moved to the trash: {move.detail}")
    logger.warning(
        "trash_bypassed",
        path=display_name(str(decision.record.path)),
        error=move.detail,
        detail="it cannot be moved into the trash, so it is removed at once, as without a trash "
        "(checkpoint_deleted or checkpoint_delete_failed follows)",
    )
    return None


_REPLANNED = "kept, it is re-planned on the next pass"
_NOT_AS_PLANNED = f"no longer the file that was planned; {_REPLANNED}"
# A directory checkpoint whose files changed between its scan and its deletion's walk: a re-save in
# place (a rolled-back run saving the same step again, torch.distributed.checkpoint's default)
# changes neither the directory's own mtime nor, when a file is rewritten, its list of entries.
_WRITTEN_SINCE = f"written to since it was planned (its files changed); {_REPLANNED}"


def _changed(decision: Decision, detail: str = _NOT_AS_PLANNED) -> DeletionResult:
    logger.warning("checkpoint_changed", path=display_name(str(decision.record.path)), detail=detail)
    return DeletionResult(decision, Outcome.CHANGED)


def leftover_name(name: str, inode: int) -> str:
    """The name a directory checkpoint is renamed to while it is removed.

    It carries the directory's own inode number, so a later pass can prove the leftover is the tool's
    (a directory someone made with this prefix, or a copy of a real leftover, has another inode).
    """
    return f"{DELETING_PREFIX}i{inode}-{name}"[:255]


def _refuse_directory(
    directory_fd: int, decision: Decision, stop: threading.Event | None
) -> DeletionResult | None:
    """Why a planned directory checkpoint must not be removed now (gone, changed, written to since its
    scan, holding a mount point), or None if it may be. Raises WalkStopped once ``stop`` is set
    (nothing was touched)."""
    try:
        summary = summarize_tree(decision.record.name, dir_fd=directory_fd, stop=stop)
    except FileNotFoundError:
        return _gone(decision)
    except OSError as error:
        return _failed(decision, f"cannot be walked before removal: {describe_os_error(error)}")
    planned = decision.record.identity
    walked = summary.identity
    # Its own mtime too: an entry added or removed since the scan changes it, and a directory made
    # anew under the name may be given the inode the old one freed (ext4 reuses one at once).
    if (
        planned is None
        or walked is None
        or (walked.device, walked.inode, walked.mtime_ns) != (planned.device, planned.inode, planned.mtime_ns)
    ):
        return _changed(decision)
    if summary.mount_points:  # (before the signature: a mount hides what was walked below it)
        return _failed(
            decision,
            f"contains a mount point ({display_name(summary.mount_points[0])}): a checkpoint holding "
            "another file system is never deleted",
        )
    planned_signature = decision.record.tree_signature
    if planned_signature is not None and summary.signature() != planned_signature:
        return _changed(decision, _WRITTEN_SINCE)
    return None


def _remove_directory(
    directory_fd: int, decision: Decision, trash: TrashMover | None, stop: threading.Event | None
) -> DeletionResult:
    """Remove a directory checkpoint: refuse one that holds a mount point, rename it out of the way in
    one step (into the trash, whole, when there is one), then remove the tree without ever leaving its
    file system.

    After the rename nothing carries the checkpoint's name, so a removal that fails halfway never leaves
    half a checkpoint that looks whole; it is reported as a failure naming what remains, and a later
    pass (``finish_leftovers``) finishes it. So does a removal ``stop`` cuts short (WalkStopped,
    logged as ``removal_interrupted``); a stop during the walk before the rename leaves it untouched.
    """
    record = decision.record
    name = record.name
    refused = _refuse_directory(directory_fd, decision, stop) or _kept_by_pin(directory_fd, decision)
    if refused is not None:  # (the pin looked for after the walk, which can take long)
        return refused
    if trash is not None:
        moved = _move_to_trash(trash, directory_fd, decision)
        if moved is not None:
            return moved
    assert record.identity is not None  # checked by _refuse_directory
    doomed = leftover_name(name, record.identity.inode)
    try:
        rename_no_replace(name, doomed, source_dir_fd=directory_fd, destination_dir_fd=directory_fd)
        landed = status_at(directory_fd, doomed)
    except FileNotFoundError:
        return _gone(decision)
    except OSError as error:
        return _failed(decision, describe_os_error(error))
    if not stat.S_ISDIR(landed.mode) or (landed.device, landed.inode) != (
        record.identity.device,
        record.identity.inode,
    ):  # swapped in between the walk and the rename: not what was walked
        return _put_back(directory_fd, decision, doomed, None)
    leftover = display_name(str(record.path.parent / doomed))
    try:
        removal = remove_tree(doomed, dir_fd=directory_fd, stop=stop)
    except OSError as error:
        removal = Removal(removed=False, remains=[f". ({describe_os_error(error)})"])
    except WalkStopped:
        _log_interrupted(str(record.path), leftover, "renamed out of the way first")
        raise
    if removal.removed:
        return _deleted(decision)
    remains = [display_name(item) for item in removal.remains]
    return _failed(
        decision,
        f"removed only in part; renamed to {leftover}, where {', '.join(remains)} remain(s); "
        "the rest is removed on a later pass",
        remains=remains,
    )


def _log_interrupted(path: str, left_as: str, detail: str) -> None:
    """A removal a stop cut short: what is left is a leftover, finished at the next start."""
    logger.info(
        "removal_interrupted",
        path=display_name(path),
        left_as=display_name(left_as),
        detail=f"asked to stop; {detail}, the rest is removed at the next start (or full pass)",
    )


@dataclass(frozen=True, slots=True)
class LeftoverResult:
    """One leftover of an interrupted removal, and whether it is gone now (else what remains)."""

    path: Path
    removed: bool
    remains: tuple[str, ...] = ()


_REPORTED_FOREIGN: set[tuple[int, int]] = set()


def finish_leftovers(
    root: Path,
    directory: Path,
    *,
    reported: set[tuple[int, int]] | None = None,
    stop: threading.Event | None = None,
) -> list[LeftoverResult]:
    """Finish removing checkpoints whose removal was interrupted (killed, or failed halfway): directory
    checkpoints, and files killed between their rename out of the way and their unlink.

    Only leftovers the tool can prove it made are touched (the inode in the name is the entry's
    own); any other ``.ckpt-watcher-deleting-*`` entry is kept and reported once (``reported`` holds
    the (device, inode) of those already reported). Never raises: a failure is a result, logged.
    Once ``stop`` is set, the leftover being removed is left as it is (``removal_interrupted``), still
    a leftover, and no other is begun.
    """
    results: list[LeftoverResult] = []
    try:
        directory_fd = open_below_root(root, directory)
    except (OSError, ValueError):
        return results
    try:
        for name in os.listdir(directory_fd):
            if stop is not None and stop.is_set():
                break
            if name.startswith(DELETING_PREFIX):
                result = _finish_one(directory_fd, directory, name, reported, stop)
                if result is not None:
                    results.append(result)
    except Exception as error:
        logger.error(
            "leftover_not_removed",
            path=display_name(str(directory)),
            error=_unexpected(error),
            detail="retried on a later pass",
        )
    finally:
        os.close(directory_fd)
    return results


def _finish_one(
    directory_fd: int,
    directory: Path,
    name: str,
    reported: set[tuple[int, int]] | None,
    stop: threading.Event | None,
) -> LeftoverResult | None:
    path = directory / name
    try:
        status = status_at(directory_fd, name)
    except FileNotFoundError:
        return None
    ours = stat.S_ISDIR(status.mode) or stat.S_ISREG(status.mode)
    if not ours or name != leftover_name(name_after_prefix(name), status.inode):
        key = (status.device, status.inode)
        if reported is None or key not in reported:
            logger.warning(
                "leftover_not_ours",
                path=display_name(str(path)),
                detail="named like an interrupted removal, but not made by this tool; never removed",
            )
            if reported is not None:
                reported.add(key)
        return None
    if stat.S_ISREG(status.mode):  # a file checked and renamed, then the process died: unlink it
        return _finish_file(directory_fd, path, name)
    try:
        removal = _remove_leftover_tree(directory_fd, name, stop)
    except WalkStopped:
        _log_interrupted(str(path), str(path), "it is a leftover still")
        return LeftoverResult(path, False, (". (asked to stop)",))
    if removal is None:
        return None
    remains = tuple(display_name(item) for item in removal.remains)
    if removal.removed:
        logger.info("leftover_removed", path=display_name(str(path)))
    else:
        logger.error(
            "leftover_not_removed",
            path=display_name(str(path)),
            remains=list(remains),
            detail="retried on a later pass",
        )
    return LeftoverResult(path, removal.removed, remains)


def _remove_leftover_tree(directory_fd: int, name: str, stop: threading.Event | None) -> Removal | None:
    """Remove a directory leftover unless it holds a mount point; None if it is gone already. Raises
    WalkStopped once ``stop`` is set."""
    try:
        summary = summarize_tree(name, dir_fd=directory_fd, stop=stop)
        if summary.mount_points:
            return Removal(removed=False, remains=[f"{summary.mount_points[0]} (a mount point)"])
        return remove_tree(name, dir_fd=directory_fd, stop=stop)
    except FileNotFoundError:
        return None
    except OSError as error:
        return Removal(removed=False, remains=[f". ({describe_os_error(error)})"])


def _finish_file(directory_fd: int, path: Path, name: str) -> LeftoverResult | None:
    """Unlink a file leftover (its inode proved it the tool's); None if it is gone already."""
    try:
        os.unlink(name, dir_fd=directory_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        remains = (f". ({describe_os_error(error)})",)
        logger.error(
            "leftover_not_removed",
            path=display_name(str(path)),
            remains=list(remains),
            detail="retried on a later pass",
        )
        return LeftoverResult(path, False, remains)
    logger.info("leftover_removed", path=display_name(str(path)))
    return LeftoverResult(path, True)


def name_after_prefix(name: str) -> str:
    """The checkpoint's own name inside a leftover name (``.ckpt-watcher-deleting-i<inode>-<name>``)."""
    rest = name.removeprefix(DELETING_PREFIX)
    inode, separator, original = rest.partition("-")
    return original if separator and inode.startswith("i") else rest


def remove_leftovers(root: Path, directory: Path) -> None:
    """``finish_leftovers`` for callers that keep no state of their own (reports foreign ones once
    per process)."""
    finish_leftovers(root, directory, reported=_REPORTED_FOREIGN)


@dataclass(frozen=True, slots=True)
class TrashRemoval:
    """What removing one thing the trash holds did: DELETED, ALREADY_GONE, CHANGED or FAILED (``stopped``:
    a stop cut it short)."""

    outcome: Outcome
    error: str | None = None
    stopped: bool = False


def remove_trashed(
    dir_fd: int,
    name: str,
    *,
    expected: Callable[[EntryStatus], bool] | None,
    stop: threading.Event | None = None,
) -> TrashRemoval:
    """Remove ``name`` in the open trash directory ``dir_fd``: a file is unlinked, a directory removed
    entry by entry, never following a symlink and never leaving its mount (``remove_tree``).

    ``expected`` says whether what is there (never following a symlink) is the entry that was trashed:
    anything else is CHANGED and left alone; None removes whatever is there (an interrupted purge's
    leftover). Once ``stop`` is set, a directory's removal ends (FAILED, ``stopped``): what remains
    stays under ``name``, for the next purge to finish.
    Never raises.
    """
    try:
        status = status_at(dir_fd, name)
    except FileNotFoundError:
        return TrashRemoval(Outcome.ALREADY_GONE)
    except OSError as error:
        return TrashRemoval(Outcome.FAILED, describe_os_error(error))
    is_directory = stat.S_ISDIR(status.mode)
    if expected is not None and not expected(status):
        return TrashRemoval(Outcome.CHANGED, "not the entry that was trashed")
    try:
        if not is_directory:
            os.unlink(name, dir_fd=dir_fd)
            return TrashRemoval(Outcome.DELETED)
        removal = remove_tree(name, dir_fd=dir_fd, stop=stop)
    except FileNotFoundError:
        return TrashRemoval(Outcome.ALREADY_GONE)
    except WalkStopped:
        return TrashRemoval(Outcome.FAILED, "asked to stop before it was removed in full", stopped=True)
    except Exception as error:
        message = describe_os_error(error) if isinstance(error, OSError) else _unexpected(error)
        return TrashRemoval(Outcome.FAILED, message)
    if removal.removed:
        return TrashRemoval(Outcome.DELETED)
    remains = ", ".join(display_name(item) for item in removal.remains)
    return TrashRemoval(Outcome.FAILED, f"removed only in part: {remains} remain(s)")


def remove_name(dir_fd: int, name: str) -> str | None:
    """Unlink the file ``name`` in ``dir_fd`` (a trash entry's metadata); None if it is gone, else why
    it is not. Never raises."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        return describe_os_error(error)
    return None


def remove_empty_directory(dir_fd: int, name: str) -> bool:
    """Remove the directory ``name`` in ``dir_fd`` if it is empty; True if it was. Never raises."""
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        return False
    return True


def _unexpected(error: BaseException) -> str:
    return f"unexpected error: {type(error).__name__}: {error}"


def _gone(decision: Decision) -> DeletionResult:
    logger.debug("checkpoint_already_gone", path=display_name(str(decision.record.path)))
    return DeletionResult(decision, Outcome.ALREADY_GONE)


class RepeatedFailures:
    """The last failure of each checkpoint (path and identity; bounded): one that fails the same way at
    every pass (a run directory the watcher may not write in) is logged at error the first time and at
    debug after that, not once a pass for as long as it lasts. Each failure still counts in its pass's
    ``failed`` and in ckpt_watcher_delete_failures_total (the example alert watches that)."""

    MAXIMUM = 10_000

    def __init__(self) -> None:
        self._last: dict[tuple[str, FileIdentity | None], str] = {}

    def repeated(self, path: str, identity: FileIdentity | None, message: str) -> bool:
        """True if this very checkpoint failed with this very message the last time it failed."""
        key = (path, identity)
        if self._last.get(key) == message:
            return True
        if len(self._last) >= self.MAXIMUM:
            self._last.clear()  # (the ones forgotten are logged at error once more)
        self._last[key] = message
        return False


_REPEATED_FAILURES = RepeatedFailures()


def _failed(decision: Decision, message: str, remains: list[str] | None = None) -> DeletionResult:
    fields = {"remains": remains} if remains is not None else {}
    path = display_name(str(decision.record.path))
    if _REPEATED_FAILURES.repeated(path, decision.record.identity, message):
        level, detail = logging.DEBUG, "not deleted, as at its last attempt; retried on the next pass"
    else:
        level, detail = logging.ERROR, "not deleted; retried on the next pass (a repeat of this is at debug)"
    logger.log(level, "checkpoint_delete_failed", path=path, error=message, detail=detail, **fields)
    return DeletionResult(decision, Outcome.FAILED, message)
