"""A long-lived scan reads each Hugging Face checkpoint's trainer_state.json once per version of it
(tens of MB in a long run, seconds to parse at every pass), and forgets the checkpoints it no longer
sees; a one-shot scan reads it every time, as before."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ckpt_watcher import integrity
from ckpt_watcher.naming import Naming
from ckpt_watcher.records import CheckpointRecord
from ckpt_watcher.scan import CompletenessCache, ScanOptions, scan_directory

pytestmark = pytest.mark.timeout(60)

HUGGING_FACE = Naming.from_templates(step="checkpoint-{step}")
STATE = "trainer_state.json"


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    with capture_logs():
        yield


def write_state(directory: Path, best: str | None) -> None:
    """trainer_state.json as the Trainer writes it (``best`` a path), then aged an hour."""
    state = {"global_step": 1, "best_model_checkpoint": best and f"/mount/output/{best}"}
    (directory / STATE).write_text(json.dumps(state, indent=2) + "\n")
    an_hour_ago = time.time() - 3600
    for path in (directory / STATE, directory / "model.safetensors"):
        os.utime(path, (an_hour_ago, an_hour_ago))


def hugging_face_checkpoint(directory: Path, best: str | None = None) -> Path:
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"x" * 100)
    write_state(directory, best)
    return directory


def later() -> ScanOptions:
    """A scan a minute from now: the files just made are past the racy window (their ctime is now)."""
    return ScanOptions(directory_quiet_seconds=0.0, now=time.time() + 60)


class ReadCounter:
    """How many times a trainer_state.json was read (integrity._read_up_to, its only reader)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = integrity._read_up_to

        def counting(file_descriptor: int, size: int) -> bytes:
            self.count += 1
            return real(file_descriptor, size)

        monkeypatch.setattr(integrity, "_read_up_to", counting)


def a_pass(group: Path, cache: CompletenessCache | None, options: ScanOptions) -> dict[str, CheckpointRecord]:
    """One scan of ``group``, remembered as the reconciler remembers it between passes (``retain``)."""
    records = scan_directory(group, group, HUGGING_FACE, options, cache)
    if cache is not None:
        cache.retain(records)
    return {record.name: record for record in records}


def test_an_unchanged_trainer_state_is_read_once_by_a_long_lived_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hugging_face_checkpoint(tmp_path / "checkpoint-500")
    hugging_face_checkpoint(tmp_path / "checkpoint-1000", best="checkpoint-500")
    reads = ReadCounter(monkeypatch)
    cache = CompletenessCache()
    options = later()

    for _ in range(3):
        records = a_pass(tmp_path, cache, options)
        assert records["checkpoint-1000"].complete
        assert records["checkpoint-1000"].names_best == "checkpoint-500"
        assert records["checkpoint-500"].complete
    assert reads.count == 2  # each file once, at the first pass

    for _ in range(2):  # prune: nothing remembered, read at every scan as before
        assert a_pass(tmp_path, None, options)["checkpoint-1000"].names_best == "checkpoint-500"
    assert reads.count == 6


