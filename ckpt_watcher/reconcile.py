"""Plan a checkpoint tree, apply the plan, say what happened: the one core ``prune`` and ``watch`` call.

A pass (``Reconciler.run``) takes groups (directories): every group below the root for a full pass,
the ones events named otherwise. It

1. finds the policy in force in each (``PolicyTree``: the root policy and per-run overrides),
2. brings the ``protect_from`` configs up to date (``ProtectionRegistry``) and gathers the pins,
3. lists the symlinks of every group in the pass (``links``), so a link in one group protects its
   target in another, whichever group is planned first and whichever command runs,
4. then, one group at a time (a pass never holds the whole tree), scans it (``scan``), remembering
   what it learned for the next pass (``GroupIndex``), plans it (``plan``, a pure function) and
   applies the plan (``delete``), stopping between two deletions when asked to; with a trash
   (``trash_pass``), deletions are moves into it, what is due is purged and restored checkpoints
   are pinned,

and returns a ``PassResult``: what the logs, the command's table or JSON and ``STATUS=`` read.
Each path it could not read is logged once per pass (``scan_problem``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import threading
import time
from array import array
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ckpt_watcher.budget import FreeSpacePlan
from ckpt_watcher.compact import PackedHashes
from ckpt_watcher.config_access import LOCAL_FILES, ConfigAccess
from ckpt_watcher.delete import ApplyResult, Outcome
from ckpt_watcher.groups import GroupIndex, GroupState, Tally
from ckpt_watcher.links import LinkPins
from ckpt_watcher.logs import debug_enabled
from ckpt_watcher.memory import no_cyclic_collection, release_after
from ckpt_watcher.naming import Kind, Naming
from ckpt_watcher.overrides import EffectivePolicy, PolicyTree
from ckpt_watcher.plan import Action, Decision, GroupPlan, Plan, Summary, plan
from ckpt_watcher.policy import LoadedPolicy, Policy, PolicyError
from ckpt_watcher.policy_file import InvalidPolicyFilesError
from ckpt_watcher.protection import ProtectionRegistry, UnreadableConfigsError, protect_from_problem
from ckpt_watcher.records import CheckpointRecord, FileIdentity, display_name
from ckpt_watcher.scan import ScanOptions, ScanProblem, ScanStopped
from ckpt_watcher.space import Eviction, SpaceKeeper
from ckpt_watcher.storage import LocalStorage, Storage, StorageUnavailableError
from ckpt_watcher.trash import TrashSummary
from ckpt_watcher.trash_moves import PurgeResult
from ckpt_watcher.trash_pass import TrashKeeper, TrashPass

logger = structlog.get_logger("ckpt_watcher.reconcile")

# A last checkpoint incomplete and untouched this long is not being written: it is warned about,
# unless the reason says it was not judged or is being written (a directory's marker, a shard).
LAST_QUIET_SECONDS = 60.0
_NOT_BROKEN = (
    "symlink to ",
    "cannot be read",
    "marker present",
    "vanished",
    "not a regular file",
    "changed while",
)

# The directories a deletions_held (or _released) record names (it counts them all).
SHOWN_HELD = 5
# The checkpoints an eviction_not_needed record names (it counts them all), and why they stay.
SHOWN_SPARED = 5
SPARED_FREED = (
    "the free space keep_free asks for was there when read again just before the eviction (freed "
    "since the plan, e.g. by another daemon evicting on the same file system): these checkpoints stay"
)
SPARED_UNREADABLE = (
    "the file system's free space could not be read again just before the eviction: these "
    "checkpoints stay until a pass can read it"
)
HELD = (
    "deletions this pass planned on this file system failed (checkpoint_delete_failed): no kept "
    "checkpoint is evicted for keep_free in their place; these stay, and the next pass tries again"
)


class Trigger(enum.StrEnum):
    """Why a pass runs."""

    PRUNE = "prune"  # the one-shot command
    STARTUP = "startup"  # the daemon's first pass over the root
    REARM = "rearm"  # the root came back after it vanished
    EVENT = "event"  # events, or due re-checks, named some groups
    RESCAN = "rescan"  # the periodic full rescan
    FULL = "full"  # a full rescan asked for: overflow, policy or protection change, observer restart
    SPACE = "space"  # keep_free is short between passes (a checkpoint being written, say)

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
    why a store could not be read whole (a bucket's listing: the pass then planned and deleted nothing)
    or a pin of a restored checkpoint could not be read (the pass stopped before the group it was
    reading them for: what it did before is counted).

    For the metrics and the status line: ``deleted_by_kind`` (this pass's deletions by kind),
    ``kept_overall`` (what every known group's latest plan keeps, also the groups this pass did not
    cover), ``refused_overrides`` (per-run policy files whose latest edit was refused), and the space
    figures other parts fill: ``budget_unmet_bytes`` (how far the worst byte budget is from being
    met, 0 when met) and ``trash_bytes`` (bytes in the root's trash after the pass; None: no trash).

    ``failed_deletions``: the deletions of this pass's group plans (count rules, max_size; not the
    evictions for keep_free) that failed, by the device they were on: keep_free evicts nothing there.

    With a trash: ``trashed`` counts deletions moved into it (``deleted``: removed at once),
    ``purged`` the entries removed from it, ``trash_bytes`` what it holds after the pass (None: the
    root has no trash), ``trash`` its summary and ``trashing`` the grace of each group whose policy
    has one (both for ``prune``'s table and JSON).
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
    deleted_by_kind: Tally = field(default_factory=Tally)
    kept_overall: Tally = field(default_factory=Tally)
    refused_overrides: int = 0
    evicted: int = 0
    space: list[FreeSpacePlan] = field(default_factory=list)
    budget_unmet_bytes: int = 0
    trash_bytes: int | None = None
    trashed: int = 0
    bytes_trashed: int = 0
    purged: int = 0
    bytes_purged: int = 0
    trash: TrashSummary | None = None
    trashing: dict[Path, int] = field(default_factory=dict)
    evicted_at_once: set[Path] = field(default_factory=set)
    storage_error: str | None = None
    failed_groups: list[Path] = field(default_factory=list)
    failed_deletions: dict[int, int] = field(default_factory=dict)
    # A dry run's kept plan may go, group by group, to a sink instead of ``group_plans`` (prune --json
    # writes it as it comes), when no group's plan can change afterwards (no keep_free in the pass).
    group_sink: Callable[[GroupPlan, PassResult], None] | None = None
    streamed: bool = False

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
        if self.streamed and self.group_sink is not None:
            self.group_sink(group_plan, self)
        elif self.group_plans is not None:
            self.group_plans.append(group_plan)
        self._add_applied(applied)

    def _add_applied(self, applied: ApplyResult | None) -> None:
        if applied is None:
            return
        deleted = applied.deleted
        self.deleted += len(deleted)
        self.trashed += len(applied.trashed)
        self.bytes_trashed += applied.bytes_trashed
        for outcome in [*deleted, *applied.trashed]:  # the metrics count a checkpoint trashed as deleted
            self.deleted_by_kind.add(outcome.decision.record.kind.value, outcome.decision.record.bytes)
        self.failed += len(applied.failed)
        self.bytes_freed += applied.bytes_freed
        self.interrupted = self.interrupted or applied.interrupted
        if self.applied is not None:
            self.applied.results.extend(applied.results)

    def add_evictions(
        self, directory: Path, decisions: tuple[Decision, ...], applied: ApplyResult | None
    ) -> None:
        """Count checkpoints of a group planned in this pass that were then evicted for ``keep_free``
        (and what applying that did); a kept plan shows them evicted."""
        evicted_bytes = sum(decision.record.bytes for decision in decisions)
        self.evicted += len(decisions)
        self.evicted_at_once.update(decision.record.path for decision in decisions)
        self.summary = self.summary + Summary(
            -len(decisions), len(decisions), 0, evicted_bytes, -evicted_bytes
        )
        if self.group_plans is not None:
            replaced = {decision.record.path: decision for decision in decisions}
            self.group_plans = [
                GroupPlan(
                    group.directory, tuple(replaced.get(item.record.path, item) for item in group.decisions)
                )
                if group.directory == directory
                else group
                for group in self.group_plans
            ]
        self._add_applied(applied)

    def add_purge(self, purged: PurgeResult | None) -> None:
        """Count what a purge of the trash removed."""
        if purged is not None:
            self.purged += len(purged.purged)
            self.bytes_purged += purged.bytes_purged


class OutputClosedError(BrokenPipeError):
    """The reader of a plan streamed while the pass runs went away (``prune --dry-run --json | head``):
    nothing more can be shown, so the pass ends, as a pipe's writer ends."""


