"""Retention by bytes: which kept checkpoints space pressure evicts, and in which order. Pure: no I/O.

The count rules decide first (``plan.py``). Then two budgets may evict kept checkpoints, one at a
time, in this order, until the budget holds:

1. step checkpoints kept by ``save_top_k_checkpoints``, oldest step first;
2. step checkpoints kept by ``save_every_n_epochs``, oldest first;
3. best checkpoints, worst metric first;
4. milestones (``keep_every_n_steps``), oldest first.

A checkpoint kept by several rules belongs to the latest class among them: it goes only when every
rule that keeps it gives way. Never evicted: ``last.ckpt`` and its target, the pending link target,
anything pinned, protected or a resume source (all ``Hold.PROTECTED``), the rank-1 best, and the newest
complete checkpoint of the group (its last way to resume).

* ``max_size`` is per group: ``within_max_size`` evicts from the group's own kept checkpoints.
* ``keep_free`` is per file system: ``free_space_plan`` first takes reclaimable bytes (the trash,
  oldest first), then evicts across every group on the file system, class by class; within a class
  the oldest file (mtime) goes first, whichever group it is in, each group's own order kept (its worst
  best before its better ones). The free space it keeps counts the next save (``predict_next_save``).
* Neither evicts a name whose file another name that stays also holds (a hard link): that frees nothing.

Each function is deterministic: the same records in any order give the same result.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_watcher.naming import Kind
from ckpt_watcher.plan import Action, Decision, GroupPlan, Hold, best_order_key, oldest_first_key
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import CheckpointRecord, EntryType
from ckpt_watcher.sizes import FreeSpaceSetting, human_bytes

# The class of each rule that may give way to space pressure (PROTECTED and BEST_FIRST never do).
EVICTION_CLASSES: Mapping[Hold, int] = {
    Hold.NEWEST_STEPS: 1,
    Hold.EPOCH_END: 2,
    Hold.BEST: 3,
    Hold.MILESTONE: 4,
}
# An incomplete checkpoint modified this recently is being written (older: a leftover of a crash).
GROWING_SECONDS = 60.0
# ... or modified at most this far ahead of this host's clock: the file system's clock may run a little
# ahead (an NFS server stamps the mtimes). Further ahead is no save in progress but a leftover stamped
# elsewhere (copied with `cp -p` from a host whose clock was ahead): counted as being written, it
# would reserve a whole next save until this clock caught up with it, hours maybe.
CLOCK_SKEW_SECONDS = 5.0
_SIZED_TYPES = (EntryType.FILE, EntryType.DIRECTORY)
_CHECKPOINT_KINDS = (Kind.STEP, Kind.BEST, Kind.LAST)


@dataclass(frozen=True, slots=True)
class Reclaimable:
    """Bytes that may go before any kept checkpoint (a trash entry): counted toward ``keep_free`` only.

    ``since``: when it was trashed (epoch seconds); the oldest goes first.
    """

    key: str
    device: int
    bytes: int
    since: float


# -- what may be evicted ---------------------------------------------------------------------------


def eviction_class(decision: Decision) -> int | None:
    """The class (1-4) in which space pressure may evict a kept checkpoint, or None if it never may."""
    record = decision.record
    if decision.action is not Action.KEEP or record.kind not in (Kind.STEP, Kind.BEST):
        return None
    if not record.complete or record.entry_type not in _SIZED_TYPES or record.identity is None:
        return None
    holds = decision.holds
    if not holds or Hold.PROTECTED in holds or Hold.BEST_FIRST in holds:
        return None
    return max(EVICTION_CLASSES[hold] for hold in holds)


def newest_kept(decisions: Iterable[Decision]) -> Decision | None:
    """The newest complete checkpoint the group keeps (by step, then a step before a best): never
    evicted, it is the group's last way to resume; the same choice as the planner's rule 5."""
    kept = [
        decision
        for decision in decisions
        if decision.action is Action.KEEP
        and decision.record.kind in (Kind.STEP, Kind.BEST)
        and decision.record.complete
        and decision.record.entry_type in _SIZED_TYPES
    ]
    if not kept:
        return None
    return max(
        kept,
        key=lambda decision: (
            decision.record.step_order,
            decision.record.kind is Kind.STEP,
            _reversed_text(decision.record.name),
        ),
    )


def _reversed_text(text: str) -> tuple[int, ...]:
    """A key under which a smaller text sorts larger (the planner takes the smallest name on a tie)."""
    return (*(-ord(character) for character in text), 1)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A kept checkpoint space pressure may evict: its decision, class, and place in its group's order."""

    decision: Decision
    eviction_class: int
    position: int

    @property
    def record(self) -> CheckpointRecord:
        """The checkpoint."""
        return self.decision.record

    @property
    def bytes(self) -> int:
        """What evicting it frees (its size)."""
        return self.decision.record.bytes

    @property
    def mtime_ns(self) -> int:
        """When it was last written."""
        identity = self.decision.record.identity
        return identity.mtime_ns if identity is not None else 0


