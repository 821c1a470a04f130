"""The trash with real files and real processes: the daemon, ``prune``, ``restore``, ``trash list`` and
``trash empty`` (``python -m ckpt_watcher ...``), alone and at the same time."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import events, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import step_name, write_checkpoint

pytestmark = pytest.mark.timeout(180)

TRASH = ".ckpt-trash"


def digests(directory: Path) -> dict[str, str]:
    """Every file below ``directory`` (the trash left out) with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and TRASH not in path.relative_to(directory).parts
    }


def write_steps(directory: Path, steps: Iterable[int]) -> None:
    for step in steps:
        write_checkpoint(directory / step_name(0, step), payload=f"the weights of step {step}".encode() * 64)


def directory_checkpoint(path: Path, files: int = 4) -> Path:
    """A finished DeepSpeed-style directory checkpoint (``latest`` written last), old enough to count."""
    (path / "checkpoint").mkdir(parents=True)
    for index in range(files):
        (path / "checkpoint" / f"zero_rank_{index}.pt").write_bytes(os.urandom(4096))
    (path / "latest").write_text("checkpoint")
    an_hour_ago = 1_700_000_000
    for item in [*path.rglob("*"), path]:
        os.utime(item, (an_hour_ago, an_hour_ago), follow_symlinks=False)
    return path


def trash_keys(root: Path) -> list[str]:
    info = root / TRASH / "info"
    return sorted(name for name in os.listdir(info) if not name.startswith(".")) if info.is_dir() else []


