"""Table-driven examples of retention by bytes (``ckpt_watcher.budget``): the eviction order, the
never-evicted set, the reasons, the next-save prediction, the strictest ``keep_free`` and the trash."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.budget import (
    CLOCK_SKEW_SECONDS,
    FileSystemSpace,
    GroupSpace,
    Reclaimable,
    eviction_class,
    free_space_plan,
    freed_bytes,
    group_space,
    predict_next_save,
    shortfall,
    within_max_size,
)
from ckpt_watcher.naming import Kind
from ckpt_watcher.plan import Action, Decision, GroupPlan, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import CheckpointRecord, EntryType, FileIdentity
from tests.support.factories import best_name, make_record, step_name

ROOT = Path("/ckpt")
RUN = ROOT / "run"
OTHER = ROOT / "other"
LAST = "last.ckpt"
KIB = 1024
SECOND = 10**9
NOW = 1_800_000_000.0  # wall-clock "now" of the examples


def record(
    name: str,
    directory: Path = RUN,
    *,
    size: int = KIB,
    mtime: float = 0.0,
    complete: bool = True,
    device: int = 1,
) -> CheckpointRecord:
    """A record of ``size`` bytes written at ``mtime`` (seconds) on ``device``."""
    made = make_record(name, directory, size=size, complete=complete)
    assert made.identity is not None
    identity = FileIdentity(device, made.identity.inode, size, int(mtime * SECOND))
    return dataclasses.replace(made, identity=identity)


def group_plan(
    records: Iterable[CheckpointRecord], policy: Policy, pins: Mapping[Path, str] | None = None
) -> GroupPlan:
    (only,) = plan(list(records), policy, pins).groups
    return only


def policy(**fields: Any) -> Policy:
    return Policy.model_validate(fields)


def actions(decisions: Iterable[Decision]) -> dict[str, Action]:
    return {decision.record.name: decision.action for decision in decisions}


def evicted_names(decisions: Iterable[Decision]) -> list[str]:
    return [decision.record.name for decision in decisions if decision.evicted]


# -- the order --------------------------------------------------------------------------------------

# Everything is 1 KiB. The policy keeps, by eviction class:
#   1 (save_top_k_checkpoints: 3): steps 700, 800 (and 900, never evicted: the newest);
#   2 (save_every_n_epochs: 1): steps 200 (epoch 0) and 400 (epoch 1);
#   3 (save_top_k_best: 3): bests 0.4 and 0.3 (never the rank-1 best, 0.1);
#   4 (keep_every_n_steps: 300): steps 0 and 300.
ORDER_NAMES = [
    LAST,
    step_name(2, 900),
    step_name(2, 800),
    step_name(2, 700),
    step_name(1, 400),
    step_name(1, 350),
    step_name(1, 300),
    step_name(0, 200),
    step_name(0, 0),
    best_name(0, 200, 0.4),
    best_name(1, 400, 0.1),
    best_name(2, 800, 0.3),
]
ORDER_POLICY = policy(
    save_top_k_checkpoints=3, save_every_n_epochs=1, save_top_k_best=3, keep_every_n_steps=300, max_size=0
)


def test_the_eviction_classes_of_each_kept_checkpoint() -> None:
    decisions = {
        decision.record.name: decision
        for decision in group_plan(map(record, ORDER_NAMES), ORDER_POLICY).decisions
    }
    assert {name: eviction_class(decision) for name, decision in decisions.items()} == {
        LAST: None,
        step_name(
            2, 900
        ): 4,  # top 3, epoch 2's newest and a milestone (never evicted all the same: the newest)
        step_name(2, 800): 1,
        step_name(2, 700): 1,
        step_name(1, 400): 2,
        step_name(1, 350): None,  # deleted by the count rules
        step_name(1, 300): 4,
        step_name(0, 200): 2,
        step_name(0, 0): 4,
        best_name(0, 200, 0.4): 3,
        best_name(1, 400, 0.1): None,  # the rank-1 best
        best_name(2, 800, 0.3): 3,
    }


def test_max_size_evicts_class_by_class_each_in_its_own_order() -> None:
    planned, verdict = within_max_size(group_plan(map(record, ORDER_NAMES), ORDER_POLICY), ORDER_POLICY)
    assert sorted(evicted_names(planned.decisions)) == sorted(
        [
            step_name(2, 700),
            step_name(2, 800),
            step_name(0, 200),
            step_name(1, 400),
            best_name(0, 200, 0.4),
            best_name(2, 800, 0.3),
            step_name(0, 0),
            step_name(1, 300),
        ]
    )
    kept = {name for name, action in actions(planned.decisions).items() if action is Action.KEEP}
    assert kept == {LAST, step_name(2, 900), best_name(1, 400, 0.1)}
    assert verdict is not None
    assert verdict.kept_bytes == 11 * KIB  # last.ckpt is a file here: it counts
    assert verdict.evicted_bytes == 8 * KIB
    assert verdict.unmet_bytes == 3 * KIB
    assert verdict.remaining == (
        f"{best_name(1, 400, 0.1)} (the rank-1 best)",
        f"{step_name(2, 900)} (the newest complete checkpoint)",
        "last.ckpt (last checkpoint)",
    )


@pytest.mark.parametrize(
    ("limit_kib", "evicted"),
    [
        (11, []),  # met as it is
        (10, [step_name(2, 700)]),
        (9, [step_name(2, 700), step_name(2, 800)]),
        (8, [step_name(2, 700), step_name(2, 800), step_name(0, 200)]),
        (7, [step_name(2, 700), step_name(2, 800), step_name(0, 200), step_name(1, 400)]),
        (
            6,
            [
                *(step_name(*fields) for fields in ((2, 700), (2, 800), (0, 200), (1, 400))),
                best_name(0, 200, 0.4),
            ],
        ),
        (
            5,
            [
                *(step_name(*fields) for fields in ((2, 700), (2, 800), (0, 200), (1, 400))),
                best_name(0, 200, 0.4),
                best_name(2, 800, 0.3),
            ],
        ),
        (
            4,
            [
                *(step_name(*fields) for fields in ((2, 700), (2, 800), (0, 200), (1, 400))),
                best_name(0, 200, 0.4),
                best_name(2, 800, 0.3),
                step_name(0, 0),
            ],
        ),
    ],
)
def test_max_size_evicts_in_order_and_no_more_than_needed(limit_kib: int, evicted: list[str]) -> None:
    limited = policy(**{**ORDER_POLICY.model_dump(), "max_size": f"{limit_kib}KiB"})
    planned, verdict = within_max_size(group_plan(map(record, ORDER_NAMES), limited), limited)
    assert {decision.record.name for decision in planned.decisions if decision.evicted} == set(evicted)
    assert verdict is not None
    assert verdict.unmet_bytes == 0
    assert verdict.remaining == ()


def _hard_link(original: CheckpointRecord, name: str) -> CheckpointRecord:
    """Another name of ``original``'s file: the same device and inode."""
    linked = record(name, original.directory, size=original.bytes)
    return dataclasses.replace(linked, identity=original.identity)