def candidates(decisions: Iterable[Decision], best_mode: str) -> tuple[Candidate, ...]:
    """The group's kept checkpoints that space pressure may evict, in the order it would."""
    decisions = list(decisions)
    newest = newest_kept(decisions)
    classed = [
        (decision, klass)
        for decision in decisions
        if decision is not newest and (klass := eviction_class(decision)) is not None
    ]

    def order(item: tuple[Decision, int]) -> tuple[object, ...]:
        decision, klass = item
        record = decision.record
        if klass == EVICTION_CLASSES[Hold.BEST]:
            return (klass, _worst_first(best_order_key(record, best_mode)), record.name)
        return (klass, oldest_first_key(record), record.name)

    return tuple(
        Candidate(decision, klass, position)
        for position, (decision, klass) in enumerate(sorted(classed, key=order))
    )


def _worst_first(key: tuple[bool, float, tuple[int, int, int, int, str]]) -> tuple[object, ...]:
    """``best_order_key`` turned around: NaN first, then the worst metric, then the older checkpoint."""
    is_nan, metric, newest = key
    step, epoch, version, date, name = newest
    return (not is_nan, -metric, -step, -epoch, -version, -date, _reversed_text(name))


def evicted(candidate: Candidate, reason: str) -> Decision:
    """The decision that gives ``candidate`` up for space; its former reasons follow the new one."""
    decision = candidate.decision
    return Decision(
        decision.record,
        Action.DELETE,
        (reason, "otherwise kept: " + "; ".join(decision.reasons)),
        decision.holds,
        evicted=True,
    )


def _kept_bytes(decisions: Iterable[Decision]) -> int:
    """The bytes the kept checkpoints take: a file kept under two names (a hard link) counts once; an
    incomplete one (a ``last.ckpt`` being written, or pre-sized for a download) not at all: its size
    may be bytes not on disk (a sparse file), and it is no checkpoint yet."""
    counted: set[object] = set()
    total = 0
    for decision in decisions:
        if _counted(decision):
            key = _storage_key(decision.record)
            if key not in counted:
                counted.add(key)
                total += decision.record.bytes
    return total


def _counted(decision: Decision) -> bool:
    """A kept checkpoint whose bytes count toward ``max_size``: a complete one."""
    return decision.action is Action.KEEP and decision.record.complete


def _storage_key(record: CheckpointRecord) -> object:
    """What two names of the same stored bytes share: a local file's (device, inode); anything else
    is its own (an object in a bucket, device 0, never shares its bytes with another key)."""
    identity = record.identity
    if record.entry_type is EntryType.FILE and identity is not None and identity.device != 0:
        return (identity.device, identity.inode)
    return id(record)


def _names_left(decisions: Iterable[Decision]) -> Counter[object]:
    """How many names that stay (kept, or skipped: an unknown name, a link) each stored file has."""
    return Counter(
        _storage_key(decision.record) for decision in decisions if decision.action is not Action.DELETE
    )


