"""Table-driven examples of the pure retention planner, one or more per rule of the policy."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.naming import Kind
from ckpt_watcher.plan import Action, Decision, Hold, LinkInto, Plan, Summary, _Ledger, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import CheckpointRecord, EntryType
from tests.support.factories import best_name, make_record, step_name

ROOT = Path("/ckpt")
RUN = ROOT / "run"
OTHER = ROOT / "other"

NAN = math.nan
INF = math.inf


def by_name(result: Plan) -> dict[str, Decision]:
    """Decisions of a single-group plan keyed by file name."""
    decisions = {decision.record.name: decision for decision in result.decisions}
    assert len(decisions) == len(result.decisions), "names must be unique in a single-group example"
    return decisions


def by_relative_path(result: Plan) -> dict[str, Decision]:
    """Decisions of a plan keyed by the record's path relative to the root."""
    return {decision.record.relative_path: decision for decision in result.decisions}


def names_with(result: Plan, action: Action) -> set[str]:
    return {name for name, decision in by_name(result).items() if decision.action is action}


def protecting(*patterns: str, **fields: Any) -> Policy:
    """A policy with protect globs; Policy(protect=...) takes a list, which its tuple annotation hides."""
    return Policy.model_validate({**fields, "protect": list(patterns)})


def records(names: Iterable[str], directory: Path = RUN) -> list[CheckpointRecord]:
    return [make_record(name, directory) for name in names]


# --------------------------------------------------------------------------------------------------
# The table: complete regular files in one directory, a policy, and the expected action per name.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One example: file names in /ckpt/run, policy fields, and which names are kept and deleted."""

    id: str
    names: tuple[str, ...]
    policy: Mapping[str, Any]
    keep: frozenset[str]
    delete: frozenset[str]
    skip: frozenset[str] = field(default_factory=frozenset)


def case(
    id: str,
    policy: Mapping[str, Any],
    *,
    keep: Iterable[str] = (),
    delete: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> Case:
    keep, delete, skip = tuple(keep), tuple(delete), tuple(skip)
    return Case(
        id=id,
        names=(*keep, *delete, *skip),
        policy=policy,
        keep=frozenset(keep),
        delete=frozenset(delete),
        skip=frozenset(skip),
    )


LAST = "last.ckpt"
NO_BEST = {"save_top_k_best": 0}
NO_STEP = {"save_top_k_checkpoints": 0}

CASES = [
    # Rule 1: the newest save_top_k_checkpoints step checkpoints, by (step, epoch, version).
    case(
        "top-5-of-7-default-policy",
        {},
        keep=[LAST, *(step_name(epoch, 100 * epoch) for epoch in range(3, 8))],
        delete=[step_name(1, 100), step_name(2, 200)],
    ),
    case(
        "top-2-steps-order-by-number",
        {"save_top_k_checkpoints": 2},
        keep=[step_name(3, 30), step_name(4, 4000)],
        delete=[step_name(1, 9), step_name(2, 10)],
    ),
    case(
        "overflow-step-width-1000000-newer-than-999999",
        {"save_top_k_checkpoints": 2},
        keep=[step_name(9, 1_000_000), step_name(9, 1_000_001)],
        delete=[step_name(9, 999_998), step_name(9, 999_999)],
    ),
    case(
        "overflow-step-width-top-1",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(10, 1_000_000)],
        delete=[step_name(9, 999_999)],
    ),
    case(
        "overflow-epoch-width-breaks-step-tie",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(100, 5000)],
        delete=[step_name(99, 5000)],
    ),
    case(
        "step-dominates-epoch",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(1, 600)],
        delete=[step_name(2, 500)],
    ),
    case(
        "versions-break-ties-newest-version-first",
        {"save_top_k_checkpoints": 2},
        keep=[step_name(5, 500, version=2), step_name(5, 500, version=1)],
        delete=[step_name(5, 500), step_name(4, 400)],
    ),
    case(
        "version-2-newer-than-version-1",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(5, 500, version=2)],
        delete=[step_name(5, 500, version=1)],
    ),
    case(
        "version-10-newer-than-version-9",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(5, 500, version=10)],
        delete=[step_name(5, 500, version=9)],
    ),
    case(
        "a-newer-step-beats-a-higher-version",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(5, 501)],
        delete=[step_name(5, 500, version=3)],
    ),
    case(
        "top-k-0-deletes-every-step-when-last-exists",
        {"save_top_k_checkpoints": 0},
        keep=[LAST],
        delete=[step_name(1, 100), step_name(2, 200)],
    ),
    case(
        "top-k-minus-1-keeps-every-step",
        {"save_top_k_checkpoints": -1},
        keep=[step_name(epoch, 100 * epoch + 1) for epoch in range(12)],
    ),
    case(
        "fewer-steps-than-k",
        {"save_top_k_checkpoints": 5},
        keep=[step_name(0, 10), step_name(1, 20)],
    ),
    # Rule 2: save_every_n_epochs keeps the newest step of each epoch e with (e + 1) % n == 0.
    case(
        "every-1-epoch-keeps-newest-of-each-epoch",
        {"save_top_k_checkpoints": 0, "save_every_n_epochs": 1},
        keep=[LAST, step_name(0, 200), step_name(1, 400), step_name(2, 500)],
        delete=[step_name(0, 100), step_name(1, 300), step_name(1, 350)],
    ),
    case(
        "every-2-epochs-keeps-odd-epochs",
        {"save_top_k_checkpoints": 0, "save_every_n_epochs": 2},
        keep=[LAST, step_name(1, 200), step_name(3, 400)],
        delete=[step_name(0, 100), step_name(1, 150), step_name(2, 300), step_name(3, 350)],
    ),
    case(
        "every-3-epochs-with-top-1",
        {"save_top_k_checkpoints": 1, "save_every_n_epochs": 3},
        keep=[step_name(2, 300), step_name(5, 600), step_name(6, 700)],
        delete=[step_name(0, 100), step_name(1, 200), step_name(3, 400), step_name(4, 500)],
    ),
    case(
        "every-n-epoch-newest-by-number-with-overflow",
        {"save_top_k_checkpoints": 0, "save_every_n_epochs": 1},
        keep=[LAST, step_name(0, 1_000_000)],
        delete=[step_name(0, 999_999)],
    ),
    case(
        "every-n-epoch-newest-by-version",
        {"save_top_k_checkpoints": 0, "save_every_n_epochs": 1},
        keep=[LAST, step_name(0, 100, version=1)],
        delete=[step_name(0, 100)],
    ),
    # Rule 3: best checkpoints by metric per best_mode; NaN worst; ties go to the higher step.
    case(
        "best-min-top-3",
        {**NO_STEP, "save_top_k_best": 3},
        keep=[LAST, best_name(3, 300, 0.1), best_name(1, 100, 0.3), best_name(2, 200, 0.4)],
        delete=[best_name(0, 50, 0.5), best_name(4, 400, 0.41)],
    ),
    case(
        "best-max-top-2",
        {**NO_STEP, "save_top_k_best": 2, "best_mode": "max"},
        keep=[LAST, best_name(0, 50, 0.9), best_name(2, 200, 0.8)],
        delete=[best_name(3, 300, 0.1), best_name(1, 100, 0.3)],
    ),
    case(
        "best-nan-ranks-worst-in-min-mode",
        {**NO_STEP, "save_top_k_best": 2},
        keep=[LAST, best_name(0, 100, 0.1), best_name(1, 200, 99.0)],
        delete=[best_name(2, 300, NAN)],
    ),
    case(
        "best-nan-ranks-worst-in-max-mode",
        {**NO_STEP, "save_top_k_best": 2, "best_mode": "max"},
        keep=[LAST, best_name(0, 100, 0.1), best_name(1, 200, -99.0)],
        delete=[best_name(2, 300, NAN)],
    ),
    case(
        "best-nan-below-inf-in-min-mode",
        {**NO_STEP, "save_top_k_best": 1},
        keep=[LAST, best_name(0, 100, INF)],
        delete=[best_name(2, 300, NAN)],
    ),
    case(
        "best-inf-worst-finite-in-min-mode",
        {**NO_STEP, "save_top_k_best": 2},
        keep=[LAST, best_name(0, 100, -INF), best_name(1, 200, 5.0)],
        delete=[best_name(2, 300, INF)],
    ),
    case(
        "best-inf-is-best-in-max-mode",
        {**NO_STEP, "save_top_k_best": 1, "best_mode": "max"},
        keep=[LAST, best_name(0, 100, INF)],
        delete=[best_name(1, 200, 5.0), best_name(2, 300, -INF)],
    ),
    case(
        "best-tie-goes-to-the-lower-step-the-trainers-best",
        {**NO_STEP, "save_top_k_best": 1},
        keep=[LAST, best_name(0, 100, 0.3)],
        delete=[best_name(1, 200, 0.3)],
    ),
    case(
        "best-tie-lower-step-even-with-overflow-width",
        {**NO_STEP, "save_top_k_best": 1},
        keep=[LAST, best_name(9, 999_999, 0.3)],
        delete=[best_name(9, 1_000_000, 0.3)],
    ),
    case(
        "best-tie-negative-zero-equals-zero-lower-step-wins",
        {**NO_STEP, "save_top_k_best": 1},
        keep=[LAST, best_name(0, 100, -0.0)],
        delete=[best_name(1, 200, 0.0)],
    ),
    case(
        "best-nan-ties-go-to-the-lower-step",
        {**NO_STEP, "save_top_k_best": 1},
        keep=[LAST, best_name(0, 100, NAN)],
        delete=[best_name(1, 200, NAN)],
    ),
    case(
        "best-tie-same-step-the-first-version-wins",
        {**NO_STEP, "save_top_k_best": 1},
        keep=[LAST, best_name(1, 200, 0.3)],
        delete=[best_name(1, 200, 0.3, version=1)],
    ),
    case(
        "best-top-k-minus-1-keeps-all",
        {**NO_STEP, "save_top_k_best": -1},
        keep=[best_name(0, 100, 0.1), best_name(1, 200, NAN), best_name(2, 300, INF)],
    ),
    case(
        "best-top-k-0-deletes-all-when-last-exists",
        {**NO_STEP, "save_top_k_best": 0},
        keep=[LAST],
        delete=[best_name(0, 100, 0.1), best_name(1, 200, 0.2)],
    ),
    case(
        "steps-and-bests-are-ranked-separately",
        {"save_top_k_checkpoints": 1, "save_top_k_best": 1},
        keep=[step_name(3, 300), best_name(0, 100, 0.1)],
        delete=[step_name(2, 200), best_name(3, 300, 0.5)],
    ),
    # Rule 4: last.ckpt and last-vN.ckpt are always kept.
    case(
        "last-and-last-versions-always-kept",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        keep=[LAST, "last-v1.ckpt", "last-v2.ckpt"],
        delete=[step_name(1, 100), best_name(1, 100, 0.1)],
    ),
    case(
        "last-version-alone-is-a-usable-last",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        keep=["last-v1.ckpt"],
        delete=[step_name(1, 100)],
    ),
    # Rule 5: no usable last and nothing kept: the newest checkpoint is kept.
    case(
        "no-last-top-0-and-0-keeps-newest-step",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        keep=[step_name(3, 1_000_000)],
        delete=[step_name(2, 999_999), best_name(1, 500, 0.1)],
    ),
    case(
        "no-last-top-0-and-0-keeps-newest-best",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        keep=[best_name(4, 900, 0.7)],
        delete=[step_name(3, 800), best_name(1, 500, 0.1)],
    ),
    case(
        "no-last-newest-step-preferred-over-best-of-same-step",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        keep=[step_name(3, 800)],
        delete=[best_name(3, 800, 0.1), step_name(2, 700)],
    ),
    case(
        "no-last-rule-5-not-needed-when-something-kept",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 1},
        keep=[best_name(0, 100, 0.1)],
        delete=[step_name(3, 800), best_name(1, 200, 0.2)],
    ),
    case(
        "no-last-every-n-keeps-so-no-rule-5",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0, "save_every_n_epochs": 2},
        keep=[step_name(1, 200)],
        delete=[step_name(2, 300)],
    ),
    case(
        "only-best-single-kept-by-rule-5",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        keep=[best_name(0, 10, NAN)],
    ),
    # Rule 6: unknown names are skipped, never deleted and never counted.
    case(
        "unknown-names-skipped",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        keep=[LAST],
        delete=[step_name(1, 100)],
        skip=[
            "notes.txt",
            "model.pt",
            "epoch=1-step=100-train.ckpt",  # narrower than {epoch:02d}/{step:06d}: never produced
            "Epoch=01-step=000100-train.ckpt",
            "last.ckpt.tmp",
            "best_latest.ckpt",
            "epoch=01-step=000100-train-v0.ckpt",  # versions count from 1
        ],
    ),
    case(
        "unknown-names-do-not-count-toward-top-k",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(1, 100)],
        delete=[step_name(0, 50)],
        skip=["epoch=9-step=900-train.ckpt"],
    ),
    # Milestones: keep_every_n_steps keeps every step checkpoint whose step is a multiple of n.
    case(
        "milestones-every-1000-steps",
        {"save_top_k_checkpoints": 1, "keep_every_n_steps": 1000},
        keep=[step_name(0, 0), step_name(1, 1000), step_name(2, 2000), step_name(2, 2500)],
        delete=[step_name(0, 500), step_name(1, 1500), step_name(2, 2200)],
    ),
    case(
        "milestones-off-by-default",
        {"save_top_k_checkpoints": 1},
        keep=[step_name(2, 2500)],
        delete=[step_name(1, 1000), step_name(2, 2000)],
    ),
    case(
        "milestones-are-step-checkpoints-only",
        {"save_top_k_checkpoints": 0, "save_top_k_best": 1, "keep_every_n_steps": 100},
        keep=[step_name(0, 100), best_name(0, 300, 0.1)],
        delete=[best_name(0, 200, 0.5), step_name(0, 150)],
    ),
]


