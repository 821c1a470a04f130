"""Retention by bytes on a real file system (a tmpfs mounted for each test; no mocked statvfs):
``prune``, ``prune --dry-run`` and ``--json`` with ``keep_free`` and ``max_size``, per-run overrides,
milestones, the never-evicted set with ``budget_unmet``, and the reconcile core's memory of groups
outside a pass (a stale memory never deletes: the group is planned afresh first)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from ckpt_watcher.budget import Growing
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import load_policy
from ckpt_watcher.protection import ProtectionRegistry
from ckpt_watcher.reconcile import Reconciler, Trigger
from ckpt_watcher.space import grown
from tests.support.cli import events, run_cli
from tests.support.factories import best_name, step_name, zip_bytes
from tests.support.tmpfs import MIB, free_bytes, mounted_tmpfs

pytestmark = pytest.mark.timeout(120)

CHECKPOINT_BYTES = 3 * MIB
PAGE = 4096


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs holding the checkpoint root ``ckpt``."""
    with mounted_tmpfs(tmp_path / "disk", 32 * MIB) as mount:
        root = mount / "ckpt"
        root.mkdir()
        yield root


def write(path: Path, size: int = CHECKPOINT_BYTES, age: float = 0.0) -> Path:
    """A complete checkpoint of about ``size`` bytes, written ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes(bytes(size)))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def steps(
    directory: Path, step_numbers: list[int], size: int = CHECKPOINT_BYTES, age: float = 1000
) -> list[str]:
    """Step checkpoints, the first written ``age`` seconds ago, each next one a second later."""
    names = []
    for index, step in enumerate(step_numbers):
        names.append(write(directory / step_name(0, step), size, age=age - index).name)
    return names


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def test_keep_free_in_the_dry_run_the_json_and_prune(disk: Path, tmp_path: Path) -> None:
    run = disk / "run"
    written = steps(run, [100, 200, 300, 400, 500, 600])
    (run / "last.ckpt").symlink_to(written[-1])
    policy = policy_file(tmp_path, "save_top_k_checkpoints: -1\nkeep_free: 12MiB\n")
    checkpoint = (run / written[0]).stat().st_size
    free = free_bytes(disk)
    block = os.statvfs(disk).f_frsize
    wanted = 12 * MIB + -(-checkpoint // block) * block  # keep_free + the next save (as large as the
    # newest checkpoint), in whole blocks
    needed = -(-(wanted - free) // checkpoint)  # the fewest checkpoints that make room
    assert 1 <= needed <= 3, "the layout must be short of space by a checkpoint or two"

    dry = run_cli("prune", str(disk), "--policy", str(policy), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    first = dry.stdout.splitlines()[0]
    assert first.startswith(f"free space on {disk}: ")
    assert "keep_free 12.0 MiB + next save 3.0 MiB (as large as run/" in first
    assert f"would take {needed} checkpoint" in first
    evicted = [line for line in dry.stdout.splitlines() if "evicted for space: " in line]
    assert [line.split()[6] for line in evicted] == [step_name(0, step) for step in (100, 200, 300)][:needed]
    assert names(run) == {*written, "last.ckpt"}  # a dry run deletes nothing

    document = json.loads(run_cli("prune", str(disk), "--policy", str(policy), "--dry-run", "--json").stdout)
    (space,) = document["space"]
    assert space["path"] == str(disk)
    assert space["keep_free"] == "12MiB"
    assert space["keep_free_bytes"] == 12 * MIB
    assert space["next_save_bytes"] == checkpoint
    assert space["free_bytes"] == free
    assert space["short_bytes"] == wanted - free
    assert space["evicted"] == needed
    assert space["unmet_bytes"] == 0
    assert document["summary"]["evicted"] == needed
    entries = {entry["name"]: entry for entry in document["groups"][0]["entries"]}
    assert [name for name, entry in entries.items() if entry.get("evicted")] == written[:needed]
    assert entries[written[0]]["reasons"][0].startswith("evicted for space: ")

    pruned = run_cli("prune", str(disk), "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr
    assert names(run) == {*written[needed:], "last.ckpt"}
    deleted = events(pruned.stderr, "checkpoint_deleted")
    assert [Path(record["path"]).name for record in deleted] == written[:needed]
    assert all(record["reasons"][0].startswith("evicted for space: ") for record in deleted)
    assert free_bytes(disk) >= wanted
    assert free_bytes(disk) < wanted + checkpoint + needed * PAGE  # no more than needed (pages: rounding)
    again = run_cli("prune", str(disk), "--policy", str(policy), "--dry-run")
    assert again.stdout.splitlines()[0].endswith(": met")


def test_a_percentage_is_of_the_file_system(disk: Path, tmp_path: Path) -> None:
    steps(disk / "run", [100, 200, 300, 400, 500, 600, 700])
    policy = policy_file(tmp_path, "save_top_k_checkpoints: -1\nkeep_free: 40%\n")
    pruned = run_cli("prune", str(disk), "--policy", str(policy), "--json")
    (space,) = json.loads(pruned.stdout)["space"]
    assert space["keep_free"] == "40%"
    assert space["keep_free_bytes"] == -(-32 * MIB * 4 // 10)
    assert free_bytes(disk) >= space["keep_free_bytes"] + space["next_save_bytes"]


def test_max_size_per_group_with_per_run_overrides(disk: Path, tmp_path: Path) -> None:
    size = MIB
    policy = policy_file(tmp_path, "save_top_k_checkpoints: -1\nmax_size: 6MiB\n")
    for run in ("strict", "inherits", "unlimited"):
        steps(disk / run, [100 * step for step in range(1, 9)], size=size)
    (disk / "strict" / ".ckpt-watcher.yaml").write_text("max_size: 2.5 MiB\n")
    (disk / "unlimited" / ".ckpt-watcher.yaml").write_text("max_size: null\n")

    pruned = run_cli("prune", str(disk), "--policy", str(policy))
    assert pruned.returncode == 0, pruned.stderr

    def kept(run: str) -> list[int]:
        return sorted(int(name.split("step=")[1][:6]) for name in names(disk / run) if name.endswith(".ckpt"))

    assert kept("strict") == [700, 800]  # two ~1 MiB files fit in 2.5 MiB, three do not
    assert kept("inherits") == [400, 500, 600, 700, 800]  # six are 6 MiB and their zip headers: too much
    assert kept("unlimited") == [100 * step for step in range(1, 9)]
    reasons = {
        Path(record["path"]).parent.name: record["reasons"][0]
        for record in events(pruned.stderr, "checkpoint_deleted")
    }
    assert reasons["strict"].startswith("evicted for space: group over max_size 2.5 MiB (8.0 MiB kept")
    assert reasons["inherits"].startswith("evicted for space: group over max_size 6.0 MiB (8.0 MiB kept")
    assert events(pruned.stderr, "budget_unmet") == []


def test_milestones_go_last_and_oldest_first(disk: Path, tmp_path: Path) -> None:
    size = MIB
    all_steps = [500 * step for step in range(1, 9)]  # 500 .. 4000
    steps(disk / "run", all_steps, size=size)
    text = "save_top_k_checkpoints: 3\nkeep_every_n_steps: 1000\nmax_size: 3.5MiB\n"
    pruned = run_cli("prune", str(disk), "--policy", str(policy_file(tmp_path, text)), "--json")
    document = json.loads(pruned.stdout)
    entries = {entry["step"]: entry for entry in document["groups"][0]["entries"]}
    # kept by the count rules: 3000, 3500, 4000 (newest 3) and the milestones 1000, 2000 (3000, 4000 too)
    assert [step for step, entry in entries.items() if entry["action"] == "keep"] == [4000, 3000, 2000]
    assert sorted(step for step, entry in entries.items() if entry.get("evicted")) == [1000, 3500]
    assert "milestone: step 1000 (keep_every_n_steps: 1000)" in entries[1000]["reasons"][1]
    assert "milestone: step 2000 (keep_every_n_steps: 1000)" in entries[2000]["reasons"]


def test_the_never_evicted_set_survives_an_unmet_budget(disk: Path, tmp_path: Path) -> None:
    run = disk / "run"
    written = steps(run, [100, 200, 300, 400, 500, 600], size=MIB)
    (run / "last.ckpt").symlink_to(written[1])  # last.ckpt's target: step 200
    (run / (written[2] + ".keep")).touch()  # pinned: step 300
    best = write(run / best_name(0, 400, 0.1), MIB, age=500).name  # the rank-1 best
    worse = write(run / best_name(0, 500, 0.9), MIB, age=400).name
    other = disk / "other"
    other_steps = steps(other, [10, 20, 30], size=MIB)
    policy = policy_file(tmp_path, "save_top_k_checkpoints: -1\nkeep_free: 31MiB\nmax_size: 0\n")
    resume = run / written[3]  # a resume source: step 400

    pruned = run_cli("prune", str(disk), "--policy", str(policy), "--protect", str(resume))

    assert pruned.returncode == 0, pruned.stderr  # an unmet budget is shown, not a failure
    assert names(run) == {
        "last.ckpt",
        written[1],
        written[2] + ".keep",
        written[2],
        written[3],
        written[5],
        best,
    }
    assert worse not in names(run)
    assert names(other) == {other_steps[-1]}  # each group keeps its newest complete checkpoint
    unmet = events(pruned.stderr, "budget_unmet")
    by_budget = {(record["budget"], record.get("directory", record.get("path"))): record for record in unmet}
    assert set(by_budget) == {("max_size", str(run)), ("max_size", str(other)), ("keep_free", str(disk))}
    assert by_budget["max_size", str(run)]["limit_bytes"] == 0
    detail = by_budget["max_size", str(run)]["detail"]
    for kept_name in (written[1], written[2], written[3], written[5], best):
        assert kept_name in detail
    assert "the newest complete checkpoint" in detail
    assert "the rank-1 best" in detail
    assert by_budget["keep_free", str(disk)]["unmet_bytes"] > 0
    assert all(record["level"] == "warning" for record in unmet)


# -- the core's memory of groups outside a pass ----------------------------------------------------


@pytest.fixture
def captured() -> Iterator[LogCapture]:
    capture = LogCapture()
    structlog.configure(processors=[capture], cache_logger_on_first_use=False)
    yield capture
    structlog.reset_defaults()


def _logged(capture: LogCapture, name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in list(capture.entries) if entry["event"] == name]


def _daemon_core(root: Path, policy: Path) -> Reconciler:
    tree = PolicyTree(root, load_policy(policy), strict=False)
    return Reconciler(tree, ProtectionRegistry(root), pins={}, settle_seconds=0, one_shot=False)


def test_a_group_outside_the_pass_is_planned_afresh_before_anything_is_taken_from_it(
    disk: Path, tmp_path: Path, captured: LogCapture
) -> None:
    old, new = disk / "old-run", disk / "new-run"
    old_steps = steps(old, [100, 200, 300, 400], size=2 * MIB, age=2000)  # written before new-run's
    policy = policy_file(tmp_path, "save_top_k_checkpoints: -1\nkeep_free: 14MiB\n")
    core = _daemon_core(disk, policy)
    first = core.run(Trigger.STARTUP)
    assert first.evicted == 0  # room enough for now
    # Behind the core's back (no pass sees it): the oldest checkpoint of old-run gets pinned, and the
    # next one is replaced by the truncated leftover of a crash under its name.
    (old / (old_steps[0] + ".keep")).touch()
    (old / old_steps[1]).unlink()
    write(old / old_steps[1], 2 * MIB, age=3600).write_bytes(zip_bytes(bytes(MIB))[: MIB // 2])
    os.utime(old / old_steps[1], (time.time() - 3600, time.time() - 3600))
    # new-run fills the disk; a pass over new-run alone must take from old-run
    new_steps = steps(new, [10, 20, 30, 40, 50], size=2 * MIB)
    wanted = 14 * MIB + (new / new_steps[-1]).stat().st_size
    assert free_bytes(disk) < wanted

    result = core.run(Trigger.EVENT, [new])

    deleted = [Path(entry["path"]).name for entry in _logged(captured, "checkpoint_deleted")]
    # not the pinned one (its pin was seen: old-run was planned again first), not the leftover (no
    # longer complete: never counted, never taken), but the oldest one that may still go
    assert deleted == [old_steps[2]]
    assert result.evicted == 1
    assert result.scanned_groups == 2  # new-run, and old-run joining the pass
    assert names(old) == {old_steps[0], old_steps[0] + ".keep", old_steps[1], old_steps[3]}
    assert names(new) == set(new_steps)
    assert free_bytes(disk) >= wanted
    assert result.budget_unmet_bytes == 0


# -- two daemons on one file system ----------------------------------------------------------------


def _short_by(root: Path, checkpoints: float, newest: Path) -> int:
    """A keep_free (bytes) that leaves the file system of ``root`` short by ``checkpoints`` times the
    size of ``newest`` (keep_free + the next save, as large as ``newest``, in whole blocks)."""
    size = newest.stat().st_size
    block = os.statvfs(root).f_frsize
    reserved = -(-size // block) * block
    return int(free_bytes(root) - reserved + checkpoints * size)


def _after_planning(core: Reconciler, meanwhile: Callable[[], object]) -> None:
    """Run ``meanwhile`` after ``core`` has chosen its evictions and before it applies them: the
    window in which another daemon on the same file system may free the same shortfall."""
    relieve = core.space.relieve

    def relieve_then(*arguments: Any, **options: Any) -> Any:
        planned = relieve(*arguments, **options)
        meanwhile()
        return planned

    core.space.relieve = relieve_then  # type: ignore[method-assign]


def test_two_daemons_on_one_disk_do_not_both_evict_for_the_same_shortfall(
    disk: Path, tmp_path: Path, captured: LogCapture
) -> None:
    """Two roots on one tmpfs, each with its own daemon and keep_free. Both plan evictions for the
    same shortfall; the second to apply reads the free space again, finds it there, and keeps its
    checkpoints (without the re-read, both would evict: twice what the disk needed)."""
    first_root, second_root = disk, disk.parent / "second"
    first = steps(first_root / "run", [100, 200, 300, 400, 500], size=MIB)
    second = steps(second_root / "run", [10, 20, 30, 40, 50], size=MIB, age=2000)
    keep_free = _short_by(disk, 1.5, first_root / "run" / first[-1])  # two checkpoints short
    rules = f"save_top_k_checkpoints: -1\nkeep_free: {keep_free}\n"
    policy = policy_file(tmp_path, rules)  # the same policy file for both (as one image would have)
    first_core, second_core = _daemon_core(first_root, policy), _daemon_core(second_root, policy)
    _after_planning(first_core, lambda: second_core.run(Trigger.STARTUP))

    result = first_core.run(Trigger.STARTUP)

    assert names(second_root / "run") == set(second[2:])  # the other daemon evicted its two oldest
    assert names(first_root / "run") == set(first)  # and this one kept everything it had planned
    assert result.evicted == 0
    assert result.deleted == 0
    (space,) = result.space
    assert space.evictions == ()  # the plan as applied
    assert space.short_bytes > 0  # (as planned: short when it was read)
    (spared,) = _logged(captured, "eviction_not_needed")
    assert spared["path"] == str(first_root)
    assert spared["kept"] == 2
    assert spared["checkpoints"] == [str(first_root / "run" / name) for name in first[:2]]
    assert "read again just before the eviction" in spared["detail"]
    deleted = [Path(entry["path"]) for entry in _logged(captured, "checkpoint_deleted")]
    assert deleted == [second_root / "run" / name for name in second[:2]]


def test_space_freed_between_two_evictions_spares_the_second(
    disk: Path, tmp_path: Path, captured: LogCapture
) -> None:
    """Planned: two evictions. Freed meanwhile: one checkpoint's worth. Applied: one, the most
    expendable; the other stays, and the free space keep_free asks for is there."""
    run = disk / "run"
    written = steps(run, [100, 200, 300, 400, 500], size=MIB)
    elsewhere = write(disk.parent / "elsewhere" / "scratch.bin", MIB)  # not below the root
    keep_free = _short_by(disk, 1.5, run / written[-1])
    core = _daemon_core(disk, policy_file(tmp_path, f"save_top_k_checkpoints: -1\nkeep_free: {keep_free}\n"))
    _after_planning(core, elsewhere.unlink)

    result = core.run(Trigger.STARTUP)

    assert names(run) == set(written[1:])
    assert result.evicted == 1
    assert result.deleted == 1
    (space,) = result.space
    assert [candidate.record.name for candidate in space.evictions] == [written[0]]
    assert space.short_now(free_bytes(disk)) == 0
    (spared,) = _logged(captured, "eviction_not_needed")
    assert (spared["kept"], spared["checkpoints"]) == (1, [str(run / written[1])])


def test_an_eviction_whose_free_space_cannot_be_read_again_is_kept(
    disk: Path, tmp_path: Path, captured: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In doubt, keep: the re-read before an eviction fails (here: statvfs raising EIO from then on),
    so the planned evictions stay, and the record says why."""
    run = disk / "run"
    written = steps(run, [100, 200, 300, 400, 500], size=MIB)
    keep_free = _short_by(disk, 1.5, run / written[-1])
    core = _daemon_core(disk, policy_file(tmp_path, f"save_top_k_checkpoints: -1\nkeep_free: {keep_free}\n"))

    def unreadable(path: object) -> os.statvfs_result:
        raise OSError(errno.EIO, "Input/output error", str(path))

    _after_planning(core, lambda: monkeypatch.setattr(os, "statvfs", unreadable))

    result = core.run(Trigger.STARTUP)

    assert names(run) == set(written)
    assert result.evicted == 0
    (spared,) = _logged(captured, "eviction_not_needed")
    assert spared["kept"] == 2
    assert "could not be read again" in spared["detail"]


