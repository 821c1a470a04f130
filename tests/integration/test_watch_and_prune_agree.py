"""``prune`` and ``watch`` share one reconcile core, so they decide the same on the same tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.daemon import running_daemon
from tests.support.factories import step_name, write_checkpoint

pytestmark = pytest.mark.timeout(120)


def _cross_linked_tree(root: Path) -> Path:
    """``a/last.ckpt -> ../b/<oldest>``: a link in one group naming a checkpoint of another."""
    for step in range(100, 800, 100):
        write_checkpoint(root / "b" / step_name(0, step))
    (root / "a").mkdir()
    os.symlink(Path("..") / "b" / step_name(0, 100), root / "a" / "last.ckpt")
    return root / "b" / step_name(0, 100)


def _actions(stdout: str) -> dict[str, str]:
    document = json.loads(stdout)
    return {entry["path"]: entry["action"] for group in document["groups"] for entry in group["entries"]}


def test_a_symlink_target_in_another_group_is_kept_by_both_commands(tmp_path: Path) -> None:
    root = tmp_path / "root"
    target = _cross_linked_tree(root)

    dry_run = run_cli("prune", str(root), "--dry-run", "--json", "--settle", "0")
    assert dry_run.returncode == 0, dry_run.stderr
    assert _actions(dry_run.stdout)[str(target)] == "keep"

    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        deleted = {record["path"] for record in daemon.events("checkpoint_deleted")}
        assert daemon.stop() == 0
    assert target.exists(), "the start-up reconcile deleted the target of a/last.ckpt"
    assert str(target) not in deleted
    assert len(deleted) == 1  # b keeps its newest 5 and the link target: only step 200 goes

    pruned = run_cli("prune", str(root), "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert _actions(pruned.stdout)[str(target)] == "keep"
    assert target.exists()
