"""``prune`` on real files laid out like a real run, run as a real process where it matters."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckpt_watcher.cli import main
from ckpt_watcher.delete import Outcome, apply_plan
from ckpt_watcher.plan import plan
from ckpt_watcher.policy import DEFAULT_POLICY, POLICY_KEYS
from ckpt_watcher.scan import scan_tree
from tests.support.cli import TRACEBACK, WITHOUT_READ_OVERRIDE, cli_command, events, prune_entries, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import best_name, step_name, write_checkpoint, write_truncated

STEPS_PER_EPOCH = 1000
SAVE_EVERY = 50


@dataclass
class RunLayout:
    """A generated run directory and the names the default policy must keep in it."""

    root: Path
    run: Path
    second_run: Path
    outside: Path
    expected_kept: set[Path]
    never_touched: set[Path]


def _files_below(root: Path) -> set[Path]:
    found: set[Path] = set()
    for directory, directories, files in os.walk(root):
        for name in files + [name for name in directories if os.path.islink(Path(directory, name))]:
            found.add(Path(directory, name))
    return found


@pytest.fixture
def run_layout(tmp_path: Path) -> RunLayout:
    """Hundreds of checkpoints over several epochs, plus every kind of thing that must survive."""
    root = tmp_path / "checkpoint"
    run = root / "Custom_LLaDA" / "stage1_llm_pretraining"
    second_run = root / "Custom_LLaDA" / "stage2_finetune"
    outside = tmp_path / "outside"
    outside.mkdir()
    outside_checkpoint = write_checkpoint(outside / step_name(9, 999_000))

    steps = [
        (epoch, step)
        for step in range(SAVE_EVERY, 6 * STEPS_PER_EPOCH + 1, SAVE_EVERY)
        for epoch in [(step - 1) // STEPS_PER_EPOCH]
    ]
    # Overflow of the {step:06d} width: 1,000,000 and beyond sort before 999,950 by name.
    steps += [(999, 999_950), (999, 1_000_000), (1000, 1_000_050)]
    for epoch, step in steps:
        write_checkpoint(run / step_name(epoch, step))
    losses = [0.9, 0.5, math.nan, 0.31, 0.2, 0.2, 0.44, math.nan, 0.25, 0.8]
    best_paths = []
    for index, loss in enumerate(losses):
        best_paths.append(write_checkpoint(run / best_name(index // 2, 100 * (index + 1), loss)))
    (run / "last.ckpt").write_bytes((run / step_name(1000, 1_000_050)).read_bytes())

    never_touched = {
        write_truncated(run / step_name(1000, 1_000_100)),  # newest, but half written
        write_checkpoint(run / step_name(1000, 1_000_150)),  # complete but NeMo says unfinished
        run / "epoch=1000-step=1000150-train-unfinished",
        run / "notes.txt",
        run / "epoch=03-step=001500-train.ckpt.tmp",
        run / "Epoch=03-step=001500-train.ckpt",
        run / "outside-link.ckpt",
        run / step_name(0, 999_500),  # symlink named like a checkpoint, pointing outside the root
        run / "legacy.ckpt",
        run / step_name(1000, 1_000_200),  # a checkpoint name on a non-zip (legacy pickle) file
    }
    (run / step_name(1000, 1_000_200)).write_bytes(b"\x80\x02legacy pickle")
    (run / "epoch=1000-step=1000150-train-unfinished").write_bytes(b"")
    (run / "notes.txt").write_text("hyper-parameters")
    write_checkpoint(run / "epoch=03-step=001500-train.ckpt.tmp")
    write_checkpoint(run / "Epoch=03-step=001500-train.ckpt")
    os.symlink(outside_checkpoint, run / "outside-link.ckpt")
    os.symlink(outside_checkpoint, run / step_name(0, 999_500))
    (run / "legacy.ckpt").write_bytes(b"\x80\x02legacy pickle")
    os.symlink(outside, run / "linked-dir")  # a symlinked directory: never descended into
    never_touched.add(run / "linked-dir")

    # The second run resumes through a last.ckpt symlink to an old step checkpoint.
    for epoch, step in [(0, 100), (0, 200), (0, 300), (1, 400), (1, 500), (1, 600), (2, 700)]:
        write_checkpoint(second_run / step_name(epoch, step))
    os.symlink(step_name(0, 100), second_run / "last.ckpt")

    expected_kept = {
        run / "last.ckpt",
        *(
            run / step_name(epoch, step)
            for epoch, step in [(1000, 1_000_050), (999, 1_000_000), (999, 999_950), (5, 6000), (5, 5950)]
        ),
        best_paths[4],
        best_paths[5],
        best_paths[8],  # 0.2 (step 600), 0.2 (step 500), 0.25
        second_run / "last.ckpt",
        second_run / step_name(0, 100),  # the target of last.ckpt, outside the newest 5
        *(
            second_run / step_name(epoch, step)
            for epoch, step in [(2, 700), (1, 600), (1, 500), (1, 400), (0, 300)]
        ),
    }
    return RunLayout(root, run, second_run, outside, expected_kept | never_touched, never_touched)


def test_dry_run_changes_nothing_and_explains_every_file(run_layout: RunLayout) -> None:
    before = {path: path.lstat() for path in _files_below(run_layout.root)}

    completed = run_cli("prune", str(run_layout.root), "--dry-run")

    assert completed.returncode == 0, completed.stderr
    after = {path: path.lstat() for path in _files_below(run_layout.root)}
    assert set(after) == set(before)
    assert all(after[path].st_mtime_ns == before[path].st_mtime_ns for path in before)
    assert "dry run: nothing was deleted" in completed.stdout
    assert "outside newest 5 step checkpoints" in completed.stdout
    assert "target of Custom_LLaDA/stage2_finetune/last.ckpt" in completed.stdout
    assert "checkpoint_deleted" not in completed.stderr
    warnings = [json.loads(line) for line in completed.stderr.splitlines() if "suspicious" in line]
    assert [Path(warning["path"]).name for warning in warnings] == [step_name(1000, 1_000_200)]


def test_dry_run_json_names_every_entry(run_layout: RunLayout) -> None:
    completed = run_cli("prune", str(run_layout.root), "--dry-run", "--json")

    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    entries = {Path(entry["path"]): entry for group in document["groups"] for entry in group["entries"]}
    deleted = {path for path, entry in entries.items() if entry["action"] == "delete"}
    all_files = _files_below(run_layout.root.resolve())
    resolved_expected = {Path(os.path.realpath(path.parent)) / path.name for path in run_layout.expected_kept}
    assert deleted == all_files - resolved_expected
    assert document["summary"]["deleted"] == len(deleted)
    assert document["summary"]["dry_run"] is True
    assert document["policy"]["source"] == "embedded default"
    nan_entry = next(entry for entry in entries.values() if entry["metric"] == "nan")
    assert nan_entry["kind"] == "best"
    assert all(entry["reasons"] for entry in entries.values())


def test_prune_leaves_exactly_the_policy_and_logs_every_deletion(run_layout: RunLayout) -> None:
    before = _files_below(run_layout.root)

    completed = run_cli("prune", str(run_layout.root))

    assert completed.returncode == 0, completed.stderr
    after = _files_below(run_layout.root)
    assert after == run_layout.expected_kept
    assert (run_layout.outside / step_name(9, 999_000)).exists()
    records = [json.loads(line) for line in completed.stderr.splitlines() if line.strip()]
    deletions = [record for record in records if record["event"] == "checkpoint_deleted"]
    deleted_paths = {Path(record["path"]) for record in deletions}
    assert len(deletions) == len(deleted_paths)
    assert deleted_paths == {Path(os.path.realpath(path)) for path in before - after}
    for record in deletions:
        assert {"path", "kind", "epoch", "step", "metric", "bytes", "reasons", "timestamp"} <= record.keys()
        assert record["reasons"]
        assert record["bytes"] > 0


def test_prune_twice_deletes_nothing_the_second_time(run_layout: RunLayout) -> None:
    assert run_cli("prune", str(run_layout.root)).returncode == 0

    second = run_cli("prune", str(run_layout.root), "--json")

    assert second.returncode == 0
    assert json.loads(second.stdout)["summary"]["deleted"] == 0
    assert _files_below(run_layout.root) == run_layout.expected_kept


def test_symlinked_root_is_resolved_and_nothing_outside_is_touched(run_layout: RunLayout) -> None:
    link = run_layout.root.parent / "checkpoint-link"
    os.symlink(run_layout.root, link)

    completed = run_cli("prune", str(link))

    assert completed.returncode == 0, completed.stderr
    assert _files_below(run_layout.root) == run_layout.expected_kept
    assert (run_layout.outside / step_name(9, 999_000)).exists()


def test_file_replaced_after_planning_is_not_deleted(tmp_path: Path) -> None:
    for step in range(100, 1100, 100):
        write_checkpoint(tmp_path / step_name(0, step))
    scan = scan_tree(tmp_path, DEFAULT_POLICY.compiled_naming)
    the_plan = plan(scan.records, DEFAULT_POLICY)
    victim = the_plan.deletions[0].record.path
    victim.unlink()
    write_checkpoint(victim, payload=b"a different, newer file")

    applied = apply_plan(the_plan, tmp_path)

    outcomes = {result.decision.record.path: result.outcome for result in applied.results}
    assert outcomes[victim] is Outcome.CHANGED
    assert victim.exists()


def test_file_swapped_for_symlink_after_planning_is_not_followed(tmp_path: Path) -> None:
    outside = write_checkpoint(tmp_path / "outside" / "precious.ckpt")
    root = tmp_path / "root"
    for step in range(100, 1100, 100):
        write_checkpoint(root / step_name(0, step))
    the_plan = plan(scan_tree(root, DEFAULT_POLICY.compiled_naming).records, DEFAULT_POLICY)
    victim = the_plan.deletions[0].record.path
    victim.unlink()
    os.symlink(outside, victim)

    applied = apply_plan(the_plan, root)

    assert outside.exists()
    assert victim.is_symlink()
    assert {result.outcome for result in applied.results if result.decision.record.path == victim} == {
        Outcome.CHANGED
    }


def test_group_directory_swapped_for_symlink_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    for step in range(100, 1100, 100):
        write_checkpoint(root / "run" / step_name(0, step))
    the_plan = plan(scan_tree(root, DEFAULT_POLICY.compiled_naming).records, DEFAULT_POLICY)
    (root / "run").rename(outside)
    os.symlink(outside, root / "run")

    applied = apply_plan(the_plan, root)

    assert applied.failed
    assert len(list(outside.iterdir())) == 10


def test_vanished_file_is_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for step in range(100, 1100, 100):
        write_checkpoint(tmp_path / step_name(0, step))
    the_plan = plan(scan_tree(tmp_path, DEFAULT_POLICY.compiled_naming).records, DEFAULT_POLICY)
    gone = the_plan.deletions[0].record.path
    gone.unlink()

    applied = apply_plan(the_plan, tmp_path)

    assert not applied.failed
    assert [result.outcome for result in applied.results].count(Outcome.ALREADY_GONE) == 1
    assert len(applied.deleted) == 4


def test_permission_error_is_logged_and_the_rest_goes_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for step in range(100, 1100, 100):
        write_checkpoint(tmp_path / step_name(0, step))
    refused = step_name(0, 200)
    real_unlink = os.unlink

    def unlink_refusing_one(path: str, *, dir_fd: int | None = None) -> None:
        if path.endswith(refused):  # under its name or the name it is moved to just before (delete.py)
            raise PermissionError(13, "Permission denied")
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink_refusing_one)

    exit_code = main(["prune", str(tmp_path)])

    assert exit_code == 1
    remaining = sorted(path.name for path in tmp_path.iterdir())
    assert remaining == sorted([refused, *(step_name(0, step) for step in range(600, 1100, 100))])
    errors = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "delete_failed" in line]
    assert len(errors) == 1
    assert errors[0]["error"] == "Permission denied"
    assert errors[0]["path"].endswith(refused)


def test_missing_path_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_invalid_policies_exit_2_and_delete_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for step in range(100, 1100, 100):
        write_checkpoint(root / step_name(0, step))
    cases = {
        "syntax.yaml": "save_top_k_checkpoints: [1,\n",
        "types.yaml": "save_top_k_checkpoints: 2.5\nsave_top_k_best: true\n",
        "range.yaml": "save_top_k_checkpoints: -2\nsave_every_n_epochs: -1\n",
        "nothing.yaml": "model: llada\nlr: 0.001\n",
        "list.yaml": "- save_top_k_checkpoints: 1\n",
    }
    for file_name, text in cases.items():
        policy_file = tmp_path / file_name
        policy_file.write_text(text)

        completed = run_cli("prune", str(root), "--policy", str(policy_file))

        assert completed.returncode == 2, file_name
        assert "At '" in completed.stderr, file_name
        assert "Traceback" not in completed.stderr, file_name
        assert len(list(root.iterdir())) == 10, file_name


def _unreadable_run(root: Path) -> Path:
    """A tree with one readable run and one directory nobody may list (chmod 000)."""
    for step in range(100, 800, 100):
        write_checkpoint(root / "readable" / step_name(0, step))
    locked = root / "locked"
    locked.mkdir()
    write_checkpoint(locked / step_name(0, 100))
    locked.chmod(0)
    return locked


def test_an_unreadable_directory_is_reported_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    locked = _unreadable_run(root)
    try:
        for arguments in (["--dry-run"], []):
            completed = run_cli("prune", str(root), *arguments, prefix=WITHOUT_READ_OVERRIDE)

            assert completed.returncode == 0, completed.stderr
            problems = events(completed.stderr, "scan_problem")
            assert [problem["path"] for problem in problems] == [str(locked)], arguments
        assert len(list((root / "readable").iterdir())) == 5
    finally:
        locked.chmod(0o755)


def _keys(document: object, under: str = "") -> set[str]:
    """Every key of a JSON document, each with the key it sits under (``groups.entries.outcome``)."""
    keys: set[str] = set()
    if isinstance(document, dict):
        for key, value in document.items():
            keys.add(f"{under}{key}")
            keys |= _keys(value, f"{under}{key}.")
    elif isinstance(document, list):
        for item in document:
            keys |= _keys(item, under)
    return keys


def test_the_readme_shows_every_key_of_the_json_document(run_layout: RunLayout) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("`--json` prints one document")
    shape = readme[start : readme.index("\n\n", start)]
    documents = [
        json.loads(run_cli("prune", str(run_layout.root), *arguments).stdout)
        for arguments in (["--dry-run", "--json"], ["--json"])
    ]

    keys = set().union(*(_keys(document) for document in documents))
    policy_values = {key for key in keys if key.startswith("policy.") and key != "policy.source"}
    assert {f"policy.{key}" for key in POLICY_KEYS} <= policy_values  # "...every policy key"
    for key in sorted(keys - policy_values):
        assert f'"{key.rsplit(".", 1)[-1]}"' in shape, f"README's --json shape lacks {key}"


def test_a_root_in_a_directory_the_user_may_not_search_is_a_usage_error(tmp_path: Path) -> None:
    """``prune /home/other/run`` where /home/other is mode 700: exit 2 saying why, no traceback."""
    private = tmp_path / "private"
    (private / "run").mkdir(parents=True)
    private.chmod(0)
    try:
        completed = run_cli("prune", str(private / "run"), "--dry-run", prefix=WITHOUT_READ_OVERRIDE)
    finally:
        private.chmod(0o755)

    assert completed.returncode == 2
    assert f"{private / 'run'}: cannot look at it: Permission denied" in completed.stderr
    assert TRACEBACK not in completed.stderr


@pytest.mark.parametrize("options", [["--dry-run", "--json"], ["--dry-run"], ["--json"]])
def test_a_reader_that_goes_away_ends_prune_quietly(tmp_path: Path, options: list[str]) -> None:
    """``prune --dry-run --json | head``: the streamed plan's reader is gone after a few bytes. Each
    later group failed with a traceback (group_failed, 40 of them here) and the command ended with one
    more; now it ends as SIGPIPE ends other tools (141), saying nothing."""
    root = tmp_path / "root"
    for group in range(40):
        for step in range(1, 31):
            write_checkpoint(root / f"run-{group:02d}" / step_name(0, step * 10))
    command = cli_command("prune", str(root), *options)
    log = tmp_path / "stderr"  # a file: a real run logs each deletion, more than a pipe holds
    with (
        log.open("wb") as stderr_file,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file) as process,
    ):
        assert process.stdout is not None
        process.stdout.read(16)
        process.stdout.close()  # what head does once it has its lines
        exit_code = process.wait(timeout=60)
    stderr = log.read_text()

    assert exit_code == 141, stderr
    assert TRACEBACK not in stderr
    assert "group_failed" not in stderr
    if "--dry-run" not in options:  # the deletions were made before the output: they stand
        assert sorted(path.name for path in (root / "run-00").iterdir()) == [
            step_name(0, step * 10) for step in range(26, 31)
        ]


@pytest.mark.parametrize("command", ["prune", "watch"])
def test_a_working_directory_removed_before_the_start_is_one_line_and_exit_2(
    tmp_path: Path, command: str
) -> None:
    """Started from a directory that was removed (a shell still in it): one line saying so, exit
    code 2, no traceback, nothing deleted (relative paths cannot be read against it)."""
    root = tmp_path / "root"
    root.mkdir()
    for step in (100, 200, 300, 400, 500, 600, 700):
        write_checkpoint(root / step_name(0, step))
    gone = tmp_path / "gone"
    gone.mkdir()
    removed_first = ["sh", "-c", 'cd "$0" && rmdir "$0" && exec "$@"', str(gone)]

    completed = run_cli(command, str(root), prefix=removed_first)

    assert completed.returncode == 2, completed.stderr
    assert "the working directory cannot be read" in completed.stderr
    assert TRACEBACK not in completed.stderr
    assert not gone.exists()
    assert len(list(root.iterdir())) == 7


def test_a_last_checkpoint_left_truncated_or_dangling_is_a_warning_and_kept(tmp_path: Path) -> None:
    """A trainer killed while copying last.ckpt leaves it truncated; a last.ckpt link whose target is
    gone resumes nothing: each is kept, with a warning saying a resume from it fails (only once it has
    been untouched for a minute: a save in progress is incomplete too)."""
    root = tmp_path / "root"
    for run in ("a", "b", "c"):
        for step in (100, 200):
            write_checkpoint(root / run / step_name(0, step))
    write_truncated(root / "a" / "last.ckpt")
    (root / "b" / "last.ckpt").symlink_to("gone.ckpt")
    write_truncated(root / "c" / "last.ckpt")  # just written: a save in progress
    an_hour_ago = time.time() - 3600
    os.utime(root / "a" / "last.ckpt", (an_hour_ago, an_hour_ago))
    os.utime(root / "b" / "last.ckpt", (an_hour_ago, an_hour_ago), follow_symlinks=False)

    completed = run_cli("prune", str(root))

    assert completed.returncode == 0, completed.stderr
    warned = events(completed.stderr, "last_checkpoint_incomplete")
    assert sorted(Path(str(record["path"])).parent.name for record in warned) == ["a", "b"]
    assert all(
        (root / run / "last.ckpt").is_symlink() or (root / run / "last.ckpt").exists() for run in "abc"
    )
    assert events(completed.stderr, "checkpoint_deleted") == []


@pytest.mark.parametrize("watched", ["run", "parent"])
def test_a_prune_that_deletes_does_not_run_beside_a_watcher(tmp_path: Path, watched: str) -> None:
    """A watcher keeps everything; a ``prune`` with a policy that keeps one would delete the rest by
    its own rules beside it. It exits 2 naming the watcher, deletes nothing, and its dry run (the
    audit) still runs there; once the watcher stops, the same ``prune`` runs. A watcher of a directory
    above the run counts too: a review found ``prune ROOT/run`` ran beside ``watch ROOT``."""
    watched_path = tmp_path / "runs"
    run = watched_path / "run"
    for step in range(500, 3000, 500):
        write_checkpoint(run / step_name(0, step))
    keep_all = tmp_path / "keep-all.yaml"
    keep_all.write_text("save_top_k_checkpoints: -1\nsave_top_k_best: -1\n")
    keep_one = tmp_path / "keep-one.yaml"
    keep_one.write_text("save_top_k_checkpoints: 1\n")
    before = {path.name for path in run.iterdir()}

    target = run if watched == "run" else watched_path
    with running_daemon(["watch", str(target), "--policy", str(keep_all)], tmp_path / "watch.log") as daemon:
        daemon.wait_ready()
        refused = run_cli("prune", str(run), "--policy", str(keep_one), timeout=60)
        audit = run_cli("prune", str(run), "--policy", str(keep_one), "--dry-run", "--json", timeout=60)
        assert daemon.stop() == 0

    assert refused.returncode == 2, refused.stderr
    above = "" if watched == "run" else f", which holds {run}"
    assert refused.stderr.strip() == (
        f"ckpt-watcher: another ckpt-watcher is already pruning {target} (pid {daemon.process.pid}){above}: "
        "stop it before a prune that deletes (--dry-run runs beside it)"
    )
    entries = prune_entries(audit, exit_code=0)
    assert sorted(name for name, entry in entries.items() if entry["action"] == "delete") == sorted(
        before - {step_name(0, 2500)}
    )
    assert {path.name for path in run.iterdir()} == before
    assert run_cli("prune", str(run), "--policy", str(keep_one), timeout=60).returncode == 0
    assert {path.name for path in run.iterdir()} == {step_name(0, 2500)}


def test_a_lock_another_tool_holds_on_a_directory_above_does_not_stop_a_prune(tmp_path: Path) -> None:
    """A lock above PATH counts only if a ckpt-watcher holds it: a review saw ``flock /srv cron.sh``
    (any tool's lock on a directory above) refuse every prune below it, blaming a ckpt-watcher."""
    run = tmp_path / "runs" / "run"
    for step in range(500, 2000, 500):
        write_checkpoint(run / step_name(0, step))
    keep_one = tmp_path / "keep-one.yaml"
    keep_one.write_text("save_top_k_checkpoints: 1\n")
    holder = subprocess.Popen(["flock", "--exclusive", str(run.parent), "sleep", "120"])
    try:
        inode = os.stat(run.parent).st_ino
        wait_until(lambda: f":{inode} " in Path("/proc/locks").read_text(), 30, "the lock")
        pruned = run_cli("prune", str(run), "--policy", str(keep_one), timeout=60)
    finally:
        holder.kill()
        holder.wait()

    assert pruned.returncode == 0, pruned.stderr
    assert sorted(path.name for path in run.iterdir()) == [step_name(0, 1500)]
