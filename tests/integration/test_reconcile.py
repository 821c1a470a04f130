"""The reconcile core called directly on real trees in tmp_path: one pass, its result, its memory."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import LogCapture

from ckpt_watcher import delete, groups, reconcile, scan, storage
from ckpt_watcher import plan as planning
from ckpt_watcher.cli import main
from ckpt_watcher.logs import configure_logging
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import load_policy
from ckpt_watcher.policy_file import InvalidPolicyFilesError
from ckpt_watcher.protection import ProtectionRegistry
from ckpt_watcher.reconcile import Reconciler, Trigger, prune_once
from ckpt_watcher.trash import list_trash
from ckpt_watcher.trash_moves import restore
from tests.support.cli import log_records
from tests.support.factories import best_name, step_name, write_checkpoint, zip_bytes
from tests.support.logs import logged
from tests.support.pin_faults import failing_pin_reads

pytestmark = pytest.mark.timeout(60)


def _daemon_core(root: Path, policy: Path | None = None, stop: threading.Event | None = None) -> Reconciler:
    """The core as the daemon holds it: lenient about policy errors, remembering between passes."""
    tree = PolicyTree(root, load_policy(policy), strict=False)
    return Reconciler(tree, ProtectionRegistry(root), pins={}, settle_seconds=0, one_shot=False, stop=stop)


def _steps(directory: Path, steps: range | list[int]) -> list[Path]:
    return [write_checkpoint(directory / step_name(0, step)) for step in steps]


def _names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def _best_and_last_only(tmp_path: Path) -> Path:
    """Keep only the best and last.ckpt (no step checkpoint kept for itself): the setup where nothing
    but the ``save_last="link"`` rules keeps the save last.ckpt is about to name."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 0\nsave_top_k_best: 2\n")
    return policy


def _linked_run(tmp_path: Path) -> tuple[Path, Reconciler]:
    """A run whose last.ckpt links its step 8 (beside a best), after a full pass of the daemon's core
    keeping only best and last; then Lightning's next save, step 12, not linked yet."""
    run = tmp_path / "root" / "run"
    write_checkpoint(run / step_name(0, 8))
    write_checkpoint(run / best_name(0, 8, 0.5))
    (run / "last.ckpt").symlink_to(step_name(0, 8))
    core = _daemon_core(run.parent, _best_and_last_only(tmp_path))
    core.run(Trigger.FULL)
    write_checkpoint(run / step_name(0, 12))
    return run, core


def test_the_save_last_ckpt_is_about_to_name_is_kept_while_the_link_is_missing(tmp_path: Path) -> None:
    """Lightning moves last.ckpt by removing it, then linking it again: an event pass in between saw
    no link, and the memory of the missing link pinned only its old target. The new save, which
    nothing else keeps here, was deleted, and last.ckpt was then made dangling."""
    run, core = _linked_run(tmp_path)
    (run / "last.ckpt").unlink()  # (Lightning moving the link to the new save)

    core.run(Trigger.EVENT, {run})

    assert {step_name(0, 8), step_name(0, 12)} <= _names(run)
    (run / "last.ckpt").symlink_to(step_name(0, 12))
    core.run(Trigger.EVENT, {run})  # (the link back, pointing at the new save)
    assert step_name(0, 12) in _names(run)


