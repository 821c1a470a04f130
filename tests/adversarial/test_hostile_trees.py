"""Generated hostile trees (see tests/support/hostile_trees.py) under ``prune --dry-run``, ``prune`` and a
daemon pass, each bounded in time and memory. Invariants after every command: nothing outside the root
changed, nothing but a planned deletion changed inside it, the mount-holding checkpoint is intact, and
the command exited 0/1/2 without a traceback (and, if not 0, with a one-line ``ckpt-watcher: ``
message).

"Planned" comes from the code under test (scan and plan), so it cannot catch a bug in them; the
independent oracle is ``HostileTree.must_survive``, what the generator recorded as it built the tree
that the default policy must keep, checked entry by entry after every command."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ckpt_watcher.plan import plan
from ckpt_watcher.policy import DEFAULT_POLICY
from ckpt_watcher.scan import scan_tree
from tests.support.cli import assert_clean_exit, cli_command, prune_entries, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import step_name, write_checkpoint
from tests.support.hostile_trees import (
    HostileTree,
    build_hostile_tree,
    make_deep_directory,
    mount_namespace,
    mount_namespace_reason,
    remove_deep,
    tree_digest,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

PRUNE_MEMORY = 256 << 20
DAEMON_MEMORY = 1 << 30  # address space: each thread reserves its stack and a malloc arena
SEEDS = [1, 2]


def hostile(tmp_path: Path, request: pytest.FixtureRequest, seed: int, deepest: int = 1200) -> HostileTree:
    request.addfinalizer(lambda: remove_deep(tmp_path))  # pytest's own clean-up recurses
    with_mounts = mount_namespace_reason() is None
    return build_hostile_tree(
        tmp_path / "root", tmp_path / "outside", seed=seed, with_mounts=with_mounts, deepest=deepest
    )


def allowed_deletions(tree: HostileTree) -> set[str]:
    """Relative paths (as tree_digest names them) the default policy may delete, planned in-process
    with no settle time: a superset of what any command may delete."""
    records = scan_tree(tree.root, DEFAULT_POLICY.compiled_naming).records
    return {
        "/" + str(decision.record.path.relative_to(tree.root))
        for decision in plan(records, DEFAULT_POLICY).deletions
    }


def check_invariants(
    tree: HostileTree, before: dict[str, str], outside_before: dict[str, str], allowed: set[str]
) -> set[str]:
    """Assert the invariants; return the relative paths that were deleted."""
    assert tree_digest(tree.outside) == outside_before, "something outside the root changed"
    after = tree_digest(tree.root)
    gone: set[str] = set()
    for path, digest in before.items():
        if any(path == deletion or path.startswith(deletion + "/") for deletion in allowed):
            if path not in after:
                gone.add(path)
            continue
        assert after.get(path) == digest, f"{path!r} changed: {digest} -> {after.get(path)}"
    for holder in tree.mount_holders:
        assert (holder / "latest").exists(), "the checkpoint holding a mount point was touched"
    return gone


def check_survivors(tree: HostileTree, before: dict[str, str], outside_before: dict[str, str]) -> None:
    """Assert the independent oracle: every path the generator recorded as one the default policy must
    keep is still there, its digest unchanged (whatever scan and plan decided)."""
    for top, must_survive, digest_before in (
        (tree.root, tree.must_survive, before),
        (tree.outside, tree.outside_must_survive, outside_before),
    ):
        assert must_survive, f"the generator recorded no survivors in {top}"
        unknown = sorted(must_survive - digest_before.keys())
        assert not unknown, f"the oracle names paths the tree never had: {unknown[:10]}"
        after = tree_digest(top)
        lost = sorted(path for path in must_survive if after.get(path) != digest_before[path])
        assert not lost, f"{len(lost)} paths that must survive changed or vanished in {top}: {lost[:10]}"


def in_namespace(tree: HostileTree) -> list[str]:
    """The prefix that makes the tree's mounts for the command it runs (none without mounts)."""
    return mount_namespace(tree.mounts) if tree.mounts else []