def _recheck_when_settled(
    index: GroupIndex, group: Path, records: list[CheckpointRecord], wall_now: float
) -> None:
    """A file only waiting to settle is looked at again the moment it has."""
    waits = [record.settles_at - wall_now for record in records if record.settles_at is not None]
    if waits:
        index.recheck(group, time.monotonic() + max(0.05, min(waits) + 0.05))


def _alone(group: Path, result: PassResult, plan_group: Callable[[], None]) -> None:
    """Plan one group where an error nobody foresaw (a bug, an input no test has seen) costs that group
    this pass and nothing else: logged with its traceback (``group_failed``), counted in the result,
    the other groups served. A stop and an unavailable store still end the whole pass."""
    try:
        plan_group()
    except (ScanStopped, StorageUnavailableError, InvalidPolicyFilesError, OutputClosedError):
        raise
    except Exception as error:  # one group's failure must not stop the others
        logger.exception("group_failed", directory=display_name(str(group)), error=repr(error))
        result.failed_groups.append(group)


def prune_once(
    root: Path,
    loaded: LoadedPolicy,
    *,
    pins: Mapping[Path, str],
    settle_seconds: float,
    dry_run: bool,
    working_directory: Path,
    on_group: Callable[[int, int], None] | None = None,
    storage: Storage | None = None,
    files: ConfigAccess = LOCAL_FILES,
    refuse_in_runs: Callable[[LoadedPolicy], list[str]] | None = None,
    trash: Callable[[], TrashKeeper] | None = None,
    group_sink: Callable[[GroupPlan, PassResult], None] | None = None,
) -> PassResult:
    """``prune``: one strict pass over ``root``; an invalid policy or protect_from file anywhere raises
    InvalidPolicyFilesError before anything is deleted. ``on_group``: as for ``Reconciler``.
    ``storage`` and ``files`` are where the tree and its config files are (a bucket; by default the
    disk); ``refuse_in_runs`` says what a per-run policy file may not ask for there (PolicyTree),
    ``trash`` makes the root's trash (a bucket's: bucket_trash_pass), and ``group_sink`` is as for
    ``Reconciler.run``."""
    reconciler = Reconciler(
        PolicyTree(root, loaded, strict=True, files=files, refuse=refuse_in_runs),
        ProtectionRegistry(working_directory, files=files),
        pins=pins,
        settle_seconds=settle_seconds,
        one_shot=True,
        on_group=on_group,
        storage=storage,
        trash=trash() if trash is not None else None,
    )
    return reconciler.run(Trigger.PRUNE, dry_run=dry_run, keep_plan=True, group_sink=group_sink)


