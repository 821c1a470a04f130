"""Hostile config files: every file the tool reads as configuration, in every place it reads one.

Anyone who can write into a checkpoint directory can plant a ``.ckpt-watcher.yaml`` or a config it
names, so each of these must end in a clear ``At '...'`` error (exit 2 for ``prune``; for the daemon
``policy_rejected`` and that subtree blocked, everything else served), in bounded time and memory,
without deleting anything it should not and without printing the contents of a file nobody named on
the command line. Every command runs as a real process under an address-space limit.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli import TRACEBACK, run_cli
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import step_name, write_checkpoint
from tests.support.hostile_configs import (
    alias_bomb,
    deep_flow,
    merge_bomb,
)
from tests.support.hostile_trees import make_fifo
from tests.support.notify_socket import NotifySocket

pytestmark = pytest.mark.timeout(180)

# Enough for the CLI (about 40 MiB resident, 200 MiB of address space), far too little for a bomb.
MEMORY_LIMIT = 512 * 1024 * 1024
TIME_LIMIT = 60.0
SECRET = "AKIAEXAMPLESECRET42"
STEPS = range(500, 5500, 500)


def _names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir() if path.name.endswith(".ckpt")}


ALL_CHECKPOINTS = frozenset(step_name(0, step) for step in STEPS)


class Layout:
    """``configs/policy.yaml`` (keep 2) beside ``checkpoint/{run,other}``, ten checkpoints each."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path
        self.root = tmp_path / "checkpoint"
        self.run = self.root / "run"
        self.other = self.root / "other"
        for directory in (self.run, self.other):
            for step in STEPS:
                write_checkpoint(directory / step_name(0, step))
        self.configs = tmp_path / "configs"
        self.configs.mkdir()
        self.policy = self.configs / "policy.yaml"
        self.policy.write_text("save_top_k_checkpoints: 2\n")

    def place(self, location: str, make: Callable[[Path], object]) -> None:
        """Put the hostile file where ``location`` says the tool will read it."""
        if location == "override":
            make(self.run / ".ckpt-watcher.yaml")
        elif location == "policy":
            self.policy.unlink()
            make(self.policy)
        elif location == "protect_from":
            self.policy.write_text("save_top_k_checkpoints: 2\nprotect_from: [train.yaml]\n")
            make(self.configs / "train.yaml")
        elif location == "per-run protect_from":
            (self.run / ".ckpt-watcher.yaml").write_text("protect_from: [train.yaml]\n")
            make(self.run / "train.yaml")
        else:
            raise AssertionError(location)

    def prune(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "prune",
            str(self.root),
            "--policy",
            str(self.policy),
            *extra,
            cwd=self.base,
            memory=MEMORY_LIMIT,
            timeout=TIME_LIMIT,
        )


LOCATIONS = ["override", "policy", "protect_from", "per-run protect_from"]


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()


def _sparse(path: Path) -> None:
    with path.open("wb") as sparse:
        sparse.truncate(8 * 2**30)


NOT_REGULAR_FILES: list[tuple[str, Callable[[Path], object], str]] = [
    ("fifo", make_fifo, "not a regular file (a FIFO); refused"),
    ("link-to-fifo", lambda path: path.symlink_to(make_fifo(path.parent / "pipe")), "(a FIFO)"),
    ("link-to-dev-zero", lambda path: path.symlink_to("/dev/zero"), "not a regular file (a device); refused"),
    ("link-to-dev-urandom", lambda path: path.symlink_to("/dev/urandom"), "(a device)"),
    ("socket", _socket, "not a regular file (a socket); refused"),
    ("sparse-8-GiB", _sparse, "more than a config file may have (1048576 bytes); refused"),
    ("link-loop", lambda path: path.symlink_to(path.name), "a symlink loop"),
    ("dangling-link", lambda path: path.symlink_to("nowhere.yaml"), "no such file"),
]


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize(
    ("make", "problem"),
    [(make, problem) for _, make, problem in NOT_REGULAR_FILES],
    ids=[name for name, *_ in NOT_REGULAR_FILES],
)
def test_a_config_that_is_not_a_small_regular_file_stops_prune(
    tmp_path: Path, location: str, make: Callable[[Path], object], problem: str
) -> None:
    layout = Layout(tmp_path)
    layout.place(location, make)
    if location == "per-run protect_from" and "/dev/" in os.path.realpath(layout.run / "train.yaml"):
        problem = "names a file outside the checkpoint root"  # refused before it is even opened

    completed = layout.prune()

    assert completed.returncode == 2, completed.stderr
    assert problem in completed.stderr
    assert "At '" in completed.stderr
    assert TRACEBACK not in completed.stderr
    assert _names(layout.run) == _names(layout.other) == ALL_CHECKPOINTS


