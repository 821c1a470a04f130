"""Deletions the tool must never make, and failures that must be reported, not crashed on: mounts
inside directory checkpoints, removals killed or stopped halfway, leftovers the tool did not make,
swaps between plan and delete, read-only, permission-denied and full file systems."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from ckpt_watcher.delete import Outcome, apply_plan
from ckpt_watcher.plan import plan
from ckpt_watcher.policy import DEFAULT_POLICY
from ckpt_watcher.records import DELETING_PREFIX
from ckpt_watcher.scan import scan_tree
from tests.support.cli import (
    assert_clean_exit,
    cli_command,
    events,
    prune_entries,
    run_cli,
    run_command,
)
from tests.support.daemon import wait_until
from tests.support.factories import (
    backdate_tree,
    directory_checkpoint,
    leftovers,
    step_name,
    write_checkpoint,
)
from tests.support.hostile_trees import (
    bind,
    make_sentinel,
    mount_namespace,
    mount_namespace_reason,
    set_immutable,
    tree_digest,
)

pytestmark = pytest.mark.timeout(240)

MOUNTS_UNAVAILABLE = mount_namespace_reason()
needs_mounts = pytest.mark.skipif(MOUNTS_UNAVAILABLE is not None, reason=str(MOUNTS_UNAVAILABLE))


def deepspeed(path: Path, files: int = 2) -> Path:
    """A DeepSpeed directory checkpoint with ``files`` ZeRO optimizer shards."""
    return directory_checkpoint(
        path, {f"zero_pp_rank_{index}_mp_rank_00_optim_states.pt": b"weights" for index in range(files)}
    )


@pytest.fixture
def run_with_a_mount(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, str]]:
    """Seven DeepSpeed checkpoints; the oldest holds `dataset/`, where a sentinel tree from outside
    the root is bind-mounted (a dataset mounted into a run directory). Returns root, the checkpoint,
    the sentinel and the sentinel's digest."""
    root = tmp_path / "root"
    for step in range(100, 800, 100):
        deepspeed(root / "run" / step_name(0, step))
    oldest = root / "run" / step_name(0, 100)
    (oldest / "dataset").mkdir()
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    digest = make_sentinel(sentinel)
    backdate_tree(root)
    backdate_tree(sentinel)
    return root, oldest, sentinel, digest


@needs_mounts
def test_a_directory_checkpoint_holding_a_mount_point_is_never_deleted(
    run_with_a_mount: tuple[Path, Path, Path, dict[str, str]],
) -> None:
    root, oldest, sentinel, digest = run_with_a_mount
    mount = bind(sentinel, oldest / "dataset")

    dry_run = run_cli("prune", str(root), "--dry-run", "--json", prefix=mount_namespace([mount]))
    completed = run_cli("prune", str(root), prefix=mount_namespace([mount]))

    assert_clean_exit(dry_run, allowed=(0,))
    entry = prune_entries(dry_run)[oldest.name]
    assert entry["action"] == "skip"
    assert "mount point (dataset)" in str(entry["reasons"])
    assert_clean_exit(completed, allowed=(0,))
    assert tree_digest(sentinel) == digest
    assert (oldest / "latest").exists()
    assert not (root / "run" / step_name(0, 200)).exists()  # the rest of the plan went ahead
    warnings = events(completed.stderr, "checkpoint_suspicious")
    assert any("mount point" in str(record["detail"]) for record in warnings), completed.stderr
    assert not os.path.ismount(oldest / "dataset")  # the namespace took the mount with it


@needs_mounts
def test_delete_refuses_a_mount_that_appears_after_planning(
    run_with_a_mount: tuple[Path, Path, Path, dict[str, str]],
) -> None:
    """Defence in depth: the plan was made before the mount; delete.py walks the tree again first."""
    root, oldest, sentinel, digest = run_with_a_mount
    snippet = textwrap.dedent(
        """
        import json, subprocess, sys
        from pathlib import Path
        from structlog.testing import capture_logs
        from ckpt_watcher.delete import apply_plan
        from ckpt_watcher.plan import plan
        from ckpt_watcher.policy import DEFAULT_POLICY
        from ckpt_watcher.scan import scan_tree
        root, source, target = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
        the_plan = plan(scan_tree(root, DEFAULT_POLICY.compiled_naming).records, DEFAULT_POLICY)
        subprocess.run(["mount", "--bind", source, target], check=True)
        with capture_logs():
            applied = apply_plan(the_plan, root)
        print(json.dumps({r.decision.record.name: [r.outcome.value, r.error] for r in applied.results}))
        """
    )
    completed = run_command(
        [
            *mount_namespace([]),
            sys.executable,
            "-c",
            snippet,
            str(root),
            str(sentinel),
            str(oldest / "dataset"),
        ]
    )

    assert completed.returncode == 0, completed.stderr
    outcomes = json.loads(completed.stdout)
    assert outcomes[oldest.name][0] == Outcome.FAILED.value
    assert "mount point" in outcomes[oldest.name][1]
    assert outcomes[step_name(0, 200)][0] == Outcome.DELETED.value
    assert tree_digest(sentinel) == digest
    assert (oldest / "latest").exists()


