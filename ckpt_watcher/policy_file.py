"""Policy files as the tool follows them: the one place that logs what happened to a policy file.

``policy_reloaded``, ``policy_unchanged``, ``policy_rejected`` and ``policy_warning`` are logged here
only, for the main ``--policy`` file and the per-run ``.ckpt-watcher.yaml`` files alike, and
``changes`` means one thing for both: each retention key whose value *as written in that file*
changed, ``{"old": ..., "new": ...}``, where ``null`` is "not set in this file" (the parent's value,
or the default, applies). ``PolicyFile`` follows the main file of a running daemon.

Whoever counts reloads (the metrics) passes an ``on_outcome`` listener: it is called right where the
outcome is logged, once per ``policy_reloaded`` or ``policy_unchanged`` (``APPLIED``) and per
``policy_rejected`` (``REJECTED``), so the count and the log records cannot disagree.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from ckpt_watcher.config_files import QuietFiles
from ckpt_watcher.policy import LoadedPolicy, PolicyCheck, PolicyError, load_checked_policy, load_policy
from ckpt_watcher.records import FileIdentity

logger = structlog.get_logger("ckpt_watcher.policy_file")


class ReloadResult(enum.StrEnum):
    """What re-reading a policy file came to."""

    APPLIED = "applied"  # valid: in force now (changed or not)
    REJECTED = "rejected"  # refused: the previous contents (or nothing) stay in force


OutcomeListener = Callable[[ReloadResult], None]


class InvalidPolicyFilesError(Exception):
    """Several policy files (root, per-run overrides, protect_from configs) with problems: all are
    shown, exit code 2, nothing deleted."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(error) for error in errors))


def setting_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The keys whose value as written changed: ``{key: {"old": ..., "new": ...}}``, None = not set."""
    return {
        key: {"old": old.get(key), "new": new.get(key)}
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    }


def log_warnings(loaded: LoadedPolicy) -> None:
    """One ``policy_warning`` per warning of a file just read (a misspelt key, say)."""
    for warning in loaded.warnings:
        logger.warning("policy_warning", source=loaded.source_label, message=warning)


def log_rejected(
    source: str, error: PolicyError, detail: str, on_outcome: OutcomeListener | None = None
) -> None:
    """An edit that cannot be used: every problem, and what stays in force instead."""
    logger.error("policy_rejected", source=source, problems=error.problems, detail=detail)
    if on_outcome is not None:
        on_outcome(ReloadResult.REJECTED)


def log_loaded(
    source: str, old: Mapping[str, Any], new: LoadedPolicy, on_outcome: OutcomeListener | None = None
) -> bool:
    """A valid file read again: ``policy_reloaded`` with its changes, or ``policy_unchanged``.

    Returns True if anything the file sets changed.
    """
    log_warnings(new)
    changes = setting_changes(old, new.settings)
    if changes:
        logger.info("policy_reloaded", source=source, changes=changes)
    else:
        _log_unchanged(source, on_outcome)
        return False
    if on_outcome is not None:
        on_outcome(ReloadResult.APPLIED)
    return True


def _log_unchanged(source: str, on_outcome: OutcomeListener | None) -> None:
    logger.info("policy_unchanged", source=source)
    if on_outcome is not None:
        on_outcome(ReloadResult.APPLIED)


def load_policy_logged(path: Path | None, *, when_invalid: Sequence[PolicyCheck] = ()) -> LoadedPolicy:
    """Load a policy once (a command's start) and log its warnings; a PolicyError is the caller's.
    ``when_invalid``: the checks the command makes of a valid policy later (its protect_from configs
    can be read, a bucket can give what it asks), made at once of a file refused anyway, so that one
    PolicyError lists every problem (``load_checked_policy``)."""
    loaded = load_policy(None) if path is None else load_checked_policy(path, when_invalid=when_invalid)
    log_warnings(loaded)
    return loaded


class PolicyFile:
    """The main policy of a running daemon: re-read when its file changes (edit, rename, ConfigMap
    symlink swap) or on request (SIGHUP); an unusable edit keeps the last good policy in force.

    ``on_disk`` is False while what is in force is not the file on disk: after a refused edit, or
    while the file is missing.
    """

    def __init__(
        self,
        path: Path | None,
        loaded: LoadedPolicy,
        on_outcome: OutcomeListener | None = None,
        refuse: Callable[[LoadedPolicy], list[str]] | None = None,
    ) -> None:
        self.path = path
        self.loaded = loaded
        # What an edit may not ask for where the root is (a bucket: keep_free), as ``At 'key': ...``
        # problems: such an edit is refused like one that does not parse.
        self.refuse = refuse
        self.on_disk = True
        self._on_outcome = on_outcome
        self._signature = FileIdentity.of_path(path)
        self._missing_logged = False
        # Missing only once gone for the quiet time: an editor that moves the old file aside before it
        # writes the new one (vim's backup) leaves a gap, and the last good policy is in force anyway.
        self._quiet = QuietFiles(missing_waits=True)

    def changed_on_disk(self) -> bool:
        """True if the file is no longer the one last read (or appeared, or vanished), once a changed
        file has been left alone long enough to read whole (``QuietFiles``): a policy re-saved in
        place is empty, then partial, for a moment, and its missing keys would fall back to defaults
        that keep less. (A reload on request, SIGHUP, reads the file as it is.)"""
        identity = FileIdentity.of_path(self.path)
        if identity == self._signature:
            if self.path is not None:  # (moved aside and back: what was seen meanwhile is over)
                self._quiet.forget(self.path)
            return False
        return self.path is None or self._quiet.quiet(self.path, identity)

    def reload(self) -> bool:
        """Re-read the file; True if a different valid policy is now in force."""
        self._signature = FileIdentity.of_path(self.path)
        if self.path is None:
            _log_unchanged(self.loaded.source_label, self._on_outcome)
            return False
        self.on_disk = False
        if _is_missing(self.path):
            if not self._missing_logged:
                logger.warning(
                    "policy_missing",
                    source=str(self.path),
                    detail="the policy file is gone; the last good policy stays in force",
                )
                self._missing_logged = True
            return False
        self._missing_logged = False
        try:
            loaded = load_checked_policy(self.path, [self.refuse] if self.refuse is not None else [])
        except PolicyError as error:
            log_rejected(str(self.path), error, "the previous policy stays in force", self._on_outcome)
            return False
        previous, self.loaded, self.on_disk = self.loaded, loaded, True
        return log_loaded(str(self.path), previous.settings, loaded, self._on_outcome)


def _is_missing(path: Path) -> bool:
    """True if ``path`` is not there. A file that cannot be looked at (a directory on the way made
    unsearchable: EACCES) is not missing: reading it says why, as a refused edit."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False