def _freeing(ordered: Iterable[Candidate], names_left: Counter[object]) -> Iterator[Candidate]:
    """``ordered`` less each candidate whose file another name that stays also holds (a hard link):
    removing it would free nothing. ``names_left`` counts the names of each file that stay; a
    candidate the caller goes on from (it took it) stays no more."""
    for candidate in ordered:
        key = _storage_key(candidate.record)
        if names_left[key] > 1:
            continue
        yield candidate
        names_left[key] -= 1


def freed_bytes(decisions: Iterable[Decision]) -> int:
    """What applying the delete decisions among ``decisions`` (a group's plan) frees: each stored file
    once, and none whose file a name that stays also holds (a hard link)."""
    decisions = list(decisions)
    names_left = _names_left(decisions)
    freed: dict[object, int] = {}
    for decision in decisions:
        key = _storage_key(decision.record)
        if decision.action is Action.DELETE and not names_left[key]:
            freed[key] = decision.record.bytes
    return sum(freed.values())


# -- max_size: per group ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SizeVerdict:
    """A group against its ``max_size``: what it kept, what was evicted, and how far it still is over."""

    directory: Path
    limit: int
    kept_bytes: int
    evicted_bytes: int
    unmet_bytes: int
    remaining: tuple[str, ...] = ()  # when unmet: what is left and why it may not go


def within_max_size(group_plan: GroupPlan, policy: Policy) -> tuple[GroupPlan, SizeVerdict | None]:
    """The group's plan with kept checkpoints evicted, in order, until it keeps at most ``max_size``
    bytes (never more than needed); the verdict is None when the policy sets no ``max_size``."""
    limit = policy.max_size_bytes
    if limit is None:
        return group_plan, None
    kept = _kept_bytes(group_plan.decisions)
    over = kept - limit
    chosen: dict[int, Decision] = {}
    if over > 0:
        shown_limit, shown_kept = human_bytes(limit), f"{human_bytes(kept)} kept"
        if shown_limit == human_bytes(kept):  # over by less than the rounding shows: say by how much
            shown_kept += f", {over} bytes over"
        reason = f"evicted for space: group over max_size {shown_limit} ({shown_kept})"
        ordered = candidates(group_plan.decisions, policy.best_mode)
        for candidate in _freeing(ordered, _names_left(group_plan.decisions)):
            if over <= 0:
                break
            chosen[id(candidate.decision)] = evicted(candidate, reason)
            over -= candidate.bytes
    decisions = tuple(chosen.get(id(decision), decision) for decision in group_plan.decisions)
    unmet = max(0, over)
    verdict = SizeVerdict(
        directory=group_plan.directory,
        limit=limit,
        kept_bytes=kept,
        evicted_bytes=sum(decision.record.bytes for decision in chosen.values()),
        unmet_bytes=unmet,
        remaining=describe_remaining(decisions) if unmet else (),
    )
    return GroupPlan(group_plan.directory, decisions), verdict


def describe_remaining(decisions: Iterable[Decision]) -> tuple[str, ...]:
    """Each kept checkpoint with bytes that space pressure may not evict, and why (for ``budget_unmet``)."""
    decisions = list(decisions)
    newest = newest_kept(decisions)
    described: list[str] = []
    for decision in decisions:
        if not _counted(decision) or not decision.record.bytes:
            continue  # (an incomplete checkpoint does not count: it holds no budget unmet)
        if decision is newest:
            why = "the newest complete checkpoint"
        elif decision.record.kind is Kind.LAST:
            why = "last checkpoint"
        elif Hold.PROTECTED in decision.holds:
            why = "; ".join(decision.reasons)
        elif Hold.BEST_FIRST in decision.holds:
            why = "the rank-1 best"
        else:
            continue
        described.append(f"{decision.record.name} ({why})")
    return tuple(sorted(described))


