"""A real PyTorch Lightning run writing its checkpoints to ``s3://`` (a real S3 server, moto) with
``watch s3://...`` beside it; then ``Trainer.fit(ckpt_path="s3://.../last.ckpt")`` resumes.

Lightning's ModelCheckpoint keeps everything (``save_top_k=-1``): only the watcher prunes. From the
trainer's own record of what it wrote, the test computes what the policy keeps (as test_lightning.py
does on disk) and waits until the prefix holds exactly that. The policy also names, through
``protect_from``, a training config whose ``ckpt_path`` is the ``s3://`` URL of an early checkpoint:
the PL #21813 case (on S3, Lightning's own guard for the resume checkpoint does not hold), which must
survive every pass although the policy alone would delete it.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_lightning import (
    CONVERGE_TIMEOUT,
    EVERY_N_STEPS,
    POLICY,
    STEP_SECONDS,
    STEPS_PER_EPOCH,
    VAL_LOSSES,
    TrainingRun,
    _expected_survivors,
    _written,
)
from tests.support.daemon import DaemonProcess, running_daemon, wait_until
from tests.support.factories import step_name
from tests.support.s3_server import Bucket

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "lightning_s3_run.py"
REPOSITORY = Path(__file__).resolve().parents[2]
FIRST_EPOCHS = 4
RESUMED_EPOCHS = 6
TRAIN_TIMEOUT = 180.0
LEASE = ".ckpt-watcher.lease"


def _train(
    tmp_path: Path, url: str, label: str, *, max_epochs: int, resume: str | None = None
) -> TrainingRun:
    manifest_path = tmp_path / f"{label}.manifest.json"
    output_path = tmp_path / f"{label}.output"
    arguments = [
        sys.executable,
        str(TRAIN_SCRIPT),
        url,
        "--manifest",
        str(manifest_path),
        "--root-dir",
        str(tmp_path / "lightning"),
        "--max-epochs",
        str(max_epochs),
        "--every-n-steps",
        str(EVERY_N_STEPS),
        "--val-losses",
        ",".join(str(value) for value in VAL_LOSSES),
        "--step-seconds",
        str(STEP_SECONDS),
    ]
    if resume is not None:
        arguments += ["--resume", resume]
    environment = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    with output_path.open("wb") as output:
        completed = subprocess.run(
            arguments,
            cwd=REPOSITORY,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=TRAIN_TIMEOUT,
            check=False,
        )
    text = output_path.read_text(errors="replace")
    assert completed.returncode == 0, f"training run {label!r} failed:\n{text[-6000:]}"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    assert manifest["error"] is None, manifest["error"]
    return TrainingRun(manifest=manifest)


def _names(bucket: Bucket) -> set[str]:
    return {key.removeprefix("run/") for key in bucket.raw_keys() if key.startswith("run/")}


def _wait_for(daemon: DaemonProcess, bucket: Bucket, expected: set[str]) -> None:
    def converged() -> bool:
        if daemon.process.poll() is not None:
            raise AssertionError(
                f"watcher exited ({daemon.process.returncode}):\n{daemon.log_path.read_text()}"
            )
        return _names(bucket) == expected

    try:
        wait_until(converged, CONVERGE_TIMEOUT, "the prefix to hold exactly what the policy keeps")
    except AssertionError as error:
        actual = _names(bucket)
        raise AssertionError(
            f"{error}\nkept but should be deleted: {sorted(actual - expected)}"
            f"\ndeleted but should be kept: {sorted(expected - actual)}"
            f"\nwatcher log:\n{daemon.log_path.read_text()[-6000:]}"
        ) from None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_watch_prunes_a_lightning_run_writing_to_s3_which_then_resumes_from_last_ckpt(
    s3: Bucket, tmp_path: Path
) -> None:
    url = f"{s3.url}/run"
    protected = step_name(0, EVERY_N_STEPS)  # the first step checkpoint: the policy alone deletes it
    config = tmp_path / "train.yaml"
    config.write_text(f"trainer:\n  ckpt_path: {url}/{protected}\n")
    policy = tmp_path / "policy" / "retention.yaml"
    policy.parent.mkdir()
    policy.write_text(POLICY + "protect_from:\n  - ../train.yaml\n")
    arguments = ["watch", url, "--policy", str(policy), "--poll-interval", "0.5", "--settle", "1"]

    with running_daemon(arguments, tmp_path / "watch.jsonl", cwd=tmp_path) as daemon:
        daemon.wait_ready()

        first = _train(tmp_path, url, "first", max_epochs=FIRST_EPOCHS)
        assert first.manifest["removed"] == [], "Lightning itself removed checkpoints"
        assert first.manifest["final_global_step"] == FIRST_EPOCHS * STEPS_PER_EPOCH
        written = _written([first])
        expected = _expected_survivors(written, first) | {protected}
        assert {path.name for path in written} - expected, "the run must write more than the policy keeps"
        _wait_for(daemon, s3, expected | {LEASE})

        [last] = [item for item in written.values() if item.kind == "last"]
        last_saved_step = last.step
        second = _train(tmp_path, url, "resumed", max_epochs=RESUMED_EPOCHS, resume=f"{url}/last.ckpt")
        assert second.manifest["resumed_checkpoint_global_step"] == last_saved_step
        assert second.manifest["start_global_step"] == last_saved_step
        assert min(int(save["global_step"]) for save in second.saves) > last_saved_step
        assert second.manifest["final_global_step"] == RESUMED_EPOCHS * STEPS_PER_EPOCH

        written = _written([first, second])
        expected = _expected_survivors(written, second) | {protected}
        _wait_for(daemon, s3, expected | {LEASE})
        assert daemon.stop() == 0

    deleted = collections.Counter(record["path"] for record in daemon.events("checkpoint_deleted"))
    # The resumed run (from last.ckpt, mid-epoch) writes the epoch's best again under the same key: a
    # new object, which may be deleted again. Never more deletions of a key than writes of it.
    writes = collections.Counter(save["path"] for run in (first, second) for save in run.saves)
    assert {path: count for path, count in deleted.items() if count > writes[path]} == {}, (
        "a deletion logged twice"
    )
    assert {path.removeprefix(f"{url}/") for path in deleted} == {path.name for path in written} - expected
    assert _names(s3) == expected  # the lease was released
    assert daemon.events("checkpoint_delete_failed") == []
    warnings = [record for record in daemon.records() if record.get("level") not in {"info", "debug"}]
    assert [record["event"] for record in warnings] in ([], ["protection_warning"])  # named before written