@pytest.mark.parametrize("example", CASES, ids=[example.id for example in CASES])
def test_table(example: Case) -> None:
    assert not example.keep & example.delete
    assert not example.keep & example.skip
    assert not example.delete & example.skip
    result = plan(records(example.names), Policy(**example.policy))
    assert names_with(result, Action.KEEP) == example.keep
    assert names_with(result, Action.DELETE) == example.delete
    assert names_with(result, Action.SKIP) == example.skip
    assert len(result.decisions) == len(example.names)


@pytest.mark.parametrize("example", CASES, ids=[example.id for example in CASES])
def test_table_does_not_depend_on_input_order(example: Case) -> None:
    forward = by_name(plan(records(example.names), Policy(**example.policy)))
    backward = by_name(plan(records(reversed(example.names)), Policy(**example.policy)))
    assert {name: decision.action for name, decision in forward.items()} == {
        name: decision.action for name, decision in backward.items()
    }


def test_overflow_names_sort_opposite_to_their_steps() -> None:
    """The premise of the overflow cases: the newer step's name sorts first."""
    assert step_name(9, 1_000_000) < step_name(9, 999_999)
    assert step_name(100, 5000) < step_name(99, 5000)
    assert step_name(5, 500, version=10) < step_name(5, 500, version=9)
    result = plan(records([step_name(9, 999_999), step_name(9, 1_000_000)]), Policy(save_top_k_checkpoints=1))
    assert [decision.record.step for decision in result.decisions] == [1_000_000, 999_999]


# --------------------------------------------------------------------------------------------------
# Rule 6: incomplete files, directories, symlinks and other entries are skipped and never counted.
# --------------------------------------------------------------------------------------------------


def test_incomplete_file_is_skipped_and_not_counted() -> None:
    newest = make_record(step_name(9, 900), complete=False, incomplete_reason="still being written")
    complete = [make_record(step_name(epoch, 100 * epoch)) for epoch in (1, 2)]
    result = by_name(plan([newest, *complete], Policy(save_top_k_checkpoints=1)))
    assert result[newest.name].action is Action.SKIP
    assert result[newest.name].reasons == ("still being written",)
    # the incomplete newer one does not take a top-1 slot
    assert result[step_name(2, 200)].action is Action.KEEP
    assert result[step_name(1, 100)].action is Action.DELETE


def test_incomplete_best_is_skipped_and_not_ranked() -> None:
    broken = make_record(best_name(0, 10, 0.0001), complete=False, incomplete_reason="truncated zip")
    good = make_record(best_name(1, 20, 0.5))
    result = by_name(plan([broken, good, make_record(LAST)], Policy(save_top_k_best=1)))
    assert result[broken.name].action is Action.SKIP
    assert result[good.name].action is Action.KEEP
    assert result[good.name].reasons == ("top 1 best (rank 1, loss=0.5000)",)


@pytest.mark.parametrize(
    ("entry_type", "expected_reason"),
    [
        (EntryType.SYMLINK, "symlink: never followed, never deleted"),
        (EntryType.OTHER, "not a regular file"),
    ],
)
@pytest.mark.parametrize("name", [step_name(9, 900), best_name(9, 900, 0.0)])
def test_symlinks_and_other_entries_are_skipped_and_not_counted(
    entry_type: EntryType, expected_reason: str, name: str
) -> None:
    # the scan finds a symlink to a complete zip complete; it is skipped all the same
    odd = dataclasses.replace(make_record(name, entry_type=entry_type), complete=True)
    older = make_record(step_name(1, 100))
    older_best = make_record(best_name(1, 100, 0.9))
    result = by_name(plan([odd, older, older_best], Policy(save_top_k_checkpoints=1, save_top_k_best=1)))
    assert result[name].action is Action.SKIP
    assert result[name].reasons == (expected_reason,)
    assert result[older.name].action is Action.KEEP
    assert result[older_best.name].action is Action.KEEP


@pytest.mark.parametrize("name", [step_name(9, 900), best_name(9, 900, 0.0)])
def test_incomplete_directory_checkpoint_is_skipped_and_not_counted(name: str) -> None:
    unsettled = make_record(
        name, entry_type=EntryType.DIRECTORY, complete=False, incomplete_reason="no 'latest' file yet"
    )
    older = make_record(step_name(1, 100))
    older_best = make_record(best_name(1, 100, 0.9))
    result = by_name(
        plan([unsettled, older, older_best], Policy(save_top_k_checkpoints=1, save_top_k_best=1))
    )
    assert result[name].action is Action.SKIP
    assert result[name].reasons == ("directory checkpoint: no 'latest' file yet",)
    assert result[older.name].action is Action.KEEP
    assert result[older_best.name].action is Action.KEEP


