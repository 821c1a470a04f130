"""delete.py on real directory checkpoints in tmp_path: deep trees, partial failures, leftovers, and
no exception ever escaping a public function."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ckpt_watcher import delete
from ckpt_watcher import trash as trash_module
from ckpt_watcher.delete import (
    Outcome,
    RepeatedFailures,
    apply_group,
    apply_plan,
    finish_leftovers,
    leftover_name,
    remove_leftovers,
)
from ckpt_watcher.filesystem import rename_no_replace
from ckpt_watcher.plan import Plan, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import DELETING_PREFIX, FileIdentity
from ckpt_watcher.scan import ScanOptions, scan_tree
from ckpt_watcher.trash_moves import TrashTarget
from tests.support.factories import directory_checkpoint, leftovers, step_name, write_checkpoint, zip_bytes
from tests.support.hostile_trees import make_deep_directory, remove_deep, set_immutable
from tests.support.stops import stop_as_it_begins

pytestmark = pytest.mark.timeout(120)

KEEP_ONE = Policy(save_top_k_checkpoints=1)
QUIET = ScanOptions(directory_quiet_seconds=0.0)


def deepspeed(path: Path) -> Path:
    """A finished DeepSpeed-style directory checkpoint (``latest`` written last)."""
    return directory_checkpoint(path, {"mp_rank_00_model_states.pt": b"m" * 512})


def plan_of(root: Path) -> Plan:
    return plan(scan_tree(root, KEEP_ONE.compiled_naming, QUIET).records, KEEP_ONE)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Log records go to a list, never to a stream another test configured and closed."""
    with capture_logs():
        yield


@pytest.fixture
def immutable_paths(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths made immutable by a test; everything in tmp_path is made mutable again afterwards (the
    files may have moved), so tmp_path can be cleaned."""
    paths: list[Path] = []
    yield paths
    if paths:
        set_immutable(tmp_path, immutable=False, recursive=True)


def make_immutable(path: Path, registry: list[Path]) -> None:
    if not set_immutable(path):
        pytest.skip("chattr +i is not supported here (needs root and ext4/xfs/btrfs)")
    registry.append(path)


def test_a_directory_checkpoint_deeper_than_the_recursion_limit_is_removed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    old = deepspeed(tmp_path / step_name(0, 100))
    make_deep_directory(old / "checkpoint" / "nested", depth=1500)
    request.addfinalizer(lambda: remove_deep(tmp_path))  # pytest's clean-up recurses
    deepspeed(tmp_path / step_name(0, 200))
    the_plan = plan_of(tmp_path)
    assert [decision.record.name for decision in the_plan.deletions] == [old.name]

    applied = apply_plan(the_plan, tmp_path)

    assert [result.outcome for result in applied.results] == [Outcome.DELETED]
    assert sorted(os.listdir(tmp_path)) == [step_name(0, 200)]


def test_a_removal_that_fails_halfway_is_a_failure_naming_what_remains(
    tmp_path: Path, immutable_paths: list[Path]
) -> None:
    old = deepspeed(tmp_path / step_name(0, 100))
    (old / "checkpoint" / "sub").mkdir()
    stuck = old / "checkpoint" / "sub" / "stuck.pt"
    stuck.write_bytes(b"s" * 100)
    (old / "checkpoint" / "sub" / "other.pt").write_bytes(b"o" * 100)
    deepspeed(tmp_path / step_name(0, 200))
    the_plan = plan_of(tmp_path)
    make_immutable(stuck, immutable_paths)

    with capture_logs() as logs:
        applied = apply_plan(the_plan, tmp_path)

    assert [result.outcome for result in applied.results] == [Outcome.FAILED]
    assert applied.failed
    assert not applied.deleted
    error = applied.results[0].error
    assert error is not None
    assert "checkpoint/sub/stuck.pt" in error, error
    failures = [record for record in logs if record["event"] == "checkpoint_delete_failed"]
    assert len(failures) == 1
    assert any("checkpoint/sub/stuck.pt" in remaining for remaining in failures[0]["remains"])
    assert not [record for record in logs if record["event"] == "checkpoint_deleted"]
    # Everything else is gone; what is left carries the leftover name, never the checkpoint's own.
    assert not old.exists()
    (leftover,) = leftovers(tmp_path)
    remaining = sorted(
        os.path.relpath(os.path.join(directory, name), tmp_path / leftover)
        for directory, _, files in os.walk(tmp_path / leftover)
        for name in files
    )
    assert remaining == ["checkpoint/sub/stuck.pt"]

    set_immutable(tmp_path / leftover / "checkpoint" / "sub" / "stuck.pt", immutable=False)
    results = finish_leftovers(tmp_path, tmp_path)

    assert [(result.removed, result.remains) for result in results] == [(True, ())]
    assert leftovers(tmp_path) == []


def test_leftovers_the_tool_did_not_make_are_never_removed(tmp_path: Path) -> None:
    """A directory that merely has the leftover prefix (made by hand, or a copy of a real leftover,
    whose inode differs) is not provably the tool's: kept, and reported once."""
    foreign = tmp_path / f"{DELETING_PREFIX}1234-{step_name(0, 100)}"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "weights.pt").write_bytes(b"w" * 100)
    deepspeed(tmp_path / "run" / step_name(0, 100))
    deepspeed(tmp_path / "run" / step_name(0, 200))
    the_plan = plan(scan_tree(tmp_path / "run", KEEP_ONE.compiled_naming, QUIET).records, KEEP_ONE)
    assert apply_plan(the_plan, tmp_path / "run").deleted
    # A copy of a removal in progress (as `cp -a` of a run directory makes): a new inode.
    source = tmp_path / "made-by-the-tool"
    deepspeed(source)
    copy = tmp_path / f"{DELETING_PREFIX}i{os.stat(source).st_ino}-{step_name(0, 300)}"
    shutil.copytree(source, copy, symlinks=True)

    reported: set[tuple[int, int]] = set()
    with capture_logs() as logs:
        first = finish_leftovers(tmp_path, tmp_path, reported=reported)
        second = finish_leftovers(tmp_path, tmp_path, reported=reported)
    remove_leftovers(tmp_path, tmp_path)  # the daemon's spelling

    assert (foreign / "data" / "weights.pt").exists()
    assert (copy / "latest").exists()
    assert first == []
    assert second == []
    not_ours = [record["path"] for record in logs if record["event"] == "leftover_not_ours"]
    assert sorted(not_ours) == sorted([str(foreign), str(copy)])  # once each, not once per call


