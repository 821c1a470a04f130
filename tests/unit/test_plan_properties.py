"""Properties of the pure retention planner over generated directories of checkpoint records."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ckpt_watcher.naming import Kind
from ckpt_watcher.plan import (
    PIN_SUFFIX,
    Action,
    Plan,
    Summary,
    _newest_first_key,
    _sort_newest_first,
    plan,
)
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import CheckpointRecord, EntryType
from tests.support.factories import best_name, make_record, step_name

ROOT = Path("/ckpt")
DIRECTORIES = (ROOT / "run", ROOT / "other", ROOT / "nested" / "deep")
DATES = ("20261128", "20261129")
LAST_NAMES = ("last.ckpt", "last-v1.ckpt", "last-v2.ckpt")
UNKNOWN_NAMES = (
    "notes.txt",
    "model.pt",
    "epoch=1-step=5-train.ckpt",
    "last.ckpt.tmp",
    "best_latest.ckpt",
    "epoch=01-step=000005-train-v0.ckpt",
)
PROTECT_GLOBS = ("*-v1.ckpt", "other/*", "best_*_loss=0.1000*", "epoch=01-*", "nested/deep/last*")

SETTINGS = settings(max_examples=200, deadline=None)

# ---------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------

epochs = st.one_of(st.integers(0, 4), st.sampled_from([99, 100]))
steps = st.one_of(st.integers(0, 40), st.sampled_from([999_998, 999_999, 1_000_000, 1_000_001]))
versions = st.one_of(st.just(0), st.just(0), st.integers(1, 2), st.just(10))
losses = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 0.1, 0.25, 0.5]),
    st.floats(-10, 10, allow_nan=False).map(lambda value: round(value, 4)),
)
step_names = st.builds(step_name, epochs, steps, versions)
best_names = st.builds(best_name, epochs, steps, losses, date=st.sampled_from(DATES), version=versions)
last_names = st.sampled_from(LAST_NAMES)
unknown_names = st.sampled_from(UNKNOWN_NAMES)
any_names = st.one_of(step_names, best_names, last_names, unknown_names)

ENTRY_SHAPES = ("file",) * 8 + ("incomplete", "directory", "checkpoint-dir", "symlink", "symlink", "other")


def _build(directory: Path, name: str, shape: str, size: int, link_target: Path | None) -> CheckpointRecord:
    """A record shaped as the scan would produce it."""
    if shape == "file":
        return make_record(name, directory, size=size)
    if shape == "incomplete":
        return make_record(
            name, directory, size=size, complete=False, incomplete_reason="still being written"
        )
    if shape == "directory":
        return make_record(
            name,
            directory,
            entry_type=EntryType.DIRECTORY,
            complete=False,
            incomplete_reason="directory checkpoints are not pruned",
        )
    if shape == "other":
        return make_record(name, directory, entry_type=EntryType.OTHER, complete=False)
    if shape == "checkpoint-dir":  # a settled DeepSpeed / FSDP / DCP directory: planned like a file
        settled = make_record(name, directory, entry_type=EntryType.DIRECTORY)
        return dataclasses.replace(settled, complete=settled.kind is not Kind.UNKNOWN, bytes=size)
    record = make_record(name, directory, entry_type=EntryType.SYMLINK, link_target=link_target)
    # The scan checks a symlink's target: a link to a complete zip is complete, whatever its kind.
    complete = link_target is not None and record.kind is not Kind.UNKNOWN
    return dataclasses.replace(record, complete=complete, incomplete_reason=None if complete else "dangling")


NAME_CHOICES = ("step", "step", "sibling", "best", "best", "twin", "last", "unknown", "marker")


@st.composite
def group_names(draw: st.DrawFn) -> list[str]:  # noqa: C901  (a strategy drawing each kind of name)
    """Names in one directory.

    A "sibling" repeats an earlier step with another version or epoch; a "twin" repeats an earlier
    best's loss at another step, or all of it with the other date or zero sign (a full tie in the
    ranking); a "marker" is ``<name>.keep`` beside an earlier name, which pins it.
    """
    names: list[str] = []
    step_fields: list[tuple[int, int]] = []
    bests: list[tuple[int, int, float, str, int]] = []
    for _ in range(draw(st.integers(0, 10))):
        choice = draw(st.sampled_from(NAME_CHOICES))
        if choice == "step" or (choice == "sibling" and not step_fields):
            epoch, step = draw(epochs), draw(steps)
            step_fields.append((epoch, step))
            names.append(step_name(epoch, step, draw(versions)))
        elif choice == "sibling":
            epoch, step = draw(st.sampled_from(step_fields))
            if draw(st.booleans()):
                epoch = draw(epochs)
            names.append(step_name(epoch, step, draw(versions)))
        elif choice == "best" or (choice == "twin" and not bests):
            fields = (draw(epochs), draw(steps), draw(losses), draw(st.sampled_from(DATES)), draw(versions))
            bests.append(fields)
            epoch, step, loss, date, version = fields
            names.append(best_name(epoch, step, loss, date=date, version=version))
        elif choice == "twin":
            epoch, step, loss, date, version = draw(st.sampled_from(bests))
            how = draw(st.sampled_from(["date", "zero", "step"]))
            if how == "step":
                epoch, step = draw(epochs), draw(steps)
            elif how == "zero" and loss == 0.0:
                loss = -loss
            else:
                date = DATES[1 - DATES.index(date)]
            names.append(best_name(epoch, step, loss, date=date, version=version))
        elif choice == "last":
            names.append(draw(last_names))
        elif choice == "marker" and names:
            names.append(draw(st.sampled_from(names)) + PIN_SUFFIX)
        else:
            names.append(draw(unknown_names))
    return names


@st.composite
def record_sets(draw: st.DrawFn) -> list[CheckpointRecord]:
    """Records in 1-3 directories, with unique paths, some symlinks pointing at other records."""
    directories = DIRECTORIES[: draw(st.integers(1, 3))]
    records: list[CheckpointRecord] = []
    seen: set[Path] = set()

    def add(record: CheckpointRecord) -> None:
        if record.path not in seen:
            seen.add(record.path)
            records.append(record)

    for directory in directories:
        for name in draw(group_names()):
            shape = draw(st.sampled_from(ENTRY_SHAPES))
            target = draw(st.sampled_from(sorted(seen))) if shape == "symlink" and seen else None
            add(_build(directory, name, shape, draw(st.integers(0, 10_000)), target))
    # last symlinks pointing at generated records (possibly in another directory) or nowhere
    in_directory = st.sampled_from(directories)
    for _ in range(draw(st.integers(0, 3))):
        directory, name = draw(in_directory), draw(last_names)
        # mostly at a checkpoint that could be deleted, often in another directory
        candidates = sorted(record.path for record in records if is_candidate(record))
        anything = sorted(seen)
        pool = draw(st.sampled_from(["candidate", "candidate", "any", "dangling"]))
        if pool == "candidate" and candidates:
            target = draw(st.sampled_from(candidates))
        elif pool == "any" and anything:
            target = draw(st.sampled_from(anything))
        else:
            target = directory / "gone.ckpt"
        record = make_record(name, directory, entry_type=EntryType.SYMLINK, link_target=target)
        if target not in seen:
            record = dataclasses.replace(record, complete=False, incomplete_reason="dangling symlink")
        add(record)
    return list(draw(st.permutations(records)))


def policies(*, protect: bool) -> st.SearchStrategy[Policy]:
    return st.builds(
        Policy,
        save_top_k_checkpoints=st.one_of(st.just(0), st.integers(-1, 6)),
        save_top_k_best=st.one_of(st.just(0), st.integers(-1, 6)),
        save_every_n_epochs=st.integers(0, 3),
        best_mode=st.sampled_from(["min", "max"]),
        protect=(
            st.one_of(st.just([]), st.lists(st.sampled_from(PROTECT_GLOBS), min_size=1, max_size=2))
            if protect
            else st.just([])
        ),
    )


@dataclass(frozen=True)
class Scenario:
    """Everything plan() takes: records, a policy, pins and per-directory policies."""

    records: list[CheckpointRecord]
    policy: Policy
    pins: dict[Path, str] = field(default_factory=dict)
    group_policies: dict[Path, Policy] = field(default_factory=dict)

    def plan(self, records: Sequence[CheckpointRecord] | None = None) -> Plan:
        chosen = self.records if records is None else records
        return plan(chosen, self.policy, self.pins, self.group_policies)

    def policy_for(self, directory: Path) -> Policy:
        return self.group_policies.get(directory, self.policy)


@st.composite
def scenarios(draw: st.DrawFn, *, protection: bool = True) -> Scenario:
    """Records, a policy, some per-directory policies and, with ``protection``, globs and pins."""
    records = draw(record_sets())
    policy = draw(policies(protect=protection))
    pinned = draw(st.lists(st.sampled_from(records), max_size=3)) if records and protection else []
    overridden = draw(st.lists(st.sampled_from(DIRECTORIES), max_size=2, unique=True))
    return Scenario(
        records=records,
        policy=policy,
        pins={record.path: f"pinned {record.name}" for record in pinned},
        group_policies={directory: draw(policies(protect=protection)) for directory in overridden},
    )


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


CHECKPOINT_ENTRIES = (EntryType.FILE, EntryType.DIRECTORY)


def is_candidate(record: CheckpointRecord) -> bool:
    """A complete step or best checkpoint (a file, or a directory the scan found complete).

    The only kind of record that may ever be deleted.
    """
    return (
        record.entry_type in CHECKPOINT_ENTRIES and record.complete and record.kind in (Kind.STEP, Kind.BEST)
    )


def is_usable_last(record: CheckpointRecord) -> bool:
    return record.kind is Kind.LAST and record.complete


def actions_by_path(result: Plan) -> dict[Path, Action]:
    return {decision.record.path: decision.action for decision in result.decisions}


def deleted_paths(result: Plan) -> set[Path]:
    return {decision.record.path for decision in result.deletions}


def best_rank_key(record: CheckpointRecord, mode: str) -> tuple[bool, float, int, int, int]:
    """Better first: NaN worst, metric by mode, ties to the lower step, epoch, version: the first to
    reach that metric, the trainer's best (the oracle)."""
    metric = record.metric if record.metric is not None else math.nan
    nan = math.isnan(metric)
    ordered = 0.0 if nan else (metric if mode == "min" else -metric) + 0.0  # + 0.0 folds -0.0 into 0.0
    step, epoch, version = record.step_order
    return (nan, ordered, step, epoch, version)


