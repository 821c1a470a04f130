"""Checkpoints dated ahead of this machine's clock (a writer's clock ahead, on a file system that
keeps the writer's times): not counted before this clock reaches them, as anything that may still be
written, but warned about (``checkpoint_suspicious``) once they are far ahead, since that may be
long and holds the run's retention. Real files and the real ``prune`` command."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support.cli import events, prune_entries, run_cli
from tests.support.factories import backdate_tree, step_name, write_checkpoint

pytestmark = pytest.mark.timeout(120)

A_DAY = 86_400


def _date(path: Path, seconds_from_now: float) -> None:
    stamp = time.time() + seconds_from_now
    os.utime(path, (stamp, stamp), follow_symlinks=False)


@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_a_checkpoint_dated_a_day_ahead_is_kept_uncounted_and_warned_about(
    tmp_path: Path, directory: bool
) -> None:
    run = tmp_path / "run"
    for step in (100, 200, 300):
        if directory:  # Lightning's sharded save: torch.distributed.checkpoint files, then meta.pt
            for name in ("__0_0.distcp", ".metadata", "meta.pt"):
                write_checkpoint(run / step_name(0, step) / name)
        else:
            write_checkpoint(run / step_name(0, step))
    backdate_tree(run)
    ahead = run / step_name(0, 300)
    for path in [ahead, *ahead.rglob("*")]:
        _date(path, A_DAY)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")

    result = run_cli("prune", str(run), "--policy", str(policy), "--dry-run", "--json")
    entries = prune_entries(result, exit_code=0)

    assert entries[ahead.name]["action"] == "skip"
    assert (
        "s in the future by this machine's clock (the writer's clock is ahead?)"
        in entries[ahead.name]["reasons"][0]
    )
    assert entries[step_name(0, 200)]["action"] == "keep"  # the newest counted: nothing pushed out by it
    assert entries[step_name(0, 100)]["action"] == "delete"
    warned = events(result.stderr, "checkpoint_suspicious")
    assert [record["path"] for record in warned] == [str(ahead)]


def test_a_checkpoint_a_few_seconds_ahead_is_only_still_being_written(tmp_path: Path) -> None:
    """Clocks a few seconds apart are ordinary: no warning for that, and it counts once this clock
    reaches its time plus the settle time."""
    run = tmp_path / "run"
    for step in (100, 200):
        write_checkpoint(run / step_name(0, step))
    backdate_tree(run)
    _date(run / step_name(0, 200), 5)

    result = run_cli("prune", str(run), "--dry-run", "--json")
    entries = prune_entries(result, exit_code=0)

    assert entries[step_name(0, 200)]["reasons"][0].startswith("still being written (modified 0.0 s ago")
    assert events(result.stderr, "checkpoint_suspicious") == []