class Reconciler:
    """Runs passes over one root; between passes it remembers each group (verdicts, links, configs).

    ``one_shot`` (prune): policy and protect_from errors raise, nothing is cached, no detection logged;
    otherwise (the daemon) an invalid edit is logged and the last good version stays in force. ``stop``
    ends a pass between two deletions (or in a long scan); ``progress`` is called between groups (the
    keep-alive of a long pass), ``on_group`` with how many groups are done, of how many (a progress
    line). ``storage`` does the I/O (a tree on disk unless given), ``trash`` is the root's trash (a
    bucket's: bucket_trash_pass.BucketTrashPass)."""

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
        on_group: Callable[[int, int], None] | None = None,
        storage: Storage | None = None,
        trash: TrashKeeper | None = None,
    ) -> None:
        self.root = tree.root
        self.storage: Storage = storage if storage is not None else LocalStorage()
        self.tree = tree
        self.registry = registry
        self.index = GroupIndex(tree.root, tree.naming_for)
        self.trash: TrashKeeper = trash if trash is not None else TrashPass(tree.root, stop)
        self.space = SpaceKeeper(tree.root, self.index, self.trash)
        self._command_line_pins = dict(pins)
        self._settle_seconds = settle_seconds
        self._one_shot = one_shot
        self._stop = stop
        self._progress = progress
        self._on_group = on_group
        self._problems = ProblemLog()
        self._foreign_leftovers: set[tuple[int, int]] = set()  # reported once each
        self._holding = False  # a protect_from config held deletions at the last pass (_hold)

    # -- the pass ---------------------------------------------------------------------------------

    @no_cyclic_collection()  # a pass's records and decisions are no cyclic garbage (memory.py)
    def run(
        self,
        trigger: Trigger,
        groups: Iterable[Path] = (),
        *,
        closed: Collection[Path] = (),
        dry_run: bool = False,
        keep_plan: bool = False,
        group_sink: Callable[[GroupPlan, PassResult], None] | None = None,
    ) -> PassResult:
        """One pass: every group for a full trigger, else ``groups``; ``closed`` files count at once.

        ``keep_plan`` keeps every decision and outcome in the result (else only the counts);
        ``group_sink``: see ``PassResult``."""
        started = time.monotonic()
        result = PassResult(trigger, group_sink=group_sink)
        if keep_plan:
            result.group_plans = []
            result.applied = None if dry_run else ApplyResult()
        try:
            self.storage.begin_pass()
            selected = self._all_groups(dry_run, result) if trigger.covers_everything else set(groups)
            result.add_purge(self.trash.begin(purge=trigger.covers_everything, dry_run=dry_run))
            effective, result.blocked = self._policies(selected)
            refreshed = _refresh(self, trigger)
            if refreshed and not trigger.covers_everything:  # a new resume source may sit in any group
                more, more_blocked = self._policies(set(self.index) - set(effective) - set(result.blocked))
                effective.update(more)
                result.blocked += more_blocked  # (and what their policies name, edited since, is read)
                _refresh(self, trigger)
            if not self._one_shot:  # (prune stops at an unreadable config: exit 2)
                self._holding = _hold(self.registry, self.index, effective, result.blocked, self._holding)
            result.sources = {group: value.sources for group, value in effective.items()}
            links = self.index.link_pins(
                _namings(self.tree, effective, result.blocked), self.storage.list_links
            )
            self._plan_groups(effective, links, closed, dry_run, result)
        except ScanStopped:
            result.interrupted = True
        except StorageUnavailableError as error:  # (a listing comes first; a pin, before its group's plan)
            result.storage_error = str(error)
        finally:
            self._problems.flush()
            result.trash_bytes, result.trash = self.trash.end()
        result.kept_overall = self.index.kept()
        result.refused_overrides = self.tree.refused_overrides
        return _finished(result, started, release=not self._one_shot)

    def _all_groups(self, dry_run: bool, result: PassResult) -> set[Path]:
        """Every directory below the root; forget the ones that are gone, finish interrupted removals."""
        problems: list[ScanProblem] = []
        groups: set[Path] = set()
        for directory in self.storage.walk_directories(self.root, self.tree.naming_for, problems):
            if self._stopping():
                raise ScanStopped(str(directory))
            groups.add(directory)
        self._problems.note(problems)
        _forget_unwalked(self.index, groups, problems)
        self.index.clear_rechecks()
        self.tree.retain(groups)
        if not dry_run:
            _finish_leftovers(
                self.storage, self.root, groups, self.tree, self._foreign_leftovers, result, self._stop
            )
        return groups

    def _policies(self, groups: Iterable[Path]) -> tuple[dict[Path, EffectivePolicy], list[Path]]:
        """The policy in force in each group that still exists, and the groups an invalid per-run
        policy blocks (nothing is planned there)."""
        effective: dict[Path, EffectivePolicy] = {}
        blocked: list[Path] = []
        for group in sorted(groups):
            if not (is_group := self.storage.is_group(group)):
                if is_group is False:  # gone (None: cannot be looked at now; what is known stays)
                    self.index.forget(group)
                continue
            value = self.tree.for_directory(group)
            state = self.index.state(group)
            if value is None:
                blocked.append(group)
                _log_blocked(group, state, self.tree.why_blocked(group))
                continue
            state.blocked = False
            self.index.set_protect_from(group, value.protect_from)
            effective[group] = value
        _policies_read(self.tree, self.index)
        return effective, blocked

    # -- one group at a time ----------------------------------------------------------------------

    def _plan_groups(
        self,
        effective: Mapping[Path, EffectivePolicy],
        links: LinkPins,
        closed: Collection[Path],
        dry_run: bool,
        result: PassResult,
    ) -> None:
        """Scan, plan and apply each group in turn, so a pass holds one group's records at a time; then
        keep the free space each file system's ``keep_free`` asks for (``space.py``)."""
        pins = {**self._command_line_pins, **self.registry.pins()}
        result.streamed = dry_run and result.group_sink is not None and not _keeps_free(effective)
        identities, names = self.storage.identities_of(pins), self.registry.namesakes()
        context = _PassContext.build(pins, identities, names, links, closed, dry_run, result)
        self.space.begin_pass(**_space_asked(effective, one_shot=self._one_shot))
        for done, (group, value) in enumerate(sorted(effective.items()), start=1):
            if self._stopping():
                result.interrupted = True
                return
            _alone(group, context.result, functools.partial(self._plan_group, group, value, context))
            if self._on_group is not None:
                self._on_group(done, len(effective))
        result.space, evictions = self.space.relieve(
            lambda group: self._replan(group, context), dry_run=dry_run, stop=self._stopping
        )
        if any(fs_plan.reclaimed for fs_plan in result.space) and not dry_run:  # the trash goes first
            result.add_purge(self.space.reclaim(result.space, self.trash.reclaim))  # oldest first
        apply = None if dry_run else functools.partial(self._apply, grace_seconds=0)  # never trashed
        _evict(evictions, self.space, apply, self.index, result)
        result.budget_unmet_bytes = self.space.unmet_bytes()
        if not self._one_shot:
            self.space.schedule(time.monotonic())

    def _plan_group(self, group: Path, value: EffectivePolicy, context: _PassContext) -> None:
        """Scan, plan (count rules, then max_size) and apply one group."""
        closed = frozenset(context.closed_in.get(group, ()))
        records = self._scan_group(group, value, closed, context.wall_now, context.result)
        if self._stopping():  # a stop during a large group's scan is honoured before it is planned
            raise ScanStopped(str(group))
        pins = {**context.pins, **context.links.for_group(group), **self.storage.kept_whole(self.root, group)}
        identities = {**self.trash.pinned_identities(), **context.pinned_identities}  # after the scan
        group_plans = _plan(group, records, value.policy, pins, identities, context)
        first = group_plans[0] if group_plans else None
        group_plan = self.space.plan_group(
            group, first, value.policy, dry_run=context.dry_run, now=context.wall_now
        )
        self.index.set_kept(group, _kept(group_plan))
        grace = value.policy.trash.grace_seconds
        if grace and context.result.group_plans is not None:
            context.result.trashing[group] = grace
        applied = None if context.dry_run or group_plan is None else self._apply(group_plan, grace)
        _note_failed(context.result, group, applied)
        context.result.add_group(group_plan, applied)
        if self._progress is not None:
            self._progress()

    def _replan(self, group: Path, context: _PassContext) -> None:
        """A group outside the pass that keep_free would take from: listed, scanned, planned afresh."""
        value = self.tree.for_directory(group) if self.storage.is_group(group) else None
        if value is None or not _protection_known(self.registry, self.index, value):
            return  # gone, or what a config it names protects is not known (yet): nothing is taken
        context.result.sources[group] = value.sources
        naming, now = self.tree.naming_for(group), time.monotonic()  # its links listed as the pass did
        self.index.list_group_links(context.links, group, naming, self.storage.list_links, now)
        _alone(group, context.result, functools.partial(self._plan_group, group, value, context))

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

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
        scan = functools.partial(self.storage.scan_directory, stop=self._stop, progress=self._progress)
        records = scan(self.root, group, value.policy.compiled_naming, options, cache, problems)
        self._problems.note(problems)
        if not self._one_shot:
            state.cache.retain(records)
        _recheck_when_settled(self.index, group, records, wall_now)
        result.detected += _log_news(state, records, detections=not self._one_shot)
        return records

    # -- applying ---------------------------------------------------------------------------------

    def _apply(self, group_plan: GroupPlan, grace_seconds: int) -> ApplyResult:
        trash = self.trash.target(grace_seconds)
        done = self.storage.apply_group(
            group_plan, self.root, stop=self._stop, trash=trash, progress=self._progress
        )
        applied = ApplyResult(done)
        applied.interrupted = len(applied.results) < len(group_plan.deletions)
        self.space.released(group_plan.directory, applied.bytes_freed)  # btrfs may show it only later
        if any(result.outcome is Outcome.CHANGED for result in applied.results):  # changed since planned:
            self.index.recheck(group_plan.directory, time.monotonic() + max(self._settle_seconds, 1.0))
        return applied

    # -- what events mean -------------------------------------------------------------------------

    def groups_touched(self, files: Iterable[str], trees: Iterable[str]) -> set[Path]:
        """The groups to plan again for these changed files and directories (``GroupIndex.touched``,
        which a stop ends between two events); what could not be read is logged with the next pass."""
        problems: list[ScanProblem] = []
        groups = self.index.touched(files, trees, problems, stop=self._stop)
        self._problems.note(problems)
        return groups