def test_a_trainer_state_rewritten_with_its_mtime_restored_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, same mtime (restored with utime): its ctime tells it changed; the new best counts."""
    directory = hugging_face_checkpoint(tmp_path / "checkpoint-1000", best="checkpoint-500")
    reads = ReadCounter(monkeypatch)
    cache = CompletenessCache()
    assert a_pass(tmp_path, cache, later())["checkpoint-1000"].names_best == "checkpoint-500"
    before = os.stat(directory / STATE)

    write_state(directory, best="checkpoint-700")
    os.utime(directory / STATE, ns=(before.st_atime_ns, before.st_mtime_ns))
    while os.stat(directory / STATE).st_ctime_ns == before.st_ctime_ns:  # (a coarse clock's same tick)
        time.sleep(0.01)
        os.utime(directory / STATE, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(directory / STATE)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )

    assert a_pass(tmp_path, cache, later())["checkpoint-1000"].names_best == "checkpoint-700"
    assert a_pass(tmp_path, cache, later())["checkpoint-1000"].names_best == "checkpoint-700"
    assert reads.count == 2


def test_a_trainer_state_replaced_by_rename_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = hugging_face_checkpoint(tmp_path / "checkpoint-1000", best="checkpoint-500")
    reads = ReadCounter(monkeypatch)
    cache = CompletenessCache()
    assert a_pass(tmp_path, cache, later())["checkpoint-1000"].names_best == "checkpoint-500"

    (directory / "new").mkdir()
    hugging_face_checkpoint(directory / "new" / "checkpoint-1000", best="checkpoint-700")
    os.replace(directory / "new" / "checkpoint-1000" / STATE, directory / STATE)
    shutil.rmtree(directory / "new")

    assert a_pass(tmp_path, cache, later())["checkpoint-1000"].names_best == "checkpoint-700"
    assert reads.count == 2


def test_a_truncated_trainer_state_is_incomplete_until_it_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = hugging_face_checkpoint(tmp_path / "checkpoint-1000", best="checkpoint-500")
    whole = (directory / STATE).read_bytes()
    (directory / STATE).write_bytes(whole[: len(whole) // 2])  # killed mid-write
    reads = ReadCounter(monkeypatch)
    cache = CompletenessCache()

    for _ in range(2):
        record = a_pass(tmp_path, cache, later())["checkpoint-1000"]
        assert not record.complete
        assert "not whole JSON: truncated" in (record.incomplete_reason or "")
        assert record.names_best is None
    assert reads.count == 1  # a definitive verdict on this very file: remembered

    (directory / STATE).write_bytes(whole)  # saved again, whole
    record = a_pass(tmp_path, cache, later())["checkpoint-1000"]
    assert record.complete
    assert record.names_best == "checkpoint-500"
    assert reads.count == 2


def test_a_trainer_state_that_cannot_be_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hugging_face_checkpoint(tmp_path / "checkpoint-1000", best="checkpoint-500")
    real = integrity._read_up_to
    reads: list[int] = []

    def failing_once(file_descriptor: int, size: int) -> bytes:
        reads.append(size)
        if len(reads) == 1:
            raise OSError(5, "Input/output error")
        return real(file_descriptor, size)

    monkeypatch.setattr(integrity, "_read_up_to", failing_once)
    cache = CompletenessCache()

    first = a_pass(tmp_path, cache, later())["checkpoint-1000"]
    assert not first.complete
    assert "cannot be read" in (first.incomplete_reason or "")
    second = a_pass(tmp_path, cache, later())["checkpoint-1000"]
    assert second.complete
    assert second.names_best == "checkpoint-500"
    assert len(reads) == 2


def test_a_trainer_state_changed_within_the_racy_window_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its ctime is now: a write in the same clock tick could leave its identity unchanged."""
    hugging_face_checkpoint(tmp_path / "checkpoint-1000", best="checkpoint-500")
    reads = ReadCounter(monkeypatch)
    cache = CompletenessCache()
    options = ScanOptions(directory_quiet_seconds=0.0, now=time.time())

    for _ in range(2):
        assert a_pass(tmp_path, cache, options)["checkpoint-1000"].names_best == "checkpoint-500"
    assert reads.count == 2


def test_a_vanished_checkpoint_leaves_the_trainer_state_cache(tmp_path: Path) -> None:
    for step in (500, 1000, 1500):
        hugging_face_checkpoint(tmp_path / f"checkpoint-{step}")
    cache = CompletenessCache()
    a_pass(tmp_path, cache, later())
    known = cache.trainer_states()
    assert len(known) == 3

    shutil.rmtree(tmp_path / "checkpoint-500")
    shutil.rmtree(tmp_path / "checkpoint-1000")
    a_pass(tmp_path, cache, later())

    assert len(known) == 1
    assert "checkpoint-1500" in known
    assert "checkpoint-500" not in known