def matches(record: CheckpointRecord, pattern: str) -> bool:
    return fnmatch.fnmatchcase(record.name, pattern) or fnmatch.fnmatchcase(record.relative_path, pattern)


def by_group(records: Sequence[CheckpointRecord]) -> dict[Path, list[CheckpointRecord]]:
    groups: dict[Path, list[CheckpointRecord]] = defaultdict(list)
    for record in records:
        groups[record.directory].append(record)
    return groups


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------

RULE_5_REASON = "newest checkpoint: the last way to resume (no usable last.ckpt)"


@SETTINGS
@given(scenarios())
def test_every_record_gets_exactly_one_decision(scenario: Scenario) -> None:
    records = scenario.records
    result = scenario.plan()
    assert Counter(id(decision.record) for decision in result.decisions) == Counter(id(r) for r in records)
    assert len(result.decisions) == len(records)
    summary = result.summary
    assert summary.kept + summary.to_delete + summary.skipped == len(records)
    assert summary == sum((group.summary for group in result.groups), start=Summary())
    assert summary.bytes_to_delete == sum(decision.record.bytes for decision in result.deletions)
    assert [group.directory for group in result.groups] == sorted({record.directory for record in records})
    for group in result.groups:
        assert all(decision.record.directory == group.directory for decision in group.decisions)
    for decision in result.decisions:
        assert decision.action in (Action.KEEP, Action.DELETE, Action.SKIP)
        assert decision.reasons, decision
        assert all(isinstance(reason, str) and reason for reason in decision.reasons)