def at(path: Path) -> Callable[[dict[str, Any]], bool]:
    """A predicate on log records: about ``path``."""
    return lambda record: record.get("path") == str(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    return directory


def policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def watch(root: Path, policy_path: Path) -> list[str]:
    return ["watch", str(root), "--policy", str(policy_path), "--settle", "0"]


def test_a_policy_typo_is_undone_byte_for_byte_and_the_daemon_keeps_what_came_back(
    root: Path, tmp_path: Path
) -> None:
    """The issue's first story: a week of checkpoints deleted by a typo, every one restorable."""
    run = root / "stage1"
    write_steps(run, range(100, 1300, 100))
    before = digests(root)
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 20\ntrash: {grace: 1h}\n")
    with running_daemon(watch(root, policy_path), tmp_path / "log") as daemon:
        daemon.wait_ready()
        policy_path.write_text("save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")  # meant 10

        daemon.wait_for("checkpoint_trashed", count=11)
        assert sorted(os.listdir(run)) == [step_name(0, 1200)]
        assert daemon.events("checkpoint_deleted") == []
        listed = json.loads(run_cli("trash", "list", str(root), "--json").stdout)
        assert sorted(entry["original"] for entry in listed["entries"]) == sorted(
            f"stage1/{step_name(0, step)}" for step in range(100, 1200, 100)
        )

        restored = run_cli("restore", str(root), "--all")

        assert restored.returncode == 0, restored.stderr
        assert len(events(restored.stderr, "checkpoint_restored")) == 11
        assert digests(root) == before
        # The next pass over the group (a new checkpoint) takes only what the policy now deletes:
        # the restored checkpoints are pinned for the grace.
        write_steps(run, [1300])
        daemon.wait_for("checkpoint_trashed", lambda record: record["path"].endswith(step_name(0, 1200)))
        daemon.wait_for("pass_completed", lambda record: record["trashed"] == 1)
        assert len(daemon.events("checkpoint_trashed")) == 12
        now = digests(root)
        for name, digest in before.items():
            if not name.endswith(step_name(0, 1200)):
                assert now[name] == digest, name
        plan = json.loads(
            run_cli("prune", str(root), "--policy", str(policy_path), "--dry-run", "--json").stdout
        )
        reasons = {entry["name"]: entry["reasons"] for entry in plan["groups"][0]["entries"]}
        assert reasons[step_name(0, 100)][-1].startswith("restored from the trash: pinned until ")
        assert daemon.stop() == 0


def test_the_daemon_purges_each_entry_once_its_grace_is_over(root: Path, tmp_path: Path) -> None:
    write_steps(root, range(100, 600, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 2\ntrash: {grace: 2s}\n")
    with running_daemon(watch(root, policy_path), tmp_path / "log") as daemon:
        daemon.wait_ready()
        trashed = daemon.wait_for("checkpoint_trashed", count=3)

        purged = daemon.wait_for("checkpoint_purged", count=3, timeout=60)

        assert sorted(record["path"] for record in purged) == sorted(record["path"] for record in trashed)
        assert all(record["why"] == "its grace is over" for record in purged)
        wait_until(lambda: trash_keys(root) == [], what="the trash's metadata gone")
        assert [path for path in (root / TRASH).rglob("*") if not path.is_dir()] == []
        assert sorted(os.listdir(root)) == [TRASH, step_name(0, 400), step_name(0, 500)]
        # the pass that purged reports it, and what is left in the trash
        assert any(record.get("purged") for record in daemon.events("pass_completed"))
        wait_until(
            lambda: any(record.get("trash_bytes") == 0 for record in daemon.events("pass_completed")),
            what="a pass reporting an empty trash",
        )


def test_prune_trashes_shows_the_trash_and_purges_what_is_due(root: Path, tmp_path: Path) -> None:
    write_steps(root / "run", range(100, 600, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 2\ntrash: {grace: 1s}\n")

    audit = run_cli("prune", str(root), "--policy", str(policy_path), "--dry-run")
    applied = run_cli("prune", str(root), "--policy", str(policy_path))
    listed = run_cli("trash", "list", str(root))
    shown = run_cli("prune", str(root), "--policy", str(policy_path), "--dry-run", "--json")

    assert audit.returncode == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert lines[0] == "trash: none yet"
    assert [line.split()[0] for line in lines if line.startswith("  ")][1:] == ["keep"] * 2 + ["trash"] * 3
    assert lines[-1].startswith("kept 2 (")
    assert ", would trash 3 (" in lines[-1]
    assert applied.returncode == 0, applied.stderr
    assert len(events(applied.stderr, "checkpoint_trashed")) == 3
    assert events(applied.stderr, "checkpoint_deleted") == []
    assert applied.stdout.splitlines()[-1].startswith("kept 2 (")
    assert ", trashed 3 (" in applied.stdout.splitlines()[-1]
    assert listed.returncode == 0
    assert [line.split("  ")[-2].strip() for line in listed.stdout.splitlines()[1:4]] == [
        f"run/{step_name(0, step)}" for step in (100, 200, 300)
    ]
    document = json.loads(shown.stdout)
    assert document["trash"]["entries"] == 3
    assert document["trash"]["oldest"]["original"] == f"run/{step_name(0, 100)}"
    # a later prune (not a dry run) purges what is due: the grace was 1 s
    wait_until(lambda: _all_due(root), timeout=30, what="every entry's grace over")
    again = run_cli("prune", str(root), "--policy", str(policy_path))
    assert len(events(again.stderr, "checkpoint_purged")) == 3
    assert trash_keys(root) == []


def _all_due(root: Path) -> bool:
    """True once every entry's purge time (as the trash lists it) has passed."""
    listed = json.loads(run_cli("trash", "list", str(root), "--json").stdout)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return all(entry["purge_at"] < now for entry in listed["entries"])


def test_a_directory_checkpoint_is_trashed_and_restored_whole(root: Path, tmp_path: Path) -> None:
    run = root / "deepspeed"
    old = directory_checkpoint(run / step_name(0, 100), files=8)
    directory_checkpoint(run / step_name(0, 200))
    before, inside = digests(root), digests(old)
    inode = old.stat().st_ino
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")

    pruned = run_cli("prune", str(root), "--policy", str(policy_path))

    assert pruned.returncode == 0, pruned.stderr
    [trashed] = events(pruned.stderr, "checkpoint_trashed")
    assert trashed["path"] == str(old)
    assert not old.exists()
    moved = Path(trashed["trash_path"])
    assert moved.stat().st_ino == inode  # the directory itself, moved in one rename
    assert digests(moved) == inside  # whole, byte for byte

    restored = run_cli("restore", str(root), step_name(0, 100))

    assert restored.returncode == 0, restored.stderr
    assert old.stat().st_ino == inode
    assert digests(root) == before
    assert restored.stdout.startswith(f"restored  deepspeed/{step_name(0, 100)}  (trashed ")


def test_restore_refuses_to_overwrite_and_exits_1(root: Path, tmp_path: Path) -> None:
    write_steps(root, range(100, 400, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")
    run_cli("prune", str(root), "--policy", str(policy_path))
    (root / step_name(0, 100)).write_bytes(b"written again since")

    restored = run_cli("restore", str(root), "--all")

    assert restored.returncode == 1
    assert (root / step_name(0, 100)).read_bytes() == b"written again since"
    assert (root / step_name(0, 200)).is_file()  # the other entry was restored
    lines = restored.stdout.splitlines()
    assert lines[0].startswith(f"restored  {step_name(0, 200)}  ")
    assert lines[1] == (
        f"refused   {step_name(0, 100)}  ({step_name(0, 100)} exists again; it is never overwritten "
        "(move it away first))"
    )
    [refused] = events(restored.stderr, "restore_refused")
    assert refused["path"] == str(root / step_name(0, 100))
    assert len(trash_keys(root)) == 1  # still in the trash, restorable once the name is free


def test_restore_and_trash_empty_usage(root: Path, tmp_path: Path) -> None:
    write_steps(root, range(100, 400, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")
    run_cli("prune", str(root), "--policy", str(policy_path))

    nothing_named = run_cli("restore", str(root))
    both = run_cli("restore", str(root), "x", "--all")
    no_match = run_cli("restore", str(root), "no-such-checkpoint*")
    bad_since = run_cli("restore", str(root), "--since", "yesterday")
    bad_age = run_cli("trash", "empty", str(root), "--older-than", "24")
    young = run_cli("trash", "empty", str(root), "--older-than", "1h")
    recent = run_cli("restore", str(root), "--since", "10m", step_name(0, 200))
    emptied = run_cli("trash", "empty", str(root))

    assert (nothing_named.returncode, both.returncode, bad_since.returncode, bad_age.returncode) == (
        2,
        2,
        2,
        2,
    )
    assert "name the entries to restore" in nothing_named.stderr
    assert "a number needs a unit" in bad_age.stderr
    assert no_match.returncode == 1
    assert "matches" in no_match.stderr
    assert young.stdout.strip() == "purged 0 entries (0 B)"
    assert recent.returncode == 0
    assert (root / step_name(0, 200)).is_file()
    assert emptied.returncode == 0
    assert emptied.stdout.startswith("purged 1 entry (")
    assert trash_keys(root) == []


def test_a_bad_grace_is_a_policy_error(root: Path, tmp_path: Path) -> None:
    write_steps(root, range(100, 400, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash: {grace: 24}\n")

    pruned = run_cli("prune", str(root), "--policy", str(policy_path))
    watched = run_cli("watch", str(root), "--policy", str(policy_path))

    for completed in (pruned, watched):
        assert completed.returncode == 2
        assert "At 'trash.grace': expected a duration" in completed.stderr
    assert len(os.listdir(root)) == 3


def test_two_restores_race_the_daemons_passes_and_each_entry_comes_back_once(
    root: Path, tmp_path: Path
) -> None:
    """Two ``restore --all`` at once, while the daemon runs a full pass every 0.1 s over the very
    groups they move checkpoints back into: each entry comes back once, and none is taken again."""
    runs = [root / f"run{index}" for index in range(5)]
    steps = range(100, 4100, 100)  # 39 trashed per run: enough for the two restores to overlap
    for run in runs:
        write_steps(run, steps)
    before = digests(root)
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")
    trashed = len(runs) * (len(steps) - 1)
    with running_daemon([*watch(root, policy_path), "--rescan", "0.1"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        assert len(daemon.events("checkpoint_trashed")) == trashed
        restores = [
            subprocess.Popen(
                [sys.executable, "-m", "ckpt_watcher", "restore", str(root), "--all"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=120) for process in restores]
        rescans = len([record for record in daemon.events("pass_completed") if record["trigger"] == "rescan"])
        # two more full passes over every group, after both restores are done
        daemon.wait_for("pass_completed", lambda record: record["trigger"] == "rescan", count=rescans + 2)

        restored = [record for _, stderr in outputs for record in events(stderr, "checkpoint_restored")]
        assert sorted(record["path"] for record in restored) == sorted(
            str(run / step_name(0, step)) for run in runs for step in steps[:-1]
        )  # each entry restored exactly once, by one of the two
        refused = [record for _, stderr in outputs for record in events(stderr, "restore_refused")]
        # what one restore listed and the other moved back first is refused, never restored twice
        assert {record["error"] for record in refused} <= {
            "no longer in the trash (restored or purged meanwhile)"
        }
        assert len(daemon.events("checkpoint_trashed")) == trashed  # nothing restored was taken again
        assert digests(root) == before
        assert trash_keys(root) == []
        assert daemon.stop() == 0


def test_trash_commands_work_while_the_daemon_holds_the_root_lock(root: Path, tmp_path: Path) -> None:
    write_steps(root, range(100, 500, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")
    with running_daemon(watch(root, policy_path), tmp_path / "log") as daemon:
        daemon.wait_ready()
        daemon.wait_for("checkpoint_trashed", count=3)

        listed = run_cli("trash", "list", str(root), "--json")
        emptied = run_cli("trash", "empty", str(root), "--older-than", "0")

        assert listed.returncode == 0
        assert len(json.loads(listed.stdout)["entries"]) == 3
        assert emptied.returncode == 0, emptied.stderr
        assert emptied.stdout.startswith("purged 3 entries (")
        assert trash_keys(root) == []
        assert daemon.process.poll() is None


@pytest.mark.parametrize("refused", ["restored", "trash"])
def test_a_trash_directory_writable_by_every_user_still_has_its_pins_kept(
    root: Path, tmp_path: Path, refused: str
) -> None:
    """``restored/``, or the trash itself, made writable by every user (chmod o+w, a slip of an admin)
    is refused, as every such trash directory is, and was then taken for one with no pins: the
    restored checkpoints were trashed again (or deleted), without a word. Its pins are now read anyway
    (one there can only keep more), so ``prune`` and the daemon keep the restored checkpoints and say
    why the trash is refused. With the trash itself refused, the deletions that need it fail (kept),
    as before; with only ``restored/``, the trash is used."""
    write_steps(root / "run", range(100, 400, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 1\ntrash: {grace: 1h}\n")
    assert run_cli("prune", str(root), "--policy", str(policy_path)).returncode == 0
    assert run_cli("restore", str(root), "--all").returncode == 0
    write_steps(root / "run", [400])
    (root / TRASH / "restored" if refused == "restored" else root / TRASH).chmod(0o777)

    dry = run_cli("prune", str(root), "--policy", str(policy_path), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    entries = {
        entry["name"]: entry for group in json.loads(dry.stdout)["groups"] for entry in group["entries"]
    }
    for step in (100, 200):
        assert entries[step_name(0, step)]["action"] == "keep"
        assert entries[step_name(0, step)]["reasons"][0].startswith("restored from the trash: pinned until ")
    assert entries[step_name(0, 300)]["action"] == "trash"
    problems = [
        record
        for record in events(dry.stderr, "trash_problem")
        if "writable by every user" in record["error"]
    ]
    assert problems
    assert "its pins are read anyway" in problems[0]["detail"]

    with running_daemon(watch(root, policy_path), tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        if refused == "restored":
            daemon.wait_for("checkpoint_trashed")
        else:
            daemon.wait_for("checkpoint_delete_failed")
        assert daemon.stop() == 0
    assert not daemon.events("storage_unavailable")
    kept = [step_name(0, step) for step in (100, 200, 400)]
    assert sorted(os.listdir(root / "run")) == (
        kept if refused == "restored" else sorted([*kept, step_name(0, 300)])
    )


def test_a_root_removed_says_nothing_of_its_trash(root: Path, tmp_path: Path) -> None:
    """The root (and its trash) removed under the daemon: the pass of the removal's events, before
    the root check noticed, said the trash was "not this tool's" (``trash_problem``). Only the root
    check speaks (``watch_path_lost``)."""
    write_steps(root / "run", range(100, 600, 100))
    policy_path = policy(tmp_path, "save_top_k_checkpoints: 2\ntrash: {grace: 1h}\n")
    arguments = ["watch", str(root), "--policy", str(policy_path), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        wait_until(lambda: len(trash_keys(root)) == 3, what="three checkpoints trashed")
        shutil.rmtree(root)  # (its events start a pass before the root check looks)
        daemon.wait_for("watch_path_lost")
        assert daemon.events("trash_problem") == []
