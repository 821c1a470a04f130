"""``inspect`` on real checkpoints: Lightning's, weights only, truncated, foreign, unsafe, and large."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import cli_command, peak_resident_memory, run_cli, run_python
from tests.support.factories import step_name, write_truncated

pytestmark = pytest.mark.timeout(300)

LIGHTNING_RUN = Path(__file__).parent.parent / "support" / "lightning_run.py"


def _documents(completed: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {Path(document["path"]).name: document for document in json.loads(completed.stdout)}


@pytest.fixture(scope="module")
def lightning_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints written by a real Lightning run: step and best files, last.ckpt as a symlink."""
    base = tmp_path_factory.mktemp("lightning")
    directory = base / "run"
    subprocess.run(
        [
            sys.executable,
            str(LIGHTNING_RUN),
            str(directory),
            "--manifest",
            str(base / "manifest.json"),
            "--max-epochs",
            "2",
            "--every-n-steps",
            "4",
            "--save-last",
            "link",
            "--val-losses",
            "0.5,0.4",
            "--date",
            "20261128",
        ],
        check=True,
        timeout=240,
        capture_output=True,
        env={**os.environ, "TMPDIR": str(base)},
    )
    return directory


def test_lightning_checkpoints_are_described(lightning_directory: Path) -> None:
    completed = run_cli("inspect", str(lightning_directory), "--json")

    assert completed.returncode == 0, completed.stderr
    documents = _documents(completed)
    assert "last.ckpt" in documents
    step_document = documents[step_name(1, 16)]
    assert step_document["epoch"] == 1
    assert step_document["global_step"] == 16
    assert step_document["resumable"] is True
    assert step_document["lightning_version"]
    assert step_document["tensor_count"] > 0
    assert step_document["dtypes"] == {"float32": step_document["tensor_count"]}
    assert step_document["warnings"] == []
    monitors = {state["monitor"] for state in step_document["model_checkpoints"]}
    assert monitors == {None, "val_loss"}
    best_state = next(state for state in step_document["model_checkpoints"] if state["monitor"] == "val_loss")
    assert best_state["mode"] == "min"
    assert best_state["best_model_path"].endswith(".ckpt")
    assert documents["last.ckpt"]["global_step"] == 16


def test_table_has_one_row_per_checkpoint_and_callback_details(lightning_directory: Path) -> None:
    completed = run_cli(
        "inspect", str(lightning_directory / step_name(1, 16)), str(lightning_directory / "last.ckpt")
    )

    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "EPOCH", "STEP", "RESUME"]
    assert lines[1].split()[:4] == [step_name(1, 16), "1", "16", "yes"]
    assert lines[2].split()[:4] == ["last.ckpt", "1", "16", "yes"]
    assert "ModelCheckpoint monitor=val_loss mode=min" in completed.stdout


def test_weights_only_file_truncated_file_and_non_checkpoint(tmp_path: Path) -> None:
    weights = tmp_path / step_name(0, 100)
    run_python(
        """
        import sys, torch
        torch.save({"layer.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "layer.bias": torch.zeros(4)},
                   sys.argv[1])
        """,
        str(weights),
        check=True,
    )
    truncated = write_truncated(tmp_path / step_name(0, 200))
    foreign = tmp_path / "notes.ckpt"
    foreign.write_text("not a checkpoint")

    completed = run_cli("inspect", str(weights), str(truncated), str(foreign), "--json")

    assert completed.returncode == 1
    documents = _documents(completed)
    assert documents[weights.name]["resumable"] is False  # no optimizer state: weights only
    assert documents[weights.name]["tensor_count"] == 2
    assert documents[weights.name]["dtypes"] == {"bfloat16": 1, "float32": 1}
    assert documents[weights.name]["error"] is None
    assert "no end-of-central-directory record" in documents[truncated.name]["error"]
    assert "not a zip archive" in documents[foreign.name]["error"]
    errors = [json.loads(line) for line in completed.stderr.splitlines() if "inspect_failed" in line]
    assert {Path(error["path"]).name for error in errors} == {truncated.name, foreign.name}


def test_name_and_contents_that_disagree_are_a_warning(tmp_path: Path) -> None:
    misnamed = tmp_path / step_name(2, 1500)
    run_python(
        """
        import sys, torch
        torch.save({"epoch": 2, "global_step": 1499, "state_dict": {"w": torch.zeros(2)},
                    "optimizer_states": [{"state": {}}], "pytorch-lightning_version": "2.6.6"}, sys.argv[1])
        """,
        str(misnamed),
        check=True,
    )

    document = _documents(run_cli("inspect", str(misnamed), "--json"))[misnamed.name]

    assert document["warnings"] == ["the name says step 1500 but global_step is 1499"]
    assert document["resumable"] is True


def test_objects_the_safe_loader_refuses_are_named_and_unsafe_shows_them(tmp_path: Path) -> None:
    custom = tmp_path / step_name(0, 300)
    run_python(
        """
        import argparse, sys, torch
        torch.save({"epoch": 0, "global_step": 300, "state_dict": {"w": torch.zeros(3)},
                    "hyper_parameters": argparse.Namespace(lr=0.1)}, sys.argv[1])
        """,
        str(custom),
        check=True,
    )

    safe = _documents(run_cli("inspect", str(custom), "--json"))[custom.name]
    unsafe_run = run_cli("inspect", str(custom), "--json", "--unsafe")
    unsafe = _documents(unsafe_run)[custom.name]

    assert safe["unsafe_globals"] == ["argparse.Namespace"]
    assert safe["loaded"] is False
    assert safe["tensor_count"] == 1
    assert any("--unsafe" in warning for warning in safe["warnings"])
    assert unsafe["loaded"] is True
    assert unsafe["global_step"] == 300
    assert "unsafe_load_enabled" in unsafe_run.stderr


@pytest.mark.slow
def test_large_checkpoint_is_inspected_in_little_memory(tmp_path: Path) -> None:
    """A 1 GiB checkpoint: peak RSS of the child stays near that of importing torch, far below the file."""
    big = tmp_path / "big.ckpt"
    run_python(
        """
        import sys, torch
        torch.save({"state_dict": {f"w{i}": torch.zeros(64 * 1024 * 1024) for i in range(4)}}, sys.argv[1])
        """,
        str(big),
        check=True,
    )
    size = big.stat().st_size
    _, baseline_peak, _ = peak_resident_memory([sys.executable, "-c", "import torch, ckpt_watcher.contents"])
    code, peak, out = peak_resident_memory(cli_command("inspect", str(big), "--json"))

    assert code == 0
    assert json.loads(out)[0]["tensor_bytes"] == 4 * 64 * 1024 * 1024 * 4
    assert size > 1 << 30
    assert peak < 300 * 1024 * 1024
    assert peak - baseline_peak < size / 10