HOSTILE_YAML: list[tuple[str, str, str]] = [
    ("alias-bomb", alias_bomb(), "values once aliases are expanded"),
    ("merge-bomb", merge_bomb(levels=30, fanout=3), "values once aliases are expanded"),
    ("nested-100000-deep", deep_flow(100_000).replace("save_top_k_best", "model"), "nested deeper than 64"),
    ("recursive-alias", "model: &m {layers: [*m]}\n", "an alias inside the value it refers to"),
    ("invalid-date", "started: 2024-13-45\n", "a timestamp value that cannot be read"),
    ("bool-tag", "flag: !!bool maybe\n", "a bool value that cannot be read"),
    ("python-tag", "hook: !!python/object/apply:os.system ['touch pwned']\n", "could not determine a"),
    ("60000-values", "".join(f"k{index}: {index}\n" for index in range(60_000)), "values once aliases"),
]


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize(
    ("text", "problem"),
    [(text, problem) for _, text, problem in HOSTILE_YAML],
    ids=[i for i, *_ in HOSTILE_YAML],
)
def test_hostile_yaml_stops_prune_with_a_clear_error(
    tmp_path: Path, location: str, text: str, problem: str
) -> None:
    layout = Layout(tmp_path)
    # The retention key makes a policy file otherwise valid; a training config ignores it.
    layout.place(location, lambda path: path.write_text("save_top_k_best: 3\n" + text))

    completed = layout.prune()

    assert completed.returncode == 2, completed.stderr
    assert problem in completed.stderr
    assert TRACEBACK not in completed.stderr
    assert _names(layout.run) == _names(layout.other) == ALL_CHECKPOINTS


HUGE_FORMATS = [
    ("step-width", "naming:\n  step: 'epoch={epoch}-step={step:01200000000d}'\n", "naming.step"),
    ("loss-precision", "naming:\n  best: 'best_{step}_loss={loss:.1200000000f}'\n", "naming.best"),
]


@pytest.mark.parametrize("location", ["override", "policy"])
@pytest.mark.parametrize(
    ("text", "field"), [(text, field) for _, text, field in HUGE_FORMATS], ids=[i for i, *_ in HUGE_FORMATS]
)
def test_a_template_asking_for_gigabytes_of_padding_is_refused_before_any_is_made(
    tmp_path: Path, location: str, text: str, field: str
) -> None:
    """A format width or precision is that many characters made: ``{step:01200000000d}`` in a planted
    per-run file took 1.2 GB (or a MemoryError traceback) while its template was being checked."""
    layout = Layout(tmp_path)
    layout.place(location, lambda path: path.write_text("save_top_k_checkpoints: 2\n" + text))

    completed = layout.prune()

    assert completed.returncode == 2, completed.stderr
    assert f"At '{field}'" in completed.stderr
    assert "a width or precision is at most 255" in completed.stderr
    assert TRACEBACK not in completed.stderr
    assert _names(layout.run) == _names(layout.other) == ALL_CHECKPOINTS


def test_the_policy_command_refuses_a_fifo_and_dev_zero(tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path / "fifo.yaml")
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), (zero, "a device")):
        completed = run_cli("policy", str(path), memory=MEMORY_LIMIT, timeout=TIME_LIMIT)
        assert completed.returncode == 2
        assert f"At '<file>': not a regular file ({kind}); refused" in completed.stderr


# --- nothing a per-run file names is ever printed (item 23) ----------------------------------------


def _credentials(tmp_path: Path) -> Path:
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    return secret


LEAKS = ["override-is-a-link", "per-run-names-it", "per-run-names-a-link-to-it", "policy-names-it"]