def test_a_last_link_removed_between_the_listing_and_the_scan_still_keeps_its_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass lists the links before it scans the group, and left a group's own link to its scan: one
    removed in between (Lightning moving last.ckpt) protected neither its target nor the save it was
    about to name. Both were deleted, and last.ckpt was then made dangling."""
    run, core = _linked_run(tmp_path)
    scan_directory = storage.LocalStorage.scan_directory

    def scan_after_the_unlink(
        self: storage.LocalStorage, top: Path, group: Path, *rest: Any, **options: Any
    ) -> Any:
        if group == run and (run / "last.ckpt").is_symlink():
            (run / "last.ckpt").unlink()  # (after the pass listed the links, before the scan)
        return scan_directory(self, top, group, *rest, **options)

    monkeypatch.setattr(storage.LocalStorage, "scan_directory", scan_after_the_unlink)
    core.run(Trigger.EVENT, {run})

    assert {step_name(0, 8), step_name(0, 12)} <= _names(run)


def test_a_pass_result_counts_what_was_applied(tmp_path: Path) -> None:
    _steps(tmp_path / "run", range(100, 1000, 100))

    dry = prune_once(
        tmp_path, load_policy(None), pins={}, settle_seconds=0, dry_run=True, working_directory=tmp_path
    )
    assert (dry.summary.to_delete, dry.deleted, dry.applied) == (4, 0, None)
    assert len(_names(tmp_path / "run")) == 9

    done = prune_once(
        tmp_path, load_policy(None), pins={}, settle_seconds=0, dry_run=False, working_directory=tmp_path
    )
    assert done.trigger is Trigger.PRUNE
    assert (done.summary.to_delete, done.deleted, done.failed) == (4, 4, 0)
    assert done.bytes_freed == sum(decision.record.bytes for decision in done.the_plan.deletions)
    assert done.sources == {tmp_path: ("embedded default",), tmp_path / "run": ("embedded default",)}
    assert len(_names(tmp_path / "run")) == 5


@pytest.mark.parametrize("command", ["watch", "prune"])
def test_a_pass_plans_without_cyclic_collection_and_collects_again_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The collector only re-traverses a pass's records and decisions (none cyclic garbage): it is
    off while a pass plans, in the daemon's core and in prune, and on again after."""
    _steps(tmp_path / "run", range(100, 1000, 100))
    collecting: list[bool] = []
    real_plan = planning.plan

    def noting_plan(*arguments: Any, **options: Any) -> Any:
        collecting.append(gc.isenabled())
        return real_plan(*arguments, **options)

    monkeypatch.setattr(reconcile, "plan", noting_plan)
    assert gc.isenabled()
    if command == "watch":
        _daemon_core(tmp_path).run(Trigger.STARTUP)
    else:
        assert main(["prune", str(tmp_path), "--dry-run"]) == 0
    assert collecting
    assert not any(collecting)
    assert gc.isenabled()


def test_a_link_in_one_group_protects_its_target_in_another_in_every_pass(tmp_path: Path) -> None:
    target, *_ = _steps(tmp_path / "b", range(100, 800, 100))
    (tmp_path / "a").mkdir()
    os.symlink(Path("..") / "b" / target.name, tmp_path / "a" / "last.ckpt")
    core = _daemon_core(tmp_path)

    startup = core.run(Trigger.STARTUP, keep_plan=True)
    event = core.run(Trigger.EVENT, {tmp_path / "b"}, keep_plan=True)  # only b: a's link is remembered

    for result in (startup, event):
        decision = next(decision for decision in result.the_plan.decisions if decision.record.path == target)
        assert decision.action == "keep"
        assert "target of a/last.ckpt" in decision.reasons
    assert target.exists()
    assert _names(tmp_path / "b") == {target.name, *(step_name(0, step) for step in range(300, 800, 100))}