def test_a_file_kept_under_two_names_counts_once_against_max_size() -> None:
    """last.ckpt hard-linked to the newest step: 3 KiB on disk, not 4 KiB, so a 3 KiB max_size is met
    and nothing is evicted (counting both names evicted step 100 for nothing)."""
    steps = [record(step_name(0, step)) for step in (100, 200, 300)]
    limited = policy(save_top_k_checkpoints=3, max_size="3KiB")

    planned, verdict = within_max_size(group_plan([*steps, _hard_link(steps[-1], LAST)], limited), limited)

    assert evicted_names(planned.decisions) == []
    assert verdict is not None
    assert (verdict.kept_bytes, verdict.unmet_bytes) == (3 * KIB, 0)


def test_a_name_whose_bytes_another_kept_name_holds_is_not_evicted_for_nothing() -> None:
    """step 100's file has a second name in the group, one no template matches (skipped, so it stays):
    removing step 100 frees nothing, so the next candidate goes instead."""
    steps = [record(step_name(0, step)) for step in (100, 200, 300)]
    alias = _hard_link(steps[0], "copy-of-step-100.bin")  # no template's name: skipped, it stays
    limited = policy(save_top_k_checkpoints=3, max_size="2KiB")

    planned, verdict = within_max_size(group_plan([*steps, alias], limited), limited)

    assert verdict is not None
    assert verdict.kept_bytes == 3 * KIB
    assert evicted_names(planned.decisions) == [step_name(0, 200)]


GIB = 1 << 30