def test_complete_directory_checkpoints_are_ranked_and_deleted_like_files() -> None:
    """DeepSpeed / sharded FSDP write a checkpoint as a directory; once complete it counts like a file."""

    def directory(name: str, size: int) -> CheckpointRecord:
        record = make_record(name, entry_type=EntryType.DIRECTORY)
        return dataclasses.replace(record, complete=True, bytes=size)

    recs = [
        directory(step_name(1, 100), 10),
        make_record(step_name(2, 200), size=20),
        directory(step_name(3, 300), 30),
        directory(best_name(1, 100, 0.5), 40),
        directory(best_name(2, 200, 0.1), 50),
        make_record(LAST),
    ]
    result = plan(recs, Policy(save_top_k_checkpoints=1, save_top_k_best=1))
    decisions = by_name(result)
    assert decisions[step_name(3, 300)].reasons == ("newest 1 step checkpoints (#1 of 1)",)
    assert decisions[step_name(2, 200)].action is Action.DELETE
    assert decisions[step_name(1, 100)].action is Action.DELETE
    assert decisions[best_name(2, 200, 0.1)].action is Action.KEEP
    assert decisions[best_name(1, 100, 0.5)].reasons == ("outside top 1 best (rank 2, loss=0.5000)",)
    assert [decision.record.step for decision in result.deletions] == [100, 100, 200]
    assert result.summary.bytes_to_delete == 10 + 40 + 20


def test_skip_reasons_for_unknown_names() -> None:
    plain = make_record("notes.txt")
    # as the scan records a name that two templates both accept
    ambiguous = dataclasses.replace(
        make_record("ambiguous.ckpt"), note="ambiguous: matches the best and step templates"
    )
    result = by_name(plan([plain, ambiguous], Policy()))
    assert result["notes.txt"].reasons == ("unknown name: matches no checkpoint template",)
    assert result["ambiguous.ckpt"].reasons == ("ambiguous: matches the best and step templates",)


def test_incomplete_reason_includes_note() -> None:
    record = dataclasses.replace(
        make_record(step_name(1, 100), complete=False, incomplete_reason="bad zip"),
        note="not a zip archive",
    )
    result = by_name(plan([record], Policy()))
    assert result[record.name].reasons == ("bad zip; not a zip archive",)


# --------------------------------------------------------------------------------------------------
# Rule 4: last as a file, as a symlink (its target is protected), and in another directory.
# --------------------------------------------------------------------------------------------------


def test_last_file_kept_with_reason() -> None:
    result = by_name(plan(records([LAST, "last-v1.ckpt"]), Policy()))
    assert result[LAST].action is Action.KEEP
    assert result[LAST].reasons == ("last checkpoint: the resume point, always kept",)
    assert [
        decision.record.name for decision in plan(records(["last-v1.ckpt", LAST]), Policy()).decisions
    ] == [
        LAST,
        "last-v1.ckpt",
    ]


def test_last_symlink_target_is_kept_even_outside_top_k() -> None:
    old = make_record(step_name(1, 100))
    newer = [make_record(step_name(epoch, 100 * epoch)) for epoch in range(2, 6)]
    last = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=old.path)
    result = by_name(plan([last, old, *newer], Policy(save_top_k_checkpoints=2)))
    assert result[LAST].action is Action.KEEP
    assert result[LAST].reasons == (
        "last checkpoint: the resume point, always kept",
        f"symlink to {old.name}",
    )
    assert result[old.name].action is Action.KEEP
    assert result[old.name].reasons == ("target of run/last.ckpt",)
    assert {name for name, decision in result.items() if decision.action is Action.DELETE} == {
        step_name(2, 200),
        step_name(3, 300),
    }


def test_last_symlink_target_reason_at_root_group() -> None:
    """A group at the root names the link exactly ``target of last.ckpt``."""
    target = make_record(best_name(0, 10, 0.9), ROOT)
    better = make_record(best_name(1, 20, 0.1), ROOT)
    last = make_record(LAST, ROOT, entry_type=EntryType.SYMLINK, link_target=target.path)
    result = by_name(plan([target, better, last], Policy(save_top_k_best=1)))
    assert result[target.name].action is Action.KEEP
    assert result[target.name].reasons == ("target of last.ckpt",)
    assert result[better.name].action is Action.KEEP


def test_last_symlink_target_that_is_also_top_k_has_both_reasons() -> None:
    target = make_record(step_name(2, 200))
    last = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=target.path)
    result = by_name(plan([target, last], Policy(save_top_k_checkpoints=1)))
    assert result[target.name].reasons == ("newest 1 step checkpoints (#1 of 1)", "target of run/last.ckpt")


def test_last_symlink_to_target_in_another_directory_is_protected() -> None:
    target = make_record(step_name(1, 100), OTHER)
    newer_there = make_record(step_name(2, 200), OTHER)
    last = make_record(LAST, RUN, entry_type=EntryType.SYMLINK, link_target=target.path)
    mine = make_record(step_name(3, 300), RUN)
    result = plan([last, mine, target, newer_there], Policy(save_top_k_checkpoints=0))
    decisions = by_relative_path(result)
    assert decisions["other/" + target.name].action is Action.KEEP
    assert decisions["other/" + target.name].reasons == ("target of run/last.ckpt",)
    # other has no last: the target keeps the group resumable, so rule 5 does not add the newest
    assert decisions["other/" + newer_there.name].action is Action.DELETE
    assert decisions["run/" + mine.name].action is Action.DELETE
    assert decisions["run/last.ckpt"].action is Action.KEEP


def test_non_last_symlink_is_skipped_and_its_target_protected() -> None:
    target = make_record(best_name(0, 10, 0.9))
    link = make_record("best.ckpt", entry_type=EntryType.SYMLINK, link_target=target.path)
    better = make_record(best_name(1, 20, 0.1))
    result = by_name(plan([link, target, better, make_record(LAST)], Policy(save_top_k_best=1)))
    assert result["best.ckpt"].action is Action.SKIP
    assert result["best.ckpt"].reasons == ("unknown name: matches no checkpoint template",)
    assert result[target.name].action is Action.KEEP
    assert result[target.name].reasons == ("target of run/best.ckpt",)


def test_step_named_symlink_target_protected_and_link_skipped() -> None:
    target = make_record(step_name(1, 100))
    link = make_record(step_name(9, 900), entry_type=EntryType.SYMLINK, link_target=target.path)
    result = by_name(plan([link, target, make_record(step_name(2, 200))], Policy(save_top_k_checkpoints=1)))
    assert result[link.name].action is Action.SKIP
    assert result[target.name].action is Action.KEEP
    assert result[step_name(2, 200)].action is Action.KEEP


def test_last_symlink_target_that_is_incomplete_is_skipped_with_the_reason() -> None:
    target = make_record(step_name(1, 100), complete=False, incomplete_reason="still being written")
    last = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=target.path)
    result = by_name(plan([target, last], Policy()))
    assert result[target.name].action is Action.SKIP
    assert result[target.name].reasons == ("still being written", "target of run/last.ckpt")


# --------------------------------------------------------------------------------------------------
# Rule 5 with a last that cannot be used.
# --------------------------------------------------------------------------------------------------

RULE_5_REASON = "newest checkpoint: the last way to resume (no usable last.ckpt)"


def test_rule_5_reason_text() -> None:
    newest = make_record(step_name(3, 300))
    result = by_name(plan([newest, make_record(step_name(2, 200))], Policy(save_top_k_checkpoints=0)))
    assert result[newest.name].action is Action.KEEP
    assert result[newest.name].reasons == (RULE_5_REASON,)
    assert result[step_name(2, 200)].reasons == ("outside newest 0 step checkpoints (#2)",)


@pytest.mark.parametrize(
    "last",
    [
        make_record(LAST, complete=False, incomplete_reason="truncated zip"),
        make_record("last-v1.ckpt", complete=False, incomplete_reason="still being written"),
        make_record(
            LAST,
            entry_type=EntryType.SYMLINK,
            link_target=OTHER / "gone.ckpt",  # elsewhere: not a pending save_last="link" target
            complete=False,
            incomplete_reason="dangling symlink",
        ),
        make_record(
            LAST,
            entry_type=EntryType.DIRECTORY,
            complete=False,
            incomplete_reason="directory checkpoints are not pruned",
        ),
    ],
    ids=["truncated-file", "unfinished-version", "dangling-symlink", "directory"],
)
def test_rule_5_applies_when_last_is_not_usable(last: CheckpointRecord) -> None:
    newest = make_record(step_name(3, 300))
    older = make_record(best_name(2, 200, 0.1))
    result = by_name(plan([last, older, newest], Policy(save_top_k_checkpoints=0, save_top_k_best=0)))
    assert result[last.name].action is Action.KEEP  # never deleted, never skipped
    assert result[last.name].reasons[0] == "last checkpoint: the resume point, always kept"
    assert f"not usable: {last.incomplete_reason}" in result[last.name].reasons
    assert result[newest.name].action is Action.KEEP
    assert result[newest.name].reasons == (RULE_5_REASON,)
    assert result[older.name].action is Action.DELETE


def test_rule_5_ignores_incomplete_newer_files() -> None:
    unfinished = make_record(step_name(9, 900), complete=False)
    newest_complete = make_record(step_name(3, 300))
    older = make_record(step_name(2, 200))
    result = by_name(plan([unfinished, newest_complete, older], Policy(save_top_k_checkpoints=0)))
    assert result[unfinished.name].action is Action.SKIP
    assert result[newest_complete.name].action is Action.KEEP
    assert result[older.name].action is Action.DELETE


def test_rule_5_not_applied_to_groups_with_only_skipped_entries() -> None:
    result = by_name(plan([make_record("notes.txt"), make_record(step_name(1, 1), complete=False)], Policy()))
    assert {decision.action for decision in result.values()} == {Action.SKIP}


def test_rule_5_usable_last_version_suffices_even_if_last_is_broken() -> None:
    broken = make_record(LAST, complete=False)
    usable = make_record("last-v1.ckpt")
    step = make_record(step_name(1, 100))
    result = by_name(plan([broken, usable, step], Policy(save_top_k_checkpoints=0)))
    assert result[step.name].action is Action.DELETE


# --------------------------------------------------------------------------------------------------
# Groups: each directory is ranked and protected on its own.
# --------------------------------------------------------------------------------------------------


