"""Resume protection (protect_from, --protect, .keep pins) and per-run policies, in prune and in watch."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import LogCapture

from ckpt_watcher.config_files import CONFIG_QUIET_SECONDS
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import load_policy
from ckpt_watcher.protection import ProtectionRegistry, read_config_protection
from ckpt_watcher.reconcile import Reconciler, Trigger
from tests.support.cli import WITHOUT_READ_OVERRIDE, assert_clean_exit, cli_command, prune_entries, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import step_name, write_backdated, write_checkpoint
from tests.support.hostile_trees import bind, mount_namespace, mount_namespace_reason
from tests.support.quiet_clock import QuietClock

pytestmark = pytest.mark.timeout(120)

RESUME = step_name(3, 1500)
RUN = Path("checkpoint/Custom_LLaDA/stage1_llm_pretraining")


def _layout(tmp_path: Path, config_text: str, top_k: int = 2) -> tuple[Path, Path, Path]:
    """A project as users lay it out: configs/ beside checkpoint/, the policy in configs/trainer/."""
    run = tmp_path / RUN
    write_checkpoint(run / RESUME)
    config = tmp_path / "configs" / "train_llada.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(config_text)
    policy = tmp_path / "configs" / "trainer" / "llada8b.yaml"
    policy.parent.mkdir(parents=True)
    policy.write_text(
        f"model: llada-8b\nsave_on_n_steps: 500\nsave_top_k_checkpoints: {top_k}\n"
        "protect_from:\n  - ../train_llada.yaml\n"
    )
    return run, config, policy


def _names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir() if not path.name.startswith(".ckpt-watcher")}


@pytest.mark.parametrize("relative_to", ["working directory", "config directory", "absolute"])
def test_resume_source_survives_twenty_newer_checkpoints_in_prune(tmp_path: Path, relative_to: str) -> None:
    value = {
        "working directory": f"{RUN}/{RESUME}",
        "config directory": f"../{RUN}/{RESUME}",
        "absolute": str(tmp_path / RUN / RESUME),
    }[relative_to]
    run, config, policy = _layout(tmp_path, f'ckpt_path: "{value}"\npretrained_ckpt_path: null\n')
    for step in range(2000, 12000, 500):
        write_checkpoint(run / step_name(4, step))

    dry = run_cli("prune", "checkpoint", "--policy", str(policy), "--dry-run", "--json", cwd=tmp_path)

    assert dry.returncode == 0, dry.stderr
    entry = prune_entries(dry)[RESUME]
    assert entry["action"] == "keep"
    assert entry["reasons"] == ["resume source in ../train_llada.yaml (ckpt_path)"]

    assert run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path).returncode == 0
    assert _names(run) == {RESUME, step_name(4, 11000), step_name(4, 11500)}

    config.write_text("ckpt_path: null\n")  # the run no longer resumes from it: it may go
    assert run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path).returncode == 0
    assert _names(run) == {step_name(4, 11000), step_name(4, 11500)}


def test_dry_run_table_shows_the_protecting_reason(tmp_path: Path) -> None:
    run, _, policy = _layout(tmp_path, f'ckpt_path: "{RUN}/{RESUME}"\n')
    for step in range(2000, 4000, 500):
        write_checkpoint(run / step_name(4, step))

    dry = run_cli("prune", "checkpoint", "--policy", str(policy), "--dry-run", cwd=tmp_path)

    line = next(line for line in dry.stdout.splitlines() if RESUME in line)
    assert line.split()[0] == "keep"
    assert line.endswith("resume source in ../train_llada.yaml (ckpt_path)")


def test_nested_and_dotted_keys_are_read(tmp_path: Path) -> None:
    other = step_name(3, 1000)
    run, _, policy = _layout(
        tmp_path,
        f'trainer:\n  ckpt_path: "{RUN}/{RESUME}"\n"model.pretrained_ckpt_path": "{RUN}/{other}"\n',
    )
    write_checkpoint(run / other)
    for step in range(2000, 5000, 500):
        write_checkpoint(run / step_name(4, step))

    entries = prune_entries(
        run_cli("prune", "checkpoint", "--policy", str(policy), "--dry-run", "--json", cwd=tmp_path)
    )

    assert entries[RESUME]["reasons"] == ["resume source in ../train_llada.yaml (trainer.ckpt_path)"]
    assert entries[other]["reasons"] == [
        "fine-tuning source in ../train_llada.yaml (model.pretrained_ckpt_path)"
    ]


def test_both_keys_set_warns_quoting_the_rule_and_protects_both(tmp_path: Path) -> None:
    other = step_name(3, 1000)
    run, _, policy = _layout(
        tmp_path, f'ckpt_path: "{RUN}/{RESUME}"\npretrained_ckpt_path: "{RUN}/{other}"\n'
    )
    write_checkpoint(run / other)
    for step in range(2000, 5000, 500):
        write_checkpoint(run / step_name(4, step))

    completed = run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path)

    assert completed.returncode == 0
    assert {RESUME, other} <= _names(run)
    warnings = [json.loads(line) for line in completed.stderr.splitlines() if "protection_warning" in line]
    assert any("only one may be used" in warning["message"] for warning in warnings)


def test_missing_resume_file_is_a_warning_not_an_error(tmp_path: Path) -> None:
    _, _, policy = _layout(tmp_path, f'ckpt_path: "{RUN}/epoch=09-step=009999-train.ckpt"\n')

    completed = run_cli("prune", "checkpoint", "--policy", str(policy), "--dry-run", cwd=tmp_path)

    assert completed.returncode == 0
    warnings = [json.loads(line) for line in completed.stderr.splitlines() if "protection_warning" in line]
    assert len(warnings) == 1
    assert "does not exist" in warnings[0]["message"]


def test_unreadable_protect_from_config_stops_prune(tmp_path: Path) -> None:
    run, config, policy = _layout(tmp_path, "ckpt_path: [\n")
    for step in range(2000, 5000, 500):
        write_checkpoint(run / step_name(4, step))
    before = _names(run)

    completed = run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path)

    assert completed.returncode == 2
    assert "At 'protect_from'" in completed.stderr
    assert "nothing was deleted" in completed.stderr
    assert _names(run) == before
    config.unlink()
    assert run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path).returncode == 2


def test_a_type_error_and_a_missing_protect_from_config_are_one_message(tmp_path: Path) -> None:
    """Both problems at once: not the type error first and the missing config only on the next run."""
    run, config, policy = _layout(tmp_path, "ckpt_path: null\n")
    for step in range(2000, 5000, 500):
        write_checkpoint(run / step_name(4, step))
    before = _names(run)
    config.unlink()
    policy.write_text(policy.read_text().replace("save_top_k_checkpoints: 2", "save_top_k_checkpoints: many"))

    completed = run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path)

    assert_clean_exit(completed, allowed=(2,))
    messages = [line for line in completed.stderr.splitlines() if line.startswith("ckpt-watcher: ")]
    assert messages == [f"ckpt-watcher: invalid policy {policy}:"], completed.stderr
    assert "  At 'save_top_k_checkpoints': expected a whole number, got 'many' (a string)" in completed.stderr
    assert "  At 'protect_from': ../train_llada.yaml: no such file" in completed.stderr
    assert _names(run) == before


def test_keep_pin_and_command_line_protect(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in range(500, 5500, 500):
        write_checkpoint(run / step_name(0, step))
    (run / (step_name(0, 500) + ".keep")).touch()

    dry = run_cli(
        "prune", "run", "--protect", f"run/{step_name(0, 1000)}", "--dry-run", "--json", cwd=tmp_path
    )

    entries = prune_entries(dry)
    assert entries[step_name(0, 500)]["reasons"] == [f"pinned by {step_name(0, 500)}.keep"]
    assert entries[step_name(0, 1000)]["reasons"] == [f"protected by --protect run/{step_name(0, 1000)}"]
    assert entries[step_name(0, 1500)]["action"] == "delete"

    (run / (step_name(0, 500) + ".keep")).unlink()
    assert run_cli("prune", "run", cwd=tmp_path).returncode == 0
    assert step_name(0, 500) not in _names(run)


@pytest.mark.parametrize("command", ["prune", "watch"])
def test_a_url_to_protect_under_a_local_root_is_refused(tmp_path: Path, command: str) -> None:
    """A URL names an object, never a file under a local root (a bucket mounted there, say), so
    taking it would protect nothing and delete the checkpoint meant: exit 2, one line, nothing gone."""
    run = tmp_path / "run"
    for step in range(500, 3500, 500):
        write_checkpoint(run / step_name(0, step))
    pin = f"s3://bucket/run/{step_name(0, 500)}"
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")
    before = _names(run)

    result = run_cli(command, "run", "--policy", str(policy), "--protect", pin, cwd=tmp_path, timeout=60)

    assert_clean_exit(result, (2,), explained=True)
    assert result.stderr.strip() == (
        f"ckpt-watcher: --protect {pin}: run is a local directory; give the checkpoint's path under it, "
        "not a URL, which names no file there"
    )
    assert _names(run) == before


def test_protect_through_a_symlinked_path_protects_the_real_file(tmp_path: Path) -> None:
    run = tmp_path / "data" / "run"
    for step in range(500, 5500, 500):
        write_checkpoint(run / step_name(0, step))
    os.symlink(tmp_path / "data", tmp_path / "mnt")

    completed = run_cli("prune", "data", "--protect", f"mnt/run/{step_name(0, 500)}", cwd=tmp_path)

    assert completed.returncode == 0
    assert step_name(0, 500) in _names(run)


def test_two_runs_under_one_root_have_their_own_policies(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    stage1 = root / "Custom_LLaDA" / "stage1_llm_pretraining"
    stage2 = root / "Custom_LLaDA" / "stage2_finetune"
    for run in (stage1, stage2):
        for step in range(500, 5500, 500):
            write_checkpoint(run / step_name(0, step))
    (root / "Custom_LLaDA" / ".ckpt-watcher.yaml").write_text(
        "save_top_k_checkpoints: 4\nsave_top_k_best: 1\n"
    )
    (stage2 / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 1\n")

    dry = run_cli("prune", "checkpoint", "--dry-run", "--json", cwd=tmp_path)

    document = json.loads(dry.stdout)
    sources = {Path(group["directory"]).name: group["policy_sources"] for group in document["groups"]}
    assert sources["stage1_llm_pretraining"] == ["embedded default", "Custom_LLaDA/.ckpt-watcher.yaml"]
    assert sources["stage2_finetune"] == [
        "embedded default",
        "Custom_LLaDA/.ckpt-watcher.yaml",
        "Custom_LLaDA/stage2_finetune/.ckpt-watcher.yaml",
    ]
    table = run_cli("prune", "checkpoint", "--dry-run", cwd=tmp_path).stdout
    assert "stage2_finetune  (policy: embedded default + Custom_LLaDA/.ckpt-watcher.yaml + " in table

    assert run_cli("prune", "checkpoint", cwd=tmp_path).returncode == 0
    assert len([name for name in _names(stage1) if name.endswith(".ckpt")]) == 4
    assert [name for name in _names(stage2) if name.endswith(".ckpt")] == [step_name(0, 5000)]


def test_invalid_per_run_policy_stops_prune(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    for step in range(500, 5500, 500):
        write_checkpoint(root / "run" / step_name(0, step))
    (root / "run" / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: many\n")

    completed = run_cli("prune", "checkpoint", cwd=tmp_path)

    assert completed.returncode == 2
    # A per-run file was not named on the command line: its values are described, not quoted.
    assert "At 'save_top_k_checkpoints': expected a whole number, got a string" in completed.stderr
    assert "many" not in completed.stderr
    assert len(_names(root / "run")) == 10


def test_override_keys_fall_through_and_protection_adds_up(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    run = root / "run"
    for step in range(500, 5500, 500):
        write_checkpoint(run / step_name(0, step))
    (root / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 3\nprotect: ['*step=000500*']\n")
    (run / ".ckpt-watcher.yaml").write_text("best_mode: max\nprotect: ['*step=001000*']\n")

    entries = prune_entries(run_cli("prune", "checkpoint", "--dry-run", "--json", cwd=tmp_path))

    kept = {name for name, entry in entries.items() if entry["action"] == "keep"}
    assert kept == {step_name(0, step) for step in (500, 1000, 4000, 4500, 5000)}


def test_read_config_protection_resolves_both_bases(tmp_path: Path) -> None:
    config = tmp_path / "configs" / "train.yaml"
    config.parent.mkdir()
    config.write_text('ckpt_path: "ckpt/last.ckpt"\n')
    working = tmp_path / "work"

    protection = read_config_protection(config, "configs/train.yaml", working)

    (reference,) = protection.references
    assert tmp_path / "configs" / "ckpt" / "last.ckpt" in reference.candidates
    assert working / "ckpt" / "last.ckpt" in reference.candidates
    assert protection.warnings == (
        "configs/train.yaml: 'ckpt_path' names 'ckpt/last.ckpt', which does not exist (yet); a checkpoint "
        "named 'last.ckpt' anywhere under the root is kept in doubt",
    )


def test_a_policy_that_is_the_trainers_config_protects_its_own_resume_source(tmp_path: Path) -> None:
    """The policy may be the trainer's own YAML (README: it "holds many other keys too"); a ckpt_path
    in it named the checkpoint the run resumes from, and prune deleted it without a word."""
    run = tmp_path / RUN
    write_checkpoint(run / RESUME)
    for step in range(2000, 4000, 500):
        write_checkpoint(run / step_name(4, step))
    policy = tmp_path / "configs" / "train_llada.yaml"
    policy.parent.mkdir(parents=True)
    policy.write_text(
        f"model: llada-8b\nsave_top_k_checkpoints: 1\ntrainer:\n  ckpt_path: ../{RUN}/{RESUME}\n"
    )

    dry = run_cli("prune", "checkpoint", "--policy", str(policy), "--dry-run", "--json", cwd=tmp_path)
    completed = run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path)

    assert prune_entries(dry, exit_code=0)[RESUME]["reasons"] == [
        f"resume source in {policy} (trainer.ckpt_path)"
    ]
    assert completed.returncode == 0, completed.stderr
    assert _names(run) == {RESUME, step_name(4, 3500)}
    assert json.loads(dry.stdout)["policy"]["protect_from"] == []  # not one of the policy's settings


@pytest.mark.parametrize(
    "value",
    [
        f"${{paths.ckpt_dir}}/{RESUME}",  # Hydra / OmegaConf: resolved by the trainer, not here
        f"${{oc.env:CKPT_ROOT}}/stage1_llm_pretraining/{RESUME}",
        f"{RUN}/{RESUME}",  # relative to the trainer's working directory, not the watcher's
    ],
)
def test_a_resume_value_the_watcher_cannot_resolve_keeps_its_namesake_in_doubt(
    tmp_path: Path, value: str
) -> None:
    """The value names a checkpoint the watcher cannot find as written: it was deleted with only a
    warning. Now the checkpoint of that name, in any group, is kept in doubt."""
    run, _, policy = _layout(tmp_path, f'paths:\n  ckpt_dir: "{RUN}"\nckpt_path: "{value}"\n')
    other_run = tmp_path / "checkpoint" / "other"
    write_checkpoint(other_run / RESUME)  # the same name in another run: kept too (in doubt)
    for step in range(2000, 4000, 500):
        write_checkpoint(run / step_name(4, step))
        write_checkpoint(other_run / step_name(4, step))
    elsewhere = tmp_path / "elsewhere"  # the watcher's working directory is not the trainer's
    elsewhere.mkdir()

    root = str(tmp_path / "checkpoint")
    dry = run_cli("prune", root, "--policy", str(policy), "--dry-run", "--json", cwd=elsewhere)
    completed = run_cli("prune", root, "--policy", str(policy), cwd=elsewhere)

    assert prune_entries(dry, exit_code=0)[RESUME]["reasons"] == [
        "named like the resume source in ../train_llada.yaml (ckpt_path), which is not found as written "
        "(kept in doubt)"
    ]
    assert completed.returncode == 0, completed.stderr
    assert _names(run) == {RESUME, step_name(4, 3000), step_name(4, 3500)}
    assert _names(other_run) == {RESUME, step_name(4, 3000), step_name(4, 3500)}
    warnings = [json.loads(line) for line in completed.stderr.splitlines() if "protection_warning" in line]
    assert len(warnings) == 1
    assert warnings[0]["message"].endswith(
        f"a checkpoint named {RESUME!r} anywhere under the root is kept in doubt"
    )


class TestWatch:
    """The same protections, live."""

    def test_resume_source_survives_while_newer_arrive_and_goes_once_unnamed(self, tmp_path: Path) -> None:
        run, config, policy = _layout(tmp_path, f'ckpt_path: "{RUN}/{RESUME}"\n')
        arguments = ["watch", "checkpoint", "--policy", str(policy), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
            daemon.wait_ready()
            for step in range(2000, 12000, 500):
                write_checkpoint(run / step_name(4, step))
            wait_until(lambda: _names(run) == {RESUME, step_name(4, 11000), step_name(4, 11500)})

            config.write_text("ckpt_path: null\n")

            daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(RESUME))
            wait_until(lambda: _names(run) == {step_name(4, 11000), step_name(4, 11500)})

    def test_a_config_being_rewritten_never_unpins_its_resume_source(self, tmp_path: Path) -> None:
        """The training config is re-saved in place while the daemon runs: truncated, then written
        bit by bit (each write moves its mtime). Read half-way, it named no resume source, and the
        next pass deleted it. Until the file is quiet, its pins stay."""
        run, config, policy = _layout(tmp_path, "")
        resume_line = f'ckpt_path: "{RUN}/{RESUME}"\n'
        write_backdated(config, "model: llada-8b\n" + resume_line)
        arguments = ["watch", "checkpoint", "--policy", str(policy), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
            daemon.wait_ready()
            writing = threading.Event()
            writing.set()

            def still_writing() -> None:  # the writer's next bytes keep coming: its mtime moves on
                while writing.is_set():
                    os.utime(config)
                    time.sleep(0.2)

            with config.open("w") as writer:
                writer.write("model: llada-8b\n")  # half-way: the resume key not written yet
                writer.flush()
                toucher = threading.Thread(target=still_writing)
                toucher.start()
                try:
                    for step in range(2000, 4000, 500):
                        write_checkpoint(run / step_name(4, step))
                    wait_until(lambda: _names(run) == {RESUME, step_name(4, 3000), step_name(4, 3500)})
                    writer.write(resume_line)
                finally:
                    writing.clear()
                    toucher.join()
            for step in range(4000, 5000, 500):
                write_checkpoint(run / step_name(4, step))
            wait_until(lambda: _names(run) == {RESUME, step_name(4, 4000), step_name(4, 4500)})
            assert daemon.stop() == 0
        deleted = {Path(record["path"]).name for record in daemon.events("checkpoint_deleted")}
        assert RESUME not in deleted

    def test_invalid_protect_from_edit_keeps_the_previous_protection(self, tmp_path: Path) -> None:
        run, config, policy = _layout(tmp_path, f'ckpt_path: "{RUN}/{RESUME}"\n')
        arguments = ["watch", "checkpoint", "--policy", str(policy), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
            daemon.wait_ready()
            config.write_text("ckpt_path: [\n")
            daemon.wait_for("protection_rejected")
            for step in range(2000, 6000, 500):
                write_checkpoint(run / step_name(4, step))
            wait_until(lambda: _names(run) == {RESUME, step_name(4, 5000), step_name(4, 5500)})
            assert daemon.process.poll() is None

    def test_a_config_deleted_for_good_is_said_missing_once_and_its_protection_stays(
        self, tmp_path: Path
    ) -> None:
        """Said once it has been gone for its quiet time (a save that moves the old file aside is
        missing for a moment), and not again at each later read, which each quiet time makes."""
        run, config, policy = _layout(tmp_path, f'ckpt_path: "{RUN}/{RESUME}"\n')
        arguments = ["watch", "checkpoint", "--policy", str(policy), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
            daemon.wait_ready()
            config.unlink()
            (rejected,) = daemon.wait_for("protection_rejected")
            assert rejected["detail"].startswith("the previous protection set from this file stays")
            for step in range(2000, 6000, 500):
                write_checkpoint(run / step_name(4, step))
            wait_until(lambda: _names(run) == {RESUME, step_name(4, 5000), step_name(4, 5500)})
            time.sleep(3 * CONFIG_QUIET_SECONDS)  # (reads of the missing file meanwhile: one a quiet time)
            assert len(daemon.events("protection_rejected")) == 1
            assert daemon.stop() == 0

    def test_a_config_never_read_holds_deletions_until_it_is_read(self, tmp_path: Path) -> None:
        """The config exists but cannot be read from the start (here: a YAML error), so the resume
        source it names is unknown: the daemon deletes nothing in the directories its policy covers
        (deletions_held) rather than the resume source. Once the config is read, retention goes on and
        the resume source is kept."""
        run, config, policy = _layout(tmp_path, f'ckpt_path: "{RUN}/{RESUME}"\n  bad: [\n')
        for step in range(2000, 4000, 500):
            write_checkpoint(run / step_name(4, step))
        everything = _names(run)
        arguments = ["--log-level", "debug", "watch", "checkpoint", "--policy", str(policy), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
            daemon.wait_ready()
            (rejected,) = daemon.events("protection_rejected")
            assert "never read" in rejected["detail"]
            (held,) = daemon.events("deletions_held")  # one record: the root and the two below it
            assert held["groups"] == 3
            assert str(tmp_path / RUN) in held["directories"]
            assert held["configs"] == ["../train_llada.yaml"]
            write_checkpoint(run / step_name(4, 4000))  # an event pass is held too
            daemon.wait_for("pass_completed", lambda record: record["trigger"] == "event")
            assert _names(run) == everything | {step_name(4, 4000)}

            config.write_text(f'ckpt_path: "{RUN}/{RESUME}"\n')

            (released,) = daemon.wait_for("deletions_released")
            assert released["groups"] == 3
            wait_until(lambda: _names(run) == {RESUME, step_name(4, 3500), step_name(4, 4000)})
            assert daemon.stop() == 0
            deleted = [Path(record["path"]).name for record in daemon.events("checkpoint_deleted")]
        assert sorted(deleted) == sorted(everything - {RESUME, step_name(4, 3500)})
        assert len(daemon.events("deletions_held")) == 1

    def test_a_config_that_does_not_exist_holds_nothing(self, tmp_path: Path) -> None:
        """A missing config protects nothing, and is no reason to stop retention (a config the
        launcher writes later): it is logged, and the policy applies."""
        run, config, policy = _layout(tmp_path, "")
        config.unlink()
        for step in range(2000, 4000, 500):
            write_checkpoint(run / step_name(4, step))
        arguments = ["watch", "checkpoint", "--policy", str(policy), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
            daemon.wait_ready()
            (rejected,) = daemon.events("protection_rejected")
            assert rejected["detail"] == "it protects nothing until it exists"
            wait_until(lambda: _names(run) == {step_name(4, 3000), step_name(4, 3500)})
            assert daemon.stop() == 0
            assert daemon.events("deletions_held") == []

    def test_keep_pin_and_protect_flag_live(self, tmp_path: Path) -> None:
        run = tmp_path / "run"
        run.mkdir()
        arguments = ["watch", "run", "--settle", "0", "--protect", f"run/{step_name(0, 1000)}"]
        with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
            daemon.wait_ready()
            write_checkpoint(run / step_name(0, 500))
            (run / (step_name(0, 500) + ".keep")).touch()
            for step in range(1000, 6000, 500):
                write_checkpoint(run / step_name(0, step))
            expected = {step_name(0, step) for step in (500, 1000, 3500, 4000, 4500, 5000, 5500)}
            wait_until(lambda: _names(run) == expected | {step_name(0, 500) + ".keep"})

            (run / (step_name(0, 500) + ".keep")).unlink()
            daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(step_name(0, 500)))

    def test_editing_a_per_run_policy_is_applied_live(self, tmp_path: Path) -> None:
        root = tmp_path / "checkpoint"
        stage1, stage2 = root / "stage1", root / "stage2"
        for run in (stage1, stage2):
            for step in range(500, 5500, 500):
                write_checkpoint(run / step_name(0, step))
        (stage2 / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 3\n")
        with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
            daemon.wait_ready()
            wait_until(lambda: len(_names(stage1)) == 5 and len(_names(stage2)) == 3)

            (stage2 / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 1\n")
            wait_until(lambda: len(_names(stage2)) == 1, what="stage2 pruned to 1")

            (stage2 / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: -3\n")
            daemon.wait_for("policy_rejected")
            for step in range(6000, 7000, 500):
                write_checkpoint(stage2 / step_name(0, step))
            wait_until(
                lambda: _names(stage2) == {step_name(0, 6500)},
                what="the previous per-run policy still applied",
            )
            assert len(_names(stage1)) == 5

    def test_a_per_run_policy_replaced_by_unlink_and_create_stays_in_force(self, tmp_path: Path) -> None:
        """``rm && cp`` (or a git checkout) replaces the run's policy file, which keeps 10: it is missing
        for a moment, and the pass in that moment fell back to the root policy (keeps 1) and deleted
        all but the newest checkpoint. It stays in force until it has been missing for the quiet
        time, and a file gone for good then goes, though no event comes."""
        root = tmp_path / "checkpoint"
        run = root / "run"
        written = _steps(run, [100, 200, 300, 400, 500])
        override = write_backdated(run / ".ckpt-watcher.yaml", "save_top_k_checkpoints: 10\n")
        policy = tmp_path / "policy.yaml"
        policy.write_text("save_top_k_checkpoints: 1\n")
        arguments = ["watch", str(root), "--policy", str(policy), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log") as daemon:
            daemon.wait_ready()
            override.unlink()
            written.append(write_checkpoint(run / step_name(0, 600)).name)  # a save meanwhile
            daemon.wait_for(
                "pass_completed", lambda record: record["trigger"] == "event" and record["detected"]
            )
            assert daemon.events("checkpoint_deleted") == []
            override.write_text("save_top_k_checkpoints: 10\n")  # the same, written anew
            daemon.wait_for("policy_unchanged", lambda record: record["source"] == str(override))
            assert _names(run) == set(written)
            assert daemon.events("checkpoint_deleted") == []

            override.unlink()  # for good
            daemon.wait_for("policy_override_removed")
            wait_until(lambda: _names(run) == {written[-1]}, what="the root policy applied")
            assert daemon.stop() == 0

    def test_a_resume_source_named_below_a_directory_that_cannot_be_listed_stays_pinned(
        self, tmp_path: Path
    ) -> None:
        """a/run1's per-run file names its training config, which fine-tunes from run2's oldest
        checkpoint. Once ``a`` could not be listed, a full rescan forgot run1 and with it the config
        (though the daemon said the previous protection stayed in force), and run2's next save
        deleted the resume source. What the groups below it use stays until it can be listed."""
        root = tmp_path / "checkpoint"
        run1, run2 = root / "a" / "run1", root / "run2"
        written = _steps(run2, [100, 200])
        run1.mkdir(parents=True)
        write_backdated(run1 / ".ckpt-watcher.yaml", "protect_from: [train.yaml]\n")
        write_backdated(run1 / "train.yaml", f"pretrained_ckpt_path: ../../run2/{written[0]}\n")
        policy = tmp_path / "policy.yaml"
        policy.write_text("save_top_k_checkpoints: 1\n")
        arguments = ("watch", str(root), "--policy", str(policy), "--settle", "0", "--rescan", "1")
        command = [*WITHOUT_READ_OVERRIDE, *cli_command(*arguments)]
        with running_daemon([], tmp_path / "log", command=command) as daemon:
            daemon.wait_ready()
            assert _names(run2) == set(written)
            (root / "a").chmod(0)
            try:
                passes = len(daemon.events("pass_completed"))
                daemon.wait_for(
                    "pass_completed", lambda record: record["trigger"] == "rescan", count=passes + 2
                )
                _steps(run2, [300])
                wait_until(lambda: not (run2 / written[1]).exists(), what="run2 pruned")
                assert (run2 / written[0]).exists()
            finally:
                (root / "a").chmod(0o755)
            assert daemon.stop() == 0


# --- a resume source named through another path of the same file (issue 10, item 3) ---------------


def _alias_layout(tmp_path: Path, resume_path: str) -> tuple[Path, Path]:
    """A run whose oldest checkpoint is the resume source, named as ``resume_path`` by the config."""
    root = tmp_path / "checkpoint"
    run = root / "run"
    for step in range(500, 5500, 500):
        write_checkpoint(run / step_name(0, step))
    config = tmp_path / "configs" / "train.yaml"
    config.parent.mkdir()
    config.write_text(f'ckpt_path: "{resume_path}"\n')
    policy = tmp_path / "configs" / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\nprotect_from: [train.yaml]\n")
    return root, policy


def test_a_resume_source_named_through_a_hard_link_is_kept(tmp_path: Path) -> None:
    alias = tmp_path / "resume" / "from.ckpt"
    root, policy = _alias_layout(tmp_path, str(alias))
    alias.parent.mkdir()
    os.link(root / "run" / step_name(0, 500), alias)

    dry = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json", cwd=tmp_path)
    completed = run_cli("prune", str(root), "--policy", str(policy), cwd=tmp_path)

    assert dry.returncode == 0, dry.stderr
    assert prune_entries(dry)[step_name(0, 500)]["reasons"] == ["resume source in train.yaml (ckpt_path)"]
    assert completed.returncode == 0, completed.stderr
    assert _names(root / "run") == {step_name(0, step) for step in (500, 4500, 5000)}


def test_a_resume_source_named_through_a_bind_mount_of_the_root_is_kept(tmp_path: Path) -> None:
    if (reason := mount_namespace_reason()) is not None:
        pytest.skip(reason)
    mount_point = tmp_path / "mnt" / "volume"
    mount_point.mkdir(parents=True)
    root, policy = _alias_layout(tmp_path, f"{mount_point}/run/{step_name(0, 500)}")
    # The bind mount exists only in a private mount namespace that dies with the command.
    in_namespace = mount_namespace([bind(root, mount_point)])
    prune = ("prune", str(root), "--policy", str(policy))

    dry = run_cli(*prune, "--dry-run", "--json", prefix=in_namespace, cwd=tmp_path, timeout=120)
    completed = run_cli(*prune, prefix=in_namespace, cwd=tmp_path, timeout=120)

    assert list(mount_point.iterdir()) == []  # the mount did not outlive its namespace
    assert dry.returncode == 0, dry.stderr
    assert "protection_warning" not in dry.stderr  # the file exists through the mount: no warning
    assert prune_entries(dry)[step_name(0, 500)]["reasons"] == ["resume source in train.yaml (ckpt_path)"]
    assert completed.returncode == 0, completed.stderr
    assert _names(root / "run") == {step_name(0, step) for step in (500, 4500, 5000)}


# --- resume keys at any depth (item 21) ------------------------------------------------------------


def test_a_resume_key_nested_deeper_than_four_levels_protects_its_checkpoint(tmp_path: Path) -> None:
    run, _, policy = _layout(
        tmp_path,
        f'a:\n  b:\n    c:\n      d:\n        e:\n          ckpt_path: "{RUN}/{RESUME}"\n',
    )
    for step in range(2000, 5000, 500):
        write_checkpoint(run / step_name(4, step))

    completed = run_cli("prune", "checkpoint", "--policy", str(policy), cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert RESUME in _names(run)


# --- what a per-run file may name (item 23) --------------------------------------------------------


def test_a_per_run_file_naming_a_config_outside_the_root_stops_prune(tmp_path: Path) -> None:
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text("[default]\naws_secret_access_key = AKIAEXAMPLESECRET42\n")
    root = tmp_path / "checkpoint"
    for step in range(500, 5500, 500):
        write_checkpoint(root / "run" / step_name(0, step))
    (root / "run" / ".ckpt-watcher.yaml").write_text(f"protect_from: [{secret}]\n")

    completed = run_cli("prune", "checkpoint", cwd=tmp_path)

    assert completed.returncode == 2
    assert "At 'protect_from.0': names a file outside the checkpoint root" in completed.stderr
    assert "AKIA" not in completed.stderr + completed.stdout
    assert len(_names(root / "run")) == 10


def test_a_per_run_file_may_name_a_config_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    run = root / "run"
    for step in range(500, 5500, 500):
        write_checkpoint(run / step_name(0, step))
    (run / "train.yaml").write_text(f"ckpt_path: {step_name(0, 500)}\n")
    (run / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 2\nprotect_from: [train.yaml]\n")

    completed = run_cli("prune", "checkpoint", cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert _names(run) == {step_name(0, 500), step_name(0, 4500), step_name(0, 5000), "train.yaml"}


# --- the reconcile core while a config holds deletions ---------------------------------------------


def _core(root: Path, policy: Path) -> Reconciler:
    """The daemon's reconcile core over ``root`` (its passes called directly, in this process)."""
    tree = PolicyTree(root, load_policy(policy), strict=False)
    return Reconciler(tree, ProtectionRegistry(root.parent), pins={}, settle_seconds=0, one_shot=False)