@pytest.mark.parametrize("how", LEAKS)
def test_a_credentials_file_is_never_printed(tmp_path: Path, how: str) -> None:
    layout = Layout(tmp_path)
    secret = _credentials(tmp_path)
    override = layout.run / ".ckpt-watcher.yaml"
    if how == "override-is-a-link":
        override.symlink_to(secret)
    elif how == "per-run-names-it":
        override.write_text(f"protect_from: [{secret}]\n")
    elif how == "per-run-names-a-link-to-it":
        (layout.run / "train.yaml").symlink_to(secret)
        override.write_text("protect_from: [train.yaml]\n")
    else:
        layout.policy.write_text(f"save_top_k_checkpoints: 2\nprotect_from: [{secret}]\n")

    for arguments in ((), ("--dry-run",), ("--dry-run", "--json")):
        completed = layout.prune(*arguments)
        assert completed.returncode == 2, completed.stderr
        assert SECRET not in completed.stderr + completed.stdout
        assert "aws_secret" not in completed.stderr + completed.stdout
        assert TRACEBACK not in completed.stderr
    assert _names(layout.run) == ALL_CHECKPOINTS


# --- the daemon: a bad subtree is blocked, every other one served (items 5, 7, 8) -----------------

DAEMON_HOSTILE: dict[str, Callable[[Path], object]] = {
    "invalid-date": lambda path: path.write_text("save_top_k_checkpoints: 1\nstarted: 2024-13-45\n"),
    "fifo": make_fifo,
    "dev-zero": lambda path: path.symlink_to("/dev/zero"),
    "alias-bomb": lambda path: path.write_text("save_top_k_checkpoints: 1\n" + alias_bomb()),
    "outside-config": lambda path: path.write_text("protect_from: [/etc/hostname]\n"),
}


def test_the_daemon_blocks_each_bad_subtree_and_serves_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    for name in [*DAEMON_HOSTILE, "good"]:
        for step in STEPS:
            write_checkpoint(root / name / step_name(0, step))
    for name, make in DAEMON_HOSTILE.items():
        make(root / name / ".ckpt-watcher.yaml")
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        environment = {"NOTIFY_SOCKET": str(notify.path)}
        arguments = ["watch", str(root), "--settle", "0"]
        with running_daemon(arguments, tmp_path / "log", environment) as daemon:
            daemon.wait_ready(timeout=60)
            wait_until(lambda: "READY=1" in notify.lines(), what="READY=1")
            wait_until(lambda: len(_names(root / "good")) == 5, what="the good run pruned to 5")

            rejected = {Path(record["source"]).parent.name for record in daemon.events("policy_rejected")}
            blocked = {Path(record["directory"]).name for record in daemon.events("group_blocked")}
            assert rejected == blocked == set(DAEMON_HOSTILE)
            for record in daemon.events("policy_rejected"):
                assert all(problem.startswith("At '") for problem in record["problems"])
            for name in DAEMON_HOSTILE:
                assert _names(root / name) == ALL_CHECKPOINTS, name
            assert not [record for record in daemon.records() if record.get("event") == "worker_error"]

            # Fixing one file serves that run again, live.
            (root / "invalid-date" / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 1\n")
            wait_until(lambda: len(_names(root / "invalid-date")) == 1, what="the fixed run pruned")
            assert daemon.process.poll() is None
            assert daemon.stop() == 0
    finally:
        notify.close()


HOSTILE_TRAINING_CONFIGS: dict[str, tuple[Callable[[Path], object], str]] = {
    "dev-zero": (lambda path: path.symlink_to("/dev/zero"), "(a device)"),
    "alias-bomb": (
        lambda path: path.write_text("ckpt_path: x\n" + alias_bomb()),
        "once aliases are expanded",
    ),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE_TRAINING_CONFIGS))
