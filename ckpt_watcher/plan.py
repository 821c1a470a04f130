"""The retention plan: a pure function from scan records and a policy to one decision per record.

No I/O happens here. Every record gets exactly one action (keep, delete or skip) and the reasons for
it, so ``prune --dry-run`` can show why each file stays or goes. Only complete, regular step and best
checkpoint files can ever be deleted; everything else is kept or skipped.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ckpt_watcher.frozen import quick_init
from ckpt_watcher.naming import Kind
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import CheckpointRecord, EntryType

PIN_SUFFIX = ".keep"


class Hold(enum.StrEnum):
    """Which rule keeps a checkpoint, as space pressure reads it (the reasons are the text).

    A checkpoint held by ``PROTECTED`` or ``BEST_FIRST`` is never evicted for space; the others are
    evicted in the order of their rules (``budget.py``), and one held by several rules only when the
    last of them gives way.
    """

    NEWEST_STEPS = "save_top_k_checkpoints"
    EPOCH_END = "save_every_n_epochs"
    BEST = "save_top_k_best"
    BEST_FIRST = "rank-1 best"
    MILESTONE = "keep_every_n_steps"
    PROTECTED = "protected"  # last, a link's target, pins, protect, resume sources, the last way to resume


class Action(enum.StrEnum):
    """What happens to a record."""

    KEEP = "keep"
    DELETE = "delete"
    SKIP = "skip"


@quick_init
@dataclass(frozen=True, slots=True)
class Decision:
    """One record, its action and the human-readable reasons for it (``reasons``).

    ``holds`` are the rules that keep it (a kept decision); ``evicted`` says a kept checkpoint was given
    up for space (``budget.py``), its reasons then saying why. ``told`` holds the reasons as given;
    with a ``rank`` its first is a template the rank is put into when the reasons are read ("outside
    newest 5 step checkpoints (#%d)"): the step ranking gives nearly every deleted checkpoint of a
    large group a reason of its own, and one text per checkpoint, in a tuple of its own, is ~140
    bytes (~13 MB per 100,000) held from the plan until it is shown.
    """

    record: CheckpointRecord
    action: Action
    told: tuple[str, ...]
    holds: frozenset[Hold] = frozenset()
    evicted: bool = False
    rank: int = 0

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why, in words (the ranked reason formatted now)."""
        if not self.rank:
            return self.told
        return (self.told[0] % self.rank, *self.told[1:])


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts and bytes of a plan or a group: what it keeps and what it would delete (``to_delete``:
    planned; what a pass did delete is ``ApplyResult.deleted``, its count ``PassResult.deleted``)."""

    kept: int = 0
    to_delete: int = 0
    skipped: int = 0
    bytes_to_delete: int = 0
    bytes_kept: int = 0

    def __add__(self, other: Summary) -> Summary:
        return Summary(
            self.kept + other.kept,
            self.to_delete + other.to_delete,
            self.skipped + other.skipped,
            self.bytes_to_delete + other.bytes_to_delete,
            self.bytes_kept + other.bytes_kept,
        )


def summarize(decisions: Iterable[Decision]) -> Summary:
    """Count the actions of ``decisions``."""
    kept = deleted = skipped = bytes_deleted = bytes_kept = 0
    for decision in decisions:
        if decision.action is Action.KEEP:
            kept += 1
            bytes_kept += decision.record.bytes
        elif decision.action is Action.DELETE:
            deleted += 1
            bytes_deleted += decision.record.bytes
        else:
            skipped += 1
    return Summary(kept, deleted, skipped, bytes_deleted, bytes_kept)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """The decisions for one directory."""

    directory: Path
    decisions: tuple[Decision, ...]

    @property
    def deletions(self) -> tuple[Decision, ...]:
        """The decisions whose action is delete, oldest (lowest step) first."""
        deletions = [decision for decision in self.decisions if decision.action is Action.DELETE]
        return tuple(sorted(deletions, key=lambda decision: oldest_first_key(decision.record)))

    @property
    def summary(self) -> Summary:
        """Counts for this group."""
        return summarize(self.decisions)


@dataclass(frozen=True, slots=True)
class Plan:
    """Decisions for every group, ordered by directory."""

    groups: tuple[GroupPlan, ...]

    @property
    def decisions(self) -> tuple[Decision, ...]:
        """Every decision of every group."""
        return tuple(decision for group in self.groups for decision in group.decisions)

    @property
    def deletions(self) -> tuple[Decision, ...]:
        """Every delete decision."""
        return tuple(decision for group in self.groups for decision in group.deletions)

    @property
    def summary(self) -> Summary:
        """Counts over all groups."""
        return summarize(self.decisions)


def format_metric(record: CheckpointRecord) -> str:
    """``loss=0.4100`` as written in the name."""
    return f"{record.metric_name}={record.metric_text}"


def _newest_first_key(record: CheckpointRecord) -> tuple[int, int, int, int, str]:
    """Newer first: higher (step, epoch, version), then the later date; the name settles exact ties."""
    step, epoch, version = record.step_order
    return (-step, -epoch, -version, -int(record.date or 0), record.name)


def oldest_first_key(record: CheckpointRecord) -> tuple[tuple[int, int, int], str]:
    return (record.step_order, record.name)


def best_order_key(record: CheckpointRecord, mode: str) -> tuple[bool, float, tuple[int, int, int, int, str]]:
    """Better first: NaN last, then the metric by mode, then the *older* checkpoint: of two with the
    same metric the first to reach it is the trainer's best (Lightning's ``ModelCheckpoint`` and
    Hugging Face's Trainer replace their best only with a strictly better one), so
    ``ckpt_path="best"`` names it."""
    metric = record.metric if record.metric is not None else math.nan
    is_nan = math.isnan(metric)
    ordered_metric = 0.0 if is_nan else (metric if mode == "min" else -metric)
    step, epoch, version = record.step_order
    return (is_nan, ordered_metric, (step, epoch, version, int(record.date or 0), record.name))


def symlink_targets(records: Iterable[CheckpointRecord]) -> dict[Path, str]:
    """Each resolved symlink target, with the reason it must be kept (``target of last.ckpt``).

    When several links share a target, the reason names a ``last`` link if there is one, else the
    first link by path, so the reason never depends on the order of the input.
    """
    links = sorted(
        (record for record in records if record.entry_type is EntryType.SYMLINK and record.link_target),
        key=lambda record: (record.kind is not Kind.LAST, record.relative_path),
    )
    targets: dict[Path, str] = {}
    for record in links:
        assert record.link_target is not None
        targets.setdefault(record.link_target, f"target of {record.relative_path}")
    return targets


@dataclass(frozen=True, slots=True)
class LinkInto:
    """A ``last`` symlink as ``save_last="link"`` rules read it: how reasons name it (``label``), its
    resolved ``target``, and when it was made (its own mtime; None if unknown).

    Lightning's ``filename="best/best_{epoch}"`` writes into a directory below its ``dirpath`` and
    links ``dirpath/last.ckpt`` down to it: the link is a record of one group, its targets are in
    another, so the group of the target is planned with the links that point down into it.
    """

    label: str
    target: Path
    made_ns: int | None = None


def links_from_above(records: Iterable[CheckpointRecord]) -> list[LinkInto]:
    """The ``last`` symlinks among ``records`` whose target is in a directory below the link's own
    (Lightning's ``filename`` with a ``/``), as ``LinkInto`` (named by their path from the root). A
    link into a sibling or elsewhere (another run) is not Lightning's own: only its target is kept."""
    found: list[LinkInto] = []
    for record in records:
        target = record.link_target
        if (
            record.kind is Kind.LAST
            and record.entry_type is EntryType.SYMLINK
            and target is not None
            and record.directory in target.parent.parents
        ):
            made = record.identity.mtime_ns if record.identity is not None else None
            found.append(LinkInto(record.relative_path, target, made))
    return found


def _protect_holders(
    protected: Mapping[Path, list[str]], protected_in: dict[Path, dict[str, list[str]]]
) -> None:
    """A protected path inside a directory checkpoint keeps that checkpoint whole: each directory
    above it is protected in its own parent, its reason naming what it holds
    (``holds model.safetensors: target of stage2/last.ckpt``). A file inside is never deleted alone."""
    for path, reasons in protected.items():
        inner, holder = path.name, path.parent
        while holder.parent != holder:
            held = protected_in[holder.parent].setdefault(holder.name, [])
            for reason in reasons:
                text = f"holds {inner}: {reason}"
                if text not in held:
                    held.append(text)
            inner, holder = f"{holder.name}/{inner}", holder.parent


def plan(
    records: Iterable[CheckpointRecord],
    policy: Policy,
    pins: Mapping[Path, str] | None = None,
    group_policies: Mapping[Path, Policy] | None = None,
    *,
    pinned_identities: Mapping[tuple[int, int], str] | None = None,
    pinned_names: Mapping[str, str] | None = None,
    links_into: Iterable[LinkInto] = (),
    listed_links: Iterable[LinkInto] = (),
) -> Plan:
    """Decide for every record; ``pins`` maps paths that must be kept to the reason why.

    Symlink targets found among ``records`` are pinned too. A caller that plans one group alone
    passes the targets of links elsewhere in ``pins``. ``group_policies`` gives a directory its own
    policy (per-run overrides); other directories use ``policy``. ``pinned_identities`` maps the
    (device, inode) of pinned files to the reason (``protection.identities_of(pins)``): a record that
    is one of them is kept with that reason, whatever path named it (a hard link, a bind mount).
    ``pinned_names`` keeps a record of that name in any group (``protection.namesakes_from``).
    ``links_into``: ``last`` links elsewhere whose target is in a directory below their own (a caller
    planning that group alone; ``links_from_above``): the ``save_last="link"`` rules apply there too.
    ``listed_links``: a group's own ``last`` links as a listing just before its scan saw them (and
    those missed a moment ago): one the records lack was removed between the two (Lightning removes
    ``last.ckpt`` before it links it again), and its rules still apply.
    """
    group_policies = group_policies or {}
    records = list(records)
    protected: dict[Path, list[str]] = defaultdict(list)
    for path, reason in symlink_targets(records).items():
        protected[path].append(reason)
    for path, reason in (pins or {}).items():
        if reason not in protected[path]:  # (a group's own link, listed before its scan: said once)
            protected[path].append(reason)
    if pinned_identities:
        _add_record_pins(records, functools.partial(_identity_reason, pinned_identities), protected)
    if pinned_names:
        _add_record_pins(records, lambda record: pinned_names.get(record.name), protected)
    # By directory, then name: a group looks its records up by name (no Path made or hashed per record).
    protected_in: dict[Path, dict[str, list[str]]] = defaultdict(dict)
    for path, reasons in protected.items():
        protected_in[path.parent][path.name] = list(reasons)
    _protect_holders(protected, protected_in)
    from_above = _links_by_target_directory([*links_into, *links_from_above(records)])
    listed = _links_by_target_directory(listed_links)
    groups = _by_directory(records)
    return Plan(
        groups=tuple(
            _plan_group(
                directory,
                groups[directory],
                group_policies.get(directory, policy),
                _with_pins_above(directory, groups[directory], protected_in.get(directory, {}), pins or {}),
                from_above.get(directory, ()),
                listed.get(directory, ()),
            )
            for directory in sorted(groups)
        )
    )


def _by_directory(records: list[CheckpointRecord]) -> dict[Path, list[CheckpointRecord]]:
    """``records`` by their directory, in their order."""
    groups: dict[Path, list[CheckpointRecord]] = defaultdict(list)
    directory: Path | None = None
    members: list[CheckpointRecord] = []
    for record in records:
        if record.directory is not directory:  # a scan's records share their directory's Path
            directory = record.directory
            members = groups[directory]
        members.append(record)
    return groups


def _links_by_target_directory(links: Iterable[LinkInto]) -> dict[Path, list[LinkInto]]:
    """``links`` by the directory of their target, once each (a caller's may repeat the records'),
    in the order of their labels (the reasons never depend on the order of the input)."""
    unique = {(link.label, link.target): link for link in links}
    by_directory: dict[Path, list[LinkInto]] = defaultdict(list)
    for key in sorted(unique, key=lambda key: (key[0], str(key[1]))):
        link = unique[key]
        by_directory[link.target.parent].append(link)
    return by_directory


def _with_pins_above(
    directory: Path,
    members: list[CheckpointRecord],
    in_group: dict[str, list[str]],
    pins: Mapping[Path, str],
) -> Mapping[str, list[str]]:
    """``in_group``, plus, for every record, the reason of a pin that names ``directory`` itself or a
    directory above it (``--protect run/``, a resume value naming a run directory): a pinned directory
    keeps everything in it, in doubt, rather than nothing. Only pins given (not links to a directory:
    a ``latest -> run2`` link must not stop retention in run2)."""
    if not pins:
        return in_group
    above = [
        f"{pins[holder]} (everything in {holder.name})"
        for holder in (directory, *directory.parents)
        if holder in pins
    ]
    if not above:
        return in_group
    return {**in_group, **{record.name: [*in_group.get(record.name, ()), *above] for record in members}}


def _identity_reason(pinned: Mapping[tuple[int, int], str], record: CheckpointRecord) -> str | None:
    identity = record.identity
    return None if identity is None else pinned.get((identity.device, identity.inode))


def _add_record_pins(
    records: list[CheckpointRecord],
    reason_of: Callable[[CheckpointRecord], str | None],
    protected: dict[Path, list[str]],
) -> None:
    """Pin by path every record ``reason_of`` gives a reason for (its identity or its name is pinned);
    a reason already there is not repeated."""
    for record in records:
        reason = reason_of(record)
        if reason is not None:
            path = record.path
            if reason not in protected.get(path, ()):
                protected[path].append(reason)


def _skip_reason(record: CheckpointRecord) -> str | None:
    """Why a record can never be deleted, or None if it is a complete step or best checkpoint.

    A checkpoint is a regular file, or a directory (DeepSpeed, sharded FSDP, DCP, Hugging Face) that
    the scan found complete.
    """
    if record.kind is Kind.UNKNOWN:
        return record.note or "unknown name: matches no checkpoint template"
    if record.entry_type is EntryType.SYMLINK:
        return "symlink: never followed, never deleted"
    if record.entry_type is EntryType.OTHER:
        return "not a regular file"
    if not record.complete:
        reason = record.incomplete_reason or "incomplete"
        if record.entry_type is EntryType.DIRECTORY:
            reason = f"directory checkpoint: {reason}"
        return f"{reason}; {record.note}" if record.note and record.note not in reason else reason
    return None


_PROTECTED = frozenset({Hold.PROTECTED})


_HELD_BY = {hold: frozenset({hold}) for hold in Hold}  # shared: most kept records have one rule
_NO_HOLDS: frozenset[Hold] = frozenset()


class _Ledger:
    """A group's keep reasons, the rules (holds) behind them, and delete reasons, by a candidate's
    position in ``steps + bests``: lists, where dicts keyed by ``id(record)`` took an int and a slot
    per record (~8 MB per 100,000). Held as the tuple and frozenset its decision takes as they are."""

    def __init__(self, size: int) -> None:
        self.keep_reasons: list[tuple[str, ...] | None] = [None] * size
        self.holds: list[frozenset[Hold]] = [frozenset()] * size
        self.delete_reasons: list[tuple[str, ...]] = [()] * size
        self.ranks: list[int] = [0] * size  # a delete reason's rank, where its first is a template
        self._single: tuple[str] = ("",)  # the last one-reason tuple made, shared while its text is

    def _alone(self, reason: str) -> tuple[str]:
        """``(reason,)``, the same tuple for the same text object: a rule that gives every record one
        fixed text ("all step checkpoints kept ...") makes one tuple, not one per record."""
        if self._single[0] is not reason:
            self._single = (reason,)
        return self._single

    def keep(self, position: int, reason: str, hold: Hold) -> None:
        """The candidate at ``position`` is kept by ``hold``'s rule, for ``reason``."""
        reasons = self.keep_reasons[position]
        self.keep_reasons[position] = self._alone(reason) if reasons is None else (*reasons, reason)
        held = self.holds[position]
        self.holds[position] = _HELD_BY[hold] if not held or held == _HELD_BY[hold] else held | {hold}

    def drop(self, position: int, reason: str) -> None:
        """One more reason the candidate at ``position`` goes, unless a rule keeps it."""
        reasons = self.delete_reasons[position]
        self.delete_reasons[position] = (*reasons, reason) if reasons else self._alone(reason)

    def drop_ranked(self, position: int, template: str, rank: int) -> None:
        """The first reason the candidate at ``position`` goes: ``template % rank``, formatted when read
        (``Decision.rank``); the same template object gives every candidate one shared tuple. Only a
        first reason can wait (a decision puts its rank into its first told reason)."""
        if self.delete_reasons[position]:
            self.drop(position, template % rank)
            return
        self.delete_reasons[position] = self._alone(template)
        self.ranks[position] = rank

    def is_kept(self, position: int) -> bool:
        return self.keep_reasons[position] is not None

    def decision(self, position: int, record: CheckpointRecord) -> Decision:
        """The decision on ``record``, the candidate at ``position``."""
        reasons = self.keep_reasons[position]
        if reasons is not None:
            return Decision(record, Action.KEEP, reasons, self.holds[position])
        reasons, rank = self.delete_reasons[position], self.ranks[position]
        return Decision(record, Action.DELETE, reasons, _NO_HOLDS, False, rank)


def _sort_newest_first(records: list[CheckpointRecord]) -> None:
    """Sort in place as ``key=_newest_first_key`` does, in stable passes from its last part to its
    first (a reversed pass keeps ties in order), each keyed by a value the record already holds: no
    key tuple per record, which for 100,000 step checkpoints was ~10 MB at the plan's peak."""
    records.sort(key=_name_of)
    records.sort(key=_date_number, reverse=True)
    records.sort(key=_version_of, reverse=True)
    records.sort(key=_epoch_number, reverse=True)
    records.sort(key=_step_number, reverse=True)


def _name_of(record: CheckpointRecord) -> str:
    return record.name


def _date_number(record: CheckpointRecord) -> int:
    return int(record.date) if record.date else 0


def _version_of(record: CheckpointRecord) -> int:
    return record.version


def _epoch_number(record: CheckpointRecord) -> int:
    return record.epoch or 0


def _step_number(record: CheckpointRecord) -> int:
    return record.step or 0


def _keep_hugging_face_best(
    steps: list[CheckpointRecord], candidates: list[CheckpointRecord], ledger: _Ledger
) -> None:
    """Keep the checkpoint a complete Hugging Face checkpoint's trainer_state.json names as
    ``best_model_checkpoint``: the Trainer's ``load_best_model_at_end`` loads it, and its own rotation
    never deletes it. Named by the newest (``steps`` are newest first) and by the one written last
    (its directory's mtime): after a resume from an older checkpoint, the abandoned branch's
    higher steps stay until the live run passes them, and the live run's best is the latter's."""
    directories = [record for record in steps if record.entry_type is EntryType.DIRECTORY]
    if not directories:
        return
    written_last = max(directories, key=lambda record: record.identity.mtime_ns if record.identity else -1)
    naming = {written_last.names_best: written_last, directories[0].names_best: directories[0]}
    for position, record in enumerate(candidates):
        newest = naming.get(record.name)
        if newest is not None:
            reason = f"best_model_checkpoint in {newest.name}/trainer_state.json (Hugging Face)"
            ledger.keep(position, reason, Hold.PROTECTED)


def _plan_group(  # noqa: C901, PLR0912  (long: the policy's rules in the order README numbers them)
    directory: Path,
    records: list[CheckpointRecord],
    policy: Policy,
    protected: Mapping[str, list[str]],
    from_above: Iterable[LinkInto] = (),
    listed: Iterable[LinkInto] = (),
) -> GroupPlan:
    """One group's decisions; ``protected``: the reasons that keep an entry of it, by name;
    ``from_above``: the ``last`` links of directories above it that point into it; ``listed``: its own
    as listed before its scan (``plan``'s ``listed_links``)."""
    lasts: list[CheckpointRecord] = []
    skipped: list[tuple[CheckpointRecord, str]] = []
    steps: list[CheckpointRecord] = []
    bests: list[CheckpointRecord] = []
    pinned: set[str] = set()  # the names a ``NAME.keep`` file beside them pins
    for record in records:
        if record.name.endswith(PIN_SUFFIX):
            pinned.add(record.name[: -len(PIN_SUFFIX)])
        if record.kind is Kind.LAST:
            lasts.append(record)
            continue
        reason = _skip_reason(record)
        if reason is not None:
            skipped.append((record, reason))
        elif record.kind is Kind.STEP:
            steps.append(record)
        else:
            bests.append(record)

    _sort_newest_first(steps)
    bests.sort(key=lambda record: best_order_key(record, policy.best_mode))
    candidates = steps + bests  # a candidate's position here is its place in the ledger
    ledger = _Ledger(len(candidates))
    _rank_steps(steps, policy.save_top_k_checkpoints, ledger)
    _keep_epoch_ends(steps, policy.save_every_n_epochs, ledger)
    _keep_milestones(steps, policy.keep_every_n_steps, ledger)
    _rank_bests(bests, len(steps), policy.save_top_k_best, ledger)

    for position, record in enumerate(candidates):
        for reason in protected.get(record.name, ()):
            ledger.keep(position, reason, Hold.PROTECTED)
        if record.name in pinned:
            ledger.keep(position, f"pinned by {record.name}{PIN_SUFFIX}", Hold.PROTECTED)
        for pattern in policy.protect:
            if fnmatch.fnmatchcase(record.name, pattern) or fnmatch.fnmatchcase(
                record.relative_path, pattern
            ):
                ledger.keep(position, f"matches protect pattern '{pattern}'", Hold.PROTECTED)

    _keep_hugging_face_best(steps, candidates, ledger)
    own = _own_links(lasts)
    scanned = {last.name for last in lasts}  # (a link the scan found is read as the scan found it)
    own += [link for link in listed if link.label not in scanned]
    _keep_pending_link_target([*own, *from_above], records, candidates, ledger)

    has_usable_last = any(last.complete for last in lasts)
    if candidates and not has_usable_last and not any(map(ledger.is_kept, range(len(candidates)))):
        newest = min(
            range(len(candidates)),
            key=lambda position: (
                _newest_first_key(candidates[position])[:3],
                candidates[position].kind is not Kind.STEP,
                candidates[position].name,
            ),
        )
        ledger.keep(newest, "newest checkpoint: the last way to resume (no usable last.ckpt)", Hold.PROTECTED)

    decisions: list[Decision] = []
    for last in sorted(lasts, key=lambda record: (record.version, record.name)):
        decisions.append(Decision(last, Action.KEEP, _last_reasons(last, protected), _PROTECTED))
    for position, record in enumerate(bests, start=len(steps)):
        decisions.append(ledger.decision(position, record))
    for position, record in enumerate(steps):
        decisions.append(ledger.decision(position, record))
    for record, reason in sorted(skipped, key=lambda pair: pair[0].name):
        extra = tuple(protected.get(record.name, ()))
        decisions.append(Decision(record, Action.SKIP, (reason, *extra)))
    return GroupPlan(directory=directory, decisions=tuple(decisions))


def _own_links(lasts: list[CheckpointRecord]) -> list[LinkInto]:
    """The group's ``last`` symlinks into its own directory (Lightning links within its ``dirpath``),
    named by their name."""
    return [
        LinkInto(link.name, link.link_target, link.identity.mtime_ns if link.identity is not None else None)
        for link in sorted(lasts, key=lambda record: (record.version, record.name))
        if link.entry_type is EntryType.SYMLINK
        and link.link_target is not None
        and link.link_target.parent == link.directory
    ]


def _keep_pending_link_target(
    links: list[LinkInto],
    records: list[CheckpointRecord],
    candidates: list[CheckpointRecord],
    ledger: _Ledger,
) -> None:
    """With ``save_last="link"``, the newest checkpoint of the link's kind is about to become its target.

    Lightning saves a checkpoint, runs its loggers (a slow upload, say), and only then moves the link,
    always to a file of the callback that owns it, so of one kind. While the link still points at an
    older checkpoint of that kind, the newest of that kind is kept, so the link never ends up pointing
    at a file that was just deleted. A link to something that is not a checkpoint (another last file)
    is not about to move. ``links``: those whose target is in this group's directory, beside them or
    from a directory above (``LinkInto``).

    A link to a checkpoint not written yet (dangling) or not whole yet has already moved: Lightning's
    ``AsyncCheckpointIO`` links before its thread writes, a save across file systems copies the bytes
    in under the final name. Until that target is whole, the resume point is the whole checkpoint of
    that kind written last (after a resume from an older step, not the newest by step), kept too.
    """
    if not links:
        return
    # The links' targets among the group's entries, by name (every target is in the group's
    # directory): a candidate (whole), a checkpoint not whole yet, or another entry (another last).
    target_names = {link.target.name for link in links}
    by_name = {record.name: record for record in candidates if record.name in target_names}
    others = {
        record.name: record
        for record in records
        if record.name in target_names and record.name not in by_name
    }
    for link in links:
        target = by_name.get(link.target.name)
        other = others.get(link.target.name)
        if other is not None and other.kind not in {Kind.STEP, Kind.BEST}:
            continue  # it points at something that stays (another last, a pinned file): not moving
        named = target or other
        kinds = [named.kind] if named is not None else [Kind.STEP, Kind.BEST]
        lags = f"points at {other.name}, not whole yet" if other is not None else "does not point at it yet"
        for kind in kinds:
            same_kind = [position for position, record in enumerate(candidates) if record.kind is kind]
            if not same_kind:
                continue
            _keep_newest_of_kind(
                f"newest {kind.value} checkpoint: {link.label} {lags}", target, same_kind, candidates, ledger
            )
            if target is None:
                _keep_resume_point(link, same_kind, candidates, ledger)
            _keep_written_since_link(link, target, same_kind, candidates, ledger)


def _keep_newest_of_kind(
    reason: str,
    target: CheckpointRecord | None,
    same_kind: list[int],
    candidates: list[CheckpointRecord],
    ledger: _Ledger,
) -> None:
    """Keep the newest checkpoints of one kind while the link's whole ``target`` (None: none) is older.

    Newness as everywhere: (step, epoch, version). A resumed run that saves step 300 again writes
    ...-v1.ckpt, newer than the step 300 the link may still name. Every checkpoint at the newest step
    is kept while the link lags: any of them may be where it moves."""
    newest = max(candidates[position].step_order for position in same_kind)
    if target is None or target.step_order < newest:
        for position in same_kind:
            if (candidates[position].step or 0) == newest[0]:
                ledger.keep(position, reason, Hold.PROTECTED)


def _keep_resume_point(
    link: LinkInto, same_kind: list[int], candidates: list[CheckpointRecord], ledger: _Ledger
) -> None:
    """Keep the whole checkpoint of the kind written last, while the link names one not whole (or not
    there) yet: a kill now leaves that one the run's resume point. Time orders nothing here either; it
    only keeps one more."""
    reason = f"written last before {link.label} moved to {link.target.name}, not whole yet: the resume point"
    _keep_written_last(same_kind, candidates, ledger, reason)


def _keep_written_last(
    positions: list[int], candidates: list[CheckpointRecord], ledger: _Ledger, reason: str
) -> None:
    """Keep the one of ``positions`` written last (mtime, then newness), unless something already
    keeps it for good (the newest the link lags behind, a pin): one reason is enough."""
    latest = max(positions, key=lambda position: _written_order(candidates[position]))
    if Hold.PROTECTED not in ledger.holds[latest]:
        ledger.keep(latest, reason, Hold.PROTECTED)


def _keep_written_since_link(
    link: LinkInto,
    target: CheckpointRecord | None,
    same_kind: list[int],
    candidates: list[CheckpointRecord],
    ledger: _Ledger,
) -> None:
    """Keep the checkpoint of the link's kind written last since the link itself was made.

    A run resumed from an older checkpoint (rolled back after a loss spike), or a fresh run in the same
    directory, saves below the newest step, which the rule above does not reach: its save would be
    deleted before Lightning moves the link to it, leaving the link dangling. Lightning makes the link
    anew at every save, so what was written since (the link's own mtime) may be where it moves next.
    Only the latest of them: a link nobody moves any more holds one checkpoint, not every one after it.
    Time orders nothing here; it only keeps one more.
    """
    if link.made_ns is None:
        return
    made = link.made_ns
    written_since = [
        position
        for position in same_kind
        if candidates[position] is not target
        and (identity := candidates[position].identity) is not None
        and identity.mtime_ns >= made
    ]
    if not written_since:
        return
    reason = f"written after {link.label} was made: it may be where the link moves next"
    _keep_written_last(written_since, candidates, ledger, reason)


def _written_order(record: CheckpointRecord) -> tuple[int, tuple[int, int, int]]:
    identity = record.identity
    return (identity.mtime_ns if identity is not None else -1, record.step_order)


def _last_reasons(last: CheckpointRecord, protected: Mapping[str, list[str]]) -> tuple[str, ...]:
    reasons = ["last checkpoint: the resume point, always kept"]
    if last.entry_type is EntryType.SYMLINK:
        target = last.link_target.name if last.link_target is not None else "?"
        reasons.append(f"symlink to {target}")
    if not last.complete and last.incomplete_reason:
        reasons.append(f"not usable: {last.incomplete_reason}")
    reasons.extend(protected.get(last.name, ()))
    return tuple(reasons)


def _rank_steps(steps: list[CheckpointRecord], top_k: int, ledger: _Ledger) -> None:
    """The newest ``top_k`` step checkpoints (``steps`` newest first, at the ledger's first places)."""
    outside = f"outside newest {top_k} step checkpoints (#%d)"  # the rank put in when read
    for position in range(len(steps)):
        rank = position + 1
        if top_k == -1:
            ledger.keep(position, "all step checkpoints kept (save_top_k_checkpoints: -1)", Hold.NEWEST_STEPS)
        elif rank <= top_k:
            ledger.keep(position, f"newest {top_k} step checkpoints (#{rank} of {top_k})", Hold.NEWEST_STEPS)
        else:
            ledger.drop_ranked(position, outside, rank)


def _keep_epoch_ends(steps: list[CheckpointRecord], every_n_epochs: int, ledger: _Ledger) -> None:
    """Keep the newest step checkpoint of each epoch e with (e + 1) % n == 0 (Lightning's convention)."""
    if every_n_epochs == 0:
        return
    seen_epochs: set[int] = set()
    not_newest: dict[int, str] = {}  # one reason text per epoch, shared by its checkpoints
    for position, record in enumerate(steps):  # newest first, so the first of an epoch is its newest
        epoch = record.epoch
        if epoch is None or (epoch + 1) % every_n_epochs != 0:
            continue
        if epoch in seen_epochs:
            reason = not_newest.get(epoch)
            if reason is None:
                reason = not_newest[epoch] = f"not the newest of epoch {epoch}"
            ledger.drop(position, reason)
            continue
        seen_epochs.add(epoch)
        ledger.keep(
            position, f"newest of epoch {epoch} (save_every_n_epochs: {every_n_epochs})", Hold.EPOCH_END
        )


def _rank_bests(bests: list[CheckpointRecord], first_position: int, top_k: int, ledger: _Ledger) -> None:
    """The best ``top_k`` (``bests`` best first, in the ledger from ``first_position`` on)."""
    for rank, record in enumerate(bests, start=1):
        position = first_position + rank - 1
        metric = format_metric(record)
        hold = Hold.BEST_FIRST if rank == 1 else Hold.BEST
        if top_k == -1:
            ledger.keep(position, f"all best checkpoints kept (rank {rank}, {metric})", hold)
        elif rank <= top_k:
            ledger.keep(position, f"top {top_k} best (rank {rank}, {metric})", hold)
        else:
            ledger.drop(position, f"outside top {top_k} best (rank {rank}, {metric})")


def _keep_milestones(steps: list[CheckpointRecord], every_n_steps: int, ledger: _Ledger) -> None:
    """Milestones: keep every step checkpoint whose step is a multiple of ``every_n_steps`` (0: off)."""
    if every_n_steps == 0:
        return
    for position, record in enumerate(steps):
        step = record.step or 0
        if step % every_n_steps == 0:
            ledger.keep(
                position, f"milestone: step {step} (keep_every_n_steps: {every_n_steps})", Hold.MILESTONE
            )