def _finished(result: PassResult, started: float, *, release: bool) -> PassResult:
    """The pass's duration; with ``release`` (a daemon lives on), a pass that planned many files first
    gives back the memory it used (``memory.release_after``)."""
    if release:
        release_after(result.summary.kept + result.summary.to_delete + result.summary.skipped)
    result.seconds = time.monotonic() - started
    return result


def _namings(
    tree: PolicyTree, effective: Mapping[Path, EffectivePolicy], blocked: Iterable[Path]
) -> dict[Path, Naming]:
    """The naming of each group whose links a pass lists: its groups, and its blocked ones (nothing is
    deleted there, but a blocked run's ``last.ckpt`` still protects what it points at elsewhere)."""
    namings = {group: value.policy.compiled_naming for group, value in effective.items()}
    for group in blocked:
        namings.setdefault(group, tree.naming_for(group))
    return namings


def _keeps_free(effective: Mapping[Path, EffectivePolicy]) -> bool:
    """True when some group's policy has keep_free (its evictions may change any group's plan)."""
    return any(value.policy.keep_free is not None for value in effective.values())


def _space_asked(effective: Mapping[Path, EffectivePolicy], *, one_shot: bool) -> dict[str, bool]:
    """What ``SpaceKeeper.begin_pass`` is told of a pass's policies. A one-shot pass covers every
    group: with no byte budget in any policy, no space fact is read."""
    return {"facts_needed": not one_shot or _budgeted(effective), "keep_free": _keeps_free(effective)}