# -- the next save ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Written:
    """A complete checkpoint as the prediction needs it: where, how big, when written."""

    relative_path: str
    bytes: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Growing:
    """A checkpoint being written: what is there, and how big it is expected to become (the group's
    previous complete checkpoint of its kind; None when there is none)."""

    path: Path
    relative_path: str
    inode: int
    written: int
    expected: int | None
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class GroupSpace:
    """What the free-space step needs of one group, remembered between passes; bounded by the group's
    kept checkpoints (never every record of it)."""

    directory: Path
    device: int
    keep_free: FreeSpaceSetting | None
    candidates: tuple[Candidate, ...] = ()
    growing: tuple[Growing, ...] = ()
    latest: Written | None = None
    sizes_by_kind: Mapping[Kind, int] = field(default_factory=dict)
    budgeted: bool = False  # max_size or keep_free is in force here
    names_left: Mapping[object, int] = field(default_factory=dict)  # of each candidate's file, that stay


def group_space(
    directory: Path,
    decisions: Sequence[Decision],
    policy: Policy,
    *,
    device: int,
    now: float,
    previous: GroupSpace | None = None,
) -> GroupSpace:
    """One group's space facts from its plan (after ``within_max_size``) at wall-clock time ``now``.

    Only a group under ``keep_free`` gives up checkpoints for it (its candidates are remembered); every
    group's saves count in the prediction.

    Sizes the group no longer shows (its only ``last.ckpt`` is being rewritten, say) are taken from
    ``previous``, the facts of its last pass.
    """
    records = [decision.record for decision in decisions]
    complete = [
        record
        for record in records
        if record.complete
        and record.kind in _CHECKPOINT_KINDS
        and record.entry_type in _SIZED_TYPES
        and record.identity is not None
    ]
    sizes = dict(previous.sizes_by_kind) if previous is not None else {}
    for kind in _CHECKPOINT_KINDS:
        of_kind = [record for record in complete if record.kind is kind]
        if of_kind:
            steps = [record.step or 0 for record in of_kind]  # _newest_of_kind_key's first part
            sizes[kind] = _greatest(of_kind, steps, _newest_of_kind_key).bytes
    latest = previous.latest if previous is not None else None
    if complete:
        record = _greatest(complete, [_mtime(record) for record in complete], _latest_written_key)
        latest = Written(record.relative_path, record.bytes, _mtime(record))
    growing = _growing(decisions, sizes, now)
    evictable = candidates(decisions, policy.best_mode) if policy.keep_free is not None else ()
    names_left = _names_left(decisions) if evictable else Counter()
    return GroupSpace(
        directory=directory,
        device=device,
        keep_free=policy.keep_free_setting,
        candidates=evictable,
        growing=growing,
        latest=latest,
        sizes_by_kind=sizes,
        budgeted=policy.max_size is not None or policy.keep_free is not None,
        names_left={
            key: names_left[key] for key in (_storage_key(candidate.record) for candidate in evictable)
        },
    )


def _growing(decisions: Sequence[Decision], sizes: Mapping[Kind, int], now: float) -> tuple[Growing, ...]:
    """The group's checkpoints being written, each expected as large as its kind's newest complete one."""
    growing: list[Growing] = []
    for decision in decisions:
        record = decision.record
        if _is_growing(record, now) and record.identity is not None:
            identity = record.identity
            expected = sizes.get(record.kind)
            growing.append(
                Growing(
                    record.path,
                    record.relative_path,
                    identity.inode,
                    record.bytes,
                    expected,
                    identity.mtime_ns,
                )
            )
    return tuple(sorted(growing, key=lambda item: item.relative_path))


def _greatest(
    records: Sequence[CheckpointRecord],
    firsts: Sequence[int],
    key: Callable[[CheckpointRecord], tuple[Any, ...]],
) -> CheckpointRecord:
    """``max(records, key=key)``, where ``firsts`` holds each record's ``key(record)[0]``: only the few
    records with the greatest first part are compared by the whole key (a key tuple each), not all."""
    top = max(firsts)
    return max((record for record, first in zip(records, firsts, strict=True) if first == top), key=key)


def _newest_of_kind_key(record: CheckpointRecord) -> tuple[int, int, int, int, str]:
    """(step_order, mtime, name): the newest of a kind is the greatest."""
    return (*record.step_order, _mtime(record), record.name)


def _latest_written_key(record: CheckpointRecord) -> tuple[int, str]:
    """The latest written checkpoint is the greatest: (mtime, relative path)."""
    return (_mtime(record), record.relative_path)


