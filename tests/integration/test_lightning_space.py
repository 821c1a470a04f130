"""A real PyTorch Lightning training on a small tmpfs whose checkpoints would not fit on it, beside a
``watch`` daemon with ``keep_free``: training completes (no ``ENOSPC``), and a second run resumes from
``last.ckpt`` and completes too. Both ``ModelCheckpoint`` callbacks keep everything themselves
(``save_top_k=-1``) and the policy keeps everything by count, so only space pressure deletes.

Lightning saves through fsspec: to a temporary file in ``$TMPDIR``, then a rename into place. Here
``$TMPDIR`` is on the same tmpfs but outside the watched root, as on a machine whose /tmp is the
checkpoints' disk: bytes the daemon never sees being written, only in ``statvfs``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import running_daemon
from tests.support.tmpfs import MIB, mounted_tmpfs, total_bytes

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "lightning_run.py"
BALLAST = 3 * MIB  # each checkpoint is a little over 3 MiB
DISK = 40 * MIB
FIRST_EPOCHS = 6
RESUMED_EPOCHS = 8
VAL_LOSSES = "0.9,0.5,0.3,0.6,0.7,0.8,0.2,0.4"


def _train(
    tmp_path: Path, run: Path, temporary: Path, label: str, epochs: int, resume: Path | None
) -> dict[str, Any]:
    manifest = tmp_path / f"{label}.manifest.json"
    output = tmp_path / f"{label}.output"
    arguments = [
        sys.executable,
        str(TRAIN_SCRIPT),
        str(run),
        "--manifest",
        str(manifest),
        "--max-epochs",
        str(epochs),
        "--every-n-steps",
        "3",
        "--save-last",
        "true",
        "--val-losses",
        VAL_LOSSES,
        "--step-seconds",
        "0.1",
        "--ballast-bytes",
        str(BALLAST),
    ]
    if resume is not None:
        arguments += ["--resume", str(resume)]
    environment = {**os.environ, "TMPDIR": str(temporary), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    with output.open("wb") as sink:
        completed = subprocess.run(
            arguments,
            cwd=tmp_path,
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=200,
            check=False,
        )
    assert completed.returncode == 0, (
        f"training {label!r} failed:\n{output.read_text(errors='replace')[-6000:]}"
    )
    document: dict[str, Any] = json.loads(manifest.read_text())
    assert document["error"] is None, document["error"]
    return document


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_lightning_trains_and_resumes_on_a_disk_too_small_for_its_checkpoints(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "disk", DISK) as mount:
        root = mount / "checkpoints"
        run = root / "run"
        run.mkdir(parents=True)
        temporary = mount / "tmp"  # $TMPDIR on the same file system, outside the watched root
        temporary.mkdir()
        policy = tmp_path / "policy.yaml"
        policy.write_text("save_top_k_checkpoints: -1\nsave_top_k_best: -1\nkeep_free: 12MiB\n")
        with running_daemon(
            ["watch", str(root), "--policy", str(policy), "--settle", "1"], tmp_path / "log"
        ) as daemon:
            daemon.wait_ready()
            first = _train(tmp_path, run, temporary, "first", FIRST_EPOCHS, None)
            written = sum(1 for save in first["saves"]) * BALLAST
            assert written > total_bytes(mount), "the checkpoints would not fit without eviction"
            assert (run / "last.ckpt").is_file()
            resumed = _train(tmp_path, run, temporary, "resumed", RESUMED_EPOCHS, run / "last.ckpt")
            assert daemon.stop() == 0
        deletions = daemon.events("checkpoint_deleted")
        assert deletions, "space pressure evicted nothing"
        assert all(record["reasons"][0].startswith("evicted for space: ") for record in deletions)
        assert "last.ckpt" not in {Path(str(record["path"])).name for record in deletions}
        assert daemon.events("checkpoint_delete_failed") == []
        # the resume restored the first run's last state and trained on to the end
        steps_per_epoch = first["final_global_step"] // FIRST_EPOCHS
        assert resumed["resumed_checkpoint_global_step"] == first["final_global_step"]
        assert resumed["start_global_step"] == first["final_global_step"]
        assert resumed["final_global_step"] == steps_per_epoch * RESUMED_EPOCHS
        assert (run / "last.ckpt").is_file()