def test_a_link_down_into_a_subdirectory_keeps_the_save_it_is_about_to_name_in_an_event_pass(
    tmp_path: Path,
) -> None:
    """Lightning's ``filename="steps/epoch=..."`` with ``save_last="link"``: checkpoints are written in
    root/steps, root/last.ckpt links down to them, and is moved only after the loggers ran. A pass for
    the new save's event plans root/steps alone (root's listing remembered): the save, outside the
    newest 0, was deleted before the link named it, which then dangled."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 0\nsave_top_k_best: 0\n")
    root = tmp_path / "root"
    steps = root / "steps"
    (first,) = _steps(steps, [100])
    link = root / "last.ckpt"
    os.symlink(Path("steps") / first.name, link)
    core = _daemon_core(root, policy)
    core.run(Trigger.STARTUP)
    assert first.exists()

    (saved,) = _steps(steps, [200])  # written; the link still names step 100
    event = core.run(Trigger.EVENT, {steps}, keep_plan=True)

    kept = next(decision for decision in event.the_plan.decisions if decision.record.path == saved)
    assert (kept.action, kept.reasons) == (
        "keep",
        ("newest step checkpoint: last.ckpt does not point at it yet",),
    )
    assert saved.exists()
    assert first.exists()

    link.unlink()  # Lightning moves the link: the previous target goes at the next pass
    os.symlink(Path("steps") / saved.name, link)
    core.run(Trigger.EVENT, {root})
    core.run(Trigger.EVENT, {steps})
    assert link.resolve() == saved
    assert saved.exists()
    assert not first.exists()


def test_a_blocked_groups_link_still_protects_its_target_in_another_group(tmp_path: Path) -> None:
    """A run whose per-run policy is invalid is blocked (nothing deleted there), and its last.ckpt
    names a checkpoint of another run: that checkpoint is what the blocked run resumes from."""
    target, *_ = _steps(tmp_path / "good", range(100, 800, 100))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: lots\n")
    os.symlink(Path("..") / "good" / target.name, bad / "last.ckpt")

    result = _daemon_core(tmp_path).run(Trigger.STARTUP, keep_plan=True)

    assert result.blocked == [bad]
    decision = next(decision for decision in result.the_plan.decisions if decision.record.path == target)
    assert (decision.action, decision.reasons) == ("keep", ("target of bad/last.ckpt",))
    assert target.exists()
    assert len(_names(tmp_path / "good")) == 6  # the 5 newest and the link's target


@pytest.mark.parametrize(("owner", "other"), [("run1", "run2"), ("run2", "run1")])
def test_a_link_protects_its_target_when_the_owners_own_link_moves_on_during_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: str, other: str
) -> None:
    """run2 was started from run1's step 500 (run2/last.ckpt -> ../run1/<500>). Between the pass's
    listing of links and run1's scan, run1 saves step 600 and moves its own last.ckpt there: run2's
    link still names step 500, whichever run's directory is listed first."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nsave_top_k_best: 0\n")
    root = tmp_path / "root"
    shared = _steps(root / owner, range(100, 600, 100))[-1]
    os.symlink(shared.name, root / owner / "last.ckpt")
    (root / other).mkdir()
    os.symlink(Path("..") / owner / shared.name, root / other / "last.ckpt")
    core = _daemon_core(root, policy)
    scan_directory = core.storage.scan_directory

    def trainer_saves_then_scan(root_: Path, directory: Path, *arguments: Any, **keywords: Any) -> Any:
        if directory == root / owner and not (directory / step_name(0, 600)).exists():
            saved = write_checkpoint(directory / step_name(0, 600))
            os.utime(saved, (time.time() - 60, time.time() - 60))  # its writer finished a while ago
            (directory / "last.ckpt").unlink()
            os.symlink(saved.name, directory / "last.ckpt")
        return scan_directory(root_, directory, *arguments, **keywords)

    monkeypatch.setattr(core.storage, "scan_directory", trainer_saves_then_scan)
    core.run(Trigger.STARTUP)

    assert shared.exists(), f"{other}/last.ckpt dangles: its target was deleted"
    assert _names(root / owner) == {shared.name, step_name(0, 600), "last.ckpt"}


def test_a_stop_before_the_scan_ends_plans_and_deletes_nothing(tmp_path: Path) -> None:
    _steps(tmp_path, range(100, 1000, 100))
    stop = threading.Event()
    stop.set()

    result = _daemon_core(tmp_path, stop=stop).run(Trigger.STARTUP)

    assert result.interrupted
    assert result.the_plan.groups == ()
    assert len(_names(tmp_path)) == 9


def test_a_stop_is_honoured_between_two_deletions_of_one_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _steps(tmp_path, range(100, 2100, 100))
    stop = threading.Event()
    delete_one = delete._delete_one

    def delete_then_stop(directory_fd: int, decision: Any, *rest: Any) -> Any:
        result = delete_one(directory_fd, decision, *rest)
        stop.set()  # a SIGTERM arrives during the first deletion
        return result

    monkeypatch.setattr(delete, "_delete_one", delete_then_stop)

    result = _daemon_core(tmp_path, stop=stop).run(Trigger.STARTUP)

    assert result.summary.to_delete == 15
    assert result.deleted == 1
    assert result.interrupted
    assert len(_names(tmp_path)) == 19


