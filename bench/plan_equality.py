"""Behaviour unchanged: the same plan before and after a change, on generated trees.

    python bench/plan_equality.py --before /path/to/old/python --after /path/to/new/python \
        [--work-dir /tmp/scale-trees] [--size large|smoke]

Runs ``prune TREE --dry-run --json`` with each interpreter (each has its own ckpt-watcher installed)
under several policies and requires equal parsed JSON documents: the default policy, a byte budget
with a trash grace (``max_size``, ``trash``: the ``space``/``trash``/``evicted`` keys), and
``keep_free`` on a tmpfs of its own (so its free bytes do not move between the two runs; root only,
else said so and skipped). Trees: one directory of N checkpoints and G directories of M, written by
``benchlib.write_run``; with ``--size large`` the 100,000-checkpoint trees of ``bench/hundred_k.py``.
Exit code 0 when every document is equal, 1 otherwise (the first differing paths are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchlib import write_run

SIZES = {"large": ((100_000,), (2_000, 49)), "smoke": ((500,), (20, 9))}
BUDGET_POLICY = "max_size: 1 KiB\ntrash:\n  grace: 1h\nsave_top_k_checkpoints: 20\n"
KEEP_FREE_POLICY = "keep_free: 60%\nsave_top_k_checkpoints: 30\nsave_top_k_best: 10\n"
TMPFS_BYTES = 48 << 20
SHARED_DISK_MOVING = frozenset({"free_bytes"})


def one_directory(work: Path, count: int) -> Path:
    """A directory of ``count`` checkpoints plus last.ckpt (made once)."""
    directory = work / f"one-{count}"
    if not directory.exists():
        write_run(directory, count)
    return directory


def many_directories(work: Path, groups: int, each: int) -> Path:
    """``groups`` run directories of ``each`` checkpoints plus last.ckpt (made once)."""
    root = work / f"many-{groups}x{each + 1}"
    if not root.exists():
        root.mkdir(parents=True)
        for run in range(groups):
            write_run(root / f"run-{run:04d}", each)
    return root


def plan_of(python: str, tree: Path, policy: Path | None) -> Any:
    """The parsed ``prune --dry-run --json`` document ``python``'s ckpt-watcher writes for ``tree``."""
    command = [python, "-m", "ckpt_watcher", "prune", str(tree), "--dry-run", "--json"]
    if policy is not None:
        command += ["--policy", str(policy)]
    done = subprocess.run(command, capture_output=True, check=False, cwd="/")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]!r}")
    return json.loads(done.stdout)


def differences(
    before: Any, after: Any, where: str = "$", *, moving: frozenset[str] = frozenset()
) -> list[str]:
    """Where two parsed documents differ (the first few paths); keys in ``moving`` are not compared."""
    if type(before) is not type(after):
        return [f"{where}: {before!r} != {after!r}"]
    if isinstance(before, dict):
        found = [f"{where}.{key}: only on one side" for key in before.keys() ^ after.keys()]
        for key in (before.keys() & after.keys()) - moving:
            found += differences(before[key], after[key], f"{where}.{key}", moving=moving)
        return found[:10]
    if isinstance(before, list):
        if len(before) != len(after):
            return [f"{where}: {len(before)} items != {len(after)}"]
        found = []
        for index, (left, right) in enumerate(zip(before, after, strict=True)):
            found += differences(left, right, f"{where}[{index}]", moving=moving)
            if len(found) >= 10:
                break
        return found
    return [] if before == after else [f"{where}: {before!r} != {after!r}"]


def mounted_tmpfs(work: Path) -> Path | None:
    """A tmpfs of its own for the keep_free case (its free space moves only with what we write)."""
    mount = work / "keep-free-tmpfs"
    if os.path.ismount(mount):
        return mount
    if os.geteuid() != 0:
        return None
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    return mount if done.returncode == 0 else None


def cases(work: Path, size: str) -> list[tuple[str, Path, Path | None]]:
    """(label, tree, policy file) for every comparison."""
    (single,), (groups, each) = SIZES[size]
    one = one_directory(work, single)
    many = many_directories(work, groups, each)
    budget = work / "budget-trash-policy.yaml"
    budget.write_text(BUDGET_POLICY)
    found: list[tuple[str, Path, Path | None]] = [
        (f"default policy, 1 x {single:,}", one, None),
        (f"default policy, {groups:,} x {each + 1}", many, None),
        (f"max_size + trash, 1 x {single:,}", one, budget),
        (f"max_size + trash, {groups:,} x {each + 1}", many, budget),
    ]
    mount = mounted_tmpfs(work)
    if mount is not None:
        keep_free = work / "keep-free-policy.yaml"
        keep_free.write_text(KEEP_FREE_POLICY)
        found.append(("keep_free on a tmpfs, 100 x 50", many_directories(mount, 100, 49), keep_free))
    else:
        print("keep_free case skipped: no tmpfs of its own could be mounted (needs root)", file=sys.stderr)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the interpreter of the old version")
    parser.add_argument("--after", default=sys.executable, help="the interpreter of the new version")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ckpt-watcher-plan-equality"))
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    arguments = parser.parse_args()
    arguments.work_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    try:
        failed = _compare_all(arguments)
    finally:
        mount = arguments.work_dir / "keep-free-tmpfs"
        if os.path.ismount(mount):
            subprocess.run(["umount", str(mount)], check=False)
    return 1 if failed else 0


def _compare_all(arguments: argparse.Namespace) -> int:
    """Compare every case; how many differ."""
    failed = 0
    for label, tree, policy in cases(arguments.work_dir, arguments.size):
        before = plan_of(arguments.before, tree, policy)
        after = plan_of(arguments.after, tree, policy)
        # On the shared disk the free bytes move between the two runs; no decision reads them there
        # (no keep_free), so they alone are not compared. On the tmpfs everything is.
        found = differences(before, after, moving=frozenset() if "tmpfs" in label else SHARED_DISK_MOVING)
        entries = sum(len(group["entries"]) for group in after["groups"])
        summary = after["summary"]
        verdict = "equal" if not found else "DIFFERENT"
        print(
            f"{label}: {verdict} ({entries:,} entries, {len(after['groups']):,} groups, "
            f"kept {summary['kept']:,}, deleted {summary['deleted']:,}, trashed {summary['trashed']:,}, "
            f"evicted {summary['evicted']:,}, "
            f"space {len(after['space'])})"
        )
        for line in found:
            print(f"  {line}")
        failed += bool(found)
    return failed


if __name__ == "__main__":
    sys.exit(main())