def _steps(run: Path, steps: list[int]) -> list[str]:
    """Step checkpoints in ``run``, older first (an mtime a second apart)."""
    names = []
    for index, step in enumerate(steps):
        path = write_checkpoint(run / step_name(0, step))
        stamp = time.time() - 1000 + index
        os.utime(path, (stamp, stamp))
        names.append(path.name)
    return names


def _events(capture: LogCapture, name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in list(capture.entries) if entry["event"] == name]


def test_a_config_never_read_holds_a_checkpoint_it_names_in_another_run(
    tmp_path: Path, captured: LogCapture
) -> None:
    """stage2 fine-tunes from stage1: its per-run file names its training config, which names a
    stage1 checkpoint. Read, that checkpoint is kept; never read, nothing in stage1 is deleted either
    (the checkpoint it names may be in any run)."""
    root = tmp_path / "checkpoint"
    stage1, stage2 = root / "stage1", root / "stage2"
    written = _steps(stage1, [100, 200, 300, 400])
    _steps(stage2, [10])
    (tmp_path / "policy.yaml").write_text("save_top_k_checkpoints: 2\n")
    config = root / "train_stage2.yaml"
    (stage2 / ".ckpt-watcher.yaml").write_text("protect_from: [../train_stage2.yaml]\n")
    config.write_text(f'ckpt_path: "{stage1 / written[0]}"\n  bad: [\n')

    result = _core(root, tmp_path / "policy.yaml").run(Trigger.STARTUP)

    assert _names(stage1) == set(written)
    assert result.deleted == 0
    (held,) = _events(captured, "deletions_held")
    assert held["groups"] == 3  # the root, stage1 and stage2
    assert held["configs"] == ["train_stage2.yaml"]


