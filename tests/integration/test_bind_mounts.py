"""Bind mounts under the root, for real (a private mount namespace per command, so no mount outlives
it): one directory seen at two paths is kept whole in both (``group_aliased``), a directory from
outside the root bind-mounted into it is never pruned (``group_outside_root``), and a volume mounted
only inside the root is pruned as before. ``prune`` and ``watch`` (its start-up pass, an event pass,
a poll that finds a bind mount made while it runs) alike. Skipped where mounts cannot be made."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_watcher.overrides import OVERRIDE_FILE_NAME
from tests.support.cli import cli_command, events, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import backdate_tree, step_name, write_checkpoint
from tests.support.hostile_trees import bind, mount_namespace, mount_namespace_reason

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        (MOUNTS_UNAVAILABLE := mount_namespace_reason()) is not None, reason=str(MOUNTS_UNAVAILABLE)
    ),
]

REPOSITORY = Path(__file__).resolve().parents[2]
STEPS = (100, 200, 300, 400)
ALL = {step_name(0, step) for step in STEPS}


def _names(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if name.endswith(".ckpt")}


def _alias_tree(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """``keepers/run`` (its per-run file protects everything) and an empty ``scratch/run`` whose
    per-run file allows 0 bytes: the place a bind mount of keepers/run goes. Returns the root, the
    run, the alias's mount point and the policy."""
    root = tmp_path / "root"
    real = root / "keepers" / "run"
    for step in STEPS:
        write_checkpoint(real / step_name(0, step))
    (root / "keepers" / OVERRIDE_FILE_NAME).write_text("protect: ['*']\n")
    alias = root / "scratch" / "run"
    alias.mkdir(parents=True)
    (root / "scratch" / OVERRIDE_FILE_NAME).write_text("max_size: 0\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 10\n")
    backdate_tree(root)
    return root, real, alias, policy


def _outside_tree(tmp_path: Path) -> tuple[Path, Path, Path, Path, Path]:
    """Four checkpoints in ``elsewhere/run`` (outside the root) and the root's own ``mine`` run, an
    empty ``imported/run`` for the bind mount and an empty ``volume`` for a tmpfs. Returns the root,
    the outside run, the two mount points and the policy (keep 1)."""
    root = tmp_path / "root"
    outside = tmp_path / "elsewhere" / "run"
    for step in STEPS:
        write_checkpoint(outside / step_name(0, step))
        write_checkpoint(root / "mine" / step_name(0, step))
    imported = root / "imported" / "run"
    volume = root / "volume"
    imported.mkdir(parents=True)
    volume.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")
    backdate_tree(tmp_path)
    return root, outside, imported, volume, policy


def _fill_volume(volume: Path) -> list[str]:
    """The commands that mount a tmpfs on ``volume`` and write four settled checkpoints into it."""
    writer = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
        "from tests.support.factories import backdate_tree, step_name, write_checkpoint;"
        f"[write_checkpoint(Path(sys.argv[1]) / 'run' / step_name(0, step)) for step in {STEPS!r}];"
        "backdate_tree(Path(sys.argv[1]))"
    )
    return [
        f"mount -t tmpfs -o size=4m tmpfs {volume}",
        f'{sys.executable} -c "{writer}" {volume} {REPOSITORY}',
    ]


def test_prune_keeps_whole_a_directory_seen_at_two_paths(tmp_path: Path) -> None:
    root, real, alias, policy = _alias_tree(tmp_path)
    in_namespace = mount_namespace([bind(real, alias)])

    dry = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", prefix=in_namespace, cwd=tmp_path)
    completed = run_cli("prune", str(root), "--policy", str(policy), prefix=in_namespace, cwd=tmp_path)

    assert dry.returncode == 0, dry.stderr
    assert "kept whole: the same directory as keepers/run (a bind mount)" in dry.stdout
    assert completed.returncode == 0, completed.stderr
    assert _names(real) == ALL  # protected in keepers/, never deleted through scratch/'s max_size: 0
    assert events(completed.stderr, "checkpoint_deleted") == []
    (aliased,) = events(completed.stderr, "group_aliased")  # one record for the pair, per pass
    assert {aliased["directory"], aliased["same_as"]} == {str(real), str(alias)}
    assert _names(alias) == set()  # the mount did not outlive its namespace