def test_a_dry_run_shows_every_planned_eviction(disk: Path, tmp_path: Path, captured: LogCapture) -> None:
    """Nothing is applied in a dry run, so nothing is read again: the plan is shown whole."""
    run = disk / "run"
    written = steps(run, [100, 200, 300, 400, 500], size=MIB)
    elsewhere = write(disk.parent / "elsewhere" / "scratch.bin", 2 * MIB)
    keep_free = _short_by(disk, 1.5, run / written[-1])
    core = _daemon_core(disk, policy_file(tmp_path, f"save_top_k_checkpoints: -1\nkeep_free: {keep_free}\n"))
    _after_planning(core, elsewhere.unlink)

    result = core.run(Trigger.STARTUP, dry_run=True)

    assert result.evicted == 2
    (space,) = result.space
    assert [candidate.record.name for candidate in space.evictions] == written[:2]
    assert names(run) == set(written)
    assert _logged(captured, "eviction_not_needed") == []


def test_keep_free_takes_nothing_while_a_protect_from_config_holds_deletions(
    disk: Path, tmp_path: Path, captured: LogCapture
) -> None:
    """The config was missing, then is written unreadable (half-written) naming run-b's oldest
    checkpoint, and run-a fills the disk. An event pass over run-a holds every group: keep_free does
    not re-plan run-b to evict from it (that would go by a config nobody could read)."""
    run_a, run_b = disk / "run-a", disk / "run-b"
    written_b = steps(run_b, [100, 200, 300, 400], size=2 * MIB, age=3000)
    steps(run_a, [10], size=2 * MIB, age=100)
    config = tmp_path / "train.yaml"
    policy = policy_file(
        tmp_path, f"save_top_k_checkpoints: -1\nkeep_free: 14MiB\nprotect_from: [{config}]\n"
    )
    core = _daemon_core(disk, policy)
    assert core.run(Trigger.STARTUP).evicted == 0
    config.write_text(f'ckpt_path: "{run_b / written_b[0]}"\n  bad: [\n')
    steps(run_a, [20, 30, 40, 50], size=2 * MIB, age=50)
    assert free_bytes(disk) < 14 * MIB + 2 * MIB

    result = core.run(Trigger.EVENT, [run_a])

    assert names(run_b) == set(written_b)
    assert (result.evicted, result.deleted) == (0, 0)
    (held,) = _logged(captured, "deletions_held")
    assert held["groups"] == 3  # the root and both runs