@SETTINGS
@given(scenarios())
def test_protected_and_non_candidate_records_are_never_deleted(scenario: Scenario) -> None:
    records = scenario.records
    actions = actions_by_path(scenario.plan())
    last_targets = {
        record.link_target
        for record in records
        if record.kind is Kind.LAST and record.entry_type is EntryType.SYMLINK
    }
    any_targets = {record.link_target for record in records if record.entry_type is EntryType.SYMLINK}
    markers = {record.path for record in records if record.name.endswith(PIN_SUFFIX)}
    for record in records:
        action = actions[record.path]
        if record.kind is Kind.LAST:
            assert action is Action.KEEP, record
        if record.path in last_targets or record.path in any_targets or record.path in scenario.pins:
            assert action is not Action.DELETE, record
        if record.path.with_name(record.name + PIN_SUFFIX) in markers:
            assert action is not Action.DELETE, record
        if not record.complete or record.kind is Kind.UNKNOWN or record.entry_type not in CHECKPOINT_ENTRIES:
            assert action is not Action.DELETE, record
            if record.kind is not Kind.LAST:
                assert action is Action.SKIP, record
        if any(matches(record, pattern) for pattern in scenario.policy_for(record.directory).protect):
            assert action is not Action.DELETE, record


@SETTINGS
@given(scenarios())
def test_only_complete_step_and_best_checkpoints_are_deleted(scenario: Scenario) -> None:
    result = scenario.plan()
    for decision in result.deletions:
        assert is_candidate(decision.record), decision
    for decision in result.decisions:
        if is_candidate(decision.record):
            assert decision.action is not Action.SKIP, decision