def _mtime(record: CheckpointRecord) -> int:
    return record.identity.mtime_ns if record.identity is not None else 0


def _is_growing(record: CheckpointRecord, now: float) -> bool:
    """An incomplete checkpoint file (or directory) modified just now (``recently_modified``)."""
    return (
        not record.complete
        and record.kind in _CHECKPOINT_KINDS
        and record.entry_type in _SIZED_TYPES
        and record.identity is not None
        and recently_modified(record.identity.mtime_ns, now)
    )


def recently_modified(mtime_ns: int, now: float) -> bool:
    """Modified in the last GROWING_SECONDS before ``now``, or at most CLOCK_SKEW_SECONDS after it
    (a time further ahead is not a write in progress)."""
    age = now - mtime_ns / 1e9
    return -CLOCK_SKEW_SECONDS <= age < GROWING_SECONDS


@dataclass(frozen=True, slots=True)
class NextSave:
    """The bytes the next save is expected to need, and why that figure."""

    bytes: int
    basis: str


def predict_next_save(groups: Iterable[GroupSpace]) -> NextSave:
    """While checkpoints are being written: what they still need (each expected as large as its group's
    previous complete checkpoint of its kind, else as the newest one written). Otherwise: as large as
    the newest complete checkpoint of the most recently written group."""
    groups = list(groups)
    latest = max(
        (group.latest for group in groups if group.latest is not None),
        key=lambda written: (written.mtime_ns, written.relative_path),
        default=None,
    )
    growing = sorted(
        (item for group in groups for item in group.growing), key=lambda item: item.relative_path
    )
    if growing:
        fallback = latest.bytes if latest is not None else 0
        expected = [item.expected if item.expected is not None else fallback for item in growing]
        remaining = sum(max(0, size - item.written) for size, item in zip(expected, growing, strict=True))
        written = sum(item.written for item in growing)
        being = growing[0].relative_path if len(growing) == 1 else f"{len(growing)} checkpoints"
        return NextSave(
            remaining,
            f"{being} being written: {human_bytes(written)} of an expected {human_bytes(sum(expected))}",
        )
    if latest is None:
        return NextSave(0, "no complete checkpoint yet")
    return NextSave(latest.bytes, f"as large as {latest.relative_path}, the newest complete checkpoint")


# -- keep_free: per file system --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileSystemSpace:
    """A file system as ``statvfs`` saw it (free: what an unprivileged writer may still use).

    ``block_bytes``: its allocation unit; a save takes whole blocks, so the next save is reserved in
    them (an eviction is credited with its size only: it frees at least that).
    """

    device: int
    path: Path
    total_bytes: int
    free_bytes: int
    block_bytes: int = 1


@dataclass(frozen=True, slots=True)
class FreeSpacePlan:
    """What ``keep_free`` asks of one file system, and what it takes: trash first, then checkpoints."""

    space: FileSystemSpace
    keep_free: FreeSpaceSetting | None
    keep_free_bytes: int
    next_save: NextSave
    short_bytes: int
    reclaimed: tuple[Reclaimable, ...] = ()
    evictions: tuple[Candidate, ...] = ()
    unmet_bytes: int = 0
    reason: str = ""

    @property
    def reclaimed_bytes(self) -> int:
        """Bytes taken from the trash."""
        return sum(item.bytes for item in self.reclaimed)

    @property
    def evicted_bytes(self) -> int:
        """Bytes of the checkpoints evicted."""
        return sum(candidate.bytes for candidate in self.evictions)

    def evicted_decisions(self) -> list[Decision]:
        """The evictions as delete decisions, in eviction order (the most expendable first)."""
        return [evicted(candidate, self.reason) for candidate in self.evictions]

    def short_now(self, free_bytes: int) -> int:
        """How many bytes the file system would still be short with ``free_bytes`` free now (0: it has
        what ``keep_free`` and the next save ask for): the same sum the plan was made with."""
        return shortfall(self.keep_free_bytes, self.next_save.bytes, free_bytes, self.space.block_bytes)


