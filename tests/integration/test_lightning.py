"""``ckpt-watcher watch`` as a real process beside a real PyTorch Lightning training run, then a resume.

The trainer runs in its own process (``tests/support/lightning_run.py``): a tiny regression on CPU,
8 optimizer steps per epoch, two ``ModelCheckpoint`` callbacks with Lightning's own ``save_top_k=-1``
(Lightning never deletes; only the daemon prunes):

* step checkpoints every 3 steps, ``epoch={epoch:02d}-step={step:06d}-train``;
* a best checkpoint at every validation (each epoch),
  ``best_<date>_epoch={epoch:02d}_step={step:06d}_loss={val_loss:.4f}``;
* ``last.ckpt`` from exactly one of them: a copy (``save_last=True``) or a symlink (``"link"``).

The trainer's manifest lists every file Lightning's checkpoint I/O wrote. From it alone the test
computes what the policy keeps, waits (with a deadline) until the directory holds exactly that, checks
the daemon's log accounts for every deletion once, resumes training from ``last.ckpt`` in a new process
(still beside the daemon), checks again, and stops the daemon with SIGTERM.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, LogRecord, running_daemon, wait_until

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "lightning_run.py"

STEPS_PER_EPOCH = 8  # 64 samples in batches of 8 (lightning_run.py)
EVERY_N_STEPS = 3  # does not divide 8, so the newest step checkpoint of an epoch is not always its end
FIRST_EPOCHS = 6
RESUMED_EPOCHS = 8
STEP_SECONDS = 0.08  # per training step, so the run lasts a few seconds and the daemon prunes mid-run
# val_loss per epoch. Epochs 1 and 3 tie at the name's precision (both "0.5000"): the daemon ranks
# what the name says, ties going to the lower step (the first to reach it, which is what Lightning
# calls its best), so epoch 1 stays; here it is also truly lower.
# Epoch 5, the last of the first run, is outside the best 2: with save_last="link" on the best callback
# it survives only as the target of last.ckpt, until the resumed run moves the link on.
VAL_LOSSES = (0.9, 0.49996, 0.3, 0.50004, 0.7, 0.8, 0.2, 0.6)

KEEP_STEPS = 3
KEEP_BEST = 2
EVERY_N_EPOCHS = 2
POLICY = (
    f"save_top_k_checkpoints: {KEEP_STEPS}\n"
    f"save_top_k_best: {KEEP_BEST}\n"
    f"save_every_n_epochs: {EVERY_N_EPOCHS}\n"
)
SETTLE_SECONDS = "1"
CONVERGE_TIMEOUT = 30.0
TRAIN_TIMEOUT = 120.0

_VERSION_SUFFIX = re.compile(r"-v([1-9][0-9]*)\.ckpt$")


@dataclass(frozen=True)
class Written:
    """One checkpoint file Lightning wrote, described by what the trainer knew when writing it."""

    path: Path
    kind: str  # "step", "best" or "last"
    epoch: int
    step: int
    version: int
    loss: float | None  # val_loss at the precision the name carries (best checkpoints only)


@dataclass(frozen=True)
class TrainingRun:
    """One finished training process: its manifest (see lightning_run.py)."""

    manifest: dict[str, Any]

    @property
    def saves(self) -> list[dict[str, Any]]:
        return list(self.manifest["saves"])


def _train(
    tmp_path: Path,
    run_directory: Path,
    label: str,
    *,
    max_epochs: int,
    save_last: str,
    last_on: str,
    resume: Path | None = None,
) -> TrainingRun:
    """Run lightning_run.py in its own process; fail with its output unless it exits 0."""
    manifest_path = tmp_path / f"{label}.manifest.json"
    stderr_path = tmp_path / f"{label}.stderr"
    # fsspec (Lightning's atomic save) writes each checkpoint to a temporary file in $TMPDIR and
    # renames it into place; keep that on the checkpoints' file system and out of the shared /tmp.
    temporary = tmp_path / "trainer-tmp"
    temporary.mkdir(exist_ok=True)
    environment = {**os.environ, "PYTHONHASHSEED": "0", "TMPDIR": str(temporary), "OMP_NUM_THREADS": "1"}
    arguments = [
        sys.executable,
        str(TRAIN_SCRIPT),
        str(run_directory),
        "--manifest",
        str(manifest_path),
        "--max-epochs",
        str(max_epochs),
        "--every-n-steps",
        str(EVERY_N_STEPS),
        "--save-last",
        save_last,
        "--last-on",
        last_on,
        "--val-losses",
        ",".join(str(value) for value in VAL_LOSSES),
        "--step-seconds",
        str(STEP_SECONDS),
    ]
    if resume is not None:
        arguments += ["--resume", str(resume)]
    with stderr_path.open("wb") as stderr:
        completed = subprocess.run(
            arguments,
            cwd=tmp_path,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            timeout=TRAIN_TIMEOUT,
            check=False,
        )
    output = stderr_path.read_text(errors="replace")
    assert completed.returncode == 0, (
        f"training run {label!r} failed (exit {completed.returncode}); did the daemon delete a file "
        f"Lightning needed?\n{output[-6000:]}"
    )
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    assert manifest["error"] is None, manifest["error"]
    return TrainingRun(manifest=manifest)


def _written(runs: Sequence[TrainingRun]) -> dict[Path, Written]:
    """Every file the runs wrote (a rewritten last.ckpt counts once, as last written).

    Each name is checked against the epoch, step and val_loss the trainer recorded, so the expected
    set below rests on what Lightning did, not on how the daemon parses names.
    """
    written: dict[Path, Written] = {}
    for run in runs:
        date = run.manifest["date"]
        for save in run.saves:
            path = Path(save["path"])
            name = path.name
            epoch, step = int(save["epoch"]), int(save["global_step"])
            version_match = _VERSION_SUFFIX.search(name)
            version = int(version_match.group(1)) if version_match else 0
            suffix = f"-v{version}" if version else ""
            loss: float | None = None
            if name == "last.ckpt":
                kind = "last"
            elif name.startswith("best_"):
                kind = "best"
                val_loss = float(save["val_loss"])
                assert (
                    name == f"best_{date}_epoch={epoch:02d}_step={step:06d}_loss={val_loss:.4f}{suffix}.ckpt"
                )
                loss = float(f"{val_loss:.4f}")
            else:
                kind = "step"
                assert name == f"epoch={epoch:02d}-step={step:06d}-train{suffix}.ckpt"
            written[path] = Written(path, kind, epoch, step, version, loss)
    return written


def _expected_survivors(written: dict[Path, Written], last_run: TrainingRun) -> set[str]:
    """What the policy keeps, computed here from the trainer's own record."""
    steps = sorted(
        (item for item in written.values() if item.kind == "step"),
        key=lambda item: (item.step, item.epoch, item.version),
        reverse=True,
    )
    keep = {item.path.name for item in steps[:KEEP_STEPS]}
    epochs_seen: set[int] = set()
    for item in steps:  # newest first
        if (item.epoch + 1) % EVERY_N_EPOCHS == 0 and item.epoch not in epochs_seen:
            epochs_seen.add(item.epoch)
            keep.add(item.path.name)
    bests = sorted(
        (item for item in written.values() if item.kind == "best"),
        key=lambda item: (item.loss, item.step, item.epoch, item.version),
    )
    keep |= {item.path.name for item in bests[:KEEP_BEST]}
    # last.ckpt is a copy Lightning wrote (save_last=True) or a symlink it made (save_last="link")
    assert any(item.kind == "last" for item in written.values()) or last_run.manifest["last_is_symlink"]
    keep.add("last.ckpt")
    link_text = last_run.manifest["last_link_text"]
    if link_text is not None:
        keep.add(link_text)
    return keep