def run(tree: HostileTree, *arguments: str, memory: int) -> None:
    assert_clean_exit(run_cli(*arguments, memory=memory, prefix=in_namespace(tree)), explained=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_prune_and_dry_run_on_a_hostile_tree(
    tmp_path: Path, request: pytest.FixtureRequest, seed: int
) -> None:
    tree = hostile(tmp_path, request, seed)
    outside_before = tree_digest(tree.outside)
    before = tree_digest(tree.root)
    allowed = allowed_deletions(tree)
    assert tree_digest(tree.root) == before  # planning read nothing it changed (atime aside)

    run(tree, "prune", str(tree.root), "--dry-run", memory=PRUNE_MEMORY)
    assert check_invariants(tree, before, outside_before, set()) == set()
    check_survivors(tree, before, outside_before)
    run(tree, "prune", str(tree.root), "--json", memory=PRUNE_MEMORY)
    gone = check_invariants(tree, before, outside_before, allowed)
    check_survivors(tree, before, outside_before)

    assert tree.plain_group is not None
    assert not (tree.plain_group / "epoch=00-step=000100-train.ckpt").exists()  # it did prune
    assert gone


@pytest.mark.parametrize("seed", SEEDS[:1])
def test_a_daemon_pass_on_a_hostile_tree(tmp_path: Path, request: pytest.FixtureRequest, seed: int) -> None:
    """The deepest directory checkpoint is 1,200 levels, the one the daemon deletes: past the recursion
    limit for the observer's walks, and its removal is as many events as entries, each placed in its
    group at once (see tests/integration/test_deep_trees.py for their count)."""
    tree = hostile(tmp_path, request, seed)
    outside_before = tree_digest(tree.outside)
    before = tree_digest(tree.root)
    allowed = allowed_deletions(tree) | {"/.ckpt-watcher.lock"}
    command = [
        *in_namespace(tree),
        *cli_command("watch", str(tree.root), "--rescan", "3600", memory=DAEMON_MEMORY),
    ]

    deepest = next(tree.root.glob("group*-deep_nesting")) / "epoch=05-step=000100-train.ckpt"
    with running_daemon([], tmp_path / "daemon.log", command=command) as daemon:
        daemon.wait_ready(timeout=180)
        # A directory checkpoint counts once the daemon has seen it unchanged for its quiet time (30 s)
        daemon.wait_for("checkpoint_deleted", lambda record: record["path"] == str(deepest), timeout=180)
        code = daemon.stop(signal.SIGTERM, timeout=60)
        log = daemon.log_path.read_text(errors="replace")

    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    gone = check_invariants(tree, before, outside_before, allowed)
    check_survivors(tree, before, outside_before)
    assert os.path.exists(tree.root)
    assert "/" + str(deepest.relative_to(tree.root)) in gone  # the daemon's own deep removal


DEEPER_THAN_THE_RECURSION_LIMIT = 1200  # levels; one-letter names keep the path within PATH_MAX


@pytest.mark.parametrize("observer", [[], ["--poll-interval", "1"]], ids=["inotify", "polling"])
def test_the_daemon_arms_and_serves_on_a_tree_deeper_than_the_recursion_limit(
    tmp_path: Path, request: pytest.FixtureRequest, observer: list[str]
) -> None:
    """watchdog walks the watched tree with recursive walks (os.walk on Python 3.11, a recursive
    generator when polling): 1,200 levels raised RecursionError, so the daemon never armed. It arms, and
    serves a group at the very bottom of such a tree as any other."""
    request.addfinalizer(lambda: remove_deep(tmp_path))
    root = tmp_path / "root"
    make_deep_directory(root / "run" / "epoch=00-step=000100-train.ckpt" / "nested", depth=1200)
    make_deep_directory(root / "deep", depth=DEEPER_THAN_THE_RECURSION_LIMIT)
    bottom = Path(str(root / "deep") + "/d" * DEEPER_THAN_THE_RECURSION_LIMIT)
    assert bottom.is_dir()

    with running_daemon(["watch", str(root), "--settle", "1", *observer], tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(timeout=120)
        for step in range(100, 800, 100):  # written after start-up: only the observer sees them
            write_checkpoint(bottom / step_name(0, step))
        wait_until(
            lambda: len(list(bottom.glob("*.ckpt"))) == 5, timeout=120, what="the deepest group pruned"
        )
        code = daemon.stop(signal.SIGTERM, timeout=60)
        log = daemon.log_path.read_text(errors="replace")

    assert code == 0, log[-3000:]
    assert not daemon.events("worker_error"), log[-3000:]
    assert "Traceback" not in log
    assert sorted(path.name for path in bottom.glob("*.ckpt")) == [
        step_name(0, step) for step in range(300, 800, 100)
    ]


def test_a_last_link_at_the_head_of_a_chain_longer_than_the_recursion_limit(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``last.ckpt -> link-0 -> ... -> link-1499 -> step 100``: resolving it recursed once per link
    (os.path.realpath on Python 3.11), so ``prune`` died with a traceback and the daemon's start-up
    pass failed forever (no READY). Both resolve it, keep its target and prune the rest."""
    run = tmp_path / "root" / "run"
    for step in range(100, 800, 100):
        write_checkpoint(run / step_name(0, step))
    for index in range(1500):
        os.symlink(f"link-{index + 1}" if index < 1499 else step_name(0, 100), run / f"link-{index}")
    os.symlink("link-0", run / "last.ckpt")

    dry_run = run_cli("prune", str(run.parent), "--dry-run", "--json", "--settle", "0")
    assert_clean_exit(dry_run, allowed=(0,))
    entries = prune_entries(dry_run)
    assert entries[step_name(0, 100)]["action"] == "keep"
    assert entries[step_name(0, 200)]["action"] == "delete"

    with running_daemon(["watch", str(run.parent), "--settle", "0"], tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(timeout=120)
        code = daemon.stop(signal.SIGTERM, timeout=60)
        log = daemon.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    assert sorted(path.name for path in run.glob("epoch=*")) == [
        step_name(0, step) for step in (100, 300, 400, 500, 600, 700)
    ]
