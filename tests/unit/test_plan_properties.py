"""Properties of the pure retention planner over generated directories of checkpoint records."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ckpt_watcher.naming import Kind
from ckpt_watcher.plan import Action, Plan, plan
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
any_names = st.one_of(step_names, step_names, best_names, best_names, last_names, unknown_names)

ENTRY_SHAPES = ("file", "file", "file", "file", "incomplete", "directory", "symlink", "other")


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
    record = make_record(name, directory, entry_type=EntryType.SYMLINK, link_target=link_target)
    # The scan checks a symlink's target: a link to a complete zip is complete, whatever its kind.
    complete = link_target is not None and record.kind is not Kind.UNKNOWN
    return dataclasses.replace(record, complete=complete, incomplete_reason=None if complete else "dangling")


@st.composite
def record_sets(draw: st.DrawFn) -> list[CheckpointRecord]:
    """Records in 1-3 directories, with unique paths, some symlinks pointing at other records."""
    directories = DIRECTORIES[: draw(st.integers(1, 3))]
    in_directory = st.sampled_from(directories)
    specs = draw(
        st.lists(
            st.tuples(in_directory, any_names, st.sampled_from(ENTRY_SHAPES), st.integers(0, 10_000)),
            max_size=24,
        )
    )
    records: list[CheckpointRecord] = []
    seen: set[Path] = set()

    def add(record: CheckpointRecord) -> None:
        if record.path not in seen:
            seen.add(record.path)
            records.append(record)

    for directory, name, shape, size in specs:
        if shape == "symlink":
            target = draw(st.one_of(st.none(), st.sampled_from(sorted(seen))) if seen else st.none())
            add(_build(directory, name, shape, size, target))
        else:
            add(_build(directory, name, shape, size, None))
    # last symlinks pointing at generated records (possibly in another directory) or nowhere
    links = draw(
        st.lists(st.tuples(in_directory, last_names, st.integers(0, 10**6), st.booleans()), max_size=3)
    )
    for directory, name, index, dangling in links:
        candidates = sorted(seen)
        target = (
            candidates[index % len(candidates)] if candidates and not dangling else directory / "gone.ckpt"
        )
        record = make_record(name, directory, entry_type=EntryType.SYMLINK, link_target=target)
        if target not in seen:
            record = dataclasses.replace(record, complete=False, incomplete_reason="dangling symlink")
        add(record)
    return list(draw(st.permutations(records)))


def policies(*, protect: bool) -> st.SearchStrategy[Policy]:
    return st.builds(
        Policy,
        save_top_k_checkpoints=st.integers(-1, 6),
        save_top_k_best=st.integers(-1, 6),
        save_every_n_epochs=st.integers(0, 3),
        best_mode=st.sampled_from(["min", "max"]),
        protect=st.lists(st.sampled_from(PROTECT_GLOBS), max_size=2) if protect else st.just([]),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[CheckpointRecord], Policy, dict[Path, str]]:
    """Records, a policy with protect globs, and pins of some of the records' paths."""
    records = draw(record_sets())
    policy = draw(policies(protect=True))
    pinned = draw(st.lists(st.sampled_from(records), max_size=3)) if records else []
    pins = {record.path: f"pinned {record.name}" for record in pinned}
    return records, policy, pins


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def is_candidate(record: CheckpointRecord) -> bool:
    """A complete regular step or best file: the only kind of record that may be deleted."""
    return record.entry_type is EntryType.FILE and record.complete and record.kind in (Kind.STEP, Kind.BEST)


def is_usable_last(record: CheckpointRecord) -> bool:
    return record.kind is Kind.LAST and record.complete


def actions_by_path(result: Plan) -> dict[Path, Action]:
    return {decision.record.path: decision.action for decision in result.decisions}


def deleted_paths(result: Plan) -> set[Path]:
    return {decision.record.path for decision in result.deletions}


def best_rank_key(record: CheckpointRecord, mode: str) -> tuple[bool, float, int, int, int]:
    """Better first: NaN worst, metric by mode, ties to the higher step, epoch, version (the oracle)."""
    metric = record.metric if record.metric is not None else math.nan
    nan = math.isnan(metric)
    ordered = 0.0 if nan else (metric if mode == "min" else -metric) + 0.0  # + 0.0 folds -0.0 into 0.0
    step, epoch, version = record.step_order
    return (nan, ordered, -step, -epoch, -version)


def tie_class(record: CheckpointRecord, policy: Policy) -> Hashable:
    """Records a correct planner may legitimately tell apart only by input order share a class."""
    if is_candidate(record) and record.kind is Kind.BEST:
        return (record.directory, best_rank_key(record, policy.best_mode))
    return record.path


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