def test_a_directory_checkpoint_being_written_is_measured_by_its_files(tmp_path: Path) -> None:
    """The free-space check re-reads a checkpoint being written between passes: for a directory
    checkpoint, the bytes and newest time of its files, not the directory entry's own st_size/mtime
    (a shard being appended to changes neither), so the next save is not foreseen too large."""
    checkpoint = tmp_path / step_name(0, 500)
    (checkpoint / "shards").mkdir(parents=True)
    shard = checkpoint / "shards" / "rank0.pt"
    shard.write_bytes(b"x" * 1000)
    status = checkpoint.stat()
    item = Growing(checkpoint, checkpoint.name, status.st_ino, 1000, 100_000, status.st_mtime_ns)
    with shard.open("ab") as appending:
        appending.write(b"y" * 50_000)
    later = time.time_ns() + 2_000_000_000
    os.utime(shard, ns=(later, later))
    now = grown(item)
    assert now is not None
    assert now.written == 51_000
    assert now.mtime_ns == later
    other = tmp_path / "other"
    other.mkdir()  # made while the checkpoint exists: another inode
    shutil.rmtree(checkpoint)
    other.rename(checkpoint)  # another directory took its name
    assert grown(item) is None


def test_keep_free_replanning_a_run_whose_last_link_is_missing_keeps_the_save_it_is_about_to_name(
    disk: Path, tmp_path: Path
) -> None:
    """keep_free re-plans a run outside an event pass between Lightning's removal of last.ckpt and its
    new link (a review): the re-plan listed no links, so nothing kept the save about to be linked
    (the policy keeps only best and last), and it was deleted with the whole re-plan applied."""
    run, other = disk / "b", disk / "a"
    write(run / step_name(0, 8), age=100)
    write(run / best_name(0, 4, 0.5), age=100)
    write(run / best_name(0, 8, 0.4), age=100)
    (run / "last.ckpt").symlink_to(step_name(0, 8))
    policy = policy_file(tmp_path, "save_top_k_checkpoints: 0\nsave_top_k_best: 2\nkeep_free: 12MiB\n")
    core = _daemon_core(disk, policy)
    core.run(Trigger.FULL)
    write(run / step_name(0, 12), age=10)  # Lightning's next save, then os.remove(last.ckpt):
    (run / "last.ckpt").unlink()
    write(other / step_name(0, 1), size=3 * CHECKPOINT_BYTES, age=10)  # the disk is short now

    core.run(Trigger.EVENT, {other})  # keep_free takes from the run outside the pass

    assert step_name(0, 12) in names(run)
    assert step_name(0, 8) in names(run)  # (the link's old target, pinned while it is missing)