def test_a_config_a_per_run_file_just_named_is_read_before_its_group_is_planned(
    tmp_path: Path, captured: LogCapture, quiet_clock: QuietClock
) -> None:
    """An event pass over run-a takes run-b in (a config changed), and run-b's per-run file now names
    a config nobody read yet, unreadable: it is read (and holds) before anything in run-b is planned.
    (The per-run file is new: read once it has been left alone for the quiet time.)"""
    root = tmp_path / "checkpoint"
    run_a, run_b = root / "run-a", root / "run-b"
    _steps(run_a, [10])
    written = _steps(run_b, [100, 200])
    train_a = tmp_path / "train_a.yaml"
    train_a.write_text(f'ckpt_path: "{run_a / step_name(0, 10)}"\n')
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: 2\nprotect_from: [{train_a}]\n")
    core = _core(root, policy)
    core.run(Trigger.STARTUP)
    train_b = root / "train_b.yaml"
    train_b.write_text(f'ckpt_path: "{run_b / written[0]}"\n  bad: [\n')
    (run_b / ".ckpt-watcher.yaml").write_text("protect_from: [../train_b.yaml]\n")
    written += _steps(run_b, [300, 400])
    _steps(run_a, [20])
    train_a.write_text(f'ckpt_path: "{run_a / step_name(0, 20)}"\n')
    core.run(Trigger.EVENT, [run_b])  # (its new per-run file seen, left unread for now)
    assert _names(run_b) == set(written)
    quiet_clock.pass_quiet_time()

    core.run(Trigger.EVENT, [run_a])

    assert _names(run_b) == set(written)
    (rejected,) = _events(captured, "protection_rejected")
    assert rejected["config"] == "train_b.yaml"
    assert len(_events(captured, "deletions_held")) == 1


