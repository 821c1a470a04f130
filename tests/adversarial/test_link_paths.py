"""``last.ckpt`` naming its target through a path other than the watched root's own: the root's bind
mount (or the trainer's mount path of the volume, where the watcher sees it too), and a mount path
the watcher does not have at all (the link dangles from here). Its target is never deleted."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ckpt_watcher.links import list_links
from ckpt_watcher.naming import DEFAULT_NAMING
from tests.support.cli import assert_clean_exit, cli_command, events, prune_entries, run_cli
from tests.support.daemon import DaemonProcess, wait_until
from tests.support.factories import backdate_tree, step_name, write_checkpoint
from tests.support.hostile_trees import bind, make_fifo, mount_namespace, mount_namespace_reason

pytestmark = pytest.mark.timeout(240)

MOUNTS_UNAVAILABLE = mount_namespace_reason()
needs_mounts = pytest.mark.skipif(MOUNTS_UNAVAILABLE is not None, reason=str(MOUNTS_UNAVAILABLE))


def _run(root: Path) -> Path:
    """Three step checkpoints in ``root/run``, old enough to count; a policy that keeps the newest."""
    for step in (100, 200, 300):
        write_checkpoint(root / "run" / step_name(0, step))
    backdate_tree(root)
    return root / "run"


@needs_mounts
def test_a_last_link_through_a_bind_mount_of_the_root_keeps_its_target(tmp_path: Path) -> None:
    root, alias = tmp_path / "root", tmp_path / "alias"
    run = _run(root)
    alias.mkdir()
    target = step_name(0, 200)
    os.symlink(alias / "run" / target, run / "last.ckpt")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")
    mount = mount_namespace([bind(root, alias)])

    dry_run = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json", prefix=mount)
    completed = run_cli("prune", str(root), "--policy", str(policy), prefix=mount)

    entries = prune_entries(dry_run, exit_code=0)
    assert entries[target]["action"] == "keep"
    assert "target of run/last.ckpt" in entries[target]["reasons"]
    assert entries[step_name(0, 100)]["action"] == "delete"  # the rest of the plan is unchanged
    assert_clean_exit(completed, allowed=(0,))
    assert (run / target).exists()
    assert not (run / step_name(0, 100)).exists()
    assert [record["path"] for record in events(completed.stderr, "checkpoint_deleted")] == [
        str(run / step_name(0, 100))
    ]


def test_a_last_link_written_for_a_mount_path_the_watcher_lacks_keeps_its_namesake(tmp_path: Path) -> None:
    """The trainer's container mounts the volume at /ckpts; the sidecar elsewhere: an absolute link
    dangles here, and the file of its target's name beside it is kept (in doubt), whatever its rank."""
    run = _run(tmp_path / "root")
    target = step_name(0, 100)  # the oldest: the count rule alone would delete it
    os.symlink(Path("/nonexistent-ckpts-mount") / "run" / target, run / "last.ckpt")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")

    dry_run = run_cli("prune", str(tmp_path / "root"), "--policy", str(policy), "--dry-run", "--json")
    completed = run_cli("prune", str(tmp_path / "root"), "--policy", str(policy))

    entries = prune_entries(dry_run, exit_code=0)
    assert entries[target]["action"] == "keep"
    assert entries[target]["reasons"] == [
        "named like the target of run/last.ckpt, which is outside the root and not found from here "
        "(kept in doubt)"
    ]
    assert entries[step_name(0, 200)]["action"] == "delete"
    assert_clean_exit(completed, allowed=(0,))
    assert (run / target).exists()
    assert (run / step_name(0, 300)).exists()
    assert not (run / step_name(0, 200)).exists()


