"""Every problem of a config file in one message: the checks made of a valid policy only (its
protect_from configs can be read, a per-run file names configs under the root, a bucket can give
what it asks) are made of a file refused for a type error too, so nothing waits for a second run."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from ckpt_watcher.overrides import OVERRIDE_FILE_NAME, PolicyTree, root_configs
from ckpt_watcher.policy import LoadedPolicy, PolicyError, load_checked_policy, load_policy
from ckpt_watcher.policy_file import PolicyFile
from ckpt_watcher.protection import ProtectionRegistry, UnreadableConfigsError, unreadable_configs

pytestmark = pytest.mark.timeout(60)

TYPE_ERROR = "At 'save_top_k_best': expected a whole number, got 'many' (a string)"
TYPE_ERROR_UNQUOTED = "At 'save_top_k_best': expected a whole number, got a string"
OUTSIDE = "At 'protect_from.0': names a file outside the checkpoint root"


@pytest.fixture(autouse=True)
def _reset_logging() -> None:
    structlog.reset_defaults()


def _no_keep_free(loaded: LoadedPolicy) -> list[str]:
    return ["At 'keep_free': not here"] if loaded.policy.keep_free is not None else []


def _configs_of(loaded: LoadedPolicy) -> list[str]:
    return unreadable_configs(root_configs(loaded))


# (id, policy text, expected problems): the root policy as prune loads it (cli._checks_made_later).
ROOT_POLICIES = [
    (
        "type-error-and-missing-config",
        "save_top_k_best: many\nprotect_from: [missing.yaml]\n",
        [TYPE_ERROR, "At 'protect_from': missing.yaml: no such file"],
    ),
    (
        "type-error-and-unparsable-config",
        "save_top_k_best: many\nprotect_from: [broken.yaml]\n",
        [TYPE_ERROR, "At 'protect_from': broken.yaml: YAML syntax error at line 2"],
    ),
    (
        "type-error-and-two-bad-configs",
        "save_top_k_best: many\nprotect_from: [missing.yaml, broken.yaml]\n",
        [
            TYPE_ERROR,
            "At 'protect_from': missing.yaml: no such file",
            "At 'protect_from': broken.yaml: YAML syntax error",
        ],
    ),
    (
        "type-error-and-bucket-refusal",
        "save_top_k_best: many\nkeep_free: 10%\n",
        [TYPE_ERROR, "At 'keep_free': not here"],
    ),
    (
        "refusal-and-missing-config-of-a-valid-file",  # when_invalid is for refused files only
        "keep_free: 10%\nprotect_from: [missing.yaml]\n",
        ["At 'keep_free': not here"],
    ),
    (
        "a-bad-protect_from-itself-reads-no-config",
        "save_top_k_best: many\nprotect_from: missing.yaml\n",
        [TYPE_ERROR, "At 'protect_from': expected a list of training config files"],
    ),
    ("a-readable-config-is-no-problem", "save_top_k_best: many\nprotect_from: [good.yaml]\n", [TYPE_ERROR]),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in ROOT_POLICIES], ids=[i for i, *_ in ROOT_POLICIES]
)
def test_a_refused_policy_lists_what_later_checks_would_find(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    (tmp_path / "broken.yaml").write_text("ckpt_path: [\n")
    (tmp_path / "good.yaml").write_text("ckpt_path: x\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)

    with pytest.raises(PolicyError) as caught:
        load_checked_policy(policy, [_no_keep_free], when_invalid=[_configs_of])

    problems = caught.value.problems
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problems
    assert caught.value.render().count("invalid policy") == 1


def test_the_keys_that_validated_are_the_partial_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_best: many\nsave_top_k_checkpoints: 7\nprotect_from: [a.yaml]\n")

    with pytest.raises(PolicyError) as caught:
        load_policy(policy)

    partial = caught.value.partial
    assert partial is not None
    assert partial.policy.save_top_k_checkpoints == 7
    assert partial.policy.protect_from == ("a.yaml",)
    assert "save_top_k_best" not in partial.settings


# (id, per-run file text, expected problems) for a strict tree (prune) that refuses keep_free.
PER_RUN_FILES = [
    (
        "type-error-and-missing-config-under-the-root",
        "save_top_k_best: many\nprotect_from: [train.yaml]\n",
        [TYPE_ERROR_UNQUOTED, "At 'protect_from': run/train.yaml: no such file"],
    ),
    (
        "type-error-and-unparsable-config-under-the-root",
        "save_top_k_best: many\nprotect_from: [broken.yaml]\n",
        [TYPE_ERROR_UNQUOTED, "At 'protect_from': run/broken.yaml: YAML syntax error"],
    ),
    (
        "type-error-and-config-outside-the-root",  # refused, and never read
        "save_top_k_best: many\nprotect_from: [{outside}]\n",
        [TYPE_ERROR_UNQUOTED, OUTSIDE],
    ),
    (
        "type-error-and-refused-key",
        "save_top_k_best: many\nkeep_free: 10%\n",
        [TYPE_ERROR_UNQUOTED, "At 'keep_free': not here"],
    ),
    (
        "config-outside-the-root-and-refused-key",
        "keep_free: 10%\nprotect_from: [{outside}]\n",
        [OUTSIDE, "At 'keep_free': not here"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in PER_RUN_FILES], ids=[i for i, *_ in PER_RUN_FILES]
)
def test_a_refused_per_run_file_lists_every_problem(tmp_path: Path, text: str, expected: list[str]) -> None:
    outside = tmp_path / "outside.yaml"
    outside.write_text("ckpt_path: [\n")
    run = tmp_path / "ckpt" / "run"
    run.mkdir(parents=True)
    (run / "broken.yaml").write_text("ckpt_path: [\n")
    (run / OVERRIDE_FILE_NAME).write_text(text.format(outside=outside))
    tree = PolicyTree(tmp_path / "ckpt", load_policy(None), strict=True, refuse=_no_keep_free)

    assert tree.for_directory(run) is None

    problems = [problem for error in tree.errors for problem in error.problems]
    assert len(tree.errors) == 1
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problems


def test_the_daemon_logs_every_problem_of_a_refused_per_run_file(tmp_path: Path) -> None:
    """Live: the file is refused as before (its subtree blocked), one policy_rejected listing all."""
    run = tmp_path / "ckpt" / "run"
    run.mkdir(parents=True)
    (run / OVERRIDE_FILE_NAME).write_text(f"save_top_k_best: many\nprotect_from: [{tmp_path / 'x.yaml'}]\n")
    tree = PolicyTree(tmp_path / "ckpt", load_policy(None), strict=False)

    with capture_logs() as logs:
        assert tree.for_directory(run) is None

    rejected = [log for log in logs if log["event"] == "policy_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["problems"][0] == TYPE_ERROR_UNQUOTED
    assert rejected[0]["problems"][1].startswith(OUTSIDE)
    assert len(rejected[0]["problems"]) == 2


def test_a_reloaded_policy_refused_for_two_reasons_logs_both(tmp_path: Path) -> None:
    """The daemon's main policy: a bad edit keeps the previous policy, and its record lists all."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_best: 2\n")
    follower = PolicyFile(policy, load_policy(policy), refuse=_no_keep_free)
    policy.write_text("save_top_k_best: many\nkeep_free: 10%\n")

    with capture_logs() as logs:
        assert not follower.reload()

    assert follower.loaded.policy.save_top_k_best == 2
    rejected = [log for log in logs if log["event"] == "policy_rejected"]
    assert rejected[0]["problems"] == [TYPE_ERROR, "At 'keep_free': not here"]


def test_a_strict_refresh_reports_every_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text("ckpt_path: a.ckpt\n")
    (tmp_path / "broken.yaml").write_text("[\n")
    configs = {tmp_path / name: name for name in ("missing.yaml", "good.yaml", "broken.yaml")}

    with pytest.raises(UnreadableConfigsError) as caught:
        ProtectionRegistry(tmp_path).refresh(configs, strict=True)

    assert [error.config for error in caught.value.errors] == ["missing.yaml", "broken.yaml"]
    assert caught.value.errors[0].missing