@SETTINGS
@given(scenarios())
def test_planning_is_idempotent(scenario: Scenario) -> None:
    first = scenario.plan()
    gone = deleted_paths(first)
    second = scenario.plan([record for record in scenario.records if record.path not in gone])
    assert second.deletions == ()
    assert actions_by_path(second) == {
        path: action for path, action in actions_by_path(first).items() if path not in gone
    }


@SETTINGS
@given(
    scenarios(),
    st.lists(
        st.tuples(st.sampled_from(DIRECTORIES), any_names, st.integers(0, 10**6)),
        min_size=1,
        max_size=4,
    ),
    st.data(),
)
def test_adding_incomplete_records_never_changes_deletions(
    scenario: Scenario,
    extra_specs: list[tuple[Path, str, int]],
    data: st.DataObject,
) -> None:
    taken = {record.path for record in scenario.records}
    extras = []
    for directory, name, size in extra_specs:
        if directory / name not in taken:
            taken.add(directory / name)
            extras.append(
                make_record(name, directory, size=size, complete=False, incomplete_reason="partial")
            )
    combined = list(scenario.records)
    for extra in extras:
        combined.insert(data.draw(st.integers(0, len(combined))), extra)
    before = scenario.plan()
    after = scenario.plan(combined)
    assert deleted_paths(after) == deleted_paths(before)
    after_actions = actions_by_path(after)
    for extra in extras:
        assert after_actions[extra.path] is (Action.KEEP if extra.kind is Kind.LAST else Action.SKIP)


def reordered(records: list[CheckpointRecord], seed: int, reverse: bool) -> list[CheckpointRecord]:
    if reverse:
        return list(reversed(records))
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)  # noqa: S311 - a reproducible test order, not a secret
    return shuffled


_FULL_TIE = [
    make_record(best_name(1, 100, 0.5, date="20261128")),
    make_record(best_name(1, 100, 0.5, date="20261129")),
    make_record("last.ckpt"),
]
_SIGNED_ZERO_TIE = [
    make_record(best_name(1, 100, -0.0)),
    make_record(best_name(1, 100, 0.0)),
    make_record("last.ckpt"),
]