def test_remove_leftovers_keeps_a_directory_it_did_not_make(tmp_path: Path) -> None:
    foreign = tmp_path / f"{DELETING_PREFIX}a-directory-someone-made"
    (foreign / "inside").mkdir(parents=True)
    (foreign / "inside" / "keep-me").write_text("not the tool's")

    remove_leftovers(tmp_path, tmp_path)

    assert (foreign / "inside" / "keep-me").read_text() == "not the tool's"


def test_no_exception_escapes_the_public_functions(tmp_path: Path) -> None:
    """Whatever the input, a failure is a result (logged), never an exception."""
    for step in (100, 200, 300):
        write_checkpoint(tmp_path / step_name(0, step))
    the_plan = plan_of(tmp_path)
    group = the_plan.groups[0]
    poisoned = tuple(
        dataclasses.replace(
            decision,
            record=dataclasses.replace(decision.record, name="bad\x00name"),
        )
        for decision in group.decisions
    )
    poisoned_group = dataclasses.replace(group, decisions=poisoned)
    outside_group = dataclasses.replace(group, directory=Path("/definitely/not/below/the/root"))
    a_file = tmp_path / step_name(0, 300)

    with capture_logs() as logs:
        poisoned_results = apply_group(poisoned_group, tmp_path)
        outside_results = apply_group(outside_group, tmp_path)
        leftover_results = finish_leftovers(a_file, a_file)
        relative_results = finish_leftovers(Path("relative"), Path("relative/run"))

    assert {result.outcome for result in poisoned_results} == {Outcome.FAILED}
    assert {result.outcome for result in outside_results} == {Outcome.FAILED}
    assert leftover_results == []
    assert relative_results == []
    assert [record["event"] for record in logs].count("checkpoint_delete_failed") == 4
    assert sorted(os.listdir(tmp_path)) == [step_name(0, step) for step in (100, 200, 300)]


# -- a file renamed onto a planned name while it is being deleted ------------------------------------


NEW_SAVE = b"a new save of the same step"


def _outcome_with(
    monkeypatch: pytest.MonkeyPatch, owner: object, attribute: str, replacement: object, the_plan: Plan
) -> Outcome:
    """The outcome of the plan's one deletion, applied with ``owner.attribute`` replaced."""
    [group] = the_plan.groups
    monkeypatch.setattr(owner, attribute, replacement)
    [result] = apply_plan(the_plan, group.directory).results
    monkeypatch.undo()
    return result.outcome


def _two_steps(tmp_path: Path) -> tuple[Plan, Path]:
    """Steps 100 and 200 in ``run``, planned with keep-1: step 100 is to be deleted."""
    for step in (100, 200):
        write_checkpoint(tmp_path / "run" / step_name(0, step))
    the_plan = plan_of(tmp_path / "run")
    [doomed] = the_plan.deletions
    return the_plan, doomed.record.path