@SETTINGS
@given(scenarios())
def test_every_record_gets_exactly_one_decision(
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]],
) -> None:
    records, policy, pins = scenario
    result = plan(records, policy, pins)
    assert Counter(id(decision.record) for decision in result.decisions) == Counter(id(r) for r in records)
    assert len(result.decisions) == len(records)
    summary = result.summary
    assert summary.kept + summary.deleted + summary.skipped == len(records)
    assert summary == sum((group.summary for group in result.groups), start=type(summary)())
    assert [group.directory for group in result.groups] == sorted({record.directory for record in records})
    for group in result.groups:
        assert all(decision.record.directory == group.directory for decision in group.decisions)
    for decision in result.decisions:
        assert decision.action in (Action.KEEP, Action.DELETE, Action.SKIP)
        assert decision.reasons, decision
        assert all(isinstance(reason, str) and reason for reason in decision.reasons)


@SETTINGS
@given(scenarios())
def test_protected_and_non_candidate_records_are_never_deleted(
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]],
) -> None:
    records, policy, pins = scenario
    actions = actions_by_path(plan(records, policy, pins))
    last_targets = {
        record.link_target
        for record in records
        if record.kind is Kind.LAST
        and record.entry_type is EntryType.SYMLINK
        and record.link_target is not None
    }
    any_targets = {record.link_target for record in records if record.entry_type is EntryType.SYMLINK}
    for record in records:
        action = actions[record.path]
        if record.kind is Kind.LAST:
            assert action is Action.KEEP, record
        if record.path in last_targets or record.path in any_targets or record.path in pins:
            assert action is not Action.DELETE, record
        if record.kind is Kind.UNKNOWN or record.entry_type is not EntryType.FILE or not record.complete:
            assert action is not Action.DELETE, record
            if record.kind is not Kind.LAST:
                assert action is Action.SKIP, record
        if any(matches(record, pattern) for pattern in policy.protect):
            assert action is not Action.DELETE, record


@SETTINGS
@given(scenarios())
def test_only_complete_step_and_best_files_are_deleted(
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]],
) -> None:
    records, policy, pins = scenario
    result = plan(records, policy, pins)
    for decision in result.deletions:
        assert is_candidate(decision.record), decision
    for decision in result.decisions:
        if is_candidate(decision.record):
            assert decision.action is not Action.SKIP, decision


@SETTINGS
@given(scenarios())
def test_planning_is_idempotent(scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]]) -> None:
    records, policy, pins = scenario
    first = plan(records, policy, pins)
    gone = deleted_paths(first)
    survivors = [record for record in records if record.path not in gone]
    second = plan(survivors, policy, pins)
    assert second.deletions == ()
    assert actions_by_path(second) == {
        path: a for path, a in actions_by_path(first).items() if path not in gone
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
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]],
    extra_specs: list[tuple[Path, str, int]],
    data: st.DataObject,
) -> None:
    records, policy, pins = scenario
    taken = {record.path for record in records}
    extras = []
    for directory, name, size in extra_specs:
        if directory / name not in taken:
            taken.add(directory / name)
            extras.append(
                make_record(name, directory, size=size, complete=False, incomplete_reason="partial")
            )
    combined = list(records)
    for extra in extras:
        combined.insert(data.draw(st.integers(0, len(combined))), extra)
    before = plan(records, policy, pins)
    after = plan(combined, policy, pins)
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


def actions_by_tie_class(
    records: list[CheckpointRecord], result: Plan, policy: Policy
) -> dict[Hashable, list[Action]]:
    actions = actions_by_path(result)
    classes: dict[Hashable, list[Action]] = defaultdict(list)
    for record in records:
        classes[tie_class(record, policy)].append(actions[record.path])
    return {key: sorted(value) for key, value in classes.items()}


@SETTINGS
@given(scenarios(), st.integers(0, 2**32 - 1), st.booleans())
def test_planning_is_independent_of_input_order_up_to_full_ties(
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]], seed: int, reverse: bool
) -> None:
    """Same actions, except that fully tied bests may swap theirs (the xfail below shows that bug)."""
    records, policy, pins = scenario
    forward = plan(records, policy, pins)
    other = plan(reordered(records, seed, reverse), policy, pins)
    assert actions_by_tie_class(records, forward, policy) == actions_by_tie_class(records, other, policy)
    assert forward.summary == other.summary


RULE_5_REASON = "newest checkpoint: the last way to resume (no usable last.ckpt)"

_FULL_TIE = [
    make_record(best_name(1, 100, 0.5, date="20261128")),
    make_record(best_name(1, 100, 0.5, date="20261129")),
    make_record("last.ckpt"),
]