@pytest.mark.parametrize(
    ("last", "limit", "evicted", "counted", "remaining"),
    [
        (None, "3KiB", [], 3 * KIB, ()),
        (record(LAST, size=2 * KIB), "4KiB", [step_name(0, 100)], 5 * KIB, ()),  # a whole one counts
        # pre-sized for a download (sparse: nothing on disk yet), incomplete: counts nothing
        (record(LAST, size=GIB, complete=False), "3KiB", [], 3 * KIB, ()),
        (record(LAST, size=GIB, complete=False), "2KiB", [step_name(0, 100)], 3 * KIB, ()),
        (  # unmet: only what counts is named as what may not go
            record(LAST, size=GIB, complete=False),
            0,
            [step_name(0, 100), step_name(0, 200)],
            3 * KIB,
            (f"{step_name(0, 300)} (the newest complete checkpoint)",),
        ),
    ],
)
def test_an_incomplete_last_ckpt_is_never_counted_toward_max_size(
    last: CheckpointRecord | None,
    limit: str | int,
    evicted: list[str],
    counted: int,
    remaining: tuple[str, ...],
) -> None:
    """A kept last.ckpt that is not whole yet (pre-sized to 1 GiB, a hole at byte 0) once counted at
    its apparent size and pushed complete checkpoints out for bytes not even on disk."""
    steps = [record(step_name(0, step)) for step in (100, 200, 300)]
    limited = policy(save_top_k_checkpoints=10, max_size=limit)
    records = [*steps, *([last] if last is not None else [])]

    planned, verdict = within_max_size(group_plan(records, limited), limited)

    assert sorted(evicted_names(planned.decisions)) == evicted
    assert verdict is not None
    assert verdict.kept_bytes == counted
    assert verdict.remaining == remaining
    assert all(f"({counted // KIB}.0 KiB kept)" in d.reasons[0] for d in planned.decisions if d.evicted)


def test_the_reasons_of_an_evicted_checkpoint() -> None:
    limited = policy(save_top_k_checkpoints=3, max_size="2KiB")
    names = [step_name(0, 100), step_name(0, 200), step_name(0, 300)]
    planned, _ = within_max_size(group_plan(map(record, names), limited), limited)
    decision = {decision.record.name: decision for decision in planned.decisions}[step_name(0, 100)]
    assert decision.action is Action.DELETE
    assert decision.evicted
    assert decision.reasons == (
        "evicted for space: group over max_size 2.0 KiB (3.0 KiB kept)",
        "otherwise kept: newest 3 step checkpoints (#3 of 3)",
    )


def test_a_checkpoint_kept_by_several_rules_goes_with_the_last_of_them() -> None:
    limited = policy(save_top_k_checkpoints=3, keep_every_n_steps=100, max_size="2KiB")
    names = [step_name(0, 100), step_name(0, 150), step_name(0, 160)]  # 100 is also a milestone
    planned, _ = within_max_size(group_plan(map(record, names), limited), limited)
    assert evicted_names(planned.decisions) == [step_name(0, 150)]


def test_an_incomplete_newer_checkpoint_never_makes_the_newest_complete_one_evictable() -> None:
    limited = policy(save_top_k_checkpoints=3, max_size=0)
    records = [
        record(step_name(0, 100)),
        record(step_name(0, 200)),
        record(step_name(0, 300), complete=False),
    ]
    planned, verdict = within_max_size(group_plan(records, limited), limited)
    assert evicted_names(planned.decisions) == [step_name(0, 100)]
    assert verdict is not None
    assert verdict.unmet_bytes == KIB  # step 200 stays: the newest complete checkpoint


def test_a_last_symlink_counts_nothing_and_its_target_is_never_evicted() -> None:
    limited = policy(save_top_k_checkpoints=3, max_size="1KiB")
    target = RUN / step_name(0, 100)
    link = make_record(LAST, RUN, entry_type=EntryType.SYMLINK, link_target=target)
    records = [link, record(step_name(0, 100)), record(step_name(0, 200)), record(step_name(0, 300))]
    planned, verdict = within_max_size(group_plan(records, limited), limited)
    assert evicted_names(planned.decisions) == [step_name(0, 200)]
    assert verdict is not None
    assert verdict.kept_bytes == 3 * KIB
    assert verdict.unmet_bytes == KIB


def test_pins_and_resume_sources_are_never_evicted() -> None:
    limited = policy(save_top_k_checkpoints=4, max_size=0, protect=[step_name(0, 200)])
    names = [step_name(0, 100), step_name(0, 200), step_name(0, 300), step_name(0, 400)]
    records = [*map(record, names), record(step_name(0, 300) + ".keep")]
    pins = {RUN / step_name(0, 100): "resume source in train.yaml (ckpt_path)"}
    planned, verdict = within_max_size(group_plan(records, limited, pins), limited)
    assert evicted_names(planned.decisions) == []
    assert verdict is not None
    assert verdict.remaining == (
        f"{step_name(0, 100)} (newest 4 step checkpoints (#4 of 4); resume source in train.yaml (ckpt_path))",
        f"{step_name(0, 200)} (newest 4 step checkpoints (#3 of 4); "
        f"matches protect pattern '{step_name(0, 200)}')",
        f"{step_name(0, 300)} (newest 4 step checkpoints (#2 of 4); pinned by {step_name(0, 300)}.keep)",
        f"{step_name(0, 400)} (the newest complete checkpoint)",
    )


