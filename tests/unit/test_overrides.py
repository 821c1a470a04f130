"""PolicyTree: per-run policies, their cost in deep and changing trees, and what a per-run file may read."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ckpt_watcher import overrides
from ckpt_watcher.config_files import CONFIG_QUIET_SECONDS
from ckpt_watcher.overrides import OVERRIDE_FILE_NAME, RETRY_SECONDS, PolicyTree
from ckpt_watcher.policy import LoadedPolicy, Policy, load_policy
from ckpt_watcher.policy_file import PolicyFile
from tests.support.factories import write_backdated
from tests.support.hostile_configs import FlakyConfigFiles, sequence_bomb
from tests.support.hostile_trees import make_fifo
from tests.support.quiet_clock import QuietClock

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    return directory


@pytest.fixture
def stat_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts every stat/lstat/open the code under test makes (the work a directory costs)."""
    counts: Counter[str] = Counter()

    def counting(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*arguments: Any, **keywords: Any) -> Any:
            counts[name] += 1
            return function(*arguments, **keywords)

        return wrapper

    for name in ("stat", "lstat", "open"):
        monkeypatch.setattr(os, name, counting(name, getattr(os, name)))
    return counts


def default_tree(root: Path, *, strict: bool = False, policy: Path | None = None) -> PolicyTree:
    return PolicyTree(root, load_policy(policy), strict=strict)


def chain(root: Path, depth: int) -> list[Path]:
    """``root/d/d/.../d`` ``depth`` levels deep; returns every level, the root first."""
    levels = [root]
    for _ in range(depth):
        levels.append(levels[-1] / "d")
    levels[-1].mkdir(parents=True)
    return levels


# --- cost: linear in the number of directories (issue 10, item 17) -------------------------------


def test_an_empty_deep_tree_costs_a_few_stats_per_directory(root: Path, stat_calls: Counter[str]) -> None:
    levels = chain(root, 300)
    tree = default_tree(root)
    stat_calls.clear()

    for directory in levels:  # parents first, as a scan walks
        assert tree.for_directory(directory) is not None
        tree.naming_for(directory)

    assert sum(stat_calls.values()) <= 4 * len(levels)