@pytest.mark.xfail(
    strict=True,
    reason="BUG: bests tied on metric, step, epoch and version (differing in date or zero sign) are "
    "ranked by input order",
)
@SETTINGS
@given(scenarios(), st.integers(0, 2**32 - 1), st.booleans())
@example(scenario=(_FULL_TIE, Policy(save_top_k_best=1), {}), seed=0, reverse=True)
def test_planning_is_independent_of_input_order(
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]], seed: int, reverse: bool
) -> None:
    records, policy, pins = scenario
    forward = actions_by_path(plan(records, policy, pins))
    other = actions_by_path(plan(reordered(records, seed, reverse), policy, pins))
    assert forward == other


@SETTINGS
@given(scenarios())
def test_a_group_without_usable_last_keeps_a_candidate(
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]],
) -> None:
    records, policy, pins = scenario
    actions = actions_by_path(plan(records, policy, pins))
    for directory, members in by_group(records).items():
        candidates = [record for record in members if is_candidate(record)]
        if not candidates or any(is_usable_last(record) for record in members):
            continue
        kept = [record for record in candidates if actions[record.path] is Action.KEEP]
        assert kept, f"{directory} lost every candidate: {[c.name for c in candidates]}"


@SETTINGS
@given(record_sets(), policies(protect=False))
def test_newest_k_steps_are_kept(records: list[CheckpointRecord], policy: Policy) -> None:
    policy = policy.model_copy(update={"save_every_n_epochs": 0})
    k = policy.save_top_k_checkpoints
    actions = actions_by_path(plan(records, policy))
    for members in by_group(records).values():
        group_steps = sorted(
            (record for record in members if is_candidate(record) and record.kind is Kind.STEP),
            key=lambda record: record.step_order,
            reverse=True,
        )
        newest = group_steps if k == -1 else group_steps[:k]
        assert all(actions[record.path] is Action.KEEP for record in newest)


@SETTINGS
@given(record_sets(), policies(protect=False))
def test_kept_steps_without_protection_are_exactly_the_rules(
    records: list[CheckpointRecord], policy: Policy
) -> None:
    """With no pins, protect globs or symlinks, a step is kept iff top-k, epoch end or rule 5."""
    records = [record for record in records if record.entry_type is not EntryType.SYMLINK]
    k, n = policy.save_top_k_checkpoints, policy.save_every_n_epochs
    result = plan(records, policy)
    actions = actions_by_path(result)
    rule_5 = {decision.record.path for decision in result.decisions if RULE_5_REASON in decision.reasons}
    for members in by_group(records).values():
        group_steps = sorted(
            (record for record in members if is_candidate(record) and record.kind is Kind.STEP),
            key=lambda record: record.step_order,
            reverse=True,
        )
        epoch_ends: dict[int, CheckpointRecord] = {}
        if n:
            for record in group_steps:
                if record.epoch is not None and (record.epoch + 1) % n == 0:
                    epoch_ends.setdefault(record.epoch, record)
        for rank, record in enumerate(group_steps, start=1):
            expected = k == -1 or rank <= k or record in epoch_ends.values() or record.path in rule_5
            assert (actions[record.path] is Action.KEEP) == expected, (rank, record.name)


@SETTINGS
@given(record_sets(), policies(protect=False))
def test_bests_within_top_k_are_kept_and_ranking_is_monotone(
    records: list[CheckpointRecord], policy: Policy
) -> None:
    k = policy.save_top_k_best
    result = plan(records, policy)
    decisions = {decision.record.path: decision for decision in result.decisions}
    link_targets = {record.link_target for record in records if record.entry_type is EntryType.SYMLINK}
    for members in by_group(records).values():
        bests = [record for record in members if is_candidate(record) and record.kind is Kind.BEST]
        keys = {record.path: best_rank_key(record, policy.best_mode) for record in bests}
        for record in bests:
            # however ties are broken, a best with fewer than k others at least as good is in the top k
            at_least_as_good = sum(
                1 for other in bests if other is not record and keys[other.path] <= keys[record.path]
            )
            if k == -1 or at_least_as_good < k:
                assert decisions[record.path].action is Action.KEEP, record.name
        for worse in bests:
            if decisions[worse.path].action is not Action.KEEP:
                continue
            for better in bests:
                if keys[better.path] < keys[worse.path] and decisions[better.path].action is Action.DELETE:
                    # a kept best outranked by a deleted one is kept for another reason than its rank
                    assert worse.path in link_targets or RULE_5_REASON in decisions[worse.path].reasons, (
                        worse.name,
                        better.name,
                    )


@SETTINGS
@given(scenarios())
def test_group_deletions_of_steps_are_oldest_first(
    scenario: tuple[list[CheckpointRecord], Policy, dict[Path, str]],
) -> None:
    records, policy, pins = scenario
    for group in plan(records, policy, pins).groups:
        step_orders = [d.record.step_order for d in group.deletions if d.record.kind is Kind.STEP]
        assert step_orders == sorted(step_orders)
        assert all(d.action is Action.DELETE for d in group.deletions)
        assert len(group.deletions) == group.summary.deleted