def _budgeted(effective: Mapping[Path, EffectivePolicy]) -> bool:
    """True when some group's policy has a byte budget (max_size or keep_free)."""
    return any(
        value.policy.max_size is not None or value.policy.keep_free is not None
        for value in effective.values()
    )


def _kept(group_plan: GroupPlan | None) -> Tally:
    """The checkpoints (step, best, last) a group's plan keeps, by kind."""
    decisions = group_plan.decisions if group_plan is not None else ()
    return _tally(decision for decision in decisions if decision.action is Action.KEEP)


def _evict(
    evictions: list[Eviction],
    space: SpaceKeeper,
    apply: Callable[[GroupPlan], ApplyResult] | None,
    index: GroupIndex,
    result: PassResult,
) -> None:
    """Apply the evictions for ``keep_free`` (``apply``: None in a dry run; deleted at once, never
    trashed: a checkpoint in the trash would still hold its bytes), the most expendable first,
    each only while its file system is still short when read again just before it (what frees the
    space meanwhile, such as another daemon evicting on the same disk, spares the rest: it is kept
    and logged). None at all on a file system where a deletion of this pass's plans failed: what the
    plan dropped is still there, and a kept checkpoint never goes in its place (``eviction_held``)."""
    spared: dict[Path, tuple[str, list[Decision]]] = {}
    held: dict[Path, int] = {}
    evicted: dict[Path, list[Decision]] = {}
    applied: dict[Path, ApplyResult] = {}
    for eviction in evictions:
        space_path = eviction.file_system.space.path
        if apply is not None and space_path not in spared:
            failed = result.failed_deletions.get(eviction.file_system.space.device, 0)
            why = HELD if failed else _not_needed(eviction, space)
            if why is not None:
                spared[space_path] = (why, [])
                if failed:
                    held[space_path] = failed
        if space_path in spared:
            spared[space_path][1].append(eviction.decision)
            continue
        space.evicting(eviction)
        evicted.setdefault(eviction.directory, []).append(eviction.decision)
        if apply is not None:
            one = apply(GroupPlan(eviction.directory, (eviction.decision,)))
            group = applied.setdefault(eviction.directory, ApplyResult())
            group.results.extend(one.results)
            group.interrupted = group.interrupted or one.interrupted
    for directory, decisions in sorted(evicted.items()):
        result.add_evictions(directory, tuple(decisions), applied.get(directory))
        _no_longer_kept(index, directory, decisions)
    if spared:
        result.space = [_without_spared(fs_plan, spared) for fs_plan in result.space]
        for space_path, (why, kept) in spared.items():
            _log_spared(space_path, why, kept, held.get(space_path, 0))


