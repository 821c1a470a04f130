"""A pass that planned a checkpoint, then was frozen (or waited for the trash's lock) while a `prune`
trashed it and a `restore` put it back: the restored checkpoint has the very identity the stale plan
checks (a rename keeps inode, size and mtime), so only its pin, read under the trash's lock, keeps
the late move from undoing the restore."""

from __future__ import annotations

from pathlib import Path

from ckpt_watcher.delete import Outcome, apply_plan
from ckpt_watcher.plan import plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.scan import ScanOptions, scan_tree
from ckpt_watcher.trash import list_trash
from ckpt_watcher.trash_moves import TrashTarget, restore
from tests.support.factories import step_name, write_checkpoint

KEEP_ONE = Policy(save_top_k_checkpoints=1)
DAY = 86400
NOW = 1_800_000_000.0


def test_a_checkpoint_restored_since_it_was_planned_is_not_trashed_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (100, 200, 300):
        write_checkpoint(run / step_name(0, step), f"weights {step}".encode())
    stale = plan(scan_tree(tmp_path, KEEP_ONE.compiled_naming, ScanOptions()).records, KEEP_ONE)
    assert [decision.record.name for decision in stale.deletions] == [step_name(0, 100), step_name(0, 200)]
    prune = apply_plan(stale, tmp_path, trash=TrashTarget(tmp_path, DAY, clock=lambda: NOW))
    assert [result.outcome for result in prune.results] == [Outcome.TRASHED] * 2
    listing = list_trash(tmp_path)
    assert listing is not None
    restore(tmp_path, listing.entries, now=NOW + 10)

    late = apply_plan(stale, tmp_path, trash=TrashTarget(tmp_path, DAY, clock=lambda: NOW + 20))

    assert [result.outcome for result in late.results] == [Outcome.CHANGED] * 2
    assert sorted(path.name for path in run.iterdir()) == [step_name(0, step) for step in (100, 200, 300)]
    after = list_trash(tmp_path)
    assert after is not None
    assert after.entries == []