def test_the_daemon_survives_its_policy_and_configs_turning_hostile(tmp_path: Path, hostile: str) -> None:
    make_hostile, problem = HOSTILE_TRAINING_CONFIGS[hostile]
    layout = Layout(tmp_path)
    train = layout.configs / "train.yaml"
    train.write_text(f"ckpt_path: ../checkpoint/run/{step_name(0, 500)}\n")
    layout.policy.write_text("save_top_k_checkpoints: 2\nprotect_from: [train.yaml]\n")
    arguments = ["watch", str(layout.root), "--policy", str(layout.policy), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
        daemon.wait_ready(timeout=60)
        wait_until(lambda: _names(layout.run) == {step_name(0, step) for step in (500, 4500, 5000)})

        layout.policy.unlink()
        make_fifo(layout.policy)
        train.unlink()
        make_hostile(train)
        daemon.wait_for("policy_rejected", lambda record: "(a FIFO)" in " ".join(record["problems"]))
        daemon.wait_for("protection_rejected", lambda record: problem in record["error"])

        # The worker is not stuck: new checkpoints are pruned by the last good policy and protection.
        for step in (6000, 6500):
            write_checkpoint(layout.run / step_name(0, step))
        wait_until(lambda: _names(layout.run) == {step_name(0, step) for step in (500, 6000, 6500)})
        assert daemon.stop() == 0


# (A link to /dev/zero is not among them: a per-run file naming a config that leads out of the root
# is itself refused, which blocks its own subtree; test_protection.py says so for prune.)
@pytest.mark.parametrize("hostile", ["alias-bomb", "fifo"])
def test_a_hostile_config_written_into_the_root_from_the_start_holds_and_never_hangs(
    tmp_path: Path, hostile: str
) -> None:
    """The training job writes a per-run ``.ckpt-watcher.yaml`` naming a config of its own, and that
    config is hostile before the daemon ever reads it (a FIFO, a YAML bomb). The
    daemon must start (no hang on the FIFO, no growth on the bomb), delete nothing anywhere while the
    config cannot be read (it could name a checkpoint in any run), and apply the policy once it can,
    keeping what it names."""
    layout = Layout(tmp_path)
    layout.policy.write_text("save_top_k_checkpoints: 2\n")
    train = layout.run / "train.yaml"
    if hostile == "fifo":
        make_fifo(train)
    else:
        HOSTILE_TRAINING_CONFIGS[hostile][0](train)
    (layout.run / ".ckpt-watcher.yaml").write_text("protect_from: [train.yaml]\n")
    arguments = ["watch", str(layout.root), "--policy", str(layout.policy), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "log", cwd=tmp_path) as daemon:
        daemon.wait_ready(timeout=60)
        (held,) = daemon.events("deletions_held")
        assert held["configs"] == ["run/train.yaml"]
        assert _names(layout.run) == _names(layout.other) == ALL_CHECKPOINTS

        train.unlink()
        train.write_text(f"ckpt_path: ../other/{step_name(0, 500)}\n")

        daemon.wait_for("deletions_released")
        wait_until(lambda: _names(layout.run) == {step_name(0, step) for step in (4500, 5000)})
        wait_until(lambda: _names(layout.other) == {step_name(0, step) for step in (500, 4500, 5000)})
        assert daemon.stop() == 0


# --- cost in depth (item 17): bounded here; counted in tests/unit/test_overrides.py --------------


def test_prune_dry_run_of_an_empty_tree_800_deep_finishes(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    deepest = root.joinpath(*(["d"] * 800))
    deepest.mkdir(parents=True)
    write_checkpoint(deepest / step_name(0, 500))

    completed = run_cli(
        "prune", str(root), "--dry-run", "--json", cwd=tmp_path, memory=MEMORY_LIMIT, timeout=120
    )

    assert completed.returncode == 0, completed.stderr
    assert step_name(0, 500) in completed.stdout


def test_a_symlinked_root_config_is_still_read(tmp_path: Path) -> None:
    """ConfigMaps are symlink chains: following links for config files is deliberate."""
    layout = Layout(tmp_path)
    data = layout.configs / "..2026_11_28"
    data.mkdir()
    (data / "policy.yaml").write_text("save_top_k_checkpoints: 3\n")
    (layout.configs / "..data").symlink_to(data.name)
    layout.policy.unlink()
    layout.policy.symlink_to("..data/policy.yaml")

    completed = layout.prune()

    assert completed.returncode == 0, completed.stderr
    assert len(_names(layout.run)) == 3