def test_groups_are_planned_independently() -> None:
    nested = ROOT / "nested" / "deep"
    run = [make_record(step_name(epoch, 100 * epoch), RUN) for epoch in range(1, 4)]
    other = [make_record(step_name(epoch, 10 * epoch), OTHER) for epoch in range(1, 3)]
    deep = [make_record(best_name(epoch, epoch, 0.1 * epoch), nested) for epoch in range(1, 3)]
    lasts = [make_record(LAST, RUN)]
    result = plan(
        [*deep, *run, *other, *lasts],
        Policy(save_top_k_checkpoints=1, save_top_k_best=0),
    )
    assert [group.directory for group in result.groups] == sorted([RUN, OTHER, nested])
    decisions = by_relative_path(result)
    # each group keeps its own newest step, even though /ckpt/other's steps are older than /ckpt/run's
    assert decisions["run/" + step_name(3, 300)].action is Action.KEEP
    assert decisions["run/" + step_name(2, 200)].action is Action.DELETE
    assert decisions["other/" + step_name(2, 20)].action is Action.KEEP
    assert decisions["other/" + step_name(2, 20)].reasons == ("newest 1 step checkpoints (#1 of 1)",)
    assert decisions["other/" + step_name(1, 10)].action is Action.DELETE
    # nested/deep has no last and keeps no best: rule 5 keeps its newest, run's last does not count
    assert decisions["nested/deep/" + best_name(2, 2, 0.2)].reasons == (RULE_5_REASON,)
    assert decisions["nested/deep/" + best_name(1, 1, 0.1)].action is Action.DELETE
    for group in result.groups:
        assert {decision.record.directory for decision in group.decisions} == {group.directory}


def test_same_names_in_two_groups_are_distinct_records() -> None:
    names = [step_name(1, 100), step_name(2, 200)]
    result = plan(
        [*records(names, RUN), *records(names, OTHER), make_record(LAST, OTHER)],
        Policy(save_top_k_checkpoints=0),
    )
    decisions = by_relative_path(result)
    assert decisions["run/" + names[1]].action is Action.KEEP  # rule 5 in run only
    assert decisions["run/" + names[0]].action is Action.DELETE
    assert decisions["other/" + names[1]].action is Action.DELETE
    assert decisions["other/" + names[0]].action is Action.DELETE


# --------------------------------------------------------------------------------------------------
# protect globs and pins.
# --------------------------------------------------------------------------------------------------


def test_protect_glob_on_name_keeps_matching_files() -> None:
    old = make_record(step_name(1, 100))
    old_best = make_record(best_name(0, 50, 0.9))
    newest = make_record(step_name(5, 500))
    policy = protecting("epoch=01-*", "best_*_loss=0.9*", save_top_k_checkpoints=1, save_top_k_best=0)
    result = by_name(plan([old, old_best, newest, make_record(step_name(2, 200))], policy))
    assert result[old.name].action is Action.KEEP
    assert result[old.name].reasons == ("matches protect pattern 'epoch=01-*'",)
    assert result[old_best.name].reasons == ("matches protect pattern 'best_*_loss=0.9*'",)
    assert result[newest.name].action is Action.KEEP
    assert result[step_name(2, 200)].action is Action.DELETE


def test_protect_glob_on_relative_path_only_matches_that_directory() -> None:
    policy = protecting("other/*", save_top_k_checkpoints=0)
    result = plan(
        [
            make_record(step_name(1, 100), RUN),
            make_record(step_name(1, 100), OTHER),
            make_record(LAST, RUN),
            make_record(LAST, OTHER),
        ],
        policy,
    )
    decisions = by_relative_path(result)
    assert decisions["other/" + step_name(1, 100)].action is Action.KEEP
    assert decisions["other/" + step_name(1, 100)].reasons == ("matches protect pattern 'other/*'",)
    assert decisions["run/" + step_name(1, 100)].action is Action.DELETE


def test_protect_glob_is_case_sensitive_and_never_unskips() -> None:
    policy = protecting("EPOCH=*", "*.txt", save_top_k_checkpoints=0)
    result = by_name(plan([make_record(step_name(1, 100)), make_record("a.txt"), make_record(LAST)], policy))
    assert result[step_name(1, 100)].action is Action.DELETE
    assert result["a.txt"].action is Action.SKIP


def test_pins_keep_paths_with_the_given_reason() -> None:
    pinned = make_record(step_name(1, 100))
    pinned_best = make_record(best_name(1, 100, 0.9))
    pinned_skip = make_record("notes.txt")
    pinned_last = make_record(LAST)
    pins = {
        pinned.path: "pinned by the user",
        pinned_best.path: "evaluation in progress",
        pinned_skip.path: "pinned too",
        pinned_last.path: "resume pin",
        RUN / "not-there.ckpt": "ignored",
    }
    result = by_name(
        plan(
            [pinned, pinned_best, pinned_skip, pinned_last],
            Policy(save_top_k_checkpoints=0, save_top_k_best=0),
            pins,
        )
    )
    assert result[pinned.name].action is Action.KEEP
    assert result[pinned.name].reasons == ("pinned by the user",)
    assert result[pinned_best.name].reasons == ("evaluation in progress",)
    assert result["notes.txt"].action is Action.SKIP
    assert result["notes.txt"].reasons == ("unknown name: matches no checkpoint template", "pinned too")
    assert result[LAST].reasons == ("last checkpoint: the resume point, always kept", "resume pin")
    assert len(result) == 4


def test_pins_in_one_group_do_not_affect_same_name_elsewhere() -> None:
    run_step = make_record(step_name(1, 100), RUN)
    other_step = make_record(step_name(1, 100), OTHER)
    result = plan(
        [run_step, other_step, make_record(LAST, RUN), make_record(LAST, OTHER)],
        Policy(save_top_k_checkpoints=0),
        {run_step.path: "pinned"},
    )
    decisions = by_relative_path(result)
    assert decisions["run/" + run_step.name].action is Action.KEEP
    assert decisions["other/" + other_step.name].action is Action.DELETE


def test_pin_counts_as_a_kept_checkpoint_for_rule_5() -> None:
    old = make_record(step_name(1, 100))
    new = make_record(step_name(2, 200))
    result = by_name(plan([old, new], Policy(save_top_k_checkpoints=0), {old.path: "pinned"}))
    assert result[old.name].action is Action.KEEP
    assert result[new.name].action is Action.DELETE


# --------------------------------------------------------------------------------------------------
# Reasons text.
# --------------------------------------------------------------------------------------------------


def test_reasons_text_for_steps() -> None:
    steps = [make_record(step_name(epoch, 100 * epoch)) for epoch in range(1, 8)]
    result = by_name(plan(steps, Policy(save_top_k_checkpoints=5)))
    assert result[step_name(7, 700)].reasons == ("newest 5 step checkpoints (#1 of 5)",)
    assert result[step_name(6, 600)].reasons == ("newest 5 step checkpoints (#2 of 5)",)
    assert result[step_name(3, 300)].reasons == ("newest 5 step checkpoints (#5 of 5)",)
    assert result[step_name(2, 200)].reasons == ("outside newest 5 step checkpoints (#6)",)
    assert result[step_name(1, 100)].reasons == ("outside newest 5 step checkpoints (#7)",)
    everything = by_name(plan(steps, Policy(save_top_k_checkpoints=-1)))
    assert everything[step_name(1, 100)].reasons == (
        "all step checkpoints kept (save_top_k_checkpoints: -1)",
    )


def test_reasons_text_for_bests() -> None:
    losses = [0.1, 0.2, 0.3, 0.35, 0.41]
    bests = [make_record(best_name(index, 10 * index, loss)) for index, loss in enumerate(losses)]
    result = by_name(plan([*bests, make_record(LAST)], Policy(save_top_k_best=3)))
    assert result[best_name(0, 0, 0.1)].reasons == ("top 3 best (rank 1, loss=0.1000)",)
    assert result[best_name(2, 20, 0.3)].reasons == ("top 3 best (rank 3, loss=0.3000)",)
    assert result[best_name(4, 40, 0.41)].reasons == ("outside top 3 best (rank 5, loss=0.4100)",)
    assert result[best_name(4, 40, 0.41)].action is Action.DELETE
    nan = make_record(best_name(9, 90, NAN))
    everything = by_name(plan([*bests, nan], Policy(save_top_k_best=-1)))
    assert everything[nan.name].reasons == ("all best checkpoints kept (rank 6, loss=nan)",)
    assert everything[best_name(1, 10, 0.2)].reasons == ("all best checkpoints kept (rank 2, loss=0.2000)",)


def test_reasons_text_for_every_n_epochs() -> None:
    steps = [make_record(step_name(epoch, step)) for epoch, step in [(1, 100), (1, 150), (2, 200), (3, 300)]]
    result = by_name(plan(steps, Policy(save_top_k_checkpoints=1, save_every_n_epochs=2)))
    assert result[step_name(3, 300)].reasons == (
        "newest 1 step checkpoints (#1 of 1)",
        "newest of epoch 3 (save_every_n_epochs: 2)",
    )
    assert result[step_name(1, 150)].reasons == ("newest of epoch 1 (save_every_n_epochs: 2)",)
    assert result[step_name(1, 100)].action is Action.DELETE
    assert result[step_name(1, 100)].reasons == (
        "outside newest 1 step checkpoints (#4)",
        "not the newest of epoch 1",
    )
    assert result[step_name(2, 200)].reasons == ("outside newest 1 step checkpoints (#2)",)