def _not_needed(eviction: Eviction, space: SpaceKeeper) -> str | None:
    """Why no eviction is applied on ``eviction``'s file system any more (the space is there, or
    cannot be read again), or None while it is still short."""
    short = space.still_short(eviction)
    if short > 0:
        return None
    return SPARED_FREED if short == 0 else SPARED_UNREADABLE


def _note_failed(result: PassResult, group: Path, applied: ApplyResult | None) -> None:
    """Count the failed deletions of ``group``'s plan by the device each was on (its group's, as the
    free-space step groups file systems, and its own): no kept checkpoint is evicted for keep_free
    there in this pass, in place of what the plan dropped (``_evict``)."""
    failures = applied.failed if applied is not None else []
    if not failures:
        return
    try:
        group_device: int | None = os.stat(group).st_dev
    except OSError:
        group_device = None
    for failure in failures:
        identity = failure.decision.record.identity
        devices = {group_device, identity.device if identity is not None else None}
        for device in devices:
            if device is not None:
                result.failed_deletions[device] = result.failed_deletions.get(device, 0) + 1


def _without_spared(
    fs_plan: FreeSpacePlan, spared: Mapping[Path, tuple[str, list[Decision]]]
) -> FreeSpacePlan:
    """The file system's plan as applied: without the evictions its fresh free space spared."""
    kept = spared.get(fs_plan.space.path)
    if kept is None:
        return fs_plan
    paths = {decision.record.path_text for decision in kept[1]}
    evictions = tuple(candidate for candidate in fs_plan.evictions if candidate.record.path_text not in paths)
    return dataclasses.replace(fs_plan, evictions=evictions)


def _log_spared(space_path: Path, why: str, kept: list[Decision], failed: int) -> None:
    """One record for the planned evictions on a file system that were not applied (they stay):
    ``eviction_held`` (a warning) when deletions the pass planned there failed, else
    ``eviction_not_needed``."""
    fields = {
        "path": display_name(str(space_path)),
        "kept": len(kept),
        "kept_bytes": sum(decision.record.bytes for decision in kept),
        "detail": why,
        "checkpoints": [display_name(decision.record.path_text) for decision in kept[:SHOWN_SPARED]],
    }
    if failed:
        logger.warning("eviction_held", failed=failed, **fields)
    else:
        logger.info("eviction_not_needed", **fields)


def _no_longer_kept(index: GroupIndex, directory: Path, evicted: Iterable[Decision]) -> None:
    """Checkpoints ``directory``'s plan kept, then evicted for space, leave its kept tally (metrics)."""
    state = index.get(directory)
    if state is not None and state.kept is not None:
        kept = state.kept.copy()
        kept.merge(_tally(evicted), sign=-1)
        index.set_kept(directory, kept)


def _tally(decisions: Iterable[Decision]) -> Tally:
    """``decisions``' checkpoints (not unknown names) by kind, with their bytes."""
    tally = Tally()
    for decision in decisions:
        if decision.record.kind is not Kind.UNKNOWN:
            tally.add(decision.record.kind.value, decision.record.bytes)
    return tally


def _plan(
    group: Path,
    records: list[CheckpointRecord],
    policy: Policy,
    pins: Mapping[Path, str],
    identities: Mapping[tuple[int, int], str],
    context: _PassContext,
) -> tuple[GroupPlan, ...]:
    """``plan`` for one group of a pass, with what the pass listed elsewhere: the names pinned in any
    group, and the ``last`` links of directories above it that point down into it (``links_into``)."""
    return plan(
        records,
        policy,
        pins,
        pinned_identities=identities,
        pinned_names=context.pinned_names,
        links_into=context.links.links_into(group),
        listed_links=context.links.listed_links(group),
    ).groups


