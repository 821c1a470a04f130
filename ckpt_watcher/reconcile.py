"""Plan a checkpoint tree, apply the plan, say what happened: the one core ``prune`` and ``watch`` call.

A pass (``Reconciler.run``) takes groups (directories): every group below the root for a full pass,
the ones events named otherwise. It

1. finds the policy in force in each (``PolicyTree``: the root policy and per-run overrides),
2. brings the ``protect_from`` configs up to date (``ProtectionRegistry``) and gathers the pins,
3. scans each group (``scan``), remembering what it learned for the next pass (``GroupIndex``),
4. plans them all at once (``plan``, a pure function), so a symlink in one group protects its
   target in another, whichever command runs,
5. applies the plan (``delete``), stopping between two deletions when asked to,

and returns a ``PassResult``: what the logs, the command's table or JSON and ``STATUS=`` read.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ckpt_watcher.delete import ApplyResult, Outcome, apply_plan, remove_leftovers
from ckpt_watcher.groups import GroupIndex, GroupState, LastLink
from ckpt_watcher.naming import Kind
from ckpt_watcher.overrides import OVERRIDE_FILE_NAME, EffectivePolicy, PolicyTree
from ckpt_watcher.plan import Plan, Summary, plan, symlink_targets
from ckpt_watcher.policy import LoadedPolicy, PolicyError
from ckpt_watcher.policy_file import InvalidPolicyFilesError
from ckpt_watcher.protection import ProtectionError, ProtectionRegistry
from ckpt_watcher.records import CheckpointRecord, EntryType, display_name
from ckpt_watcher.scan import ScanOptions, ScanProblem, ScanStopped, scan_directory, walk_directories

logger = structlog.get_logger("ckpt_watcher.reconcile")

# A last.ckpt symlink missing from one listing is trusted gone only when a listing this much later
# still misses it (Lightning replaces the link by unlink + symlink).
LINK_RECHECK_SECONDS = 1.0


class Trigger(enum.StrEnum):
    """Why a pass runs."""

    PRUNE = "prune"  # the one-shot command
    STARTUP = "startup"  # the daemon's first pass over the root
    REARM = "rearm"  # the root came back after it vanished
    EVENT = "event"  # events, or due re-checks, named some groups
    RESCAN = "rescan"  # the periodic full rescan
    FULL = "full"  # a full rescan asked for: overflow, policy or protection change, observer restart

    @property
    def covers_everything(self) -> bool:
        """True for a pass over every group below the root."""
        return self is not Trigger.EVENT


@dataclass(frozen=True)
class PassResult:
    """What one pass planned, applied and found; ``applied`` is None for a dry run."""

    trigger: Trigger
    the_plan: Plan
    applied: ApplyResult | None
    sources: Mapping[Path, tuple[str, ...]] = field(default_factory=dict)
    scanned_groups: int = 0
    blocked: tuple[Path, ...] = ()
    detected: int = 0
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def summary(self) -> Summary:
        """What the plan decided: kept, to delete, skipped."""
        return self.the_plan.summary

    @property
    def deleted(self) -> int:
        """Checkpoints actually removed."""
        return len(self.applied.deleted) if self.applied is not None else 0

    @property
    def failed(self) -> int:
        """Deletions the system refused (retried by the next pass)."""
        return len(self.applied.failed) if self.applied is not None else 0

    @property
    def bytes_freed(self) -> int:
        """Bytes of the checkpoints removed."""
        return self.applied.bytes_freed if self.applied is not None else 0


def prune_once(
    root: Path,
    loaded: LoadedPolicy,
    *,
    pins: Mapping[Path, str],
    settle_seconds: float,
    dry_run: bool,
    working_directory: Path,
) -> PassResult:
    """``prune``: one strict pass over ``root``; an invalid policy or protect_from file anywhere raises
    InvalidPolicyFilesError before anything is deleted."""
    reconciler = Reconciler(
        PolicyTree(root, loaded, strict=True),
        ProtectionRegistry(working_directory),
        pins=pins,
        settle_seconds=settle_seconds,
        one_shot=True,
    )
    return reconciler.run(Trigger.PRUNE, dry_run=dry_run)


class Reconciler:
    """Runs passes over one root; between passes it remembers each group (verdicts, links, configs).

    ``one_shot`` (prune): policy and protect_from errors raise, nothing is cached and no detection is
    logged. Otherwise (the daemon) an invalid edit is logged and the last good version stays in force.
    ``stop`` ends a pass between two deletions (or inside a long scan); ``progress`` is called
    between groups (the liveness keep-alive of a long pass).
    """

    def __init__(
        self,
        tree: PolicyTree,
        registry: ProtectionRegistry,
        *,
        pins: Mapping[Path, str],
        settle_seconds: float,
        one_shot: bool,
        stop: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.root = tree.root
        self.tree = tree
        self.registry = registry
        self.index = GroupIndex(tree.root, tree.naming_for)
        self._command_line_pins = dict(pins)
        self._settle_seconds = settle_seconds
        self._one_shot = one_shot
        self._stop = stop
        self._progress = progress
        self._problems: dict[Path, str] = {}

    # -- the pass ---------------------------------------------------------------------------------

    def run(
        self,
        trigger: Trigger,
        groups: Iterable[Path] = (),
        *,
        closed: Collection[Path] = (),
        dry_run: bool = False,
    ) -> PassResult:
        """One pass: every group for a full trigger, else ``groups``; ``closed`` files count at once."""
        started = time.monotonic()
        self._problems = {}
        try:
            selected = self._all_groups(dry_run) if trigger.covers_everything else set(groups)
            effective, blocked = self._policies(selected)
            if self._refresh_protection(trigger) and not trigger.covers_everything:
                more, more_blocked = self._policies(set(self.index) - set(effective) - set(blocked))
                effective.update(more)  # a new resume source may sit in any group
                blocked += more_blocked
            records, pins, detected = self._scan(effective, closed)
        except ScanStopped:
            return PassResult(trigger, Plan(()), None, interrupted=True, seconds=time.monotonic() - started)
        finally:
            self._log_problems()
        the_plan = plan(records, self.tree.base.policy, pins, {g: e.policy for g, e in effective.items()})
        applied = None if dry_run else self._apply(the_plan)
        return PassResult(
            trigger=trigger,
            the_plan=the_plan,
            applied=applied,
            sources={group: value.sources for group, value in effective.items()},
            scanned_groups=len(effective),
            blocked=tuple(blocked),
            detected=detected,
            interrupted=applied is not None and applied.interrupted,
            seconds=time.monotonic() - started,
        )

    def _all_groups(self, dry_run: bool) -> set[Path]:
        """Every directory below the root; forget the ones that are gone, finish interrupted removals."""
        problems: list[ScanProblem] = []
        groups: set[Path] = set()
        for directory in walk_directories(self.root, self.tree.naming_for, problems):
            if self._stop is not None and self._stop.is_set():
                raise ScanStopped(str(directory))
            groups.add(directory)
        self._note_problems(problems)
        for known in self.index:
            if known not in groups:
                self.index.forget(known)
        self.index.clear_rechecks()
        if not dry_run:
            for group in sorted(groups):
                remove_leftovers(self.root, group)
        return groups

    def _policies(self, groups: Iterable[Path]) -> tuple[dict[Path, EffectivePolicy], list[Path]]:
        """The policy in force in each group that still exists, and the groups an invalid per-run
        policy blocks (nothing is planned there)."""
        effective: dict[Path, EffectivePolicy] = {}
        blocked: list[Path] = []
        for group in sorted(groups):
            if not os.path.isdir(group) or os.path.islink(group):
                self.index.forget(group)
                continue
            value = self.tree.for_directory(group)
            state = self.index.state(group)
            if value is None:
                blocked.append(group)
                _log_blocked(group, state)
                continue
            state.blocked = False
            self.index.set_protect_from(group, value.protect_from)
            effective[group] = value
        if self._one_shot and self.tree.errors:
            raise InvalidPolicyFilesError(self.tree.errors)
        return effective, blocked

    def _refresh_protection(self, trigger: Trigger) -> bool:
        """Re-read the protect_from configs that changed; True if what they protect changed."""
        configs = self.index.configs()
        try:
            changed = self.registry.refresh(configs, strict=self._one_shot)
        except ProtectionError as error:
            problem = PolicyError("protect_from", [f"At 'protect_from': {error}"])
            raise InvalidPolicyFilesError([problem]) from None
        if trigger.covers_everything:
            changed = self.registry.retain(configs) or changed
        return changed

    # -- scanning ---------------------------------------------------------------------------------

    def _scan(
        self, effective: Mapping[Path, EffectivePolicy], closed: Collection[Path]
    ) -> tuple[list[CheckpointRecord], dict[Path, str], int]:
        """Scan each group: its records, the pins for the plan, and how many checkpoints are news."""
        wall_now = time.time()
        closed_in: dict[Path, set[Path]] = defaultdict(set)
        for path in closed:
            closed_in[path.parent].add(path)
        records: list[CheckpointRecord] = []
        pins = {**self._command_line_pins, **self.registry.pins()}
        pins.update(self.index.link_targets_outside(set(effective)))
        detected = 0
        for group, value in sorted(effective.items()):
            state = self.index.state(group)
            problems: list[ScanProblem] = []
            options = ScanOptions(
                settle_seconds=self._settle_seconds,
                now=wall_now,
                closed_paths=frozenset(closed_in.get(group, ())),
                verify=value.policy.verify,
            )
            cache = None if self._one_shot else state.cache
            found = scan_directory(
                self.root, group, value.policy.compiled_naming, options, cache, problems, stop=self._stop
            )
            self._note_problems(problems)
            pins.update(self._remember(group, state, found, wall_now))
            detected += _log_news(state, found, detections=not self._one_shot)
            records.extend(found)
            if self._progress is not None:
                self._progress()
        return records, pins, detected

    def _remember(
        self, group: Path, state: GroupState, records: list[CheckpointRecord], wall_now: float
    ) -> dict[Path, str]:
        """Keep what the next pass needs; return the pins of last links this listing missed."""
        if not self._one_shot:
            present = {record.identity for record in records}
            state.cache = {identity: value for identity, value in state.cache.items() if identity in present}
        self.index.set_link_targets(group, symlink_targets(records))
        waits = [record.settles_at - wall_now for record in records if record.settles_at is not None]
        if waits:  # a file only waiting to settle is looked at again the moment it has
            self.index.recheck(group, time.monotonic() + max(0.05, min(waits) + 0.05))
        return self._last_link_pins(group, state, records)

    def _last_link_pins(
        self, group: Path, state: GroupState, records: list[CheckpointRecord]
    ) -> dict[Path, str]:
        """A ``last`` link seen before but missing now keeps its target pinned until a listing at least
        LINK_RECHECK_SECONDS later still misses it: one listing between Lightning's unlink and
        symlink never takes that protection away."""
        now = time.monotonic()
        remembered: dict[str, LastLink] = {}
        pins: dict[Path, str] = {}
        current = {
            record.name: record.link_target
            for record in records
            if record.kind is Kind.LAST and record.entry_type is EntryType.SYMLINK and record.link_target
        }
        for name, link in state.last_links.items():
            if name in current:
                continue
            missing_since = link.missing_since if link.missing_since is not None else now
            if now - missing_since < LINK_RECHECK_SECONDS:
                relative = os.path.relpath(group / name, self.root)
                pins[link.target] = f"target of {relative} (missing from this listing; re-checked)"
                remembered[name] = LastLink(link.target, missing_since)
                self.index.recheck(group, missing_since + LINK_RECHECK_SECONDS)
        for name, target in current.items():
            remembered[name] = LastLink(target)
        state.last_links = remembered
        return pins

    def _note_problems(self, problems: Iterable[ScanProblem]) -> None:
        for problem in problems:
            self._problems.setdefault(problem.path, problem.message)

    def _log_problems(self) -> None:
        """Each path the pass could not read, once (a directory is listed by the walk and the scan)."""
        for path, message in self._problems.items():
            logger.warning("scan_problem", path=display_name(str(path)), error=message)
        self._problems = {}

    # -- applying ---------------------------------------------------------------------------------

    def _apply(self, the_plan: Plan) -> ApplyResult:
        applied = apply_plan(the_plan, self.root, self._stop)
        for result in applied.results:
            if result.outcome is Outcome.CHANGED:  # changed since it was planned: plan it again soon
                directory = result.decision.record.directory
                self.index.recheck(directory, time.monotonic() + max(self._settle_seconds, 1.0))
        return applied

    # -- what events mean -------------------------------------------------------------------------

    def groups_touched(self, files: Iterable[str], trees: Iterable[str]) -> set[Path]:
        """The groups to plan again for these changed files and directories (``GroupIndex.touched``)."""
        problems: list[ScanProblem] = []
        groups = self.index.touched(files, trees, problems)
        self._note_problems(problems)
        self._log_problems()
        return groups


def _log_blocked(group: Path, state: GroupState) -> None:
    """``group_blocked``, once while the group stays blocked."""
    if not state.blocked:
        logger.warning(
            "group_blocked",
            directory=str(group),
            detail=f"an invalid {OVERRIDE_FILE_NAME} applies here; nothing is deleted here until it is fixed",
        )
        state.blocked = True


def _log_news(state: GroupState, records: list[CheckpointRecord], *, detections: bool) -> int:
    """Warn once about each suspicious name; with ``detections`` (the daemon) also log each checkpoint
    that is new or whose completeness changed (``checkpoint_detected``). Returns how many."""
    seen: dict[str, bool] = {}
    detected = 0
    for record in records:
        if record.note and record.name not in state.suspicious:
            state.suspicious.add(record.name)
            logger.warning(
                "checkpoint_suspicious",
                path=display_name(str(record.path)),
                detail=f"{record.note}; kept",
            )
        if record.kind is Kind.UNKNOWN or not detections:
            continue
        seen[record.name] = record.complete
        if state.seen.get(record.name) != record.complete:
            detected += 1
            logger.info(
                "checkpoint_detected",
                path=display_name(str(record.path)),
                kind=record.kind.value,
                complete=record.complete,
                reason=record.incomplete_reason,
            )
    state.seen = seen
    state.suspicious &= {record.name for record in records}
    return detected