def _listing(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


def _deleted_counts(daemon: DaemonProcess) -> collections.Counter[str]:
    return collections.Counter(str(record["path"]) for record in daemon.events("checkpoint_deleted"))


def _wait_for_policy_state(
    daemon: DaemonProcess, directory: Path, expected: set[str], should_be_deleted: set[str]
) -> None:
    """Wait until the directory holds exactly ``expected`` and every deletion has been logged."""

    def converged() -> bool:
        if daemon.process.poll() is not None:
            raise AssertionError(
                f"daemon exited ({daemon.process.returncode}):\n{daemon.log_path.read_text()}"
            )
        return _listing(directory) == expected and set(_deleted_counts(daemon)) >= should_be_deleted

    try:
        wait_until(converged, CONVERGE_TIMEOUT, f"{directory} to hold exactly what the policy keeps")
    except AssertionError as error:
        actual = _listing(directory)
        logged = set(_deleted_counts(daemon))
        raise AssertionError(
            f"{error}\nkept but should be deleted: {sorted(actual - expected)}"
            f"\ndeleted but should be kept: {sorted(expected - actual)}"
            f"\ndeleted without a checkpoint_deleted record: {sorted(should_be_deleted - logged)}"
            f"\ndaemon log:\n{daemon.log_path.read_text()[-8000:]}"
        ) from None


def _assert_every_deletion_logged_once(daemon: DaemonProcess, should_be_deleted: set[str]) -> None:
    counts = _deleted_counts(daemon)
    repeated = {path: count for path, count in counts.items() if count != 1}
    assert not repeated, f"deletions logged more than once: {repeated}"
    assert set(counts) == should_be_deleted
    assert daemon.events("checkpoint_delete_failed") == []


def _timestamp(record: LogRecord) -> float:
    return datetime.datetime.fromisoformat(str(record["timestamp"])).timestamp()


CASES = [
    pytest.param("true", "step", id="last-copy-on-step-callback"),
    pytest.param("link", "step", id="last-link-on-step-callback"),
    pytest.param("link", "best", id="last-link-on-best-callback"),
]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("save_last", "last_on"), CASES)
def test_daemon_prunes_beside_a_lightning_run_that_then_resumes(  # noqa: PLR0915  (one real run, checked step by step)
    tmp_path: Path, save_last: str, last_on: str
) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    root = root.resolve()  # the daemon logs paths below the real path of its root
    run_directory = root / "tiny_regression"  # created by Lightning once the daemon is watching
    # The policy gets a directory of its own: the daemon re-reads the policy on any event in that
    # directory, so with its own log file there it would reload (and log that) in an endless loop.
    policy = tmp_path / "policy" / "retention.yaml"
    policy.parent.mkdir()
    policy.write_text(POLICY)
    logs = tmp_path / "logs"
    logs.mkdir()
    arguments = ["watch", str(root), "--policy", str(policy), "--settle", SETTLE_SECONDS]

    with running_daemon(arguments, logs / "watch.jsonl") as daemon:
        daemon.wait_ready()

        # -- a fresh run --------------------------------------------------------------------------
        first = _train(
            tmp_path, run_directory, "first", max_epochs=FIRST_EPOCHS, save_last=save_last, last_on=last_on
        )
        assert first.manifest["removed"] == [], "Lightning itself removed checkpoints"
        assert first.manifest["final_global_step"] == FIRST_EPOCHS * STEPS_PER_EPOCH
        assert first.manifest["last_is_symlink"] is (save_last == "link")
        if save_last == "link":
            # Lightning links by bare relative name, within the directory
            assert "/" not in first.manifest["last_link_text"]
        written = _written([first])
        expected = _expected_survivors(written, first)
        should_be_deleted = {str(path) for path in written} - {str(run_directory / name) for name in expected}
        assert should_be_deleted, "the run must write more than the policy keeps"

        _wait_for_policy_state(daemon, run_directory, expected, should_be_deleted)
        _assert_every_deletion_logged_once(daemon, should_be_deleted)
        last_write = max(float(save["time"]) for save in first.saves)
        first_deletion = min(_timestamp(record) for record in daemon.events("checkpoint_deleted"))
        assert first_deletion < last_write, "the daemon should prune while Lightning is still writing"
        first_target = first.manifest["last_link_text"]
        if last_on == "best":
            top_bests = sorted(
                (item for item in written.values() if item.kind == "best"),
                key=lambda item: (item.loss, item.step),
            )[:KEEP_BEST]
            assert first_target not in {item.path.name for item in top_bests}, "the pin is not exercised"

        # -- resume from last.ckpt, still beside the daemon ----------------------------------------
        resumed_from = run_directory / "last.ckpt"
        last_saved_step = (
            written[run_directory / first_target].step
            if first_target is not None
            else written[resumed_from].step
        )
        second = _train(
            tmp_path,
            run_directory,
            "resumed",
            max_epochs=RESUMED_EPOCHS,
            save_last=save_last,
            last_on=last_on,
            resume=resumed_from,
        )
        assert second.manifest["removed"] == [], "Lightning itself removed checkpoints"
        assert second.manifest["resumed_checkpoint_global_step"] == last_saved_step
        assert second.manifest["start_global_step"] == last_saved_step
        assert second.saves, "the resumed run wrote no checkpoint"
        assert min(int(save["global_step"]) for save in second.saves) > last_saved_step
        assert second.manifest["final_global_step"] == RESUMED_EPOCHS * STEPS_PER_EPOCH

        written = _written([first, second])
        expected = _expected_survivors(written, second)
        should_be_deleted = {str(path) for path in written} - {str(run_directory / name) for name in expected}
        _wait_for_policy_state(daemon, run_directory, expected, should_be_deleted)
        _assert_every_deletion_logged_once(daemon, should_be_deleted)
        if last_on == "best":
            # once last.ckpt points elsewhere, the old target is just a poor best checkpoint
            assert str(run_directory / first_target) in should_be_deleted
        if save_last == "link":
            assert os.readlink(run_directory / "last.ckpt") == second.manifest["last_link_text"]

        # -- stop -------------------------------------------------------------------------------------
        code = daemon.stop(signal.SIGTERM)
        assert code == 0
        stopped = daemon.events("watch_stopped")
        assert len(stopped) == 1
        assert stopped[0]["deleted"] == len(should_be_deleted)
        assert _listing(run_directory) == expected
        unexpected = [record for record in daemon.records() if record.get("level") not in {"info", "debug"}]
        assert unexpected == [], f"the daemon warned or failed: {unexpected}"
        assert _listing(root) == {run_directory.name}  # the lock is on the directory: no file in it

    # Lightning's temporary files were all renamed into place (none left behind by a failed save)
    leftovers = [path.name for path in (tmp_path / "trainer-tmp").iterdir() if path.is_file()]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_fresh_run_watched_at_its_own_dirpath_finds_it_empty(tmp_path: Path) -> None:
    """Lightning warns "Checkpoint directory ... exists and is not empty" if its dirpath holds any file.

    The daemon watches the very directory ModelCheckpoint writes into and takes its single-instance
    lock there before the trainer starts: the lock must leave no file where the trainer looks.
    """
    run_directory = tmp_path / "checkpoints"
    run_directory.mkdir()
    run_directory = run_directory.resolve()
    policy = tmp_path / "policy" / "retention.yaml"
    policy.parent.mkdir()
    policy.write_text(POLICY)
    arguments = ["watch", str(run_directory), "--policy", str(policy), "--settle", SETTLE_SECONDS]

    with running_daemon(arguments, tmp_path / "watch.jsonl") as daemon:
        daemon.wait_ready()

        run = _train(tmp_path, run_directory, "fresh", max_epochs=2, save_last="link", last_on="step")

        not_empty = [warning for warning in run.manifest["warnings"] if "exists and is not empty" in warning]
        assert not_empty == []
        assert run.saves, "the run wrote no checkpoint"
        code = daemon.stop(signal.SIGTERM)
        assert code == 0
        assert not any("lock" in name for name in _listing(run_directory))


TIE_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "lightning_best_tie.py"


@pytest.mark.timeout(300)
def test_a_tie_keeps_the_checkpoint_lightning_calls_the_best(tmp_path: Path) -> None:
    """Lightning replaces its best only with a strictly better one: of tied best checkpoints, its
    best_model_path is the first. ``save_top_k_best: 1`` keeps that one, and ``ckpt_path="best"``
    still loads after the prune."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: -1\nsave_top_k_best: 1\n")
    report = tmp_path / "report.json"
    completed = subprocess.run(
        [sys.executable, str(TIE_SCRIPT), str(tmp_path / "run"), str(policy), str(report)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document = json.loads(report.read_text())

    assert document["prune_exit"] == 0
    assert "epoch=01" in document["best_model_path"]  # the first to reach 0.25
    assert document["exists"], document["files"]
    assert document["test_loaded_best"]
    assert [name for name in document["files"] if name.startswith("best_")] == [document["best_model_path"]]