@SETTINGS
@given(scenarios(), st.integers(0, 2**32 - 1), st.booleans())
@example(scenario=Scenario(_FULL_TIE, Policy(save_top_k_best=1)), seed=0, reverse=True)
@example(scenario=Scenario(_SIGNED_ZERO_TIE, Policy(save_top_k_best=1)), seed=0, reverse=True)
def test_planning_is_independent_of_input_order(scenario: Scenario, seed: int, reverse: bool) -> None:
    """The same actions, reasons and order of decisions for any order of the same records.

    The examples are regressions: fully tied bests (another date, or -0.0 vs 0.0) were once ranked
    by input order.
    """
    forward = scenario.plan()
    other = scenario.plan(reordered(scenario.records, seed, reverse))
    assert actions_by_path(forward) == actions_by_path(other)
    assert forward.summary == other.summary
    assert [d.record.path for d in forward.decisions] == [d.record.path for d in other.decisions]
    # the same reasons, in the same order
    assert {d.record.path: d.reasons for d in forward.decisions} == {
        d.record.path: d.reasons for d in other.decisions
    }


@SETTINGS
@given(scenarios())
def test_a_group_without_usable_last_keeps_a_candidate(scenario: Scenario) -> None:
    result = scenario.plan()
    actions = actions_by_path(result)
    for directory, members in by_group(scenario.records).items():
        candidates = [record for record in members if is_candidate(record)]
        if not candidates or any(is_usable_last(record) for record in members):
            continue
        kept = [record for record in candidates if actions[record.path] is Action.KEEP]
        assert kept, f"{directory} lost every candidate: {[c.name for c in candidates]}"
    for decision in result.decisions:
        if RULE_5_REASON in decision.reasons:
            # rule 5 keeps the newest checkpoint, preferring a step checkpoint to a best of the same step
            group = [r for r in by_group(scenario.records)[decision.record.directory] if is_candidate(r)]
            newest = max(record.step_order for record in group)
            assert decision.record.step_order == newest, decision.record.name
            if any(r.kind is Kind.STEP and r.step_order == newest for r in group):
                assert decision.record.kind is Kind.STEP, decision.record.name


@SETTINGS
@given(scenarios())
def test_the_next_target_of_a_last_link_is_kept(scenario: Scenario) -> None:  # noqa: C901  (one property over every link scenario)
    """save_last="link" moves last.ckpt (within its directory) to the newest checkpoint of its kind.

    While the link points at an older checkpoint (or dangles), the newest of that kind (of each kind,
    if it dangles) is kept, so the link never ends up dangling.
    """
    actions = actions_by_path(scenario.plan())
    for directory, members in by_group(scenario.records).items():
        candidates = {record.path: record for record in members if is_candidate(record)}
        for link in members:
            if link.kind is not Kind.LAST or link.entry_type is not EntryType.SYMLINK:
                continue
            if link.link_target is None or link.link_target.parent != directory:
                continue
            target = candidates.get(link.link_target)
            if target is None and link.link_target in {record.path for record in members}:
                continue  # it points at something that stays (another last file): not about to move
            kinds = [target.kind] if target is not None else [Kind.STEP, Kind.BEST]
            for kind in kinds:
                same_kind = [record for record in candidates.values() if record.kind is kind]
                if not same_kind:
                    continue
                newest = max(record.step or 0 for record in same_kind)
                if target is not None and (target.step or 0) >= newest:
                    continue  # the link already points at a checkpoint of the newest step
                for record in same_kind:
                    if (record.step or 0) == newest:
                        assert actions[record.path] is Action.KEEP, (link.name, record.name)