def _a_writer_saves(moment: str, old: Path) -> tuple[object, str, Callable[..., object]]:
    """What to patch so that a writer saves ``old``'s name anew at ``moment``: right after the identity
    check by name ("after the check": its rename lands before the file is moved out of the way), or
    right after the move ("after the move")."""
    if moment == "after the check":
        real_stat = os.stat

        def check_then_the_writer_replaces(
            path: str, *arguments: object, **keywords: object
        ) -> os.stat_result:
            result = real_stat(path, *arguments, **keywords)  # type: ignore[arg-type]
            if path == old.name and keywords.get("dir_fd") is not None:
                os.rename(write_checkpoint(old.parent / "tmp-save", NEW_SAVE), old)
            return result

        return os, "stat", check_then_the_writer_replaces

    def move_then_the_writer_saves(source: str, destination: str, **keywords: int) -> None:
        rename_no_replace(source, destination, **keywords)
        if source == old.name:
            write_checkpoint(old, NEW_SAVE)

    return delete, "rename_no_replace", move_then_the_writer_saves


@pytest.mark.parametrize(
    ("moment", "outcome"), [("after the check", Outcome.CHANGED), ("after the move", Outcome.DELETED)]
)
def test_a_new_save_under_a_planned_name_while_it_is_deleted_is_never_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str, outcome: Outcome
) -> None:
    """A writer renames a new save onto the planned name between the check and the removal: what is
    moved out of the way is then the new file, not the one planned, and it goes back under its name
    (CHANGED). Once the checked file is out of the way, a new file under its name is another file:
    the checked one is removed (DELETED), the new one never touched."""
    the_plan, old = _two_steps(tmp_path)

    assert _outcome_with(monkeypatch, *_a_writer_saves(moment, old), the_plan) is outcome
    assert old.read_bytes() == zip_bytes(NEW_SAVE)
    assert leftovers(tmp_path / "run") == []