def test_no_max_size_no_verdict() -> None:
    planned = group_plan(map(record, ORDER_NAMES), Policy())
    assert within_max_size(planned, Policy()) == (planned, None)


def test_bests_go_worst_first_by_the_mode() -> None:
    newest = step_name(0, 900)  # the newest complete checkpoint: never evicted
    names = [
        best_name(0, 100, 0.1),
        best_name(0, 200, 0.2),
        best_name(0, 300, 0.3),
        best_name(0, 400, float("nan")),
    ]
    for mode, order in (("min", [names[3], names[2], names[1]]), ("max", [names[3], names[0], names[1]])):
        for limit in range(2, 6):
            limited = policy(
                save_top_k_checkpoints=1, save_top_k_best=-1, best_mode=mode, max_size=f"{limit}KiB"
            )
            planned, _ = within_max_size(group_plan(map(record, [newest, *names]), limited), limited)
            assert set(evicted_names(planned.decisions)) == set(order[: 5 - limit]), (mode, limit)


# -- keep_free ---------------------------------------------------------------------------------------


def space_of(
    records: Sequence[CheckpointRecord],
    directory: Path,
    rules: Policy,
    *,
    device: int = 1,
    now: float = NOW,
    previous: GroupSpace | None = None,
) -> GroupSpace:
    decisions = group_plan(records, rules).decisions if records else ()
    return group_space(directory, decisions, rules, device=device, now=now, previous=previous)


def test_keep_free_evicts_oldest_first_across_groups_class_by_class() -> None:
    rules = policy(save_top_k_checkpoints=3, save_top_k_best=2, keep_free="4KiB")
    run = [
        record(LAST, size=KIB, mtime=90),
        record(step_name(0, 100), mtime=10),
        record(step_name(0, 200), mtime=30),
        record(step_name(0, 300), mtime=50),
        record(best_name(0, 100, 0.5), mtime=5),
        record(best_name(0, 200, 0.4), mtime=31),
    ]
    other = [
        record(step_name(0, 10), OTHER, mtime=20),
        record(step_name(0, 20), OTHER, mtime=40),
        record(step_name(0, 30), OTHER, mtime=60),
    ]
    groups = [space_of(run, RUN, rules), space_of(other, OTHER, rules)]
    # free 4 KiB + next save 1 KiB asked; 1 KiB free: short 4 KiB
    result = free_space_plan(FileSystemSpace(1, ROOT, 100 * KIB, KIB), groups)
    assert result.short_bytes == 4 * KIB
    assert [candidate.record.name for candidate in result.evictions] == [
        step_name(0, 100),  # class 1, mtime 10
        step_name(0, 10),  # class 1, mtime 20
        step_name(0, 200),  # class 1, mtime 30
        step_name(0, 20),  # class 1, mtime 40; the best of mtime 5 waits: class 3
    ]
    assert result.unmet_bytes == 0
    assert result.reason == "evicted for space: 1.0 KiB free, keep_free 4.0 KiB + next save 1.0 KiB"
    decisions = result.evicted_decisions()  # in eviction order, each group's own among the others
    assert [decision.record.name for decision in decisions] == [
        candidate.record.name for candidate in result.evictions
    ]
    assert [decision.record.directory for decision in decisions] == [RUN, OTHER, RUN, OTHER]
    assert all(decision.action is Action.DELETE and decision.evicted for decision in decisions)
    assert decisions[0].reasons[0] == result.reason


@pytest.mark.parametrize(
    ("keep_free", "next_save", "free", "block", "short"),
    [
        (4 * KIB, KIB, KIB, 1, 4 * KIB),  # the example above
        (4 * KIB, KIB, 5 * KIB, 1, 0),  # exactly what is asked: met
        (4 * KIB, KIB, 9 * KIB, 1, 0),  # more than asked: never negative
        (4 * KIB, 1, 4 * KIB, 4 * KIB, 4 * KIB),  # a 1-byte save takes a whole block
        (4 * KIB, 4 * KIB + 1, 8 * KIB, 4 * KIB, 4 * KIB),  # one byte past a block: two blocks
        (0, 0, 0, 0, 0),  # no block size reported: bytes
    ],
)
def test_the_shortfall_reserves_the_next_save_in_whole_blocks(
    keep_free: int, next_save: int, free: int, block: int, short: int
) -> None:
    assert shortfall(keep_free, next_save, free, block) == short