def test_prune_never_prunes_a_directory_from_outside_the_root_but_does_a_volume_of_its_own(
    tmp_path: Path,
) -> None:
    root, outside, imported, volume, policy = _outside_tree(tmp_path)
    in_namespace = mount_namespace([bind(outside, imported), *_fill_volume(volume)])

    completed = run_cli("prune", str(root), "--policy", str(policy), prefix=in_namespace, cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert _names(outside) == ALL
    (warning,) = events(completed.stderr, "group_outside_root")
    assert (warning["directory"], warning["outside"]) == (str(imported), str(outside))
    deleted = {record["path"] for record in events(completed.stderr, "checkpoint_deleted")}
    ours = {root / "mine" / step_name(0, step) for step in STEPS[:-1]}
    on_volume = {volume / "run" / step_name(0, step) for step in STEPS[:-1]}
    assert deleted == {str(path) for path in ours | on_volume}  # the root's runs, its tmpfs too
    assert _names(root / "mine") == {step_name(0, 400)}


def test_watch_keeps_whole_a_directory_bind_mounted_at_a_second_path_while_it_runs(
    tmp_path: Path,
) -> None:
    """The alias appears after the start-up pass; the poll finds the new files under it and plans that
    group in an event pass, which must see it is a directory the walk saw elsewhere."""
    root, real, alias, policy = _alias_tree(tmp_path)
    arguments = ["watch", str(root), "--policy", str(policy), "--settle", "0", "--poll-interval", "0.5"]
    command = [*mount_namespace([]), *cli_command()]

    with running_daemon(arguments, tmp_path / "log", command=command, cwd=tmp_path) as daemon:
        daemon.wait_ready()
        mounted = subprocess.run(
            ["nsenter", "-t", str(daemon.process.pid), "-m", "mount", "--bind", str(real), str(alias)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert mounted.returncode == 0, mounted.stderr
        (warned,) = daemon.wait_for("group_aliased", timeout=60)
        write_checkpoint(real / step_name(0, 500))  # an event in the run, seen through either path
        daemon.wait_for("pass_completed", lambda record: record.get("trigger") == "event", count=2)
        time.sleep(1.5)  # polls over both paths
        records = daemon.records()
        assert daemon.stop() == 0

    assert {warned["directory"], warned["same_as"]} == {str(real), str(alias)}
    assert [record for record in records if record.get("event") == "checkpoint_deleted"] == []
    assert _names(real) == {*ALL, step_name(0, 500)}


def test_watch_never_prunes_a_directory_from_outside_the_root(tmp_path: Path) -> None:
    root, outside, imported, volume, policy = _outside_tree(tmp_path)
    arguments = ["watch", str(root), "--policy", str(policy), "--settle", "0"]
    command = [*mount_namespace([bind(outside, imported), *_fill_volume(volume)]), *cli_command()]

    with running_daemon(arguments, tmp_path / "log", command=command, cwd=tmp_path) as daemon:
        daemon.wait_ready()
        (warning,) = daemon.wait_for("group_outside_root")
        wait_until(lambda: _names(root / "mine") == {step_name(0, 400)}, what="the root's own run pruned")
        write_checkpoint(outside / step_name(0, 500))  # an event under the mount: an event pass there
        daemon.wait_for("pass_completed", lambda record: record.get("trigger") == "event")
        records = daemon.records()
        assert daemon.stop() == 0

    assert (warning["directory"], warning["outside"]) == (str(imported), str(outside))
    deleted = {record["path"] for record in records if record.get("event") == "checkpoint_deleted"}
    assert not any(path.startswith(str(imported)) for path in deleted)
    assert _names(outside) == {*ALL, step_name(0, 500)}


def test_an_event_pass_still_sees_the_bind_mount_of_a_run_moved_behind_a_symlink(tmp_path: Path) -> None:
    """``root/z`` is a bind mount of ``root/a``; then ``mv a moved/; ln -s moved/a a``. The walk's
    first path of the run (``a/run1``) now leads there through a symlink, which is no second path;
    but ``z/run1`` still is one, and the run at its new path is kept whole (it was pruned under its
    own policy by event passes until the next full walk)."""
    root = tmp_path / "root"
    for directory in ("a/run1", "z", "moved"):
        (root / directory).mkdir(parents=True)
    script = """
import os, sys
from pathlib import Path
from ckpt_watcher.aliases import AliasGuard
root = Path(sys.argv[1])
guard = AliasGuard()
list(guard.walk(root, [root / name for name in ("a", "a/run1", "moved", "z", "z/run1")]))
os.rename(root / "a", root / "moved" / "a")
os.symlink("moved/a", root / "a")
guard.begin_pass()
print(sorted(guard.kept_whole(root, root / "moved" / "a" / "run1").values()))
"""
    command = [*mount_namespace([bind(root / "a", root / "z")]), sys.executable, "-c", script, str(root)]
    completed = subprocess.run(
        command, cwd=REPOSITORY, capture_output=True, text=True, timeout=60, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert "kept whole: the same directory as z/run1 (a bind mount)" in completed.stdout, completed.stdout