def complete_steps_newest_first(members: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
    steps = [record for record in members if is_candidate(record) and record.kind is Kind.STEP]
    return sorted(steps, key=lambda record: record.step_order, reverse=True)


@SETTINGS
@given(scenarios(protection=False))
def test_newest_k_steps_are_kept(scenario: Scenario) -> None:
    """With every_n = 0 and no pins or globs, each group keeps its k newest step checkpoints."""
    scenario = dataclasses.replace(
        scenario,
        policy=scenario.policy.model_copy(update={"save_every_n_epochs": 0}),
        group_policies={
            directory: policy.model_copy(update={"save_every_n_epochs": 0})
            for directory, policy in scenario.group_policies.items()
        },
    )
    actions = actions_by_path(scenario.plan())
    for directory, members in by_group(scenario.records).items():
        k = scenario.policy_for(directory).save_top_k_checkpoints
        group_steps = complete_steps_newest_first(members)
        newest = group_steps if k == -1 else group_steps[:k]
        assert all(actions[record.path] is Action.KEEP for record in newest)


@SETTINGS
@given(scenarios(protection=False))
def test_kept_steps_without_protection_are_exactly_the_rules(scenario: Scenario) -> None:
    """With no pins, globs, symlinks or .keep markers, a step is kept iff top-k, epoch end or rule 5."""
    records = [
        record
        for record in scenario.records
        if record.entry_type is not EntryType.SYMLINK and not record.name.endswith(PIN_SUFFIX)
    ]
    result = scenario.plan(records)
    actions = actions_by_path(result)
    rule_5 = {decision.record.path for decision in result.decisions if RULE_5_REASON in decision.reasons}
    for directory, members in by_group(records).items():
        policy = scenario.policy_for(directory)
        k, n = policy.save_top_k_checkpoints, policy.save_every_n_epochs
        group_steps = complete_steps_newest_first(members)
        epoch_ends: dict[int, CheckpointRecord] = {}
        if n:
            for record in group_steps:
                if record.epoch is not None and (record.epoch + 1) % n == 0:
                    epoch_ends.setdefault(record.epoch, record)
        for rank, record in enumerate(group_steps, start=1):
            expected = k == -1 or rank <= k or record in epoch_ends.values() or record.path in rule_5
            assert (actions[record.path] is Action.KEEP) == expected, (rank, record.name)


def kept_by_best_rank(reasons: Sequence[str]) -> bool:
    return any(reason.startswith(("top ", "all best checkpoints kept")) for reason in reasons)


@SETTINGS
@given(scenarios(protection=False))
def test_bests_within_top_k_are_kept_and_ranking_is_monotone(scenario: Scenario) -> None:
    """NaN ranks worst, the metric by best_mode, ties to the older checkpoint (however ties are broken)."""
    decisions = {decision.record.path: decision for decision in scenario.plan().decisions}
    for directory, members in by_group(scenario.records).items():
        policy = scenario.policy_for(directory)
        k = policy.save_top_k_best
        bests = [record for record in members if is_candidate(record) and record.kind is Kind.BEST]
        keys = {record.path: best_rank_key(record, policy.best_mode) for record in bests}
        for record in bests:
            # a best with fewer than k others at least as good is in the top k
            at_least_as_good = sum(
                1 for other in bests if other is not record and keys[other.path] <= keys[record.path]
            )
            if k == -1 or at_least_as_good < k:
                assert decisions[record.path].action is Action.KEEP, record.name
                assert kept_by_best_rank(decisions[record.path].reasons), record.name
        for worse in bests:
            for better in bests:
                if keys[better.path] < keys[worse.path] and kept_by_best_rank(decisions[worse.path].reasons):
                    # ranked in the top k means everything strictly better is ranked in it too
                    assert kept_by_best_rank(decisions[better.path].reasons), (worse.name, better.name)


@SETTINGS
@given(scenarios())
def test_group_deletions_are_oldest_first(scenario: Scenario) -> None:
    result = scenario.plan()
    for group in result.groups:
        orders = [decision.record.step_order for decision in group.deletions]
        assert orders == sorted(orders)
        assert all(decision.action is Action.DELETE for decision in group.deletions)
        assert len(group.deletions) == group.summary.to_delete
    assert result.deletions == tuple(decision for group in result.groups for decision in group.deletions)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.one_of(step_names, best_names),
            st.one_of(st.none(), st.sampled_from(("20261128", "2026118", "20261129", "0"))),
        ),
        unique_by=lambda pair: pair[0],
        max_size=40,
    )
)
def test_sorting_newest_first_in_passes_is_the_one_key_sort(named: list[tuple[str, str | None]]) -> None:
    """The planner sorts step checkpoints in stable passes (no key tuple per record): the order is the
    one of ``_newest_first_key``, ties of step, epoch, version and date settled by the name."""
    records = [dataclasses.replace(make_record(name), date=date) for name, date in named]
    in_passes = list(records)

    _sort_newest_first(in_passes)

    assert [record.name for record in in_passes] == [
        record.name for record in sorted(records, key=_newest_first_key)
    ]
