"""The only module that removes files: applies a plan's deletions, refusing anything that changed.

Each group directory is opened component by component from the root with ``O_NOFOLLOW``, so no
symlink is ever traversed and nothing outside the root is reachable. An entry is unlinked relative
to that directory only if it is still the very regular file that was planned (device, inode, size,
mtime). A file already gone is fine; a failure is logged and the rest of the plan goes on.
"""

from __future__ import annotations

import enum
import errno
import os
import shutil
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.plan import Decision, GroupPlan, Plan
from ckpt_watcher.records import (
    DELETING_PREFIX,
    CheckpointRecord,
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


def apply_plan(plan: Plan, root: Path, stop: threading.Event | None = None) -> ApplyResult:
    """Delete what ``plan`` says to, group by group; ``stop`` is checked between two deletions.

    A group left half pruned by a stop is fine: the next pass plans it again.
    """
    result = ApplyResult()
    for group in plan.groups:
        if not group.deletions:
            continue
        if stop is not None and stop.is_set():
            break
        result.results.extend(apply_group(group, root, stop=stop))
    result.interrupted = len(result.results) < len(plan.deletions)
    return result


def apply_group(group: GroupPlan, root: Path, *, stop: threading.Event | None = None) -> list[DeletionResult]:
    """Delete one group's planned files; never partially refuses the group for one bad file.

    With ``stop``, the deletions end as soon as it is set: one result per deletion attempted.
    """
    deletions = group.deletions
    if not deletions:
        return []
    try:
        directory_fd = open_below_root(root, group.directory)
    except FileNotFoundError:
        return [_gone(decision) for decision in deletions]
    except OSError as error:
        message = _describe(error)
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            message = "a component of the directory is now a symlink or not a directory"
        return [_failed(decision, message) for decision in deletions]
    except ValueError as error:
        return [_failed(decision, str(error)) for decision in deletions]
    try:
        results: list[DeletionResult] = []
        for decision in deletions:
            if stop is not None and stop.is_set():
                break
            results.append(_delete_one(directory_fd, decision))
        return results
    finally:
        os.close(directory_fd)


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


def _delete_one(directory_fd: int, decision: Decision) -> DeletionResult:
    record = decision.record
    name = record.name
    try:
        status = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return _gone(decision)
    except OSError as error:
        return _failed(decision, _describe(error))
    now_identity = FileIdentity.of_stat(status)
    expected_type = stat.S_ISDIR if record.entry_type is EntryType.DIRECTORY else stat.S_ISREG
    if not expected_type(status.st_mode) or now_identity != record.identity:
        logger.warning(
            "checkpoint_changed",
            path=display_name(str(record.path)),
            detail="no longer the file that was planned; kept, it is re-planned on the next pass",
        )
        return DeletionResult(decision, Outcome.CHANGED)
    try:
        if record.entry_type is EntryType.DIRECTORY:
            _remove_directory(directory_fd, name, record)
        else:
            os.unlink(name, dir_fd=directory_fd)
    except FileNotFoundError:
        return _gone(decision)
    except OSError as error:
        return _failed(decision, _describe(error))
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


def _remove_directory(directory_fd: int, name: str, record: CheckpointRecord) -> None:
    """Rename the directory checkpoint out of the way in one step, then remove the tree.

    After the rename nothing carries the checkpoint's name, so a removal that fails halfway never
    leaves half a checkpoint that looks whole. ``shutil.rmtree`` with ``dir_fd`` never follows a
    symlink inside the tree: a link planted there pointing outside the root is removed, not followed.
    """
    doomed = f"{DELETING_PREFIX}{os.getpid()}-{name}"[:255]
    os.rename(name, doomed, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    try:
        shutil.rmtree(doomed, dir_fd=directory_fd)
    except OSError as error:
        logger.error(
            "checkpoint_delete_incomplete",
            path=display_name(str(record.path.parent / doomed)),
            error=_describe(error),
            detail="renamed out of the way; the rest is removed on a later pass",
        )


def remove_leftovers(root: Path, directory: Path) -> None:
    """Finish removing directory checkpoints whose earlier removal was interrupted."""
    try:
        directory_fd = open_below_root(root, directory)
    except (OSError, ValueError):
        return
    try:
        for name in os.listdir(directory_fd):
            if not name.startswith(DELETING_PREFIX):
                continue
            try:
                shutil.rmtree(name, dir_fd=directory_fd)
                logger.info("leftover_removed", path=display_name(str(directory / name)))
            except OSError as error:
                logger.warning(
                    "leftover_not_removed", path=display_name(str(directory / name)), error=_describe(error)
                )
    finally:
        os.close(directory_fd)


def _describe(error: OSError) -> str:
    return describe_os_error(error)


def _gone(decision: Decision) -> DeletionResult:
    logger.debug("checkpoint_already_gone", path=display_name(str(decision.record.path)))
    return DeletionResult(decision, Outcome.ALREADY_GONE)


def _failed(decision: Decision, message: str) -> DeletionResult:
    logger.error(
        "checkpoint_delete_failed",
        path=display_name(str(decision.record.path)),
        error=message,
        detail="kept; retried on the next pass",
    )
    return DeletionResult(decision, Outcome.FAILED, message)
