"""Plan a checkpoint tree, apply the plan, say what happened: the one core ``prune`` and ``watch`` call.

A pass (``Reconciler.run``) takes groups (directories): every group below the root for a full pass,
the ones events named otherwise. It

1. finds the policy in force in each (``PolicyTree``: the root policy and per-run overrides),
2. brings the ``protect_from`` configs up to date (``ProtectionRegistry``) and gathers the pins,
3. lists the symlinks of every group in the pass (``links``), so a link in one group protects its
   target in another, whichever group is planned first and whichever command runs,
4. then, one group at a time (a pass never holds the whole tree), scans it (``scan``), remembering
   what it learned for the next pass (``GroupIndex``), plans it (``plan``, a pure function) and
   applies the plan (``delete``), stopping between two deletions when asked to,

and returns a ``PassResult``: what the logs, the command's table or JSON and ``STATUS=`` read.
Each path it could not read is logged once per pass (``scan_problem``).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ckpt_watcher.config_access import LOCAL_FILES, ConfigAccess
from ckpt_watcher.delete import ApplyResult, Outcome
from ckpt_watcher.groups import GroupIndex, GroupState
from ckpt_watcher.links import LinkPins, link_reasons
from ckpt_watcher.naming import Kind
from ckpt_watcher.overrides import OVERRIDE_FILE_NAME, EffectivePolicy, PolicyTree
from ckpt_watcher.plan import GroupPlan, Plan, Summary, plan
from ckpt_watcher.policy import LoadedPolicy, PolicyError
from ckpt_watcher.policy_file import InvalidPolicyFilesError
from ckpt_watcher.protection import ProtectionError, ProtectionRegistry
from ckpt_watcher.records import CheckpointRecord, display_name
from ckpt_watcher.scan import ScanOptions, ScanProblem, ScanStopped
from ckpt_watcher.storage import LocalStorage, Storage, StorageUnavailableError

logger = structlog.get_logger("ckpt_watcher.reconcile")


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


@dataclass
class PassResult:
    """What one pass planned, applied and found, filled group by group by the core, then read.

    The counts are always there. Every decision (``the_plan``) and every outcome (``applied``) are kept
    only when the pass was asked to (``prune``'s table and JSON): a daemon's pass over 100,000
    checkpoints holds one group at a time. ``applied`` is None for a dry run. ``storage_error`` says
    why a store could not be read whole (the pass then planned and deleted nothing).
    """

    trigger: Trigger
    summary: Summary = field(default_factory=Summary)
    deleted: int = 0
    failed: int = 0
    bytes_freed: int = 0
    scanned_groups: int = 0
    detected: int = 0
    blocked: list[Path] = field(default_factory=list)
    leftovers_remaining: int = 0
    sources: dict[Path, tuple[str, ...]] = field(default_factory=dict)
    group_plans: list[GroupPlan] | None = None
    applied: ApplyResult | None = None
    interrupted: bool = False
    seconds: float = 0.0
    storage_error: str | None = None

    @property
    def the_plan(self) -> Plan:
        """Every group's decisions, when they were kept (else no group)."""
        return Plan(tuple(self.group_plans or ()))

    def add_group(self, group_plan: GroupPlan | None, applied: ApplyResult | None) -> None:
        """Count one group's plan and what applying it did (keep them too, if asked to)."""
        self.scanned_groups += 1
        if group_plan is None:
            return
        self.summary = self.summary + group_plan.summary
        if self.group_plans is not None:
            self.group_plans.append(group_plan)
        if applied is None:
            return
        self.deleted += len(applied.deleted)
        self.failed += len(applied.failed)
        self.bytes_freed += applied.bytes_freed
        self.interrupted = self.interrupted or applied.interrupted
        if self.applied is not None:
            self.applied.results.extend(applied.results)


def prune_once(
    root: Path,
    loaded: LoadedPolicy,
    *,
    pins: Mapping[Path, str],
    settle_seconds: float,
    dry_run: bool,
    working_directory: Path,
    storage: Storage | None = None,
    files: ConfigAccess = LOCAL_FILES,
) -> PassResult:
    """``prune``: one strict pass over ``root``; an invalid policy or protect_from file anywhere raises
    InvalidPolicyFilesError before anything is deleted. ``storage`` and ``files`` are where the tree
    and its config files are (a bucket; by default the disk)."""
    reconciler = Reconciler(
        PolicyTree(root, loaded, strict=True, files=files),
        ProtectionRegistry(working_directory, files=files),
        pins=pins,
        settle_seconds=settle_seconds,
        one_shot=True,
        storage=storage,
    )
    return reconciler.run(Trigger.PRUNE, dry_run=dry_run, keep_plan=True)


class Reconciler:
    """Runs passes over one root; between passes it remembers each group (verdicts, links, configs).

    ``one_shot`` (prune): policy and protect_from errors raise, nothing is cached and no detection is
    logged. Otherwise (the daemon) an invalid edit is logged and the last good version stays in force.
    ``stop`` ends a pass between two deletions (or inside a long scan); ``progress`` is called
    between groups (the liveness keep-alive of a long pass). ``storage`` does the pass's I/O (a
    directory tree on disk unless given; storage.py).
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
        storage: Storage | None = None,
    ) -> None:
        self.root = tree.root
        self.storage: Storage = storage if storage is not None else LocalStorage()
        self.tree = tree
        self.registry = registry
        self.index = GroupIndex(tree.root, tree.naming_for)
        self._command_line_pins = dict(pins)
        self._settle_seconds = settle_seconds
        self._one_shot = one_shot
        self._stop = stop
        self._progress = progress
        self._problems: dict[Path, str] = {}
        self._foreign_leftovers: set[tuple[int, int]] = set()  # reported once each

    # -- the pass ---------------------------------------------------------------------------------

    def run(
        self,
        trigger: Trigger,
        groups: Iterable[Path] = (),
        *,
        closed: Collection[Path] = (),
        dry_run: bool = False,
        keep_plan: bool = False,
    ) -> PassResult:
        """One pass: every group for a full trigger, else ``groups``; ``closed`` files count at once.

        ``keep_plan`` keeps every decision and outcome in the result (else only the counts).
        """
        started = time.monotonic()
        result = PassResult(trigger)
        if keep_plan:
            result.group_plans = []
            result.applied = None if dry_run else ApplyResult()
        try:
            self.storage.begin_pass()
            selected = self._all_groups(dry_run, result) if trigger.covers_everything else set(groups)
            effective, result.blocked = self._policies(selected)
            if self._refresh_protection(trigger) and not trigger.covers_everything:
                more, more_blocked = self._policies(set(self.index) - set(effective) - set(result.blocked))
                effective.update(more)  # a new resume source may sit in any group
                result.blocked += more_blocked
            result.sources = {group: value.sources for group, value in effective.items()}
            self._plan_groups(effective, self._link_pins(effective), closed, dry_run, result)
        except ScanStopped:
            result.interrupted = True
        except StorageUnavailableError as error:  # nothing was deleted: the listing came first
            result.storage_error = str(error)
        finally:
            self._log_problems()
        result.seconds = time.monotonic() - started
        return result

    def _all_groups(self, dry_run: bool, result: PassResult) -> set[Path]:
        """Every directory below the root; forget the ones that are gone, finish interrupted removals."""
        problems: list[ScanProblem] = []
        groups: set[Path] = set()
        for directory in self.storage.walk_directories(self.root, self.tree.naming_for, problems):
            if self._stop is not None and self._stop.is_set():
                raise ScanStopped(str(directory))
            groups.add(directory)
        self._note_problems(problems)
        for known in self.index:
            if known not in groups:
                self.index.forget(known)
        self.index.clear_rechecks()
        self.tree.retain(groups)
        if not dry_run:
            for group in sorted(groups):
                leftovers = self.storage.finish_leftovers(self.root, group, reported=self._foreign_leftovers)
                result.leftovers_remaining += sum(not leftover.removed for leftover in leftovers)
        return groups

    def _policies(self, groups: Iterable[Path]) -> tuple[dict[Path, EffectivePolicy], list[Path]]:
        """The policy in force in each group that still exists, and the groups an invalid per-run
        policy blocks (nothing is planned there)."""
        effective: dict[Path, EffectivePolicy] = {}
        blocked: list[Path] = []
        for group in sorted(groups):
            if not self.storage.is_group(group):
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

    # -- one group at a time ----------------------------------------------------------------------

    def _link_pins(self, effective: Mapping[Path, EffectivePolicy]) -> LinkPins:
        """List the symlinks of every group in the pass before planning any: the targets links point
        into each group, from this listing or remembered for the groups outside the pass."""
        pins = LinkPins()
        now = time.monotonic()
        for group, value in effective.items():
            links = self.storage.list_links(group, self.root, value.policy.compiled_naming)
            targets = link_reasons(links)
            self.index.set_link_targets(group, targets)
            pins.add(targets, owner=group)
            pins.add(self.index.last_link_pins(group, links, now))
        pins.add(self.index.link_targets_outside(set(effective)))
        return pins

    def _plan_groups(
        self,
        effective: Mapping[Path, EffectivePolicy],
        links: LinkPins,
        closed: Collection[Path],
        dry_run: bool,
        result: PassResult,
    ) -> None:
        """Scan, plan and apply each group in turn, so a pass holds one group's records at a time."""
        pins = {**self._command_line_pins, **self.registry.pins()}
        pinned_identities = self.storage.identities_of(pins)
        closed_in: dict[Path, set[Path]] = defaultdict(set)
        for path in closed:
            closed_in[path.parent].add(path)
        wall_now = time.time()
        for group, value in sorted(effective.items()):
            if self._stop is not None and self._stop.is_set():
                result.interrupted = True
                return
            records = self._scan_group(group, value, frozenset(closed_in.get(group, ())), wall_now, result)
            group_plans = plan(
                records, value.policy, {**pins, **links.for_group(group)}, pinned_identities=pinned_identities
            ).groups
            group_plan = group_plans[0] if group_plans else None
            applied = None if dry_run or group_plan is None else self._apply(group_plan)
            result.add_group(group_plan, applied)
            if self._progress is not None:
                self._progress()

    def _scan_group(
        self,
        group: Path,
        value: EffectivePolicy,
        closed: frozenset[Path],
        wall_now: float,
        result: PassResult,
    ) -> list[CheckpointRecord]:
        """One group's records; what the next pass needs is remembered, news logged."""
        state = self.index.state(group)
        problems: list[ScanProblem] = []
        options = ScanOptions(
            settle_seconds=self._settle_seconds, now=wall_now, closed_paths=closed, verify=value.policy.verify
        )
        cache = None if self._one_shot else state.cache
        records = self.storage.scan_directory(
            self.root, group, value.policy.compiled_naming, options, cache, problems, stop=self._stop
        )
        self._note_problems(problems)
        if not self._one_shot:
            state.cache.retain(records)
        waits = [record.settles_at - wall_now for record in records if record.settles_at is not None]
        if waits:  # a file only waiting to settle is looked at again the moment it has
            self.index.recheck(group, time.monotonic() + max(0.05, min(waits) + 0.05))
        result.detected += _log_news(state, records, detections=not self._one_shot)
        return records

    def _note_problems(self, problems: Iterable[ScanProblem]) -> None:
        for problem in problems:
            self._problems.setdefault(problem.path, problem.message)

    def _log_problems(self) -> None:
        """Each path the pass could not read, once (a directory is listed by the walk and the scan)."""
        for path, message in self._problems.items():
            logger.warning("scan_problem", path=display_name(str(path)), error=message)
        self._problems = {}

    # -- applying ---------------------------------------------------------------------------------

    def _apply(self, group_plan: GroupPlan) -> ApplyResult:
        applied = ApplyResult(self.storage.apply_group(group_plan, self.root, stop=self._stop))
        applied.interrupted = len(applied.results) < len(group_plan.deletions)
        for result in applied.results:
            if result.outcome is Outcome.CHANGED:  # changed since it was planned: plan it again soon
                self.index.recheck(group_plan.directory, time.monotonic() + max(self._settle_seconds, 1.0))
        return applied

    # -- what events mean -------------------------------------------------------------------------

    def groups_touched(self, files: Iterable[str], trees: Iterable[str]) -> set[Path]:
        """The groups to plan again for these changed files and directories (``GroupIndex.touched``);
        what could not be read is logged with the next pass."""
        problems: list[ScanProblem] = []
        groups = self.index.touched(files, trees, problems)
        self._note_problems(problems)
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