def test_a_plan_read_again_with_more_free_space_is_short_of_less() -> None:
    """``short_now`` (the re-read before each eviction) is the plan's own sum: with the free bytes the
    plan was made from it is the plan's shortfall; each byte freed since lowers it, down to 0."""
    rules = policy(save_top_k_checkpoints=-1, keep_free="4KiB")
    run = [record(step_name(0, 100), mtime=10), record(step_name(0, 200), mtime=20)]
    result = free_space_plan(FileSystemSpace(1, ROOT, 100 * KIB, KIB), [space_of(run, RUN, rules)])
    assert result.short_bytes == 4 * KIB
    assert result.short_now(KIB) == result.short_bytes
    assert result.short_now(2 * KIB) == 3 * KIB
    assert result.short_now(5 * KIB) == 0
    assert result.short_now(50 * KIB) == 0


def test_keep_free_takes_the_trash_first_oldest_first_same_device_only() -> None:
    rules = policy(save_top_k_checkpoints=3, keep_free="2KiB")
    run = [
        record(step_name(0, 100), mtime=1),
        record(step_name(0, 200), mtime=2),
        record(step_name(0, 300), mtime=3),
    ]
    trash = [
        Reclaimable("b", device=1, bytes=KIB, since=20.0),
        Reclaimable("a", device=1, bytes=KIB, since=10.0),
        Reclaimable("elsewhere", device=2, bytes=100 * KIB, since=1.0),
    ]
    space = FileSystemSpace(1, ROOT, 100 * KIB, 2 * KIB)  # short: 2 + 1 - 2 = 1 KiB
    result = free_space_plan(space, [space_of(run, RUN, rules)], trash)
    assert [item.key for item in result.reclaimed] == ["a"]
    assert result.evictions == ()
    short_more = free_space_plan(dataclasses.replace(space, free_bytes=0), [space_of(run, RUN, rules)], trash)
    assert [item.key for item in short_more.reclaimed] == ["a", "b"]
    assert [candidate.record.name for candidate in short_more.evictions] == [step_name(0, 100)]


class _CountedLooks(list[Any]):
    """A sequence that counts how often it is looked through."""

    looks = 0

    def __iter__(self) -> Iterator[Any]:
        self.looks += 1
        return super().__iter__()


def test_keep_free_with_nothing_short_looks_through_neither_the_trash_nor_the_groups() -> None:
    """The daemon checks keep_free every second: each check sorted every trash entry of the device and
    went through every group's candidates, needed or not (at rest: 5% of a core with 100,000 in the
    trash, 0.9% with 2,000 x 50 kept). Nothing short: neither is looked at; short: the same choice."""
    rules = policy(save_top_k_checkpoints=3, keep_free="2KiB")
    run = [record(step_name(0, 100), mtime=1), record(step_name(0, 200), mtime=2)]
    trash = _CountedLooks([Reclaimable("b", device=1, bytes=KIB, since=20.0), Reclaimable("a", 1, KIB, 10.0)])
    group = space_of(run, RUN, rules)
    candidates = _CountedLooks(group.candidates)
    group = dataclasses.replace(group, candidates=candidates)  # type: ignore[arg-type]
    plenty = FileSystemSpace(1, ROOT, 100 * KIB, 50 * KIB)

    result = free_space_plan(plenty, [group], trash)

    assert (result.short_bytes, result.reclaimed, result.evictions) == (0, (), ())
    assert (trash.looks, candidates.looks) == (0, 0)
    short = free_space_plan(dataclasses.replace(plenty, free_bytes=0), [group], trash)
    assert [item.key for item in short.reclaimed] == ["a", "b"]
    assert [candidate.record.name for candidate in short.evictions] == [step_name(0, 100)]
    assert trash.looks == 1
    assert candidates.looks > 0  # (once for each eviction class)