def test_only_a_target_outside_the_root_is_stat_ed_or_taken_as_dangling(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = _run(root)
    outside = write_checkpoint(tmp_path / "elsewhere" / step_name(0, 900))
    os.symlink(step_name(0, 300), run / "last.ckpt")  # inside, relative: the path pins it
    os.symlink(run / "gone.ckpt", run / "inside-dangling.ckpt")  # inside and dangling: no namesake
    os.symlink(outside, run / "outside.ckpt")
    os.symlink(tmp_path / "nowhere" / "x.ckpt", run / "outside-dangling.ckpt")

    listed = list_links(run, root, DEFAULT_NAMING)
    assert listed is not None
    links = {link.name: link for link in listed}

    assert (links["last.ckpt"].identity, links["last.ckpt"].dangles) == (None, False)
    assert (links["inside-dangling.ckpt"].identity, links["inside-dangling.ckpt"].dangles) == (None, False)
    status = outside.stat()
    assert links["outside.ckpt"].identity == (status.st_dev, status.st_ino)
    assert not links["outside.ckpt"].dangles
    assert (links["outside-dangling.ckpt"].identity, links["outside-dangling.ckpt"].dangles) == (None, True)


def test_a_run_that_cannot_be_listed_any_more_keeps_what_its_links_protected() -> None:
    """stage2's last.ckpt names a checkpoint of stage1. Once stage2 cannot be listed (its owner made
    it private), the next full pass found no link there and forgot the target it protected, and
    stage1's count rule deleted it. What a directory's links protected at its last listing stays."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the daemon as another user")
    top = Path(tempfile.mkdtemp(prefix="ckpt-watcher-links-"))
    try:
        root, stage1, stage2 = top / "root", top / "root" / "stage1", top / "root" / "stage2"
        for step in (100, 200, 300):
            write_checkpoint(stage1 / step_name(0, step))
        stage2.mkdir()
        os.symlink(f"../stage1/{step_name(0, 100)}", stage2 / "last.ckpt")
        backdate_tree(root)
        for directory in (top, root, stage1, stage2):
            directory.chmod(0o777 if directory != top else 0o755)  # the daemon's user may delete
        policy = top / "policy.yaml"
        policy.write_text("save_top_k_checkpoints: 1\n")
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cli_command()]
        arguments = ["watch", str(root), "--policy", str(policy), "--settle", "0", "--rescan", "1"]
        daemon = DaemonProcess(arguments, top / "log", command=nobody)
        try:
            daemon.wait_ready()
            assert {path.name for path in stage1.iterdir()} == {step_name(0, 100), step_name(0, 300)}
            stage2.chmod(0o700)  # root's now: the daemon's user cannot list it any more
            write_checkpoint(stage1 / step_name(0, 400))
            wait_until(lambda: not (stage1 / step_name(0, 300)).exists(), what="step 300 pruned")
            passes = len(daemon.events("pass_completed"))
            wait_until(lambda: len(daemon.events("pass_completed")) >= passes + 2, what="two more passes")
            assert (stage1 / step_name(0, 100)).exists()
            assert daemon.stop() == 0
        finally:
            daemon.close()
    finally:
        shutil.rmtree(top, ignore_errors=True)


@needs_mounts
def test_a_resume_file_inside_a_directory_checkpoint_named_through_a_bind_mount_keeps_it(
    tmp_path: Path,
) -> None:
    """A pin through another path of the root is kept by identity, and a pin on a file inside a
    directory checkpoint keeps that checkpoint: each held alone, not together (the checkpoint was
    matched by path only), and the resume source was deleted."""
    root, alias = tmp_path / "root", tmp_path / "alias"
    for step in (100, 200, 300):
        checkpoint = root / "run" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(bytes(1000))
        (checkpoint / "trainer_state.json").write_text("{}")
    backdate_tree(root)
    alias.mkdir()
    config = tmp_path / "train.yaml"
    config.write_text(f"ckpt_path: {alias}/run/checkpoint-100/model.safetensors\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        'save_top_k_checkpoints: 1\nnaming: {step: "checkpoint-{step}"}\nprotect_from: [train.yaml]\n'
    )
    mount = mount_namespace([bind(root, alias)])

    dry_run = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json", prefix=mount)
    completed = run_cli("prune", str(root), "--policy", str(policy), prefix=mount)

    entries = prune_entries(dry_run, exit_code=0)
    assert entries["checkpoint-100"]["action"] == "keep"
    assert entries["checkpoint-100"]["reasons"] == [
        "holds model.safetensors: resume source in train.yaml (ckpt_path)"
    ]
    assert entries["checkpoint-200"]["action"] == "delete"
    assert_clean_exit(completed, allowed=(0,))
    assert (root / "run" / "checkpoint-100" / "model.safetensors").exists()
    assert not (root / "run" / "checkpoint-200").exists()


def test_links_out_of_the_root_to_a_fifo_a_device_or_a_loop_open_nothing_and_keep_in_doubt(
    tmp_path: Path,
) -> None:
    """The link fixes stat what a link reaches outside the root. A training job can point a link
    anywhere: a FIFO (opening it would block), /dev/zero, a symlink loop. stat opens nothing, so
    prune finishes; a target it cannot stat counts as dangling and keeps its namesake, in doubt."""
    root = tmp_path / "root"
    run = _run(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    make_fifo(outside / step_name(0, 100))
    os.symlink(outside / "loop-b", outside / "loop-a")
    os.symlink(outside / "loop-a", outside / "loop-b")
    os.symlink(outside / step_name(0, 100), run / "last.ckpt")  # a FIFO: stat'ed, never opened
    os.symlink("/dev/zero", run / "zero.ckpt")
    os.symlink(outside / "loop-a", run / step_name(0, 200).replace(".ckpt", "-loop.ckpt"))
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")

    dry_run = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json", timeout=60)
    completed = run_cli("prune", str(root), "--policy", str(policy), timeout=60)

    entries = prune_entries(dry_run, exit_code=0)
    assert entries[step_name(0, 100)]["action"] == "delete"  # the FIFO's identity is no checkpoint's
    assert entries[step_name(0, 200)]["action"] == "delete"
    assert_clean_exit(completed, allowed=(0,))
    assert {path.name for path in run.iterdir()} == {
        step_name(0, 300),
        "last.ckpt",
        "zero.ckpt",
        step_name(0, 200).replace(".ckpt", "-loop.ckpt"),
    }
    assert (outside / step_name(0, 100)).exists()  # nothing outside the root is touched