def test_a_removal_that_fails_halfway_makes_prune_exit_1_and_a_later_prune_finishes_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    for step in range(100, 800, 100):
        deepspeed(root / step_name(0, step))
    stuck = root / step_name(0, 100) / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    backdate_tree(root)
    if not set_immutable(stuck):
        pytest.skip("chattr +i is not supported here")
    try:
        first = run_cli("prune", str(root), "--json")
    finally:
        set_immutable(root, immutable=False, recursive=True)

    assert_clean_exit(first, allowed=(1,), explained=True)
    outcomes = {entry["name"]: entry.get("outcome") for entry in prune_entries(first).values()}
    assert outcomes[step_name(0, 100)] == "failed"
    assert outcomes[step_name(0, 200)] == "deleted"
    (failure,) = events(first.stderr, "checkpoint_delete_failed")
    assert "zero_pp_rank_0" in str(failure["remains"])
    assert not events(first.stderr, "checkpoint_deleted") or all(
        step_name(0, 100) not in str(record["path"]) for record in events(first.stderr, "checkpoint_deleted")
    )
    assert len(leftovers(root)) == 1

    second = run_cli("prune", str(root))

    assert_clean_exit(second, allowed=(0,))
    assert leftovers(root) == []
    assert len(events(second.stderr, "leftover_removed")) == 1


def _caught_or_done(root: Path, process: subprocess.Popen[bytes]) -> bool:
    return bool(leftovers(root)) or process.poll() is not None