@pytest.mark.parametrize(
    ("second_name", "linked", "evicted"),
    [
        (None, False, [step_name(0, 100)]),
        (best_name(0, 100, 0.9), False, [step_name(0, 100)]),  # a best of its own: its own bytes
        (best_name(0, 100, 0.9), True, [step_name(0, 200)]),  # the kept best holds step 100's bytes
        ("copy-of-step-100.bin", True, [step_name(0, 200)]),  # so does a skipped name (no template's)
    ],
)
def test_keep_free_never_evicts_a_name_whose_file_another_name_that_stays_holds(
    second_name: str | None, linked: bool, evicted: list[str]
) -> None:
    """The best of step 100 is a hard link of the step-100 file: removing the step name frees nothing
    (it once did, claiming 8 KiB, and the next pass evicted step 200 as well)."""
    rules = policy(save_top_k_checkpoints=5, save_top_k_best=2, keep_free="16KiB")
    steps = [
        record(step_name(0, step), size=8 * KIB, mtime=10 * index)
        for index, step in enumerate((100, 200, 300, 400, 500), start=1)
    ]
    records = [*steps, record(best_name(0, 300, 0.5), size=KIB, mtime=5)]  # the rank-1 best
    if second_name is not None:
        second = record(second_name, size=8 * KIB, mtime=10)
        records.append(_hard_link(steps[0], second_name) if linked else second)
    # keep_free 16 KiB + next save 8 KiB (step 500): 1 KiB short
    result = free_space_plan(FileSystemSpace(1, ROOT, 100 * KIB, 23 * KIB), [space_of(records, RUN, rules)])

    assert [candidate.record.name for candidate in result.evictions] == evicted
    assert (result.evicted_bytes, result.unmet_bytes) == (8 * KIB, 0)


def test_keep_free_never_evicts_a_file_whose_names_are_in_two_groups() -> None:
    """step 100 of run and of other are one file: evicting either name frees nothing (the other stays)."""
    rules = policy(save_top_k_checkpoints=2, keep_free="4KiB")
    run = [record(step_name(0, 100), mtime=1), record(step_name(0, 200), mtime=5)]
    linked = dataclasses.replace(record(step_name(0, 100), OTHER), identity=run[0].identity)
    other = [linked, record(step_name(0, 200), OTHER, mtime=6)]
    groups = [space_of(run, RUN, rules), space_of(other, OTHER, rules)]

    result = free_space_plan(FileSystemSpace(1, ROOT, 100 * KIB, 4 * KIB), groups)  # 1 KiB short

    assert result.evictions == ()
    assert result.unmet_bytes == KIB


def _linked_plan(*names: tuple[str, Action]) -> list[Decision]:
    """Decisions on names of one 4 KiB file (the first name's), plus a 1 KiB step 900 deleted."""
    original = record(names[0][0], size=4 * KIB)
    decisions = [
        Decision(_hard_link(original, name) if index else original, action, ())
        for index, (name, action) in enumerate(names)
    ]
    return [*decisions, Decision(record(step_name(0, 900)), Action.DELETE, ())]


@pytest.mark.parametrize(
    ("decisions", "freed"),
    [
        ([], 0),
        ([Decision(record(step_name(0, 1), size=3 * KIB), Action.KEEP, ())], 0),
        (_linked_plan((step_name(0, 1), Action.DELETE)), 5 * KIB),
        (_linked_plan((step_name(0, 1), Action.DELETE), (best_name(0, 1, 0.5), Action.KEEP)), KIB),
        (_linked_plan((step_name(0, 1), Action.DELETE), ("copy.bin", Action.SKIP)), KIB),
        (_linked_plan((step_name(0, 1), Action.DELETE), (best_name(0, 1, 0.5), Action.DELETE)), 5 * KIB),
    ],
)
def test_what_a_plan_s_deletions_free_counts_each_file_once_and_none_still_named(
    decisions: list[Decision], freed: int
) -> None:
    """A dry run adds this to the free space: a deleted name whose file stays under another frees nothing."""
    assert freed_bytes(decisions) == freed


def test_keep_free_is_the_strictest_of_the_groups_on_the_file_system() -> None:
    loose, strict = policy(keep_free="1KiB"), policy(keep_free="10%")
    elsewhere = policy(keep_free="50KiB")
    groups = [
        space_of([record(step_name(0, 1))], RUN, loose),
        space_of([record(step_name(0, 2), OTHER)], OTHER, strict),
        space_of([record(step_name(0, 3), ROOT / "far", device=2)], ROOT / "far", elsewhere, device=2),
    ]
    result = free_space_plan(FileSystemSpace(1, ROOT, 40 * KIB, 100 * KIB), groups)
    assert result.keep_free is not None
    assert result.keep_free.text == "10%"
    assert result.keep_free_bytes == 4 * KIB
    assert result.short_bytes == 0
    short = free_space_plan(FileSystemSpace(1, ROOT, 40 * KIB, 4 * KIB), groups)
    assert short.reason == "evicted for space: 4.0 KiB free, keep_free 10% (4.0 KiB) + next save 1.0 KiB"


def test_no_keep_free_evicts_nothing_but_still_predicts() -> None:
    groups = [space_of([record(step_name(0, 1), size=3 * KIB, mtime=5)], RUN, Policy())]
    result = free_space_plan(FileSystemSpace(1, ROOT, 10 * KIB, 0), groups)
    assert result.keep_free is None
    assert result.evictions == ()
    assert result.short_bytes == 0
    assert result.next_save.bytes == 3 * KIB