@dataclass(frozen=True)
class _PassContext:
    """What planning any group of a pass needs (also a group the free-space step adds to the pass)."""

    pins: dict[Path, str]
    pinned_identities: Mapping[tuple[int, int], str]
    pinned_names: Mapping[str, str]  # the names of resume references found nowhere (kept in doubt)
    links: LinkPins
    closed_in: Mapping[Path, set[Path]]
    wall_now: float
    dry_run: bool
    result: PassResult

    @classmethod
    def build(
        cls,
        pins: dict[Path, str],
        identities: Mapping[tuple[int, int], str],
        names: Mapping[str, str],
        links: LinkPins,
        closed: Collection[Path],
        dry_run: bool,
        result: PassResult,
    ) -> _PassContext:
        """The context of a pass now: ``closed`` files are counted at once (their writer closed them)."""
        closed_in: dict[Path, set[Path]] = defaultdict(set)
        for path in closed:
            closed_in[path.parent].add(path)
        # Pinned by identity: the targets links reach from outside the root, then the pins' own files.
        identities = {**links.identities, **identities}
        return cls(pins, identities, names, links, closed_in, time.time(), dry_run, result)


def _finish_leftovers(
    storage: Storage,
    root: Path,
    groups: Iterable[Path],
    tree: PolicyTree,
    reported: set[tuple[int, int]],
    result: PassResult,
    stop: threading.Event | None,
) -> None:
    """Finish the removals a previous run left halfway in each group (only leftovers the tool can
    prove it made: a bucket's manifest counts only inside a directory named as a checkpoint there).
    A stop ends the pass here (ScanStopped); what remains is finished at the next start."""
    for group in sorted(groups):
        leftovers = storage.finish_leftovers(
            root, group, naming_for=tree.naming_for, reported=reported, stop=stop
        )
        result.leftovers_remaining += sum(not leftover.removed for leftover in leftovers)
        if stop is not None and stop.is_set():
            raise ScanStopped(str(group))


def _forget_unwalked(index: GroupIndex, walked: Collection[Path], problems: Iterable[ScanProblem]) -> None:
    """Forget the known groups a full walk did not reach (gone, or no group any more), but for those
    below a directory it found but could not list (``ScanProblem.unlisted``: EACCES): they are kept
    as last known, the targets of their links and their protect_from configs in force, until that
    directory can be listed again or is gone (a directory above that cannot be listed is not gone)."""
    unknown = {group for problem in problems if problem.unlisted for group in index.below(problem.path)}
    for known in index:
        if known not in walked and known not in unknown:
            index.forget(known)


def _policies_read(tree: PolicyTree, index: GroupIndex) -> None:
    """After the per-run files of a pass were read: the daemon looks again at each directory whose
    file was left unread for now (being written), and every group below it, once it is quiet, as no
    event may come by then. (A one-shot prune stops at an invalid one once the protect_from configs
    were read too: _refresh.)"""
    for directory, at in tree.settling.take().items():
        for group in index.below(directory):  # (the directory itself too, if a group: its file applies
            index.recheck(group, at)  # to every group below it, whose answers wait for a look)


def _refresh(reconciler: Reconciler, trigger: Trigger) -> bool:
    """Re-read the protect_from configs of the groups that changed (a full pass also forgets the ones
    no policy names any more); True if what they protect changed. A one-shot prune stops here at the
    invalid per-run files and the unreadable configs, all at once: one InvalidPolicyFilesError."""
    registry, configs, strict = reconciler.registry, reconciler.index.configs(), reconciler._one_shot
    errors = reconciler.tree.errors  # (only a strict tree, a one-shot prune's, collects them)
    try:
        changed = registry.refresh(configs, strict=strict)
    except UnreadableConfigsError as unreadable:
        problem = PolicyError("protect_from", [protect_from_problem(error) for error in unreadable.errors])
        raise InvalidPolicyFilesError([*errors, problem]) from None
    if strict and errors:
        raise InvalidPolicyFilesError(list(errors))
    if trigger.covers_everything:
        changed = registry.retain(configs) or changed
    return changed


class ProblemLog:
    """What a pass could not read, logged once per path when the pass ends (``scan_problem``): a
    directory is listed both by the walk and by the scan of its group."""

    def __init__(self) -> None:
        self._messages: dict[Path, str] = {}

    def note(self, problems: Iterable[ScanProblem]) -> None:
        """Remember ``problems`` (the first message for a path wins)."""
        for problem in problems:
            self._messages.setdefault(problem.path, problem.message)

    def flush(self) -> None:
        """Log each remembered path once and forget them."""
        for path, message in self._messages.items():
            logger.warning("scan_problem", path=display_name(str(path)), error=message)
        self._messages = {}


def _log_blocked(group: Path, state: GroupState, why: str) -> None:
    """``group_blocked``, once while the group stays blocked."""
    if not state.blocked or state.held:
        logger.warning("group_blocked", directory=str(group), detail=why)
        state.blocked, state.held = True, False