def test_every_decision_has_a_reason() -> None:
    recs = [
        *records(
            [LAST, "notes.txt", step_name(1, 1), step_name(2, 2), best_name(1, 1, 0.5), best_name(2, 2, NAN)]
        ),
        make_record(step_name(3, 3), complete=False),
    ]
    for decision in plan(recs, Policy(save_top_k_checkpoints=1, save_top_k_best=1)).decisions:
        assert decision.reasons
        assert all(reason.strip() for reason in decision.reasons)


# --------------------------------------------------------------------------------------------------
# Summary, byte counts and the order of deletions.
# --------------------------------------------------------------------------------------------------


def test_summary_counts_and_bytes() -> None:
    run = [
        make_record(LAST, RUN, size=7),
        make_record(step_name(1, 100), RUN, size=100),
        make_record(step_name(2, 200), RUN, size=200),
        make_record(step_name(3, 300), RUN, size=300),
        make_record(best_name(1, 100, 0.5), RUN, size=11),
        make_record(best_name(2, 200, 0.4), RUN, size=13),
        make_record("notes.txt", RUN, size=5000),
        make_record(step_name(4, 400), RUN, size=4000, complete=False),
        make_record(step_name(5, 500), RUN, entry_type=EntryType.DIRECTORY, complete=False),
    ]
    other = [
        make_record(step_name(1, 10), OTHER, size=1),
        make_record(step_name(2, 20), OTHER, size=2),
    ]
    result = plan([*run, *other], Policy(save_top_k_checkpoints=1, save_top_k_best=1))
    groups = {group.directory: group for group in result.groups}
    assert groups[RUN].summary == Summary(kept=3, to_delete=3, skipped=3, bytes_to_delete=311, bytes_kept=320)
    assert groups[OTHER].summary == Summary(kept=1, to_delete=1, skipped=0, bytes_to_delete=1, bytes_kept=2)
    assert result.summary == Summary(kept=4, to_delete=4, skipped=3, bytes_to_delete=312, bytes_kept=322)
    assert result.summary == groups[RUN].summary + groups[OTHER].summary
    assert len(result.deletions) == result.summary.to_delete
    assert sum(decision.record.bytes for decision in result.deletions) == result.summary.bytes_to_delete


def test_empty_input_gives_an_empty_plan() -> None:
    result = plan([], Policy())
    assert result.groups == ()
    assert result.summary == Summary()
    assert result.deletions == ()


def test_group_deletions_list_steps_oldest_first() -> None:
    steps = [step_name(epoch, step) for epoch, step in [(3, 999_999), (1, 10), (4, 1_000_000), (2, 200)]]
    steps.append(step_name(4, 1_000_000, version=1))
    steps.append(step_name(9, 2_000_000))
    result = plan(records([*steps, LAST]), Policy(save_top_k_checkpoints=1))
    (group,) = result.groups
    assert [decision.record.name for decision in group.deletions] == [
        step_name(1, 10),
        step_name(2, 200),
        step_name(3, 999_999),
        step_name(4, 1_000_000),
        step_name(4, 1_000_000, version=1),
    ]
    assert result.deletions == group.deletions


def test_group_deletions_list_bests_oldest_first() -> None:
    # losses do not fall monotonically, so worst-first and oldest-first differ
    bests = [best_name(0, 100, 0.1), best_name(1, 200, 0.3), best_name(2, 300, 0.2)]
    result = plan(records([*bests, LAST]), Policy(save_top_k_best=0))
    (group,) = result.groups
    assert [decision.record.step for decision in group.deletions] == [100, 200, 300]


def test_group_deletions_interleave_steps_and_bests_oldest_first() -> None:
    names = [step_name(3, 400), best_name(0, 100, 0.1), step_name(0, 50)]
    result = plan(records([*names, LAST]), Policy(save_top_k_checkpoints=0, save_top_k_best=0))
    (group,) = result.groups
    assert [decision.record.step for decision in group.deletions] == [50, 100, 400]


# --------------------------------------------------------------------------------------------------
# Determinism.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (best_name(1, 100, 0.5, date="20261128"), best_name(1, 100, 0.5, date="20261129")),
        (best_name(1, 100, -0.0, date="20261128"), best_name(1, 100, 0.0, date="20261128")),
        (best_name(1, 100, NAN, date="20261128"), best_name(1, 100, NAN, date="20261201")),
    ],
    ids=["date-only", "signed-zero", "nan-date"],
)
def test_fully_tied_bests_are_ranked_independently_of_input_order(first: str, second: str) -> None:
    """Regression: bests equal in metric, step, epoch and version used to be ranked by input order."""
    policy = Policy(save_top_k_checkpoints=0, save_top_k_best=1)
    forward = by_name(plan(records([first, second, LAST]), policy))
    backward = by_name(plan(records([second, first, LAST]), policy))
    assert {name: decision.action for name, decision in forward.items()} == {
        name: decision.action for name, decision in backward.items()
    }
    assert [forward[first].action, forward[second].action].count(Action.KEEP) == 1
    if make_record(first).date != make_record(second).date:
        assert forward[first].action is Action.KEEP  # the earlier date reached that metric first


def test_fully_tied_bests_with_a_protected_one_keep_the_same_count_in_any_order() -> None:
    """Regression: with a tie ranked by input order, protecting one of the pair changed the counts."""
    target = make_record(best_name(0, 0, NAN, date="20261128"))
    twin = make_record(best_name(0, 0, NAN, date="20261129"))
    link = make_record(step_name(0, 0), entry_type=EntryType.SYMLINK, link_target=target.path)
    policy = Policy(save_top_k_checkpoints=0, save_top_k_best=1)
    last = make_record(LAST)
    forward = plan([last, link, twin, target], policy)
    backward = plan([target, twin, link, last], policy)
    assert forward.summary == backward.summary
    assert {d.record.name: d.action for d in forward.decisions} == {
        d.record.name: d.action for d in backward.decisions
    }


def test_shared_symlink_target_reasons_do_not_depend_on_input_order() -> None:
    target = make_record(step_name(1, 100))
    last = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=target.path)
    alias = make_record("latest.ckpt", entry_type=EntryType.SYMLINK, link_target=target.path)
    policy = Policy(save_top_k_checkpoints=0)
    forward = by_name(plan([last, alias, target], policy))[target.name].reasons
    backward = by_name(plan([alias, last, target], policy))[target.name].reasons
    assert forward == backward == ("target of run/last.ckpt",)


def test_shared_symlink_target_without_last_names_the_first_link_by_path() -> None:
    target = make_record(step_name(1, 100))
    links = [
        make_record(name, entry_type=EntryType.SYMLINK, link_target=target.path)
        for name in ("zeta.ckpt", "alpha.ckpt")
    ]
    for ordering in ([*links, target], [target, *reversed(links)]):
        reasons = by_name(plan(ordering, Policy(save_top_k_checkpoints=0)))[target.name].reasons
        assert reasons == ("target of run/alpha.ckpt",)


def test_records_are_not_mutated_and_plan_is_repeatable() -> None:
    recs = records([LAST, step_name(1, 1), step_name(2, 2), best_name(1, 1, 0.1), "notes.txt"])
    snapshot = [dataclasses.replace(record) for record in recs]
    policy = Policy(save_top_k_checkpoints=1, save_top_k_best=0)
    first = plan(iter(recs), policy)  # any iterable, consumed once
    second = plan(recs, policy)
    assert first == second
    assert recs == snapshot


def test_record_kinds_used_in_table_are_what_the_names_say() -> None:
    """Guard the fixtures: a typo in a table name would silently become an unknown skip."""
    for example in CASES:
        for name in example.keep | example.delete:
            assert make_record(name).kind is not Kind.UNKNOWN, name


# --------------------------------------------------------------------------------------------------
# Later additions to the planner: <name>.keep pins, a pending save_last="link" target, per-run policies.
# --------------------------------------------------------------------------------------------------


def test_keep_marker_pins_its_checkpoint() -> None:
    old = make_record(step_name(1, 100))
    old_best = make_record(best_name(1, 100, 0.9))
    marker = make_record(old.name + ".keep", size=0)
    best_marker = make_record(old_best.name + ".keep", entry_type=EntryType.DIRECTORY, complete=False)
    newest = make_record(step_name(2, 200))
    recs = [old, old_best, marker, best_marker, newest, make_record(LAST)]
    result = by_name(plan(recs, Policy(save_top_k_checkpoints=1, save_top_k_best=0)))
    assert result[old.name].action is Action.KEEP
    assert result[old.name].reasons == (f"pinned by {old.name}.keep",)
    assert result[old_best.name].reasons == (f"pinned by {old_best.name}.keep",)
    assert result[marker.name].action is Action.SKIP
    assert result[newest.name].action is Action.KEEP


def test_keep_marker_only_pins_its_own_directory_and_exact_name() -> None:
    step = step_name(1, 100)
    recs = [
        make_record(step, RUN),
        make_record(step + ".keep", OTHER),  # another group
        make_record(step_name(2, 200), RUN),
        make_record(step_name(2, 200).removesuffix(".ckpt") + ".keep", RUN),  # not <name>.keep
        make_record(LAST, RUN),
    ]
    decisions = by_relative_path(plan(recs, Policy(save_top_k_checkpoints=0)))
    assert decisions["run/" + step].action is Action.DELETE
    assert decisions["run/" + step_name(2, 200)].action is Action.DELETE


def test_keep_marker_counts_as_kept_for_rule_5() -> None:
    old = make_record(step_name(1, 100))
    newest = make_record(step_name(2, 200))
    result = by_name(plan([old, newest, make_record(old.name + ".keep")], Policy(save_top_k_checkpoints=0)))
    assert result[old.name].action is Action.KEEP
    assert result[newest.name].action is Action.DELETE