def test_kill_9_in_the_middle_of_a_removal_then_prune_finishes_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    big = deepspeed(root / step_name(0, 100), files=0)
    for index in range(40_000):  # removing these takes long enough to be caught in the act
        (big / "checkpoint" / f"shard_{index:05d}.pt").touch()
    for step in range(200, 800, 100):
        deepspeed(root / step_name(0, step))
    backdate_tree(root)
    caught = False
    for _ in range(3):
        process = subprocess.Popen(
            cli_command("prune", str(root)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_until(partial(_caught_or_done, root, process), timeout=60)
            if process.poll() is None and leftovers(root):
                process.send_signal(signal.SIGKILL)
                caught = True
        finally:
            process.wait(timeout=60)
            assert process.stderr is not None
            process.stderr.close()
        if caught or not big.exists():
            break
    if not caught:
        pytest.skip("the removal finished before it could be interrupted (machine too fast)")
    (leftover,) = leftovers(root)
    assert not big.exists()  # renamed first: never seen half deleted under its own name

    completed = run_cli("prune", str(root))

    assert_clean_exit(completed, allowed=(0,))
    assert leftovers(root) == []
    assert [record["path"] for record in events(completed.stderr, "leftover_removed")] == [
        str(root / leftover)
    ]


def test_a_directory_named_like_a_leftover_that_the_tool_did_not_make_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in range(100, 800, 100):
        write_checkpoint(root / step_name(0, step))
    foreign = root / f"{DELETING_PREFIX}i12345-not-the-tools"
    (foreign / "precious").mkdir(parents=True)
    (foreign / "precious" / "data.bin").write_bytes(b"x" * 1000)

    completed = run_cli("prune", str(root))

    assert_clean_exit(completed, allowed=(0,))
    assert (foreign / "precious" / "data.bin").read_bytes() == b"x" * 1000
    assert [record["path"] for record in events(completed.stderr, "leftover_not_ours")] == [str(foreign)]


def test_swaps_between_plan_and_delete_delete_nothing_outside(tmp_path: Path) -> None:
    """A planned file replaced by a hard link to an outside file; a group replaced by a symlink to an
    outside copy; the root itself replaced by a symlink."""
    outside = tmp_path / "outside"
    outside.mkdir()
    digest_before: dict[str, str] = {}
    roots = []
    for case in ("hard-link", "group-symlink", "root-symlink"):
        root = tmp_path / case
        for step in range(100, 1000, 100):
            write_checkpoint(root / "run" / step_name(0, step))
        roots.append(root)
    precious = write_checkpoint(outside / "precious.ckpt")
    shutil.copytree(roots[1] / "run", outside / "run-copy")
    shutil.copytree(roots[2], outside / "root-copy")
    digest_before = tree_digest(outside)
    plans = [plan(scan_tree(root, DEFAULT_POLICY.compiled_naming).records, DEFAULT_POLICY) for root in roots]

    victim = plans[0].deletions[0].record.path
    victim.unlink()
    os.link(precious, victim)
    shutil.rmtree(roots[1] / "run")
    os.symlink(outside / "run-copy", roots[1] / "run")
    shutil.rmtree(roots[2])
    os.symlink(outside / "root-copy", roots[2])
    results = [apply_plan(the_plan, root) for the_plan, root in zip(plans, roots, strict=True)]

    assert tree_digest(outside) == digest_before
    assert os.stat(precious).st_nlink == 2
    assert {result.outcome for result in results[0].results if result.decision.record.path == victim} == {
        Outcome.CHANGED
    }
    assert results[1].failed
    assert not results[1].deleted
    assert results[2].failed
    assert not results[2].deleted


@needs_mounts
def test_a_read_only_file_system_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in range(100, 800, 100):
        write_checkpoint(root / step_name(0, step))
    deepspeed(root / "nested" / step_name(0, 100))
    for step in range(200, 800, 100):
        deepspeed(root / "nested" / step_name(0, step))
    backdate_tree(root)
    before = tree_digest(root)

    completed = run_cli("prune", str(root), prefix=mount_namespace([bind(root, root, read_only=True)]))

    assert_clean_exit(completed, allowed=(1,), explained=True)
    failures = events(completed.stderr, "checkpoint_delete_failed")
    assert len(failures) == 4
    assert {record["error"] for record in failures} == {"Read-only file system"}
    assert tree_digest(root) == before


@pytest.fixture
def world_readable_directory() -> Iterator[Path]:
    """A directory others can traverse (pytest's tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="ckpt-watcher-eacces-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_permission_denied_is_a_failure_not_a_crash(world_readable_directory: Path) -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run prune as another user")
    root = world_readable_directory / "run"
    for step in range(100, 800, 100):
        write_checkpoint(root / step_name(0, step))
    for step in range(100, 800, 100):
        deepspeed(root / "deepspeed" / step_name(0, step))
    backdate_tree(root)
    for directory, directories, _ in os.walk(root):
        for name in [*directories, ""]:
            Path(directory, name).chmod(0o755)
    before = tree_digest(root)

    completed = run_cli(
        "prune",
        str(root),
        prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        timeout=120,
    )

    assert_clean_exit(completed, allowed=(1,), explained=True)
    failures = events(completed.stderr, "checkpoint_delete_failed")
    assert len(failures) == 4
    assert {str(record["error"]).split(";")[0] for record in failures} >= {"Permission denied"}
    assert tree_digest(root) == before


@needs_mounts
def test_a_full_file_system_is_pruned(tmp_path: Path) -> None:
    """Nothing the deletion does needs free space: on a full disk, prune frees it."""
    root = tmp_path / "full"
    root.mkdir()
    filler = tmp_path / "fill.py"
    filler.write_text(
        textwrap.dedent(
            """
            import os, sys
            from pathlib import Path
            root = Path(sys.argv[1])
            for step in range(100, 800, 100):
                target = root / f"epoch=00-step={step:06d}-train.ckpt"
                target.mkdir()
                (target / "latest").write_text("checkpoint")
                (target / "model.pt").write_bytes(b"m" * 4096)
                for path in (target / "latest", target / "model.pt", target):
                    os.utime(path, (0, 0))
            try:
                with (root / "filler").open("wb") as stream:
                    while True:
                        stream.write(b"f" * 4096)
                        stream.flush()
            except OSError:
                pass
            try:
                (root / "probe").write_bytes(b"x" * 4096)
            except OSError:
                sys.exit(0)
            sys.exit("the file system is not full")
            """
        )
    )
    script = [f"mount -t tmpfs -o size=2m tmpfs {root}", f"{sys.executable} {filler} {root}"]

    completed = run_cli("prune", str(root), "--json", prefix=mount_namespace(script))

    assert_clean_exit(completed, allowed=(0,))
    actions = {name: entry["action"] for name, entry in prune_entries(completed).items()}
    assert actions[step_name(0, 100)] == "delete"
    assert actions[step_name(0, 200)] == "delete"
    assert not events(completed.stderr, "checkpoint_delete_failed")


def test_a_trash_above_the_root_in_a_directory_it_cannot_list_stops_nothing(
    world_readable_directory: Path,
) -> None:
    """The pins of the trashes above a root count (a ``restore`` through a root above it). A review
    found that one in a directory this user may search but not list (mode 711: another user's home)
    could not be opened, which put every pin in doubt and stopped every pass for good. Such a
    directory's trash is left out (this user could never read it), as is one on another file system."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run prune as another user")
    above = world_readable_directory / "home"
    (above / ".ckpt-trash" / "restored").mkdir(parents=True)
    (above / ".ckpt-trash").chmod(0o700)
    above.chmod(0o711)
    run = above / "runs" / "run"
    for step in range(100, 400, 100):
        write_checkpoint(run / step_name(0, step))
    backdate_tree(run)
    for path in [run.parent, run, *run.iterdir()]:
        os.chown(path, 65534, 65534)
    policy = world_readable_directory / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")
    policy.chmod(0o644)

    completed = run_cli(
        "prune",
        str(run),
        "--policy",
        str(policy),
        prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert sorted(path.name for path in run.iterdir()) == [step_name(0, 300)]
    (unread,) = [record for record in events(completed.stderr, "trash_problem") if "home" in record["path"]]
    assert unread["error"].endswith("home cannot be listed by this user")  # said, not silently left
