"""Real Lightning with ``save_last="link"``, pruned in the window between a save and the link's move.

Lightning writes a checkpoint, calls its loggers' ``after_save_checkpoint``, and only then links
``last.ckpt`` to it. ``tests/support/lightning_link_window.py`` runs ``ckpt-watcher prune`` (the real
command) from that hook after every save. A run rolled back to an older checkpoint, or a fresh run in
the same directory, saves below the directory's newest step: outside the newest N, its save used to be
deleted before the link moved to it, leaving ``last.ckpt`` dangling and the run unable to resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "lightning_link_window.py"
TRAIN_TIMEOUT = 240.0


def _run(
    tmp_path: Path, scenario: str, *extra: str, policy_text: str = "save_top_k_checkpoints: 2\n"
) -> dict[str, object]:
    run = tmp_path / "run"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    report = tmp_path / "report.json"
    temporary = tmp_path / "trainer-tmp"
    temporary.mkdir()
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, str(run), str(policy), str(report), *extra],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(temporary), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document: dict[str, object] = json.loads(report.read_text())
    return document


def _check(document: dict[str, object]) -> None:
    deletions = document["deletions"]
    assert isinstance(deletions, list)
    assert deletions, "the policy deletes something in every scenario: prune ran in the window"
    # never the checkpoint just written, which the link is about to name
    assert [d for d in deletions if d["name"] == d["after_save"]] == []
    after_fit = document["after_fit"]
    assert isinstance(after_fit, list)
    for fitted in after_fit:
        assert fitted["links"], fitted
        for name, link in fitted["links"].items():
            where = f"after the fit to step {fitted['max_steps']}"
            assert link["resolves"], f"{where}: {name} -> {link['target']} dangles"


@pytest.mark.timeout(300)
def test_a_rolled_back_run_keeps_the_checkpoint_its_link_moves_to(tmp_path: Path) -> None:
    protect = tmp_path / "run" / "epoch=00-step=000016-train.ckpt"  # the rollback point, pinned
    document = _run(tmp_path, "rollback", "--protect", str(protect))
    _check(document)
    files = document["files"]
    assert isinstance(files, list)
    assert protect.name in files


@pytest.mark.timeout(300)
def test_a_fresh_run_in_the_same_directory_keeps_the_checkpoint_its_link_moves_to(tmp_path: Path) -> None:
    document = _run(tmp_path, "restart")
    _check(document)
    last_links = document["after_fit"][-1]["links"]  # type: ignore[index]
    assert "last-v1.ckpt" in last_links  # Lightning versions the fresh run's link beside the old one


@pytest.mark.timeout(300)
def test_a_link_down_into_the_filename_subdirectory_keeps_the_checkpoint_it_moves_to(tmp_path: Path) -> None:
    """``filename="steps/epoch=..."`` writes in run/steps and links run/last.ckpt down to it. The
    saves are planned in run/steps, a directory of their own, while the link is in run: with the
    policy keeping no step checkpoint, each save went before the link moved to it (outside the
    newest 0), last.ckpt dangled, and ``fit(ckpt_path="last")`` could not resume."""
    document = _run(
        tmp_path,
        "resume",
        "--subdirectory",
        "steps",
        policy_text="save_top_k_checkpoints: 0\nsave_top_k_best: 0\n",
    )
    _check(document)
    after_fit = document["after_fit"]
    assert isinstance(after_fit, list)
    assert [fitted["started_at"] for fitted in after_fit] == [0, 16]  # resumed from last.ckpt
    target = after_fit[-1]["links"]["last.ckpt"]["target"]
    assert target.startswith("steps/"), target
    assert target.endswith("-step=000032-train.ckpt"), target


@pytest.mark.timeout(300)
def test_a_link_to_a_save_not_whole_yet_keeps_the_runs_previous_save(tmp_path: Path) -> None:
    """Lightning's AsyncCheckpointIO links last.ckpt before its thread writes; prune runs while the
    checkpoint is half written. In the run rolled back below the abandoned steps, the run's previous
    save is its only resume point until then: never deleted (the newest by step are the abandoned
    branch's)."""
    protect = tmp_path / "run" / "epoch=00-step=000016-train.ckpt"  # the rollback point, pinned
    document = _run(tmp_path, "rollback", "--async-io", "--protect", str(protect))

    deletions = document["deletions"]
    assert isinstance(deletions, list)
    assert deletions, "the policy deletes something: prune ran in the window"
    assert [d for d in deletions if d["name"] in (d["after_save"], d["resume_point"])] == []
    # the window was reached in the rolled-back run (its third fit), below the abandoned steps
    assert any(d["fit"] == 2 and d["resume_point"] is not None for d in deletions), deletions