PENDING_STEP = "newest step checkpoint: last.ckpt does not point at it yet"
PENDING_BEST = "newest best checkpoint: last.ckpt does not point at it yet"
WRITTEN_SINCE = "written after last.ckpt was made: it may be where the link moves next"


def written_at(record: CheckpointRecord, mtime_ns: int) -> CheckpointRecord:
    """``record`` as last modified at ``mtime_ns`` (a symlink: when it was made)."""
    assert record.identity is not None
    return dataclasses.replace(record, identity=dataclasses.replace(record.identity, mtime_ns=mtime_ns))


def link_to(target: CheckpointRecord, made_at: int = 10**18, name: str = LAST) -> CheckpointRecord:
    """A ``save_last="link"`` link to ``target``, made at ``made_at`` (after every file the factories
    write, at mtime 0, unless told)."""
    return written_at(make_record(name, entry_type=EntryType.SYMLINK, link_target=target.path), made_at)


def test_last_link_to_an_older_step_keeps_the_newest_step_until_it_moves() -> None:
    """save_last="link": Lightning saves the new checkpoint first and moves last.ckpt afterwards."""
    old = make_record(step_name(1, 100))
    middle = make_record(step_name(2, 200))
    newest = make_record(step_name(3, 300))
    newest_v1 = make_record(step_name(3, 300, version=1))
    newest_best = make_record(best_name(3, 300, 0.9))
    last = link_to(old)
    policy = Policy(save_top_k_checkpoints=0, save_top_k_best=0)
    result = by_name(plan([last, old, middle, newest, newest_v1, newest_best], policy))
    assert result[old.name].reasons == ("target of run/last.ckpt",)
    assert result[newest.name].reasons == (PENDING_STEP,)
    assert result[newest_v1.name].reasons == (PENDING_STEP,)  # every step checkpoint at the newest step
    # the link moves within its own kind (the callback that owns it), so the newest best may go
    assert result[newest_best.name].action is Action.DELETE
    assert result[middle.name].action is Action.DELETE
    # once the link points at the newest, the previous target goes
    moved = dataclasses.replace(last, link_target=newest_v1.path)
    after = by_name(plan([moved, old, middle, newest, newest_v1, newest_best], policy))
    assert after[newest_v1.name].reasons == ("target of run/last.ckpt",)
    assert after[old.name].action is Action.DELETE
    assert after[newest.name].action is Action.DELETE


def test_last_link_to_an_older_best_keeps_the_newest_best() -> None:
    old_best = make_record(best_name(1, 100, 0.1))
    new_best = make_record(best_name(2, 200, 0.9))
    newest_step = make_record(step_name(3, 300))
    last = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=old_best.path)
    result = by_name(
        plan([last, old_best, new_best, newest_step], Policy(save_top_k_checkpoints=0, save_top_k_best=0))
    )
    assert result[new_best.name].reasons == (PENDING_BEST,)
    assert result[newest_step.name].action is Action.DELETE


def test_dangling_last_link_keeps_the_newest_of_each_kind() -> None:
    gone = RUN / step_name(4, 400)
    last = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=gone, complete=False)
    step = make_record(step_name(3, 300))
    older = make_record(step_name(2, 200))
    best = make_record(best_name(1, 100, 0.5))
    result = by_name(plan([last, step, older, best], Policy(save_top_k_checkpoints=0, save_top_k_best=0)))
    assert result[step.name].reasons == (PENDING_STEP,)
    assert result[best.name].reasons == (PENDING_BEST,)
    assert result[older.name].action is Action.DELETE


def resume_point(target: str) -> str:
    return f"written last before last.ckpt moved to {target}, not whole yet: the resume point"


def test_a_link_moved_to_a_save_not_written_yet_keeps_the_whole_one_written_last() -> None:
    """A run resumed from step 200 below an abandoned step 400, with Lightning's AsyncCheckpointIO: the
    link moves to step 350 before the save's thread writes it. The newest by step is the abandoned
    branch's; the live run's resume point is step 300, the whole one written last."""
    old = written_at(make_record(step_name(0, 100)), 1)
    abandoned = written_at(make_record(step_name(3, 400)), 2)
    resumed = written_at(make_record(step_name(1, 200)), 3)
    live = written_at(make_record(step_name(2, 300)), 4)
    last = link_to(make_record(step_name(2, 350), complete=False), made_at=5)
    result = by_name(plan([old, abandoned, resumed, live, last], Policy(save_top_k_checkpoints=1)))
    assert result[live.name].reasons == (resume_point(step_name(2, 350)),)
    assert result[abandoned.name].action is Action.KEEP
    assert result[resumed.name].action is Action.DELETE
    assert result[old.name].action is Action.DELETE


@pytest.mark.parametrize("entry_type", [EntryType.FILE, EntryType.DIRECTORY])
def test_a_link_to_a_checkpoint_not_whole_yet_keeps_the_newest_whole_one(entry_type: EntryType) -> None:
    """A save across file systems copies the bytes in under the final name, a directory checkpoint
    is within its quiet time: the link already names it. Milestones keep step 100 (so the last way to
    resume, rule 5, does not apply); step 150 is what a kill now leaves to resume from."""
    milestone = written_at(make_record(step_name(0, 100), entry_type=entry_type), 1)
    whole = written_at(make_record(step_name(1, 150), entry_type=entry_type), 2)
    partial = written_at(make_record(step_name(2, 200), entry_type=entry_type, complete=False), 3)
    last = link_to(partial, made_at=3)
    policy = Policy(save_top_k_checkpoints=0, keep_every_n_steps=100)
    records = [milestone, whole, partial, last]
    if entry_type is EntryType.DIRECTORY:  # the factories count only files whole: a directory's verdict
        records = [dataclasses.replace(record, complete=True) for record in (milestone, whole)] + [
            partial,
            last,
        ]
    result = by_name(plan(records, policy))
    assert result[whole.name].reasons == (
        f"newest step checkpoint: last.ckpt points at {partial.name}, not whole yet",
    )
    assert result[partial.name].action is Action.SKIP


def test_a_link_to_a_best_not_whole_yet_keeps_the_newest_whole_best() -> None:
    first = written_at(make_record(best_name(0, 100, 0.2)), 1)
    second = written_at(make_record(best_name(1, 200, 0.5)), 2)
    partial = make_record(best_name(2, 300, 0.4), complete=False)
    steps = [written_at(make_record(step_name(2, 300)), 3)]
    result = by_name(plan([first, second, partial, link_to(partial), *steps], Policy(save_top_k_best=1)))
    assert result[second.name].reasons == (
        f"newest best checkpoint: last.ckpt points at {partial.name}, not whole yet",
    )
    assert result[first.name].reasons == ("top 1 best (rank 1, loss=0.2000)",)


def test_pending_link_reasons_do_not_depend_on_input_order() -> None:
    step = make_record(step_name(0, 0))
    links = [
        make_record(name, entry_type=EntryType.SYMLINK, link_target=RUN / "gone.ckpt", complete=False)
        for name in (LAST, "last-v1.ckpt")
    ]
    policy = Policy(save_top_k_checkpoints=0, save_top_k_best=0)
    forward = by_name(plan([step, *links], policy))[step.name].reasons
    backward = by_name(plan([step, *reversed(links)], policy))[step.name].reasons
    assert forward == backward


def test_last_link_into_another_directory_is_not_a_pending_link() -> None:
    elsewhere = make_record(step_name(1, 100), OTHER)
    newest = make_record(step_name(3, 300), RUN)
    older = make_record(step_name(2, 200), RUN)
    last = make_record(LAST, RUN, entry_type=EntryType.SYMLINK, link_target=elsewhere.path)
    decisions = by_relative_path(
        plan([last, elsewhere, newest, older, make_record(LAST, OTHER)], Policy(save_top_k_checkpoints=0))
    )
    assert decisions["run/" + newest.name].action is Action.DELETE
    assert decisions["other/" + elsewhere.name].action is Action.KEEP


def test_group_policies_override_the_policy_per_directory() -> None:
    names = [step_name(epoch, 100 * epoch) for epoch in range(1, 5)]
    recs = [*records(names, RUN), *records(names, OTHER)]
    result = plan(
        recs,
        Policy(save_top_k_checkpoints=1),
        group_policies={OTHER: Policy(save_top_k_checkpoints=3)},
    )
    decisions = by_relative_path(result)
    assert [decisions["run/" + name].action for name in names] == [Action.DELETE] * 3 + [Action.KEEP]
    assert [decisions["other/" + name].action for name in names] == [Action.DELETE] + [Action.KEEP] * 3
    assert decisions["other/" + names[1]].reasons == ("newest 3 step checkpoints (#3 of 3)",)


def test_last_link_to_another_last_file_is_not_a_pending_move() -> None:
    """last.ckpt -> last-v1.ckpt (a kept file, not a candidate): nothing is about to become its target."""
    other_last = make_record("last-v1.ckpt")
    link = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=other_last.path)
    newest = make_record(step_name(3, 300))
    result = by_name(plan([link, other_last, newest], Policy(save_top_k_checkpoints=0, save_top_k_best=0)))
    assert result[newest.name].action is Action.DELETE
    assert result[LAST].action is Action.KEEP
    assert result["last-v1.ckpt"].action is Action.KEEP


BEST_DIR = RUN / "best"  # Lightning's ``filename="best/best_{epoch}..."``: a directory below dirpath
PENDING_FROM_ABOVE = "newest {kind} checkpoint: run/last.ckpt does not point at it yet"
WRITTEN_SINCE_FROM_ABOVE = "written after run/last.ckpt was made: it may be where the link moves next"