def shortfall(keep_free_bytes: int, next_save_bytes: int, free_bytes: int, block_bytes: int) -> int:
    """Bytes missing for ``keep_free`` plus the next save (reserved in whole blocks) to be free."""
    blocks = max(1, block_bytes)
    reserved = -(-next_save_bytes // blocks) * blocks
    return max(0, keep_free_bytes + reserved - free_bytes)


def strictest_keep_free(
    groups: Iterable[GroupSpace], total_bytes: int
) -> tuple[FreeSpaceSetting | None, int]:
    """The ``keep_free`` in force on a file system: the largest any of its groups asks for."""
    settings = {group.keep_free for group in groups if group.keep_free is not None}
    if not settings:
        return None, 0
    chosen = max(settings, key=lambda setting: (setting.bytes_of(total_bytes), setting.text))
    return chosen, chosen.bytes_of(total_bytes)


def free_space_plan(
    space: FileSystemSpace,
    groups: Iterable[GroupSpace],
    reclaimable: Sequence[Reclaimable] = (),
) -> FreeSpacePlan:
    """What keeping ``keep_free`` (plus the next save) free on ``space`` takes: reclaimable bytes on the
    same device first, oldest first, then kept checkpoints of its groups in eviction order, each one
    only while the file system is still short (never more than needed). What cannot be met is
    ``unmet_bytes``."""
    groups = [group for group in groups if group.device == space.device]
    setting, required = strictest_keep_free(groups, space.total_bytes)
    next_save = predict_next_save(groups)
    if setting is None:
        return FreeSpacePlan(space, None, 0, next_save, 0)
    short = shortfall(required, next_save.bytes, space.free_bytes, space.block_bytes)
    shown = (
        human_bytes(required) if setting.bytes is not None else f"{setting.text} ({human_bytes(required)})"
    )
    reason = (
        f"evicted for space: {human_bytes(space.free_bytes)} free, keep_free {shown} "
        f"+ next save {human_bytes(next_save.bytes)}"
    )
    remaining = short
    reclaimed: list[Reclaimable] = []
    chosen: list[Candidate] = []
    if remaining > 0:  # (only when short: the daemon checks every second; a trash or group may hold 100,000)
        trashed = [item for item in reclaimable if item.device == space.device]
        for item in sorted(trashed, key=lambda item: (item.since, item.key)):
            if remaining <= 0:
                break
            reclaimed.append(item)
            remaining -= item.bytes
        names_left: Counter[object] = Counter()
        for group in groups:
            names_left.update(group.names_left)  # (a file whose names are in two groups: both count)
        for candidate in _freeing(eviction_order(groups), names_left):
            if remaining <= 0:
                break
            chosen.append(candidate)
            remaining -= candidate.bytes
    return FreeSpacePlan(
        space,
        setting,
        required,
        next_save,
        short,
        tuple(reclaimed),
        tuple(chosen),
        max(0, remaining),
        reason,
    )


def eviction_order(groups: Iterable[GroupSpace]) -> Iterable[Candidate]:
    """Every group's candidates, class by class; within a class, repeatedly the oldest (mtime) of the
    groups' next candidates, so each group's own order holds (its worst best before its better ones)."""
    groups = list(groups)
    for klass in sorted(set(EVICTION_CLASSES.values())):
        queues = [
            [candidate for candidate in group.candidates if candidate.eviction_class == klass]
            for group in groups
        ]
        heap = [
            (queue[0].mtime_ns, queue[0].record.path_text, index, 0)
            for index, queue in enumerate(queues)
            if queue
        ]
        heapq.heapify(heap)
        while heap:
            _, _, index, position = heapq.heappop(heap)
            queue = queues[index]
            yield queue[position]
            if position + 1 < len(queue):
                heapq.heappush(heap, _heap_entry(queue, index, position + 1))


def _heap_entry(queue: list[Candidate], index: int, position: int) -> tuple[int, str, int, int]:
    """A group's next candidate in the merge: oldest first, the path settling ties (never the group's
    place in the input)."""
    candidate = queue[position]
    return (candidate.mtime_ns, candidate.record.path_text, index, position)