def test_keep_free_unmet_keeps_the_never_evicted_set() -> None:
    rules = policy(save_top_k_checkpoints=3, save_top_k_best=1, keep_free="1MiB")
    run = [
        record(LAST, mtime=9),
        record(step_name(0, 100), mtime=1),
        record(step_name(0, 200), mtime=2),
        record(best_name(0, 100, 0.1), mtime=1),
    ]
    result = free_space_plan(FileSystemSpace(1, ROOT, 100 * KIB, KIB), [space_of(run, RUN, rules)])
    assert [candidate.record.name for candidate in result.evictions] == [step_name(0, 100)]
    assert result.unmet_bytes == 1024 * KIB + KIB - KIB - KIB


def test_within_a_class_each_group_keeps_its_own_order() -> None:
    """A group's worse best goes before its better one even when the better one is older."""
    rules = policy(save_top_k_checkpoints=1, save_top_k_best=-1, keep_free="1KiB")
    run = [
        record(step_name(0, 900), mtime=100),
        record(best_name(0, 100, 0.1), mtime=1),
        record(best_name(0, 200, 0.2), mtime=2),  # the better of the two evictable ones is older
        record(best_name(0, 300, 0.3), mtime=3),
    ]
    result = free_space_plan(FileSystemSpace(1, ROOT, 100 * KIB, KIB), [space_of(run, RUN, rules)])
    assert [candidate.record.name for candidate in result.evictions] == [best_name(0, 300, 0.3)]


# -- the next save -----------------------------------------------------------------------------------


def test_the_next_save_is_as_large_as_the_newest_checkpoint_of_the_most_recently_written_group() -> None:
    groups = [
        space_of(
            [
                record(step_name(0, 1), size=2 * KIB, mtime=10),
                record(step_name(0, 2), size=3 * KIB, mtime=20),
            ],
            RUN,
            Policy(),
        ),
        space_of([record(step_name(0, 9), OTHER, size=5 * KIB, mtime=15)], OTHER, Policy()),
    ]
    prediction = predict_next_save(groups)
    assert prediction.bytes == 3 * KIB
    assert prediction.basis == f"as large as run/{step_name(0, 2)}, the newest complete checkpoint"
    assert predict_next_save([]).bytes == 0


def test_a_checkpoint_being_written_needs_what_its_previous_one_of_its_kind_had_minus_what_is_written() -> (
    None
):
    run = [
        record(step_name(0, 100), size=8 * KIB, mtime=NOW - 100),
        record(best_name(0, 100, 0.5), size=2 * KIB, mtime=NOW - 90),
        record(step_name(0, 200), size=3 * KIB, mtime=NOW - 1, complete=False),
    ]
    prediction = predict_next_save([space_of(run, RUN, Policy())])
    assert prediction.bytes == 5 * KIB
    assert prediction.basis == f"run/{step_name(0, 200)} being written: 3.0 KiB of an expected 8.0 KiB"


def test_a_growing_checkpoint_larger_than_predicted_needs_nothing_more() -> None:
    run = [
        record(step_name(0, 100), size=KIB, mtime=NOW - 100),
        record(step_name(0, 200), size=9 * KIB, mtime=NOW, complete=False),
    ]
    assert predict_next_save([space_of(run, RUN, Policy())]).bytes == 0


def test_a_first_checkpoint_being_written_is_expected_as_large_as_the_newest_written_anywhere() -> None:
    run = [record(step_name(0, 100), size=6 * KIB, mtime=NOW - 100)]
    other = [record(step_name(0, 1), OTHER, size=KIB, mtime=NOW - 2, complete=False)]
    groups = [space_of(run, RUN, Policy()), space_of(other, OTHER, Policy())]
    assert predict_next_save(groups).bytes == 5 * KIB


def test_a_stale_incomplete_file_is_not_being_written() -> None:
    run = [
        record(step_name(0, 100), size=6 * KIB, mtime=NOW - 100),
        record(step_name(0, 200), size=KIB, mtime=NOW - 3600, complete=False),
    ]
    space = space_of(run, RUN, Policy())
    assert space.growing == ()
    assert predict_next_save([space]).bytes == 6 * KIB