def test_the_deepest_directory_first_is_linear_too(root: Path, stat_calls: Counter[str]) -> None:
    levels = chain(root, 300)
    (levels[150] / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 2\n")
    tree = default_tree(root)
    stat_calls.clear()

    deepest = tree.for_directory(levels[-1])
    for directory in reversed(levels):
        tree.for_directory(directory)

    assert deepest is not None
    assert deepest.policy.save_top_k_checkpoints == 2
    assert sum(stat_calls.values()) <= 6 * len(levels)


def test_deep_overrides_still_apply_key_by_key(root: Path) -> None:
    levels = chain(root, 300)
    (root / OVERRIDE_FILE_NAME).write_text("save_top_k_best: 7\n")
    (levels[100] / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 2\n")
    (levels[200] / OVERRIDE_FILE_NAME).write_text("best_mode: max\n")
    tree = default_tree(root)

    policies = [tree.for_directory(directory) for directory in levels]

    assert all(policy is not None for policy in policies)
    assert [policy.policy.save_top_k_best for policy in policies if policy] == [7] * len(levels)
    tops = [policy.policy.save_top_k_checkpoints for policy in policies if policy]
    assert tops == [5] * 100 + [2] * 201
    modes = [policy.policy.best_mode for policy in policies if policy]
    assert modes == ["min"] * 200 + ["max"] * 101
    deepest = policies[-1]
    assert deepest is not None
    assert len(deepest.sources) == 4


def test_an_edit_is_seen_where_it_is_made_and_below(root: Path, quiet_clock: QuietClock) -> None:
    levels = chain(root, 5)
    tree = default_tree(root)
    for directory in levels:
        tree.for_directory(directory)
    override = levels[2] / OVERRIDE_FILE_NAME

    override.write_text("save_top_k_checkpoints: 1\n")  # a new file: read once left alone a while,
    assert tree.for_directory(levels[2]) is None  # and nothing planned here or below until then
    assert tree.for_directory(levels[5]) is None
    assert tree.for_directory(levels[1]) is not None
    quiet_clock.pass_quiet_time()
    at_the_file = tree.for_directory(levels[2])
    below = tree.for_directory(levels[5])
    above = tree.for_directory(levels[1])

    assert at_the_file is not None
    assert below is not None
    assert above is not None
    assert (at_the_file.policy.save_top_k_checkpoints, below.policy.save_top_k_checkpoints) == (1, 1)
    assert above.policy.save_top_k_checkpoints == 5

    override.write_text("save_top_k_checkpoints: 3\n")  # an edit: read once seen left alone a while
    tree.for_directory(levels[2])
    quiet_clock.pass_quiet_time()
    tree.for_directory(levels[2])
    again = tree.for_directory(levels[4])
    assert again is not None
    assert again.policy.save_top_k_checkpoints == 3

    override.unlink()  # it applies until it has been missing for the quiet time
    tree.for_directory(levels[2])
    quiet_clock.pass_quiet_time()
    tree.for_directory(levels[2])
    gone = tree.for_directory(levels[5])
    assert gone is not None
    assert gone.policy.save_top_k_checkpoints == 5


def test_outside_the_root_and_the_root_itself_get_the_root_policy(root: Path, tmp_path: Path) -> None:
    (root / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 9\n")
    tree = default_tree(root)
    for directory in (root, tmp_path, Path("/")):
        effective = tree.for_directory(directory)
        assert effective is not None
        assert effective.policy.save_top_k_checkpoints == 9


# --- memory: nothing kept for directories that are gone (item 18) --------------------------------


@pytest.mark.parametrize("with_override", [False, True], ids=["plain", "with-override"])
def test_state_for_vanished_directories_is_dropped(
    root: Path, with_override: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's threshold lowered (the rule is the same at 4096; 12,288 directories made and
    removed took ~50 s on a loaded machine): state for directories that are gone stays bounded."""
    sweep = 64
    monkeypatch.setattr(overrides, "MINIMUM_SWEEP", sweep)
    tree = default_tree(root)
    for index in range(3 * sweep):
        directory = root / f"run-{index}"
        directory.mkdir()
        if with_override:
            (directory / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 2\n")
        tree.for_directory(directory)
        shutil.rmtree(directory)

    assert tree.tracked_directories <= sweep


def test_retain_keeps_only_the_present_directories(root: Path) -> None:
    tree = default_tree(root)
    present = []
    for index in range(50):
        directory = root / f"run-{index}"
        directory.mkdir()
        (directory / OVERRIDE_FILE_NAME).write_text(f"save_top_k_checkpoints: {index + 1}\n")
        assert tree.for_directory(directory) is not None
        if index % 2:
            present.append(directory)
        else:
            shutil.rmtree(directory)

    tree.retain({root, *present})

    assert tree.tracked_directories <= len(present) + 1
    for directory in present:
        effective = tree.for_directory(directory)
        assert effective is not None
        assert effective.policy.save_top_k_checkpoints == int(directory.name.split("-")[1]) + 1


def test_a_missing_override_file_leaves_no_layer(root: Path) -> None:
    tree = default_tree(root)
    for index in range(100):
        tree.for_directory(root / f"never-created-{index}")
    assert tree.tracked_directories <= 101


# --- bad files: rejected, the subtree blocked, everything else served (items 5, 8) ----------------

BAD_OVERRIDES: list[tuple[str, Callable[[Path], object]]] = [
    ("invalid-date", lambda path: path.write_text("save_top_k_checkpoints: 2\nwhen: 2024-13-45\n")),
    ("bad-int-tag", lambda path: path.write_text('save_top_k_checkpoints: !!int "two"\n')),
    ("bad-bool-tag", lambda path: path.write_text("save_top_k_checkpoints: 2\nflag: !!bool maybe\n")),
    ("bad-timestamp-tag", lambda path: path.write_text('save_top_k_best: 1\nat: !!timestamp "noon"\n')),
    ("fifo", make_fifo),
    ("link-to-a-fifo", lambda path: path.symlink_to(make_fifo(path.parent / "pipe"))),
    ("directory", lambda path: path.mkdir()),
    ("alias-bomb", lambda path: path.write_text(sequence_bomb(levels=9, fanout=9))),
]


@pytest.mark.parametrize("make", [make for _, make in BAD_OVERRIDES], ids=[name for name, _ in BAD_OVERRIDES])
def test_a_bad_override_blocks_its_subtree_only(root: Path, make: Callable[[Path], object]) -> None:
    bad, good = root / "bad", root / "good"
    (bad / "below").mkdir(parents=True)
    good.mkdir()
    make(bad / OVERRIDE_FILE_NAME)
    tree = default_tree(root)

    with capture_logs() as logs:
        blocked = tree.for_directory(bad)
        blocked_below = tree.for_directory(bad / "below")
        served = tree.for_directory(good)

    assert blocked is None
    assert blocked_below is None
    assert served is not None
    rejected = [log for log in logs if log["event"] == "policy_rejected"]
    assert len(rejected) == 1
    assert all(problem.startswith("At '") for problem in rejected[0]["problems"])


@pytest.mark.parametrize("make", [make for _, make in BAD_OVERRIDES], ids=[name for name, _ in BAD_OVERRIDES])
def test_a_bad_override_is_an_error_in_strict_mode(root: Path, make: Callable[[Path], object]) -> None:
    (root / "bad").mkdir()
    make(root / "bad" / OVERRIDE_FILE_NAME)
    tree = default_tree(root, strict=True)

    tree.for_directory(root / "bad")
    tree.for_directory(root / "bad")

    assert len(tree.errors) == 1
    assert all(problem.startswith("At '") for problem in tree.errors[0].problems)


# --- what a per-run file may name in protect_from (item 23) ---------------------------------------


def _protect_from_problems(tree: PolicyTree, directory: Path) -> list[str]:
    tree.for_directory(directory)
    return [problem for error in tree.errors for problem in error.problems]


def test_a_per_run_file_may_not_name_a_config_outside_the_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secrets" / "credentials"
    outside.parent.mkdir()
    outside.write_text("password: hunter2\n")
    run = root / "run"
    run.mkdir()
    (run / OVERRIDE_FILE_NAME).write_text(f"protect_from: [{outside}]\n")
    tree = default_tree(root, strict=True)

    problems = _protect_from_problems(tree, run)

    assert len(problems) == 1
    assert problems[0].startswith("At 'protect_from.0': names a file outside the checkpoint root")
    assert "hunter2" not in problems[0]


def test_a_link_under_the_root_to_a_config_outside_is_refused_too(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("ckpt_path: x\n")
    run = root / "run"
    run.mkdir()
    (run / "train.yaml").symlink_to(outside)
    (run / OVERRIDE_FILE_NAME).write_text("protect_from: [train.yaml]\n")
    tree = default_tree(root, strict=True)

    problems = _protect_from_problems(tree, run)

    assert len(problems) == 1
    assert problems[0].startswith("At 'protect_from.0': names a file outside the checkpoint root")


def test_configs_under_the_root_or_beside_the_policy_may_be_named(root: Path, tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    policy = configs / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 3\n")
    (configs / "train.yaml").write_text("ckpt_path: x\n")
    run = root / "run"
    run.mkdir()
    (run / "train.yaml").write_text("ckpt_path: y\n")
    (run / OVERRIDE_FILE_NAME).write_text(f"protect_from: [train.yaml, {configs / 'train.yaml'}]\n")
    tree = default_tree(root, strict=True, policy=policy)

    effective = tree.for_directory(run)

    assert tree.errors == []
    assert effective is not None
    # (and the policy itself: it may be the trainer's config, naming its own resume source)
    assert set(effective.protect_from) == {run / "train.yaml", configs / "train.yaml", policy}


def test_the_root_policy_may_name_any_config(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "far" / "away.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("ckpt_path: x\n")
    policy = tmp_path / "policies" / "policy.yaml"
    policy.parent.mkdir()
    policy.write_text(f"protect_from: [{elsewhere}]\n")
    tree = PolicyTree(root, load_policy(policy), strict=True)

    effective = tree.for_directory(root)

    assert tree.errors == []
    assert effective is not None
    assert list(effective.protect_from) == [elsewhere, policy]


def test_messages_about_a_per_run_file_quote_positions_not_contents(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    secret.write_text("[default]\naws_secret_access_key = AKIAEXAMPLESECRET42\n")
    for name, target in (("syntax", secret), ("value", None)):
        run = root / name
        run.mkdir()
        override = run / OVERRIDE_FILE_NAME
        if target is not None:
            override.symlink_to(target)
        else:
            override.write_text("save_top_k_checkpoints: AKIAEXAMPLESECRET42\n")
    tree = default_tree(root, strict=True)

    tree.for_directory(root / "syntax")
    tree.for_directory(root / "value")
    problems = [problem for error in tree.errors for problem in error.problems]

    assert len(problems) == 2
    assert all("AKIA" not in problem for problem in problems)
    assert "line 2" in problems[0]
    assert problems[1] == "At 'save_top_k_checkpoints': expected a whole number, got a string"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _no_keep_free(loaded: LoadedPolicy) -> list[str]:
    return ["At 'keep_free': not here"] if loaded.policy.keep_free is not None else []


def test_what_the_root_refuses_makes_a_per_run_file_invalid(root: Path) -> None:
    """``refuse`` (a bucket: keep_free) makes a per-run file asking for it invalid: its subtree is
    blocked in the daemon, and strict mode collects the error; a file that asks nothing refused, and
    the rest of the tree, are unaffected."""
    (root / "asks" / "below").mkdir(parents=True)
    (root / "asks" / OVERRIDE_FILE_NAME).write_text("keep_free: 10%\n")
    (root / "plain").mkdir()
    (root / "plain" / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 2\n")

    daemon = PolicyTree(root, load_policy(None), strict=False, refuse=_no_keep_free)
    with capture_logs() as logs:
        assert daemon.for_directory(root / "asks") is None
        assert daemon.for_directory(root / "asks" / "below") is None
    plain = daemon.for_directory(root / "plain")
    assert plain is not None
    assert plain.policy.save_top_k_checkpoints == 2
    assert [log["event"] for log in logs] == ["policy_rejected"]

    strict = PolicyTree(root, load_policy(None), strict=True, refuse=_no_keep_free)
    strict.for_directory(root / "asks")
    strict.for_directory(root / "plain")
    assert [error.problems for error in strict.errors] == [["At 'keep_free': not here"]]


def test_the_root_policy_alone_is_taken_as_validated(root: Path, tmp_path: Path) -> None:
    """No per-run file: the effective policy is the root's own, copied without validating it again,
    equal to validating its settings with the protection resolved (what a merge of layers does)."""
    (tmp_path / "train.yaml").write_text("ckpt_path: x\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "max_size: ' 1GiB '\nprotect: ['*-release.ckpt']\nprotect_from: [train.yaml]\n"
        "naming: {step: '{epoch}-{step}'}\ntrash: {grace: 2h}\n"
    )
    loaded = load_policy(policy)

    effective = PolicyTree(root, loaded, strict=True).for_directory(root)

    assert effective is not None
    validated = Policy.model_validate(
        {**loaded.settings, "protect": ["*-release.ckpt"], "protect_from": [str(tmp_path / "train.yaml")]}
    )
    assert effective.policy == validated
    assert effective.policy.max_size == "1GiB"
    assert effective.policy.protect_from == (str(tmp_path / "train.yaml"),)


def test_an_edit_whose_read_failed_for_now_is_read_again_later(
    root: Path, monkeypatch: pytest.MonkeyPatch, quiet_clock: QuietClock
) -> None:
    """An edit of a per-run file (an object in a bucket) whose read got a 503 was remembered as read:
    the old policy stayed in force until the file changed again. It is read again once RETRY_SECONDS
    passed, and the failure is logged once, not at every question."""
    run = root / "run"
    run.mkdir()
    override = run / OVERRIDE_FILE_NAME
    override.write_text("save_top_k_checkpoints: 2\n")
    files = FlakyConfigFiles(failures=0)
    tree = PolicyTree(root, load_policy(None), strict=False, files=files)
    assert _top_k(tree, run) == 2
    override.write_text("save_top_k_checkpoints: 9\n")  # an edit raising retention
    assert _top_k(tree, run) == 2  # not read yet: just changed
    quiet_clock.pass_quiet_time()
    files.failures = files.reads + 2
    clock = [1000.0]
    monkeypatch.setattr("ckpt_watcher.overrides.time.monotonic", lambda: clock[0])

    with capture_logs() as logs:
        answers = [_top_k(tree, run)]
        clock[0] += 1.0
        answers.append(_top_k(tree, run))  # not yet due: no read
        clock[0] += RETRY_SECONDS
        answers.append(_top_k(tree, run))  # due: read, fails again (the same problem: not logged)
        clock[0] += RETRY_SECONDS
        answers.append(_top_k(tree, run))  # due: read, works

    assert answers == [2, 2, 2, 9]
    assert [log["event"] for log in logs if log["event"] == "policy_rejected"] == ["policy_rejected"]


def _top_k(tree: PolicyTree, directory: Path) -> int:
    effective = tree.for_directory(directory)
    assert effective is not None
    return effective.policy.save_top_k_checkpoints


def test_an_edit_that_is_still_invalid_the_same_way_is_logged_again(root: Path) -> None:
    """Each edit gets its record (and its count in the reload metrics), even with the same problems:
    only a retry of a read that failed for now is not logged again."""
    run = root / "run"
    run.mkdir()
    override = run / OVERRIDE_FILE_NAME
    tree = default_tree(root)

    with capture_logs() as logs:
        for edit in range(2):
            override.write_text(f"save_top_k_checkpoints: lots\n# edit {edit}\n")
            os.utime(override, ns=(edit * 10**9, edit * 10**9))  # another identity, whatever the clock
            assert tree.for_directory(run) is None

    assert [log["event"] for log in logs if log["event"] == "policy_rejected"] == ["policy_rejected"] * 2


def test_a_per_run_file_being_rewritten_keeps_its_last_contents_until_quiet(
    root: Path, quiet_clock: QuietClock
) -> None:
    """A per-run file re-saved in place is empty, then partial, for a moment: read then, its keys fell
    back to the root policy's (keeping less). The daemon keeps its last good contents until the edit
    has been seen unchanged for the quiet time (its mtime does not count: a writer whose clock is
    behind dates it long past) and asks for the directory again then; a one-shot prune reads it as
    it is."""
    run = root / "run"
    run.mkdir()
    override = run / OVERRIDE_FILE_NAME
    override.write_text("save_top_k_best: 2\nsave_top_k_checkpoints: 50\n")
    tree = default_tree(root)
    strict = default_tree(root, strict=True)
    assert (_top_k(tree, run), _top_k(strict, run)) == (50, 50)

    write_backdated(override, "save_top_k_best: 2\n")  # half-way (the count key not written yet)
    while_written = (_top_k(tree, run), _top_k(strict, run))
    due = tree.settling.take()
    override.write_text("save_top_k_checkpoints: 40\n")  # written whole
    at_the_first_look = _top_k(tree, run)
    due_again = tree.settling.take()
    quiet_clock.pass_quiet_time()

    assert while_written == (50, 5)
    assert list(due) == list(due_again) == [run]
    assert at_the_first_look == 50
    assert _top_k(tree, run) == 40
    assert tree.settling.take() == {}


def test_a_per_run_file_missing_for_a_moment_keeps_its_last_contents_until_gone_for_the_quiet_time(
    root: Path, quiet_clock: QuietClock
) -> None:
    """``rm && cp`` (or a git checkout) replaces a per-run file: it is missing for a moment, and read
    then, the directory fell back to the root policy at once (keeping less). Its last contents stay
    until it has been missing for the quiet time, and the directory is due again then (no event may
    come); a file never valid keeps blocking meanwhile. A one-shot prune reads the tree as it is."""
    run, bad = root / "run", root / "bad"
    run.mkdir()
    bad.mkdir()
    override = write_backdated(run / OVERRIDE_FILE_NAME, "save_top_k_checkpoints: 50\n")
    invalid = write_backdated(bad / OVERRIDE_FILE_NAME, "save_top_k_checkpoints: lots\n")
    tree = default_tree(root)
    strict = default_tree(root, strict=True)
    assert (_top_k(tree, run), tree.for_directory(bad), _top_k(strict, run)) == (50, None, 50)

    override.unlink()
    invalid.unlink()
    read_as_it_is = _top_k(strict, run)
    with capture_logs() as logs:
        while_missing = (_top_k(tree, run), tree.for_directory(bad))
        due = tree.settling.take()
        quiet_clock.now += CONFIG_QUIET_SECONDS / 2
        override.write_text("save_top_k_checkpoints: 50\n")  # back, just written: read once quiet
        half_way = (_top_k(tree, run), tree.for_directory(bad))
        quiet_clock.now += CONFIG_QUIET_SECONDS
        back = _top_k(tree, run)
        gone = tree.for_directory(bad)
    assert (while_missing, read_as_it_is) == ((50, None), 5)
    assert set(due) == {run, bad}
    assert half_way == (50, None)
    assert back == 50
    assert gone is not None
    assert gone.policy.save_top_k_checkpoints == 5
    assert [log["event"] for log in logs] == ["policy_unchanged"]

    override.unlink()  # gone for good: the root policy, once it has been missing for the quiet time
    answers = [_top_k(tree, run)]
    quiet_clock.now += CONFIG_QUIET_SECONDS
    with capture_logs() as logs:
        answers.append(_top_k(tree, run))
    assert answers == [50, 5]
    assert [log["event"] for log in logs] == ["policy_override_removed"]


def test_a_policy_file_being_rewritten_is_reloaded_once_quiet(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    """Reloaded once seen unchanged for the quiet time, whatever its mtime says: a writer whose clock
    is behind (NFS) dates the truncated file long past, and its defaults keep less."""
    path = tmp_path / "policy.yaml"
    path.write_text("save_top_k_best: 10\n")
    policy = PolicyFile(path, load_policy(path))

    write_backdated(path, "")  # truncated by its writer
    changed_while_written = [policy.changed_on_disk()]
    quiet_clock.now += CONFIG_QUIET_SECONDS / 2
    changed_while_written.append(policy.changed_on_disk())
    path.write_text("save_top_k_best: 10\nsave_top_k_checkpoints: 7\n")
    changed_while_written.append(policy.changed_on_disk())
    quiet_clock.pass_quiet_time()

    assert changed_while_written == [False, False, False]
    assert policy.changed_on_disk()
    assert policy.reload()
    assert policy.loaded.policy.save_top_k_checkpoints == 7


def test_a_policy_file_missing_for_a_moment_long_ago_waits_again_when_missing_again(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    """A review: moved aside and back within its quiet time, the file's time missing was remembered;
    a save that moves it aside again, much later, was then said missing at its first look."""
    path = tmp_path / "policy.yaml"
    path.write_text("save_top_k_best: 10\n")
    policy = PolicyFile(path, load_policy(path))
    path.rename(tmp_path / "policy.yaml~")
    assert not policy.changed_on_disk()  # (missing: its wait starts)
    (tmp_path / "policy.yaml~").rename(path)
    assert not policy.changed_on_disk()  # (back as it was read)
    quiet_clock.now += 600

    path.rename(tmp_path / "policy.yaml~")

    assert not policy.changed_on_disk(), "missing a moment only: it waits its quiet time again"
    quiet_clock.pass_quiet_time()
    assert policy.changed_on_disk()


def test_a_new_per_run_file_is_read_only_once_quiet_and_blocks_below_meanwhile(
    root: Path, quiet_clock: QuietClock
) -> None:
    """A review: a per-run file made while the daemon ran was read at its first look, half-written
    ("save_top_k_checkpoints: 1" of a "10"), and its run was pruned to 1. A file that appears where a
    look found none is now read once it has been left alone for the quiet time, as an edit is, and
    until then nothing is planned in its directory or below (not the policy above either: it may keep
    fewer). A file there at the first look (the daemon's start) is read at once, and a one-shot prune
    reads every file as it is."""
    run = root / "run"
    (run / "sub").mkdir(parents=True)
    there_at_start = root / "other"
    there_at_start.mkdir()
    (there_at_start / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 7\n")
    tree = default_tree(root)
    at_start = tree.for_directory(there_at_start)
    assert at_start is not None
    assert at_start.policy.save_top_k_checkpoints == 7
    assert tree.for_directory(run) is not None  # (looked at: no file)

    (run / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 1")  # (its writer not done)
    assert tree.for_directory(run) is None
    assert tree.for_directory(run / "sub") is None
    assert tree.why_blocked(run / "sub").startswith(f"a new {OVERRIDE_FILE_NAME} in {run} is read once")
    quiet_clock.pass_quiet_time(1.0)
    (run / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 10\n")
    assert tree.for_directory(run) is None  # (changed: its quiet time starts again)
    quiet_clock.pass_quiet_time()
    assert tree.for_directory(run) is not None  # (a scan asks about a directory before those below)
    read = tree.for_directory(run / "sub")
    assert read is not None
    assert read.policy.save_top_k_checkpoints == 10
    assert tree.settling.take()  # (the daemon was told when to look at it again)

    prune_tree = default_tree(root, strict=True)
    assert prune_tree.for_directory(run) is not None
    (root / "late").mkdir()
    assert prune_tree.for_directory(root / "late") is not None
    (root / "late" / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 2\n")
    late = prune_tree.for_directory(root / "late")
    assert late is not None
    assert late.policy.save_top_k_checkpoints == 2


def test_a_directory_removed_while_its_new_file_waits_is_forgotten(
    root: Path, quiet_clock: QuietClock
) -> None:
    """The directories whose new per-run file waits were kept by name until it was read; one removed
    meanwhile was never asked about again, so it stayed for good (and in ``why_blocked``)."""
    run = root / "run"
    run.mkdir()
    tree = default_tree(root)
    assert tree.for_directory(run) is not None
    (run / OVERRIDE_FILE_NAME).write_text("save_top_k_checkpoints: 1\n")
    assert tree.for_directory(run) is None
    assert tree.new_files.why_blocked(run) is not None
    shutil.rmtree(run)

    tree.retain([root])

    assert tree.new_files.why_blocked(run) is None
