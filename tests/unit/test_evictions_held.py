"""keep_free takes nothing kept on a file system where a deletion the pass's plans made failed
(``reconcile._evict``): what the count rules dropped is still there, so a kept checkpoint never goes
in its place. No disk: the evictions are applied through a recording stand-in."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ckpt_watcher import reconcile
from ckpt_watcher.budget import FileSystemSpace, free_space_plan, group_space
from ckpt_watcher.delete import ApplyResult, DeletionResult, Outcome
from ckpt_watcher.groups import GroupIndex
from ckpt_watcher.naming import DEFAULT_NAMING
from ckpt_watcher.plan import Action, Decision, GroupPlan, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.reconcile import PassResult, Trigger
from ckpt_watcher.records import CheckpointRecord, FileIdentity
from ckpt_watcher.space import Eviction, SpaceKeeper
from tests.support.factories import make_record, step_name

ROOT = Path("/ckpt")
RUN = ROOT / "run"
KIB = 1024
DEVICE, OTHER_DEVICE = 1, 2
RULES = Policy.model_validate({"save_top_k_checkpoints": 3, "keep_free": "4KiB"})


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def _record(step: int, device: int = DEVICE) -> CheckpointRecord:
    made = make_record(step_name(0, step), RUN, size=KIB)
    assert made.identity is not None
    identity = FileIdentity(device, made.identity.inode, KIB, step * 10**9)
    return dataclasses.replace(made, identity=identity)


def _planned() -> tuple[list[Decision], list[Eviction], PassResult]:
    """Steps 100-600: the count rules drop 100-300 and keep 400-600; the disk is short, so keep_free
    would evict 400 and 500 (600 is the newest)."""
    (group,) = plan([_record(step) for step in range(100, 700, 100)], RULES).groups
    dropped = [decision for decision in group.decisions if decision.action is Action.DELETE]
    facts = group_space(RUN, group.decisions, RULES, device=DEVICE, now=0.0)
    fs_plan = free_space_plan(FileSystemSpace(DEVICE, ROOT, 100 * KIB, 3 * KIB), [facts])
    evictions = [Eviction(RUN, decision, fs_plan) for decision in fs_plan.evicted_decisions()]
    assert [eviction.decision.record.name for eviction in evictions] == [
        step_name(0, 400),
        step_name(0, 500),
    ]
    result = PassResult(Trigger.FULL)
    result.space = [fs_plan]
    return dropped, evictions, result


def _evict(evictions: list[Eviction], result: PassResult) -> list[str]:
    """Apply the evictions (the disk stays short all along); the names whose deletion was applied."""
    applied: list[str] = []

    def apply(group: GroupPlan) -> ApplyResult:
        applied.extend(decision.record.name for decision in group.deletions)
        return ApplyResult([DeletionResult(decision, Outcome.DELETED) for decision in group.deletions])

    space = SpaceKeeper(ROOT, GroupIndex(ROOT, lambda _: DEFAULT_NAMING))
    reconcile._evict(evictions, space, apply, space.index, result)
    return applied


@pytest.fixture(autouse=True)
def _always_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SpaceKeeper, "still_short", lambda self, eviction: KIB)


def test_nothing_kept_is_evicted_where_a_planned_deletion_failed(
    logs: list[MutableMapping[str, Any]],
) -> None:
    _, evictions, result = _planned()
    result.failed_deletions = {DEVICE: 2}

    assert _evict(evictions, result) == []
    assert result.evicted == 0
    assert [fs_plan.evictions for fs_plan in result.space] == [()]  # the plan as applied
    [held] = [record for record in logs if record["event"] == "eviction_held"]
    assert held["log_level"] == "warning"
    assert (held["path"], held["failed"], held["kept"], held["kept_bytes"]) == (str(ROOT), 2, 2, 2 * KIB)
    assert held["checkpoints"] == [str(RUN / step_name(0, 400)), str(RUN / step_name(0, 500))]
    assert not [record for record in logs if record["event"] == "eviction_not_needed"]


def test_a_failure_on_another_file_system_holds_nothing_here() -> None:
    _, evictions, result = _planned()
    result.failed_deletions = {OTHER_DEVICE: 1}

    assert _evict(evictions, result) == [step_name(0, 400), step_name(0, 500)]
    assert result.evicted == 2


def test_failed_deletions_are_counted_by_their_group_s_device_and_their_own(tmp_path: Path) -> None:
    dropped, _, result = _planned()
    group_device = tmp_path.stat().st_dev  # the group directory's, as the free-space step reads it
    dropped = [dataclasses.replace(decision, record=_record(100, group_device)) for decision in dropped]
    elsewhere = dataclasses.replace(dropped[2], record=_record(100, device=OTHER_DEVICE))
    outcomes = ApplyResult(
        [
            DeletionResult(dropped[0], Outcome.FAILED, "Permission denied"),
            DeletionResult(dropped[1], Outcome.DELETED),
            DeletionResult(elsewhere, Outcome.FAILED, "Device or resource busy"),
        ]
    )

    reconcile._note_failed(result, tmp_path, outcomes)
    reconcile._note_failed(result, tmp_path, None)  # a dry run applies nothing

    assert result.failed_deletions == {group_device: 2, OTHER_DEVICE: 1}