def _hold(
    registry: ProtectionRegistry,
    index: GroupIndex,
    effective: dict[Path, EffectivePolicy],
    blocked: list[Path],
    was_holding: bool,
) -> bool:
    """While a protect_from config exists but was never read (``ProtectionRegistry.holding``), take
    every group out of the pass (into ``blocked``): the checkpoint it names may be in any of them (a
    fine-tuning source in another run), so nothing is deleted until it is read. One
    ``deletions_held`` record for the groups newly held, one ``deletions_released`` afterwards; a
    held group outside the pass that ends the hold is looked at again at once (its deletions waited).
    Returns whether anything holds now."""
    holding = _holding(registry, index)  # (a config no policy names any more holds nothing)
    held: list[Path] = []
    released: list[Path] = []
    if was_holding and not holding:
        now = time.monotonic()
        for group in index:
            state = index.get(group)
            if state is not None and state.held and group not in effective:
                index.recheck(group, now)
    for group in list(effective):
        state = index.state(group)
        if holding:
            if not state.held:
                held.append(group)
            state.held = state.blocked = True
            del effective[group]
            blocked.append(group)
        elif state.held:
            state.held = False
            released.append(group)
    if held:
        logger.warning(
            "deletions_held",
            configs=sorted(set(holding.values())),
            groups=len(held),
            directories=[display_name(str(group)) for group in held[:SHOWN_HELD]],
            detail="a protect_from config exists but could not be read yet, so what it protects is "
            "unknown: no checkpoint under the root is deleted or evicted until it is read",
        )
    if released:
        logger.info(
            "deletions_released",
            groups=len(released),
            directories=[display_name(str(group)) for group in released[:SHOWN_HELD]],
            detail="the protect_from configs are read: retention applies again",
        )
    return bool(holding)


def _holding(registry: ProtectionRegistry, index: GroupIndex) -> dict[Path, str]:
    """The configs that hold deletions (``ProtectionRegistry.holding``) that some policy names now."""
    named = index.configs()
    return {config: label for config, label in registry.holding().items() if config in named}


def _protection_known(registry: ProtectionRegistry, index: GroupIndex, value: EffectivePolicy) -> bool:
    """True if no config holds deletions and every config ``value`` names was read (or tried): a
    group planned outside the pass's start (keep_free's) must not go by configs nobody read."""
    return not _holding(registry, index) and set(value.protect_from) <= set(registry.configs())


def _log_news(state: GroupState, records: list[CheckpointRecord], *, detections: bool) -> int:
    """Warn once about each suspicious name; with ``detections`` (the daemon) also log each checkpoint
    that is new or whose completeness changed (``checkpoint_detected``, at debug). Returns how many.

    What was seen is remembered as the hash of each (name, complete): an integer per checkpoint, not
    its name (a collision, ~3e-10 among 100,000 names, could only leave one detection uncounted)."""
    seen = array("q")  # packed as it is found: no object per checkpoint is kept for the pass
    seen_before = state.seen.unpacked()
    detected = 0
    # Bound once, and the fields of a detection built only if it is logged: the proxy binds anew at
    # every call, which cost ~4 us a checkpoint (0.4 s a 100,000-checkpoint start-up) for nothing.
    log = logger.bind()
    log_detections = debug_enabled(log)
    incomplete_last: list[CheckpointRecord] = []
    for record in records:
        if record.kind is Kind.LAST and not record.complete:
            incomplete_last.append(record)
        if record.note and record.name not in state.suspicious:
            state.suspicious.add(record.name)
            log.warning(
                "checkpoint_suspicious",
                path=display_name(record.path_text),
                detail=f"{record.note}; kept",
            )
        if record.kind is Kind.UNKNOWN or not detections:
            continue
        key = hash((record.name, record.complete))
        seen.append(key)
        if key not in seen_before:
            detected += 1
            if not log_detections:
                continue
            log.debug(  # at debug: a pass's one summary line (pass_completed) counts them
                "checkpoint_detected",
                path=display_name(record.path_text),
                kind=record.kind.value,
                complete=record.complete,
                reason=record.incomplete_reason,
            )
    state.seen = PackedHashes(seen)
    if state.suspicious:
        state.suspicious &= {record.name for record in records}
    if incomplete_last or state.warned_incomplete_last:
        state.warned_incomplete_last = _warn_incomplete_last(state.warned_incomplete_last, incomplete_last)
    return detected


def _warn_incomplete_last(
    warned: tuple[FileIdentity, ...], incomplete: list[CheckpointRecord]
) -> tuple[FileIdentity, ...]:
    """Warn once about each last checkpoint that has been incomplete (truncated by a trainer killed
    mid-save, a link whose target is gone) and untouched for ``LAST_QUIET_SECONDS``: a run resuming
    from it fails or starts over. It is kept, as is everything; returns the identities warned about."""
    now = time.time()
    still: list[FileIdentity] = []
    for record in incomplete:
        identity = record.identity
        if identity is None or now - identity.mtime_ns / 1e9 < LAST_QUIET_SECONDS:
            continue  # (being written: a save's last.ckpt is incomplete until it is whole)
        if any(fragment in (record.incomplete_reason or "") for fragment in _NOT_BROKEN):
            continue
        still.append(identity)
        if identity not in warned:
            logger.warning(
                "last_checkpoint_incomplete",
                path=display_name(record.path_text),
                reason=record.incomplete_reason,
                detail="a run resuming from it will fail to load it, or start over; it is kept",
            )
    return tuple(still)