@pytest.mark.parametrize("command", ["watch", "prune"])
def test_an_error_nobody_foresaw_in_one_group_costs_that_group_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A bug (here: the planner raising for group a) is logged with its traceback as group_failed, a
    is left as it is, and b is still served, by the daemon's core and by prune (which exits 1)."""
    _steps(tmp_path / "a", range(100, 1000, 100))
    _steps(tmp_path / "b", range(100, 1000, 100))
    real_plan = planning.plan

    def plan_failing_in_a(records: Any, *rest: Any, **options: Any) -> Any:
        if any(record.path.parent.name == "a" for record in records):
            raise ValueError("a bug in the planner")
        return real_plan(records, *rest, **options)

    monkeypatch.setattr(reconcile, "plan", plan_failing_in_a)

    if command == "watch":
        configure_logging("info")  # JSON lines on stderr, as the daemon logs
        result = _daemon_core(tmp_path).run(Trigger.STARTUP)
        assert result.failed_groups == [tmp_path / "a"]
    else:
        assert main(["prune", str(tmp_path)]) == 1

    assert len(_names(tmp_path / "a")) == 9, "nothing deleted in the group that failed"
    assert len(_names(tmp_path / "b")) == 5, "the other group served"
    records = log_records(capsys.readouterr().err)
    [failure] = [record for record in records if record["event"] == "group_failed"]
    assert failure["directory"] == str(tmp_path / "a")
    assert "a bug in the planner" in failure["error"]
    assert "Traceback" in failure["exception"]


def test_a_stop_during_a_groups_scan_plans_and_deletes_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _steps(tmp_path, range(100, 1000, 100))
    stop = threading.Event()
    core = _daemon_core(tmp_path, stop=stop)
    scan_directory = core.storage.scan_directory

    def scan_then_stop(*arguments: Any, **options: Any) -> Any:
        records = scan_directory(*arguments, **options)
        stop.set()  # a SIGTERM arrives as the scan of a large group ends
        return records

    monkeypatch.setattr(core.storage, "scan_directory", scan_then_stop)

    result = core.run(Trigger.STARTUP)

    assert result.interrupted
    assert result.the_plan.groups == ()
    assert len(_names(tmp_path)) == 9


def test_a_last_link_missing_from_one_listing_keeps_its_target_until_rechecked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groups, "LINK_RECHECK_SECONDS", 0.2)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")
    root = tmp_path / "root"
    _, target, _ = _steps(root, [100, 200, 300])
    link = root / "last.ckpt"
    os.symlink(target.name, link)
    core = _daemon_core(root, policy)
    core.run(Trigger.STARTUP)
    assert target.exists()

    link.unlink()  # Lightning's unlink + symlink, listed in between
    first = core.run(Trigger.EVENT, {root}, keep_plan=True)
    kept = next(decision for decision in first.the_plan.decisions if decision.record.path == target)
    assert kept.action == "keep"
    assert kept.reasons == ("target of last.ckpt (missing from this listing; re-checked)",)
    assert core.index.next_recheck() is not None

    time.sleep(0.3)  # the link stays gone past the re-check: its absence is trusted
    second = core.run(Trigger.EVENT, core.index.take_due_rechecks(time.monotonic()), keep_plan=True)
    assert [decision.record.path for decision in second.the_plan.deletions] == [target]
    assert not target.exists()