@pytest.mark.parametrize(
    ("modified", "being_written"),
    [
        (NOW - 1, True),
        (NOW - 59, True),
        (NOW - 61, False),  # a leftover of a crash
        (NOW, True),
        (NOW + CLOCK_SKEW_SECONDS, True),  # the file system's clock a little ahead of this host's
        (NOW + CLOCK_SKEW_SECONDS + 1, False),
        (NOW + 3600, False),  # stamped an hour ahead (cp -p from a fast clock): no save in progress
        (NOW + 10 * 365 * 86400, False),
    ],
)
def test_an_incomplete_checkpoint_is_being_written_only_if_modified_around_now(
    modified: float, being_written: bool
) -> None:
    run = [
        record(step_name(0, 100), size=6 * KIB, mtime=NOW - 100),
        record(step_name(0, 200), size=KIB, mtime=modified, complete=False),
    ]
    space = space_of(run, RUN, Policy())
    assert [item.relative_path for item in space.growing] == (
        [f"run/{step_name(0, 200)}"] if being_written else []
    )
    assert predict_next_save([space]).bytes == (5 * KIB if being_written else 6 * KIB)


def test_leftovers_stamped_ahead_of_the_clock_reserve_no_save_each() -> None:
    """Three truncated leftovers with an mtime an hour ahead once each reserved a whole save (12 KiB
    instead of 4 KiB), and keep_free evicted two complete checkpoints for saves never coming."""
    rules = policy(save_top_k_checkpoints=10, keep_free="20KiB")
    complete = [
        record(step_name(0, step), size=4 * KIB, mtime=NOW - 900 + index)
        for index, step in enumerate((100, 200, 300, 400, 500))
    ]
    leftovers = [
        record(step_name(0, step), size=KIB // 4, mtime=NOW + 3600, complete=False)
        for step in (600, 700, 800)
    ]
    space = FileSystemSpace(1, ROOT, 100 * KIB, 25 * KIB)  # keep_free + one 4 KiB save + 1 KiB to spare

    result = free_space_plan(space, [space_of([*complete, *leftovers], RUN, rules)])

    assert result.next_save.bytes == 4 * KIB
    assert result.next_save.basis == f"as large as run/{step_name(0, 500)}, the newest complete checkpoint"
    assert (result.short_bytes, result.evictions) == (0, ())


def test_a_rewritten_last_ckpt_is_expected_as_large_as_it_was() -> None:
    rules = Policy()
    before = space_of([record(LAST, size=7 * KIB, mtime=NOW - 50)], RUN, rules)
    assert before.sizes_by_kind == {Kind.LAST: 7 * KIB}
    during = space_of([record(LAST, size=2 * KIB, mtime=NOW, complete=False)], RUN, rules, previous=before)
    assert [item.expected for item in during.growing] == [7 * KIB]
    assert predict_next_save([during]).bytes == 5 * KIB


def test_an_empty_group_still_carries_its_keep_free() -> None:
    space = space_of([], RUN, policy(keep_free="5%"))
    assert space.keep_free is not None
    assert space.keep_free.bytes_of(100) == 5
    assert space.candidates == ()


def test_the_next_save_is_reserved_in_whole_blocks() -> None:
    rules = policy(save_top_k_checkpoints=-1, keep_free="4KiB")
    run = [record(step_name(0, 1), size=4097, mtime=1), record(step_name(0, 2), size=4097, mtime=2)]
    space = FileSystemSpace(1, ROOT, 100 * KIB, 12 * KIB, block_bytes=4096)
    assert free_space_plan(space, [space_of(run, RUN, rules)]).short_bytes == 0  # 4 KiB + 2 blocks: fits
    tight = dataclasses.replace(space, free_bytes=12 * KIB - 1)
    assert free_space_plan(tight, [space_of(run, RUN, rules)]).short_bytes == 1
    assert (
        free_space_plan(dataclasses.replace(tight, block_bytes=1), [space_of(run, RUN, rules)]).short_bytes
        == 0
    )


def test_a_run_without_keep_free_neither_asks_for_space_nor_gives_any_up() -> None:
    asking = policy(save_top_k_checkpoints=-1, keep_free="4KiB")
    opted_out = policy(save_top_k_checkpoints=-1, keep_free=None)
    run = [record(step_name(0, 1), mtime=5), record(step_name(0, 2), mtime=6)]
    other = [record(step_name(0, 1), OTHER, mtime=1), record(step_name(0, 2), OTHER, mtime=9)]
    groups = [space_of(run, RUN, asking), space_of(other, OTHER, opted_out)]
    assert groups[1].candidates == ()
    result = free_space_plan(FileSystemSpace(1, ROOT, 100 * KIB, KIB), groups)
    assert [candidate.record.path for candidate in result.evictions] == [RUN / step_name(0, 1)]
    assert result.next_save.bytes == KIB  # other's newest save still counts: written last
    assert result.next_save.basis.startswith("as large as other/")