@pytest.mark.parametrize("then", ["deleted", "fixed"])
def test_a_held_config_deleted_or_fixed_releases_every_group_at_once(
    tmp_path: Path, captured: LogCapture, then: str
) -> None:
    """The next pass, even an event pass over a single group, releases all of them: the config's
    change counts as one (a config that stops holding changes what every group may do)."""
    root = tmp_path / "checkpoint"
    run_a, run_b = root / "run-a", root / "run-b"
    _steps(run_a, [100, 200, 300, 400])
    written_b = _steps(run_b, [100, 200, 300, 400])
    config = tmp_path / "train.yaml"
    config.write_text("ckpt_path: x\n  bad: [\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: 2\nprotect_from: [{config}]\n")
    core = _core(root, policy)
    assert core.run(Trigger.STARTUP).deleted == 0
    if then == "deleted":
        config.unlink()
    else:
        config.write_text("ckpt_path: null\n")

    core.run(Trigger.EVENT, [run_a])

    assert _names(run_b) == set(written_b[2:])
    (released,) = _events(captured, "deletions_released")
    assert released["groups"] == 3


def test_a_held_config_no_policy_names_any_more_releases_every_group(
    tmp_path: Path, captured: LogCapture, quiet_clock: QuietClock
) -> None:
    """run-b's per-run file named an unreadable config, holding every group; it is edited to name
    none. The event pass over run-b releases it, and run-a (held, outside that pass) is due again at
    once: its deletions waited."""
    root = tmp_path / "checkpoint"
    run_a, run_b = root / "run-a", root / "run-b"
    written_a = _steps(run_a, [100, 200, 300, 400])
    written_b = _steps(run_b, [100, 200, 300, 400])
    (root / "train_b.yaml").write_text("ckpt_path: x\n  bad: [\n")
    (run_b / ".ckpt-watcher.yaml").write_text("protect_from: [../train_b.yaml]\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\n")
    core = _core(root, policy)
    assert core.run(Trigger.STARTUP).deleted == 0
    (run_b / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 2\n")
    assert core.run(Trigger.EVENT, [run_b]).deleted == 0  # just edited: the hold stays meanwhile
    quiet_clock.pass_quiet_time()

    core.run(Trigger.EVENT, [run_b])
    assert _names(run_b) == set(written_b[2:])
    due = core.index.take_due_rechecks(time.monotonic())
    assert run_a in due
    core.run(Trigger.EVENT, due)

    assert _names(run_a) == set(written_a[2:])
    assert sum(record["groups"] for record in _events(captured, "deletions_released")) == 3


def test_protect_naming_a_run_directory_keeps_every_checkpoint_in_it(tmp_path: Path) -> None:
    run, other = tmp_path / "root" / "run", tmp_path / "root" / "other"
    for directory in (run, other):
        for step in (100, 200, 300):
            write_checkpoint(directory / step_name(0, step))
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")

    completed = run_cli("prune", str(tmp_path / "root"), "--policy", str(policy), "--protect", str(run))

    assert completed.returncode == 0, completed.stderr
    assert _names(run) == {step_name(0, step) for step in (100, 200, 300)}
    assert _names(other) == {step_name(0, 300)}
