"""Properties of retention by bytes over generated groups (``ckpt_watcher.budget``): space pressure never
evicts a never-evicted checkpoint, decides the same whatever the order of the records (and groups),
evicts no more than needed, and takes its classes and the trash in order."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_watcher.budget import (
    EVICTION_CLASSES,
    FileSystemSpace,
    FreeSpacePlan,
    GroupSpace,
    Reclaimable,
    _greatest,
    _latest_written_key,
    _mtime,
    _newest_of_kind_key,
    candidates,
    free_space_plan,
    group_space,
    newest_kept,
    within_max_size,
)
from ckpt_watcher.naming import Kind
from ckpt_watcher.plan import Action, Decision, GroupPlan, Hold, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import CheckpointRecord, FileIdentity
from tests.unit.test_plan_properties import PROTECT_GLOBS, record_sets

SETTINGS = settings(max_examples=200, deadline=None)
NOW = 1_800_000_000.0


@st.composite
def timed_records(draw: st.DrawFn) -> list[CheckpointRecord]:
    """Generated records (several groups, links, pins, incomplete files) with mtimes and devices."""
    records = draw(record_sets())
    timed = []
    for record in records:
        identity = record.identity
        assert identity is not None
        mtime = draw(st.integers(0, 50)) * 10**9 + int(NOW * 10**9) - 40 * 10**9
        timed.append(
            dataclasses.replace(record, identity=FileIdentity(1, identity.inode, identity.size, mtime))
        )
    return timed


def budget_policies() -> st.SearchStrategy[Policy]:
    return st.builds(
        Policy,
        save_top_k_checkpoints=st.integers(-1, 6),
        save_top_k_best=st.integers(-1, 6),
        save_every_n_epochs=st.integers(0, 3),
        keep_every_n_steps=st.sampled_from([0, 0, 2, 5, 1000]),
        best_mode=st.sampled_from(["min", "max"]),
        protect=st.one_of(st.just([]), st.lists(st.sampled_from(PROTECT_GLOBS), min_size=1, max_size=2)),
        max_size=st.integers(0, 40_000),
        keep_free=st.one_of(st.integers(0, 40_000), st.sampled_from(["1%", "10%", "50%"])),
    )


def _pins(records: Sequence[CheckpointRecord], chosen: Sequence[int]) -> dict[Path, str]:
    paths = sorted({record.path for record in records})
    return (
        {paths[index % len(paths)]: "resume source in train.yaml (ckpt_path)" for index in chosen}
        if paths
        else {}
    )


def _never_evicted(group: GroupPlan) -> set[Path]:
    """What the budget must never take, read from the plan before any eviction."""
    newest = newest_kept(group.decisions)
    return {
        decision.record.path
        for decision in group.decisions
        if decision.action is Action.KEEP
        and (
            decision.record.kind is Kind.LAST
            or Hold.PROTECTED in decision.holds
            or Hold.BEST_FIRST in decision.holds
            or decision is newest
            or not decision.record.complete
        )
    }


def _evicted(decisions: Sequence[Decision]) -> list[Decision]:
    return [decision for decision in decisions if decision.evicted]


@SETTINGS
@given(timed_records(), budget_policies(), st.lists(st.integers(0, 50), max_size=3), st.randoms())
def test_max_size_never_evicts_the_never_evicted_and_no_more_than_needed(
    records: list[CheckpointRecord], policy: Policy, pin_choices: list[int], shuffler: random.Random
) -> None:
    pins = _pins(records, pin_choices)
    limit = policy.max_size_bytes
    assert limit is not None
    for group in plan(records, policy, pins).groups:
        after, verdict = within_max_size(group, policy)
        assert verdict is not None
        evicted = _evicted(after.decisions)
        assert not {decision.record.path for decision in evicted} & _never_evicted(group)
        kept = sum(  # an incomplete checkpoint (a last.ckpt being written) is never counted
            decision.record.bytes
            for decision in after.decisions
            if decision.action is Action.KEEP and decision.record.complete
        )
        assert kept == verdict.kept_bytes - verdict.evicted_bytes
        assert verdict.unmet_bytes == max(0, kept - limit)
        # the evicted are the first candidates in eviction order, and each was needed: before the last
        # one went, the group was still over
        order = candidates(group.decisions, policy.best_mode)
        assert {decision.record.path for decision in evicted} == {
            candidate.record.path for candidate in order[: len(evicted)]
        }
        if evicted:
            assert kept + order[len(evicted) - 1].bytes > limit
        if verdict.unmet_bytes:  # unmet: nothing that may go is left
            assert candidates(after.decisions, policy.best_mode) == ()
        # the count rules' own decisions are untouched
        for before, now in zip(group.decisions, after.decisions, strict=True):
            assert now.record is before.record
            if not now.evicted:
                assert now == before
            else:
                assert before.action is Action.KEEP
        # the same whatever the order of the records
        shuffled = list(records)
        shuffler.shuffle(shuffled)
        (again,) = [
            planned for planned in plan(shuffled, policy, pins).groups if planned.directory == group.directory
        ]
        again_after, again_verdict = within_max_size(again, policy)
        assert {
            decision.record.path: (decision.action, decision.reasons) for decision in again_after.decisions
        } == {decision.record.path: (decision.action, decision.reasons) for decision in after.decisions}
        assert again_verdict == verdict


def _spaces(records: Sequence[CheckpointRecord], policy: Policy, pins: dict[Path, str]) -> list[GroupSpace]:
    return [
        group_space(group.directory, group.decisions, policy, device=1, now=NOW)
        for group in plan(records, policy, pins).groups
    ]


def _summary(result: FreeSpacePlan) -> tuple[object, ...]:
    return (
        result.short_bytes,
        result.keep_free_bytes,
        result.next_save,
        tuple(item.key for item in result.reclaimed),
        tuple(candidate.record.path for candidate in result.evictions),
        result.unmet_bytes,
        result.reason,
    )


trash_entries = st.lists(
    st.builds(
        Reclaimable,
        key=st.text("abcdef", min_size=1, max_size=4),
        device=st.sampled_from([1, 1, 2]),
        bytes=st.integers(0, 5_000),
        since=st.floats(0, 1e9),
    ),
    max_size=4,
    unique_by=lambda item: item.key,
)


@SETTINGS
@given(
    timed_records(),
    budget_policies(),
    st.lists(st.integers(0, 50), max_size=3),
    trash_entries,
    st.integers(0, 60_000),
    st.randoms(),
)
def test_keep_free_never_evicts_the_never_evicted_in_order_and_no_more_than_needed(
    records: list[CheckpointRecord],
    policy: Policy,
    pin_choices: list[int],
    trash: list[Reclaimable],
    free: int,
    shuffler: random.Random,
) -> None:
    pins = _pins(records, pin_choices)
    space = FileSystemSpace(1, Path("/ckpt"), 100_000, free)
    groups = _spaces(records, policy, pins)
    result = free_space_plan(space, groups, trash)
    never = set().union(*(_never_evicted(group) for group in plan(records, policy, pins).groups))
    taken = [candidate.record.path for candidate in result.evictions]
    assert not set(taken) & never
    assert len(taken) == len(set(taken))
    assert all(item.device == 1 for item in result.reclaimed)
    # no more than needed: before the last item taken, the file system was still short
    items = [*(item.bytes for item in result.reclaimed), *(candidate.bytes for candidate in result.evictions)]
    if items:
        assert sum(items[:-1]) < result.short_bytes
    assert result.unmet_bytes == max(0, result.short_bytes - sum(items))
    # the trash goes first, oldest first; then class by class
    on_device = sorted((item for item in trash if item.device == 1), key=lambda item: (item.since, item.key))
    assert list(result.reclaimed) == on_device[: len(result.reclaimed)]
    if result.evictions:
        assert len(result.reclaimed) == len(on_device)
    classes = [candidate.eviction_class for candidate in result.evictions]
    assert classes == sorted(classes)
    if result.evictions:  # every candidate of an earlier class went first
        every = [candidate for group in groups for candidate in group.candidates]
        earlier = {candidate.record.path for candidate in every if candidate.eviction_class < classes[-1]}
        assert earlier <= set(taken)
    if result.unmet_bytes:  # unmet: everything that may go went
        assert len(result.evictions) == sum(len(group.candidates) for group in groups)
    # the same whatever the order of the records, of the groups and of the trash
    shuffled = list(records)
    shuffler.shuffle(shuffled)
    again_groups = _spaces(shuffled, policy, pins)
    shuffler.shuffle(again_groups)
    again_trash = list(trash)
    shuffler.shuffle(again_trash)
    assert _summary(free_space_plan(space, again_groups, again_trash)) == _summary(result)


def test_the_classes_are_the_documented_order() -> None:
    assert [hold for hold, _ in sorted(EVICTION_CLASSES.items(), key=lambda item: item[1])] == [
        Hold.NEWEST_STEPS,
        Hold.EPOCH_END,
        Hold.BEST,
        Hold.MILESTONE,
    ]


@SETTINGS
@given(timed_records())
def test_the_greatest_by_first_part_then_key_is_max_by_key(records: list[CheckpointRecord]) -> None:
    """group_space finds the newest of a kind and the latest written without a key tuple per record:
    the same record (the first of the greatest, as ``max`` gives) as ``max`` over the whole key."""
    if not records:
        return
    steps = [record.step or 0 for record in records]
    mtimes = [_mtime(record) for record in records]
    assert _greatest(records, steps, _newest_of_kind_key) is max(records, key=_newest_of_kind_key)
    assert _greatest(records, mtimes, _latest_written_key) is max(records, key=_latest_written_key)