def test_an_invalid_per_run_policy_blocks_its_group_and_no_other(
    tmp_path: Path, captured: LogCapture
) -> None:
    _steps(tmp_path / "good", range(100, 800, 100))
    _steps(tmp_path / "bad", range(100, 800, 100))
    (tmp_path / "bad" / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: lots\n")
    core = _daemon_core(tmp_path)

    first = core.run(Trigger.STARTUP)
    core.run(Trigger.RESCAN)

    assert first.blocked == [tmp_path / "bad"]
    assert len(logged(captured, "group_blocked")) == 1  # logged once while it stays blocked
    assert len(_names(tmp_path / "bad")) == 8
    assert len(_names(tmp_path / "good")) == 5
    with pytest.raises(InvalidPolicyFilesError):
        prune_once(
            tmp_path, load_policy(None), pins={}, settle_seconds=0, dry_run=True, working_directory=tmp_path
        )


def test_events_name_the_groups_that_hold_what_changed(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text('naming:\n  step: "checkpoint-{step}"\n')
    root = tmp_path / "root"
    (root / "run" / "checkpoint-100").mkdir(parents=True)
    (root / "run" / "nested" / "deeper").mkdir(parents=True)
    core = _daemon_core(root, policy)
    core.run(Trigger.STARTUP)
    assert set(core.index) == {
        root,
        root / "run",
        root / "run" / "nested",
        root / "run" / "nested" / "deeper",
    }

    inside = str(root / "run" / "checkpoint-100" / "trainer_state.json")
    assert core.groups_touched([inside], []) == {root / "run"}
    (root / "new" / "sub").mkdir(parents=True)
    assert core.groups_touched([], [str(root / "new")]) == {root, root / "new", root / "new" / "sub"}
    (root / "run" / "nested" / "deeper").rmdir()
    (root / "run" / "nested").rmdir()
    assert core.groups_touched([], [str(root / "run" / "nested")]) == {root / "run"}
    assert root / "run" / "nested" / "deeper" not in core.index


def test_leftovers_of_an_interrupted_removal_are_finished_only_when_not_a_dry_run(tmp_path: Path) -> None:
    interrupted = tmp_path / "run" / "epoch=00-step=000100-train.ckpt"  # as delete.py renames it
    interrupted.mkdir(parents=True)
    (interrupted / "shard").write_bytes(b"x")
    leftover = interrupted.with_name(delete.leftover_name(interrupted.name, interrupted.stat().st_ino))
    interrupted.rename(leftover)
    loaded = load_policy(None)

    prune_once(tmp_path, loaded, pins={}, settle_seconds=0, dry_run=True, working_directory=tmp_path)
    assert leftover.exists()
    prune_once(tmp_path, loaded, pins={}, settle_seconds=0, dry_run=False, working_directory=tmp_path)
    assert not leftover.exists()


def test_a_long_group_keeps_the_daemon_alive_while_it_is_scanned_and_pruned(tmp_path: Path) -> None:
    """The keep-alive (systemd watchdog, the heartbeat a liveness probe reads) is sent from the pass
    itself: every PROGRESS_EVERY entries of a group's scan and after each deletion, not only between
    groups, so a root whose one group takes minutes is not killed as hung in the middle of it."""
    run = tmp_path / "run"
    run.mkdir()
    data = zip_bytes(b"weights")
    for step in range(1, 2 * scan.PROGRESS_EVERY + 2):
        (run / step_name(0, step)).write_bytes(data)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2040\n")  # 9 deleted
    moments: list[str] = []
    original_delete = delete._delete_guarded

    def deleting(*arguments: Any) -> Any:
        moments.append("delete")
        return original_delete(*arguments)

    tree = PolicyTree(tmp_path, load_policy(policy), strict=False)
    core = Reconciler(
        tree,
        ProtectionRegistry(tmp_path),
        pins={},
        settle_seconds=0,
        one_shot=False,
        progress=lambda: moments.append("tick"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(delete, "_delete_guarded", deleting)
        assert core.run(Trigger.STARTUP).deleted == 9

    ticks_before_deletions = moments[: moments.index("delete")].count("tick")
    assert ticks_before_deletions >= 3  # the scan of 2,049 entries: at 0, 1,024 and 2,048
    after = moments[moments.index("delete") :]
    assert after[:18] == ["delete", "tick"] * 9  # one after each deletion


def test_a_pin_unread_midway_stops_prune_there_and_says_what_it_did_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restore while ``prune`` runs writes a pin the pass then cannot read: the groups before were
    pruned, the pass stops before the next group's plan, and ``prune`` says both; the restored
    checkpoint and everything after stay."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    root = tmp_path / "root"
    _steps(root / "a", range(100, 400, 100))
    _steps(root / "b", range(100, 300, 100))
    first = prune_once(
        root, load_policy(policy), pins={}, settle_seconds=0, dry_run=False, working_directory=root
    )
    assert first.trashed == 3
    _steps(root / "a", [400])
    _steps(root / "b", [300])
    pins = failing_pin_reads(monkeypatch)

    def restore_during_the_pass(done: int, total: int) -> None:
        listing = list_trash(root)
        if done == 2 and listing is not None:  # (the root's own group, then a/)
            restore(root, [entry for entry in listing.entries if entry.original.startswith("b/")])
            pins.failing = True

    result = prune_once(
        root,
        load_policy(policy),
        pins={},
        settle_seconds=0,
        dry_run=False,
        working_directory=root,
        on_group=restore_during_the_pass,
    )
    assert result.trashed == 1  # a/'s step 300, before
    assert result.storage_error is not None
    assert "a pin of a restored checkpoint is unknown (.ckpt-trash/restored/" in result.storage_error
    assert _names(root / "b") == {step_name(0, 100), step_name(0, 200), step_name(0, 300)}

    pins.failing = False
    _steps(root / "a", [500])
    pins.failing = True  # from the start of the pass: nothing is deleted
    capsys.readouterr()  # (what the passes above logged)
    assert main(["prune", str(root), "--policy", str(policy), "--dry-run", "--json"]) == 1
    shown = capsys.readouterr()
    assert shown.err.rstrip().endswith("; the plan stops there (a dry run: nothing was deleted)")
    assert "a pin of a restored checkpoint is unknown" in json.loads(shown.out)["summary"]["stopped"]
    assert main(["prune", str(root), "--policy", str(policy)]) == 1
    assert capsys.readouterr().err.rstrip().endswith("; nothing was deleted")
    assert _names(root / "a") == {step_name(0, 400), step_name(0, 500)}
    pins.failing = False
    assert main(["prune", str(root), "--policy", str(policy)]) == 0
    assert _names(root / "a") == {step_name(0, 500)}
    assert _names(root / "b") == {step_name(0, 100), step_name(0, 300)}  # the restored one, and the newest


def test_a_run_below_a_root_keeps_what_a_restore_through_that_root_pinned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``restore ROOT`` pins the checkpoint in ROOT's trash; a ``prune`` (or ``watch``) of a run
    directory inside ROOT read only the run's own trash, so a review found ``prune ROOT/run`` deleted
    the restored checkpoint at once. The trashes of the directories above are read too: kept, with
    the pin's reason, in the audit and in the prune."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    root = tmp_path / "root"
    run = root / "run"
    _steps(run, range(100, 400, 100))
    first = prune_once(
        root, load_policy(policy), pins={}, settle_seconds=0, dry_run=False, working_directory=root
    )
    assert first.trashed == 2
    listing = list_trash(root)
    assert listing is not None
    restore(root, [entry for entry in listing.entries if entry.original == f"run/{step_name(0, 100)}"])
    capsys.readouterr()

    assert main(["prune", str(run), "--policy", str(policy), "--dry-run", "--json"]) == 0
    entries = {
        entry["name"]: entry
        for group in json.loads(capsys.readouterr().out)["groups"]
        for entry in group["entries"]
    }
    assert entries[step_name(0, 100)]["action"] == "keep"
    assert entries[step_name(0, 100)]["reasons"][0].startswith("restored from the trash: pinned until ")
    assert main(["prune", str(run), "--policy", str(policy)]) == 0
    assert _names(run) == {step_name(0, 100), step_name(0, 300)}
    assert not (run / ".ckpt-trash").exists()  # (nothing for run's own trash to hold)