# (id, the link's target (index into the files, None: gone), the link's mtime, files in run/best as
#  (kind, step, metric, mtime), policy, how it is planned, expected reasons of each file (() = deleted))
FROM_ABOVE_CASES: list[
    tuple[str, int | None, int, list[tuple[str, int, float, int]], dict[str, int], str, list[tuple[str, ...]]]
] = [
    (
        "best-saved-link-not-moved-yet",
        0,
        15,
        [("best", 100, 0.1, 10), ("best", 200, 0.5, 20)],
        {"save_top_k_best": 1, "save_top_k_checkpoints": 0},
        "alone",
        [
            ("top 1 best (rank 1, loss=0.1000)", "target of run/last.ckpt"),
            (PENDING_FROM_ABOVE.format(kind="best"),),
        ],
    ),
    (
        "same-in-one-plan-of-every-group",
        0,
        15,
        [("best", 100, 0.1, 10), ("best", 200, 0.5, 20)],
        {"save_top_k_best": 1, "save_top_k_checkpoints": 0},
        "together",
        [
            ("top 1 best (rank 1, loss=0.1000)", "target of run/last.ckpt"),
            (PENDING_FROM_ABOVE.format(kind="best"),),
        ],
    ),
    (
        "without-the-link-fact-the-save-goes",
        0,
        15,
        [("best", 100, 0.1, 10), ("best", 200, 0.5, 20)],
        {"save_top_k_best": 1, "save_top_k_checkpoints": 0},
        "alone-without-links",
        [("top 1 best (rank 1, loss=0.1000)", "target of run/last.ckpt"), ()],
    ),
    (
        "steps-top-0",
        0,
        15,
        [("step", 100, 0.0, 10), ("step", 200, 0.0, 20), ("step", 150, 0.0, 5)],
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        "alone",
        [("target of run/last.ckpt",), (PENDING_FROM_ABOVE.format(kind="step"),), ()],
    ),
    (
        "moved-the-old-target-goes",
        1,
        25,
        [("step", 100, 0.0, 10), ("step", 200, 0.0, 20)],
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        "alone",
        [(), ("target of run/last.ckpt",)],
    ),
    (
        "rolled-back-save-below-the-newest",
        2,
        41,
        [("step", 16, 0.0, 16), ("step", 32, 0.0, 32), ("step", 40, 0.0, 40), ("step", 20, 0.0, 50)],
        {"save_top_k_checkpoints": 1, "save_top_k_best": 0},
        "alone",
        [
            (),
            (),
            ("newest 1 step checkpoints (#1 of 1)", "target of run/last.ckpt"),
            (WRITTEN_SINCE_FROM_ABOVE,),
        ],
    ),
    (
        "dangling-keeps-the-newest-of-each-kind",
        None,
        15,
        [("step", 100, 0.0, 10), ("step", 200, 0.0, 20), ("best", 100, 0.3, 10)],
        {"save_top_k_checkpoints": 0, "save_top_k_best": 0},
        "alone",
        [(), (PENDING_FROM_ABOVE.format(kind="step"),), (PENDING_FROM_ABOVE.format(kind="best"),)],
    ),
]


def _file_in_best(kind: str, step: int, metric: float, mtime: int) -> CheckpointRecord:
    name = step_name(0, step) if kind == "step" else best_name(0, step, metric)
    return written_at(make_record(name, BEST_DIR), mtime)


@pytest.mark.parametrize(
    ("target", "made", "files", "policy", "how", "expected"),
    [case[1:] for case in FROM_ABOVE_CASES],
    ids=[case[0] for case in FROM_ABOVE_CASES],
)
def test_save_last_link_rules_reach_a_subdirectory_the_link_points_into(
    target: int | None,
    made: int,
    files: list[tuple[str, int, float, int]],
    policy: dict[str, int],
    how: str,
    expected: list[tuple[str, ...]],
) -> None:
    """run/last.ckpt -> best/<name>: Lightning's ``filename`` with a ``/`` writes in run/best, and
    moves the link in run there after each save (after its loggers). Planned alone (an event pass,
    ``links_into``) or with run's records, run/best keeps what the link is about to name."""
    in_best = [_file_in_best(*file) for file in files]
    target_path = in_best[target].path if target is not None else BEST_DIR / step_name(0, 999)
    link = link_to(make_record("x.ckpt"), made_at=made)
    link = dataclasses.replace(link, link_target=target_path)
    pins = {target_path: "target of run/last.ckpt"}
    if how == "together":
        result = plan([link, *in_best], Policy(**policy))
    else:
        links = [LinkInto("run/last.ckpt", target_path, made)] if how == "alone" else []
        result = plan(in_best, Policy(**policy), pins, links_into=links)
    decisions = by_relative_path(result)
    for record, reasons in zip(in_best, expected, strict=True):
        decision = decisions[record.relative_path]
        assert decision.reasons == reasons if reasons else decision.action is Action.DELETE, record.name
        assert (decision.action is Action.KEEP) == bool(reasons), record.name


def test_a_link_into_a_sibling_run_gives_no_pending_rule_there() -> None:
    """other/last.ckpt -> ../run/x: not Lightning's own (its dirpath never points sideways); the
    target is kept, the newest of run is not held for it."""
    target = make_record(step_name(0, 100))
    newest = make_record(step_name(0, 200))
    link = make_record(LAST, OTHER, entry_type=EntryType.SYMLINK, link_target=target.path)
    decisions = by_relative_path(plan([link, target, newest], Policy(save_top_k_checkpoints=0)))
    assert decisions["run/" + target.name].reasons == ("target of other/last.ckpt",)
    assert decisions["run/" + newest.name].action is Action.DELETE


HOLDS_CASES: list[tuple[str, Mapping[str, Any], dict[str, frozenset[Hold]]]] = [
    (
        "each-rule-its-hold",
        {
            "save_top_k_checkpoints": 2,
            "save_every_n_epochs": 1,
            "save_top_k_best": 2,
            "keep_every_n_steps": 300,
        },
        {
            step_name(2, 400): frozenset({Hold.NEWEST_STEPS, Hold.EPOCH_END}),
            step_name(1, 350): frozenset({Hold.NEWEST_STEPS, Hold.EPOCH_END}),
            step_name(1, 300): frozenset({Hold.MILESTONE}),
            step_name(0, 200): frozenset({Hold.EPOCH_END}),
            step_name(0, 0): frozenset({Hold.MILESTONE}),
            best_name(1, 300, 0.2): frozenset({Hold.BEST_FIRST}),
            best_name(0, 200, 0.3): frozenset({Hold.BEST}),
            best_name(0, 100, 0.4): frozenset(),
            step_name(0, 100): frozenset(),
        },
    ),
    (
        "keep-all-rules-hold-too",
        {"save_top_k_checkpoints": -1, "save_top_k_best": -1},
        {
            step_name(0, 100): frozenset({Hold.NEWEST_STEPS}),
            best_name(0, 100, 0.5): frozenset({Hold.BEST}),
            best_name(0, 200, 0.1): frozenset({Hold.BEST_FIRST}),
        },
    ),
]


@pytest.mark.parametrize(
    ("policy", "expected"), [case[1:] for case in HOLDS_CASES], ids=[c[0] for c in HOLDS_CASES]
)
def test_each_kept_checkpoint_says_which_rules_hold_it(
    policy: Mapping[str, Any], expected: dict[str, frozenset[Hold]]
) -> None:
    decisions = by_name(plan(records([LAST, *expected]), Policy.model_validate(policy)))
    assert decisions[LAST].holds == {Hold.PROTECTED}
    for name, holds in expected.items():
        assert decisions[name].holds == holds, name
        assert (decisions[name].action is Action.KEEP) == bool(holds), name
        assert not decisions[name].evicted


def test_every_protection_is_a_protected_hold() -> None:
    names = [step_name(0, 100), step_name(0, 200), step_name(0, 300), step_name(0, 400), step_name(0, 500)]
    linked = make_record("last.ckpt", RUN, entry_type=EntryType.SYMLINK, link_target=RUN / names[0])
    group = [
        linked,
        *records(names),
        make_record(names[1] + ".keep", RUN),
    ]
    policy = Policy.model_validate({"save_top_k_checkpoints": 0, "protect": [names[2]]})
    pins = {RUN / names[3]: "resume source in train.yaml (ckpt_path)"}
    decisions = by_name(plan(group, policy, pins))
    for name in names:  # the link's target, a .keep pin, a protect glob, a resume source, the pending target
        assert decisions[name].action is Action.KEEP
        assert decisions[name].holds == {Hold.PROTECTED}, name
    assert "does not point at it yet" in decisions[names[4]].reasons[0]


def test_the_newest_as_last_way_to_resume_is_a_protected_hold() -> None:
    names = [step_name(0, 100), step_name(0, 200)]
    decisions = by_name(plan(records(names), Policy.model_validate({"save_top_k_checkpoints": 0})))
    assert decisions[names[1]].holds == {Hold.PROTECTED}
    assert decisions[names[0]].action is Action.DELETE


def test_a_milestone_says_so() -> None:
    decisions = by_name(
        plan(records([step_name(1, 2000)]), Policy.model_validate({"keep_every_n_steps": 500}))
    )
    assert decisions[step_name(1, 2000)].reasons == (
        "newest 5 step checkpoints (#1 of 5)",
        "milestone: step 2000 (keep_every_n_steps: 500)",
    )


def test_a_ranked_reason_is_the_same_text_however_it_is_held() -> None:
    """The step ranking's reason is held as a template and a rank and put together when read: the text
    is the one a formatted reason gives, also with reasons after it."""
    record = make_record(step_name(0, 100))
    ranked = Decision(record, Action.DELETE, ("outside newest 5 step checkpoints (#%d)", "and then"), rank=12)
    told = Decision(record, Action.DELETE, ("outside newest 5 step checkpoints (#12)", "and then"))
    assert ranked.reasons == told.reasons == ("outside newest 5 step checkpoints (#12)", "and then")
    assert Decision(record, Action.DELETE, ("50% kept",)).reasons == ("50% kept",)  # no rank: as told


