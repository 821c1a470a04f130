"""What a pass reports for the metrics and the status line, on real files: deletions by kind, what is
kept over every group (also after a pass over some of them), refused per-run files, and the progress
callback of each group."""

from __future__ import annotations

import shutil
from pathlib import Path

from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import load_policy
from ckpt_watcher.policy_file import ReloadResult
from ckpt_watcher.protection import ProtectionRegistry
from ckpt_watcher.reconcile import Reconciler, Trigger, prune_once
from tests.support.factories import best_name, step_name, write_checkpoint
from tests.support.quiet_clock import QuietClock


def _core(root: Path, outcomes: list[ReloadResult] | None = None) -> Reconciler:
    tree = PolicyTree(
        root, load_policy(None), strict=False, on_outcome=None if outcomes is None else outcomes.append
    )
    return Reconciler(tree, ProtectionRegistry(root), pins={}, settle_seconds=0, one_shot=False)


def _seed(directory: Path, steps: range, bests: int = 0) -> None:
    for step in steps:
        write_checkpoint(directory / step_name(0, step))
    for index in range(bests):
        write_checkpoint(directory / best_name(0, 100 * (index + 1), 1.0 - index / 10))


def test_deletions_are_counted_by_kind_with_their_bytes(tmp_path: Path) -> None:
    _seed(tmp_path / "run", range(100, 900, 100), bests=5)  # the default keeps 5 steps and 3 best

    result = _core(tmp_path).run(Trigger.STARTUP)

    size = (tmp_path / "run" / step_name(0, 800)).stat().st_size
    assert result.deleted_by_kind.checkpoints == {"step": 3, "best": 2}
    assert result.deleted_by_kind.bytes["step"] == 3 * size
    assert sum(result.deleted_by_kind.bytes.values()) == result.bytes_freed
    assert result.kept_overall.checkpoints == {"step": 5, "best": 3}


def test_kept_overall_counts_the_groups_an_event_pass_did_not_cover(tmp_path: Path) -> None:
    for run in ("a", "b", "c"):
        _seed(tmp_path / run, range(100, 400, 100))
    core = _core(tmp_path)
    assert core.run(Trigger.STARTUP).kept_overall.checkpoints == {"step": 9}

    _seed(tmp_path / "a", range(400, 700, 100))
    event = core.run(Trigger.EVENT, {tmp_path / "a"})
    assert event.summary.kept == 5, "the pass itself planned run a only"
    assert event.kept_overall.checkpoints == {"step": 5 + 3 + 3}

    shutil.rmtree(tmp_path / "b")
    assert core.run(Trigger.RESCAN).kept_overall.checkpoints == {"step": 5 + 3}


def test_refused_per_run_files_are_counted_until_fixed_and_each_outcome_reported_once(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    _seed(tmp_path / "run", range(100, 300, 100))
    override = tmp_path / "run" / ".ckpt-watcher.yaml"
    override.write_text("save_top_k_checkpoints: 1\n")
    outcomes: list[ReloadResult] = []
    core = _core(tmp_path, outcomes)
    assert core.run(Trigger.STARTUP).refused_overrides == 0

    override.write_text("save_top_k_checkpoints: [\n")  # edits, each read once left alone a while
    assert core.run(Trigger.EVENT, {tmp_path / "run"}).refused_overrides == 0, "not read yet"
    quiet_clock.pass_quiet_time()
    assert core.run(Trigger.EVENT, {tmp_path / "run"}).refused_overrides == 1
    assert core.run(Trigger.RESCAN).refused_overrides == 1, "read once: refused until it changes"
    override.write_text("save_top_k_checkpoints: 2\n")
    core.run(Trigger.EVENT, {tmp_path / "run"})
    quiet_clock.pass_quiet_time()
    assert core.run(Trigger.EVENT, {tmp_path / "run"}).refused_overrides == 0

    assert outcomes == [ReloadResult.REJECTED, ReloadResult.APPLIED]


def test_each_group_done_is_reported_with_the_passs_total(tmp_path: Path) -> None:
    for run in ("a", "b"):
        _seed(tmp_path / run, range(100, 300, 100))
    calls: list[tuple[int, int]] = []

    prune_once(
        tmp_path,
        load_policy(None),
        pins={},
        settle_seconds=0,
        dry_run=True,
        working_directory=tmp_path,
        on_group=lambda done, total: calls.append((done, total)),
    )

    assert calls == [(1, 3), (2, 3), (3, 3)]  # the root and the two runs