def test_a_swapped_file_that_cannot_go_back_under_its_name_is_kept_under_the_leftover_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers: the file moved away was swapped in, and its name is taken again before it can go
    back. It stays under the leftover name, which carries the planned inode, not its own: no later
    pass removes it."""
    the_plan, old = _two_steps(tmp_path)
    real_rename = rename_no_replace

    def swapped_twice(source: str, destination: str, **keywords: int) -> None:
        if source == old.name:  # just before the move away: the first writer's file lands
            fresh = write_checkpoint(tmp_path / "run" / "tmp-save", b"first writer")
            os.rename(fresh, old)
        else:  # just before the move back: the second writer's
            write_checkpoint(old, b"second writer")
        real_rename(source, destination, **keywords)

    monkeypatch.setattr(delete, "rename_no_replace", swapped_twice)
    with capture_logs() as logs:
        [result] = apply_plan(the_plan, tmp_path / "run").results
    monkeypatch.undo()
    finish_leftovers(tmp_path / "run", tmp_path / "run")

    assert result.outcome is Outcome.CHANGED
    assert old.read_bytes() == zip_bytes(b"second writer")
    [kept] = leftovers(tmp_path / "run")
    assert (tmp_path / "run" / kept).read_bytes() == zip_bytes(b"first writer")
    [changed] = [record for record in logs if record["event"] == "checkpoint_changed"]
    assert f"kept as {tmp_path / 'run' / kept}" in changed["detail"]


def test_a_file_left_renamed_by_a_killed_deletion_is_finished_only_if_it_is_the_one_named(
    tmp_path: Path,
) -> None:
    """Killed between the rename out of the way and the unlink: the leftover's name carries its own
    inode, so the next pass removes it. One whose name carries another inode is kept."""
    run = tmp_path / "run"
    ours = write_checkpoint(run / "tmp-ours")
    ours = ours.rename(run / leftover_name(step_name(0, 100), ours.stat().st_ino))
    foreign = write_checkpoint(run / f"{DELETING_PREFIX}i1-{step_name(0, 200)}")

    results = finish_leftovers(run, run, reported=set())

    assert [(result.path, result.removed) for result in results] == [(ours, True)]
    assert not ours.exists()
    assert foreign.exists()


def test_a_directory_swapped_in_between_the_walk_and_the_rename_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deepspeed(tmp_path / "run" / step_name(0, 100))
    deepspeed(tmp_path / "run" / step_name(0, 200))
    the_plan = plan_of(tmp_path / "run")
    old = tmp_path / "run" / step_name(0, 100)
    real_rename = rename_no_replace

    def swap_then_rename(source: str, destination: str, **keywords: int) -> None:
        if source == old.name:  # a new directory moved onto the name (made first: another inode)
            incoming = deepspeed(old.parent / "incoming")
            (incoming / "new").write_text("the new one")
            shutil.rmtree(old)
            incoming.rename(old)
        real_rename(source, destination, **keywords)

    outcome = _outcome_with(monkeypatch, delete, "rename_no_replace", swap_then_rename, the_plan)

    assert outcome is Outcome.CHANGED
    assert (old / "new").read_text() == "the new one"
    assert leftovers(tmp_path / "run") == []


def test_a_directory_checkpoint_written_into_after_it_was_planned_is_kept(tmp_path: Path) -> None:
    """An entry added to a planned directory checkpoint changes its own mtime: not the checkpoint
    that was planned, so it is kept and planned again (the first check by name sees it; the walk
    just before the removal compares the mtime too)."""
    deepspeed(tmp_path / "run" / step_name(0, 100))
    deepspeed(tmp_path / "run" / step_name(0, 200))
    the_plan = plan_of(tmp_path / "run")
    old = tmp_path / "run" / step_name(0, 100)
    (old / "zero_to_fp32.py").write_text("# written after the plan")

    [result] = apply_plan(the_plan, tmp_path / "run").results

    assert result.outcome is Outcome.CHANGED
    assert (old / "zero_to_fp32.py").exists()
    assert (old / "latest").exists()


def _files_below(path: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(top, name), path) for top, _, files in os.walk(path) for name in files
    )


def _many_shards(path: Path) -> Path:
    return directory_checkpoint(path, {f"shard_{index:03d}.pt": b"s" * 64 for index in range(300)})


def test_a_stop_during_the_walk_before_the_rename_leaves_the_checkpoint_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _many_shards(tmp_path / "run" / step_name(0, 100))
    deepspeed(tmp_path / "run" / step_name(0, 200))
    the_plan = plan_of(tmp_path / "run")
    files = _files_below(old)
    stop = threading.Event()
    stop_as_it_begins(monkeypatch, delete, "summarize_tree", stop)

    with capture_logs() as logs:
        applied = apply_plan(the_plan, tmp_path / "run", stop=stop)

    assert applied.results == []
    assert applied.interrupted
    assert _files_below(old) == files  # untouched, under its own name
    assert leftovers(tmp_path / "run") == []
    assert [record["event"] for record in logs if "checkpoint" in record["event"]] == []
    assert [record for record in logs if record["event"] == "removal_interrupted"] == []


def test_a_stop_during_the_removal_leaves_a_leftover_the_next_pass_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    old = _many_shards(run / step_name(0, 100))
    deepspeed(run / step_name(0, 200))
    the_plan = plan_of(run)
    doomed = leftover_name(old.name, os.stat(old).st_ino)
    stop = threading.Event()
    stop_as_it_begins(monkeypatch, delete, "remove_tree", stop)

    with capture_logs() as logs:
        applied = apply_plan(the_plan, run, stop=stop)

    assert applied.results == []  # neither deleted nor failed: cut short, finished later
    assert applied.interrupted
    assert not old.exists()  # never seen half deleted under its own name
    assert leftovers(run) == [doomed]
    assert len(_files_below(run / doomed)) > 300
    [interrupted] = [record for record in logs if record["event"] == "removal_interrupted"]
    assert interrupted["path"] == str(old)
    assert interrupted["left_as"] == str(run / doomed)
    assert [record["event"] for record in logs if record["event"].startswith("checkpoint_")] == []

    monkeypatch.undo()
    assert [(result.removed, result.remains) for result in finish_leftovers(run, run)] == [(True, ())]
    assert sorted(os.listdir(run)) == [step_name(0, 200)]


def test_a_stop_while_a_leftover_is_finished_leaves_it_for_the_next_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _many_shards(tmp_path / "run" / "made")
    doomed = tmp_path / "run" / leftover_name(step_name(0, 100), os.stat(made).st_ino)
    made.rename(doomed)
    files = _files_below(doomed)
    stop = threading.Event()
    stop_as_it_begins(monkeypatch, delete, "remove_tree", stop)

    with capture_logs() as logs:
        results = finish_leftovers(tmp_path, tmp_path / "run", stop=stop)

    assert [(result.path, result.removed) for result in results] == [(doomed, False)]
    assert _files_below(doomed) == files
    assert [(record["event"], record["path"]) for record in logs] == [("removal_interrupted", str(doomed))]

    monkeypatch.undo()
    assert [result.removed for result in finish_leftovers(tmp_path, tmp_path / "run")] == [True]
    assert leftovers(tmp_path / "run") == []


def test_a_failure_repeated_the_same_way_is_told_apart_from_a_new_one() -> None:
    """The same checkpoint (path and identity) failing with the same message is a repeat; another
    message, another file under that name, or another path is news. The memory stays bounded."""
    failures = RepeatedFailures()
    first = FileIdentity(1, 10, 100, 5)
    resaved = FileIdentity(1, 11, 100, 6)

    answers = [
        failures.repeated("run/a.ckpt", first, "Permission denied"),
        failures.repeated("run/a.ckpt", first, "Permission denied"),
        failures.repeated("run/a.ckpt", first, "Read-only file system"),
        failures.repeated("run/a.ckpt", resaved, "Read-only file system"),
        failures.repeated("run/b.ckpt", resaved, "Read-only file system"),
    ]
    for number in range(RepeatedFailures.MAXIMUM):
        failures.repeated(f"run/{number}.ckpt", first, "Permission denied")

    assert answers == [False, True, False, False, False]
    assert not failures.repeated("run/a.ckpt", resaved, "Read-only file system"), "forgotten past the bound"


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_keep_pin_touched_after_the_plan_keeps_its_checkpoint(tmp_path: Path, kind: str) -> None:
    """Pins were read only when the plan was made; a keep_free eviction is applied at the end of its
    pass, from a plan seconds old on a large tree, and a review saw one delete a checkpoint whose
    ``.keep`` was touched meanwhile. Each deletion looks for the pin again: kept (CHANGED), the rest
    deleted."""
    for step in (100, 200, 300):
        if kind == "file":
            write_checkpoint(tmp_path / step_name(0, step))
        else:
            deepspeed(tmp_path / step_name(0, step))
    planned = plan_of(tmp_path)
    pinned = step_name(0, 100)
    (tmp_path / f"{pinned}.keep").touch()
    with capture_logs() as logs:
        results = apply_plan(planned, tmp_path).results

    outcomes = {result.decision.record.name: result.outcome for result in results}
    assert outcomes[pinned] is Outcome.CHANGED
    assert [outcome for name, outcome in outcomes.items() if name != pinned] == [Outcome.DELETED]
    assert (tmp_path / pinned).exists()
    changed = [record for record in logs if record["event"] == "checkpoint_changed"]
    assert changed[0]["detail"] == f"pinned by {pinned}.keep since it was planned; kept"


@pytest.mark.parametrize("while_", ["a directory checkpoint is walked", "the trash's lock is waited for"])
def test_a_keep_pin_touched_during_a_long_step_before_the_rename_still_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, while_: str
) -> None:
    """The pin was first looked for before the slow steps: the walk of a large directory checkpoint,
    the wait for the trash's lock (a restore or purge holding it). A pin touched then was missed, a
    review showed; it is looked for right before the rename (under the trash's lock for a move)."""
    trash = None
    if while_ == "a directory checkpoint is walked":
        for step in (100, 200):
            deepspeed(tmp_path / step_name(0, step))
        slow_module: Any = delete
        slow_name = "summarize_tree"
    else:
        for step in (100, 200):
            write_checkpoint(tmp_path / step_name(0, step))
        trash = TrashTarget(tmp_path, 3600)
        slow_module, slow_name = trash_module, "_wait_for_lock"
    planned = plan_of(tmp_path)
    pinned = step_name(0, 100)
    slow = getattr(slow_module, slow_name)

    def pinned_meanwhile(*arguments: Any, **keywords: Any) -> Any:
        (tmp_path / f"{pinned}.keep").touch()
        return slow(*arguments, **keywords)

    monkeypatch.setattr(slow_module, slow_name, pinned_meanwhile)
    with capture_logs():
        results = apply_plan(planned, tmp_path, trash=trash).results

    assert [result.outcome for result in results] == [Outcome.CHANGED]
    assert (tmp_path / pinned).exists()


def test_a_directory_named_like_a_pin_is_no_pin(tmp_path: Path) -> None:
    """The planner counts no directory as a ``.keep`` pin (a scan makes no record of it), but the
    deleter's look did: the checkpoint was planned for deletion and refused every pass, logged as
    pinned. Now both go by the same rule: it is deleted as planned."""
    for step in (100, 200):
        write_checkpoint(tmp_path / step_name(0, step))
    (tmp_path / f"{step_name(0, 100)}.keep").mkdir()
    results = apply_plan(plan_of(tmp_path), tmp_path).results

    assert [result.outcome for result in results] == [Outcome.DELETED]