def test_every_step_outside_the_newest_says_its_rank() -> None:
    records = [make_record(step_name(0, step)) for step in range(10, 200, 10)]
    decisions = plan(records, Policy(save_top_k_checkpoints=3)).decisions
    deleted = sorted(
        (decision for decision in decisions if decision.action is Action.DELETE),
        key=lambda d: -(d.record.step or 0),
    )
    assert [decision.reasons for decision in deleted] == [
        (f"outside newest 3 step checkpoints (#{rank})",) for rank in range(4, 4 + len(deleted))
    ]


def test_a_ranked_reason_after_another_is_formatted_at_once() -> None:
    """Only a first reason waits to be formatted: a ranked one given after another is written out."""
    ledger = _Ledger(1)
    ledger.drop(0, "first")
    ledger.drop_ranked(0, "outside (#%d)", 7)
    ledger.drop(0, "last")
    decision = ledger.decision(0, make_record(step_name(0, 100)))
    assert decision.reasons == ("first", "outside (#7)", "last")
    assert decision.rank == 0
    ranked = _Ledger(1)
    ranked.drop_ranked(0, "outside (#%d)", 7)
    ranked.drop(0, "last")
    assert ranked.decision(0, make_record(step_name(0, 100))).reasons == ("outside (#7)", "last")


def test_a_resumed_run_keeps_the_newer_version_of_the_step_its_link_still_names() -> None:
    """A run resumed from an earlier step saves step 300 again: ``...-v1.ckpt`` is newer by (step,
    epoch, version) than the step 300 last.ckpt names, and the link moves there next."""
    old = make_record(step_name(1, 100))
    v0 = make_record(step_name(3, 300))
    v1 = make_record(step_name(3, 300, version=1))
    last = link_to(v0)
    policy = Policy(save_top_k_checkpoints=0, save_top_k_best=0)

    result = by_name(plan([last, old, v0, v1], policy))

    assert result[v0.name].reasons[0] == "target of run/last.ckpt"
    assert result[v1.name].reasons == (PENDING_STEP,)
    assert result[old.name].action is Action.DELETE
    moved = by_name(plan([dataclasses.replace(last, link_target=v1.path), old, v0, v1], policy))
    assert moved[v0.name].action is Action.DELETE  # once the link names the newest, the older goes


def test_a_rolled_back_run_keeps_its_save_until_the_link_moves_to_it() -> None:
    """Resumed from step 16 after a loss spike, the run saves step 20 below the old run's step 40:
    outside the newest 2, yet Lightning is about to link last.ckpt to it (it was written after the
    link was made, pointing at step 40). Deleted, the link would dangle and the run could not resume."""
    old_run = [written_at(make_record(step_name(1, step)), step) for step in (16, 24, 32, 40)]
    last = link_to(old_run[-1], made_at=41)
    saved = written_at(make_record(step_name(1, 20)), 50)
    policy = Policy(save_top_k_checkpoints=2, save_top_k_best=0)

    result = by_name(plan([last, *old_run, saved], policy))

    assert result[saved.name].reasons == (WRITTEN_SINCE,)
    assert result[saved.name].holds == {Hold.PROTECTED}
    assert result[old_run[0].name].action is Action.DELETE
    # once the link names it, it is kept as the target, and nothing written since needs keeping
    moved = by_name(plan([link_to(saved, made_at=51), *old_run, saved], policy))
    assert moved[saved.name].reasons == ("target of run/last.ckpt",)
    assert moved[old_run[1].name].action is Action.DELETE


def test_a_fresh_run_in_the_same_directory_keeps_its_first_save() -> None:
    """A new run writes step 12 beside an old run's steps 100..300 and its last.ckpt; Lightning links
    last-v1.ckpt to it after the save. Only the latest file written since a link is kept: a link that
    no run moves any more holds one checkpoint, not every later one."""
    old_run = [written_at(make_record(step_name(0, step)), step) for step in (100, 200, 300)]
    last = link_to(old_run[-1], made_at=301)
    first, second = (written_at(make_record(step_name(0, step)), 400 + step) for step in (12, 24))
    policy = Policy(save_top_k_checkpoints=1, save_top_k_best=0)

    result = by_name(plan([last, *old_run, first, second], policy))

    assert result[second.name].reasons == (WRITTEN_SINCE,)
    assert result[first.name].action is Action.DELETE
    assert result[old_run[0].name].action is Action.DELETE


def test_a_file_written_before_the_link_was_made_is_not_held_by_it() -> None:
    old = [written_at(make_record(step_name(0, step)), step) for step in (100, 200, 300)]
    result = by_name(plan([link_to(old[-1], made_at=301), *old], Policy(save_top_k_checkpoints=1)))
    assert result[old[0].name].action is Action.DELETE
    assert result[old[1].name].action is Action.DELETE


def test_only_the_link_kind_is_held_by_what_was_written_since() -> None:
    """The link moves within the kind of its target (the callback that owns it): a best written
    since a step link is not held by it."""
    steps = [written_at(make_record(step_name(0, step)), step) for step in (100, 200)]
    best = written_at(make_record(best_name(0, 50, 0.9)), 500)
    policy = Policy(save_top_k_checkpoints=1, save_top_k_best=0)
    result = by_name(plan([link_to(steps[-1], made_at=201), *steps, best], policy))
    assert result[best.name].action is Action.DELETE


DIRECTORY_CHECKPOINTS = [step_name(0, step) for step in (100, 200, 300)]
INSIDE = "checkpoint/mp_rank_00_model_states.pt"


def _directory_checkpoints() -> list[CheckpointRecord]:
    """Three complete directory checkpoints (DeepSpeed's layout) in ``RUN``."""
    return [
        dataclasses.replace(make_record(name, entry_type=EntryType.DIRECTORY), complete=True, bytes=10)
        for name in DIRECTORY_CHECKPOINTS
    ]


def test_a_pin_on_a_file_inside_a_directory_checkpoint_keeps_that_checkpoint() -> None:
    """``--protect run/<step 100>/checkpoint/...pt`` (or a ``pretrained_ckpt_path``): the directory
    checkpoint holding it is kept whole, and says what it holds."""
    pinned = RUN / DIRECTORY_CHECKPOINTS[0] / INSIDE
    pins = {pinned: f"protected by --protect {pinned}"}

    result = by_name(plan(_directory_checkpoints(), Policy(save_top_k_checkpoints=1), pins))

    oldest = result[DIRECTORY_CHECKPOINTS[0]]
    assert oldest.action is Action.KEEP
    assert oldest.reasons == (f"holds {INSIDE}: protected by --protect {pinned}",)
    assert Hold.PROTECTED in oldest.holds
    assert result[DIRECTORY_CHECKPOINTS[1]].action is Action.DELETE


def test_a_link_into_a_directory_checkpoint_keeps_that_checkpoint() -> None:
    """``last.ckpt -> <step 100>/checkpoint/...pt`` in the group itself, or a link of another group
    (its pin, as a pass passes it): the directory it points into stays."""
    inside = RUN / DIRECTORY_CHECKPOINTS[0] / INSIDE
    link = make_record(LAST, entry_type=EntryType.SYMLINK, link_target=inside)
    policy = Policy(save_top_k_checkpoints=1)

    own = by_name(plan([link, *_directory_checkpoints()], policy))
    elsewhere = by_name(plan(_directory_checkpoints(), policy, {inside: "target of stage2/last.ckpt"}))

    assert own[DIRECTORY_CHECKPOINTS[0]].reasons == (f"holds {INSIDE}: target of run/last.ckpt",)
    assert elsewhere[DIRECTORY_CHECKPOINTS[0]].reasons == (f"holds {INSIDE}: target of stage2/last.ckpt",)
    assert own[DIRECTORY_CHECKPOINTS[1]].action is elsewhere[DIRECTORY_CHECKPOINTS[1]].action is Action.DELETE


def test_a_pinned_directory_keeps_everything_in_it_and_below() -> None:
    """``--protect root/run`` (a directory): it protected nothing, and the run was pruned without a
    word. A pin that names a directory keeps every checkpoint in it and in the directories below."""
    run, nested, other = Path("/ckpt/run"), Path("/ckpt/run/stage2"), Path("/ckpt/other")
    group = [
        make_record(step_name(0, step), directory) for directory in (run, nested, other) for step in (1, 2)
    ]
    pins = {run: "protected by --protect /ckpt/run"}

    decisions = plan(group, Policy(save_top_k_checkpoints=1), pins).decisions

    kept = {(d.record.directory, d.record.name) for d in decisions if d.action is Action.KEEP}
    assert kept == {
        (run, step_name(0, 1)),
        (run, step_name(0, 2)),
        (nested, step_name(0, 1)),
        (nested, step_name(0, 2)),
        (other, step_name(0, 2)),
    }
    reasons = next(d.reasons for d in decisions if d.record.directory == nested and d.record.step == 1)
    assert reasons == ("protected by --protect /ckpt/run (everything in run)",)


def test_a_link_to_a_directory_keeps_nothing_in_it_for_that() -> None:
    """A ``latest -> run`` link (a directory) must not stop retention in the run it names."""
    run = Path("/ckpt/run")
    latest = make_record("latest", Path("/ckpt"), entry_type=EntryType.SYMLINK, link_target=run)
    group = [latest, *(make_record(step_name(0, step), run) for step in (1, 2))]
    result = by_name(plan(group, Policy(save_top_k_checkpoints=1)))
    assert result[step_name(0, 1)].action is Action.DELETE
