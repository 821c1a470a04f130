"""What a daemon keeps per file between passes, packed (compact.py): the same answers after packing as
before it, for the verdict cache (scan.CompletenessCache.retain packs it) and what a group has seen;
and memory.release_memory, which must never fail where glibc is missing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ckpt_watcher import memory
from ckpt_watcher.compact import PackedHashes, PackedKeys, PackedValues
from ckpt_watcher.integrity import COMPLETE, Completeness
from ckpt_watcher.policy import DEFAULT_POLICY
from ckpt_watcher.records import CheckpointRecord
from ckpt_watcher.scan import CompletenessCache, ScanOptions, scan_directory
from tests.support.factories import step_name, write_checkpoint, write_truncated

NAMING = DEFAULT_POLICY.compiled_naming
QUIET = ScanOptions(directory_quiet_seconds=0.0)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    with capture_logs():
        yield


def test_packed_hashes_hold_any_64_bit_hash() -> None:
    values = {0, -1, 2**63 - 1, -(2**63), hash("a name"), hash(("x", True))}
    assert PackedHashes(values).unpacked() == values
    assert len(PackedHashes(values)) == len(values)
    assert PackedHashes().unpacked() == set()


def test_packed_keys_keep_the_common_value_packed_and_every_other_entry_as_it_was() -> None:
    broken = Completeness(False, "truncated")
    entries: dict[bytes, Any] = {
        b"a" * 32: COMPLETE,
        b"b" * 32: broken,
        b"short": COMPLETE,
        b"c" * 32: COMPLETE,
    }
    packed = PackedKeys(entries.items(), width=32, common=COMPLETE)
    assert packed.unpacked() == entries
    assert packed.unpacked()[b"b" * 32] is broken
    assert len(packed) == 4


def test_packed_values_keep_every_entry() -> None:
    entries = {1: b"x" * 32, -(2**63): b"y" * 32, 2**64: b"z" * 32, 5: b"odd"}
    packed = PackedValues(entries.items(), width=32)
    assert packed.unpacked() == entries
    assert len(packed) == 4


def _scan(directory: Path, cache: CompletenessCache) -> dict[str, CheckpointRecord]:
    """One daemon pass over ``directory``: scan with the cache, then keep (pack) what concerns it."""
    records = scan_directory(directory, directory, NAMING, QUIET, cache)
    cache.retain(records)
    return {record.name: record for record in records}


def _backdate(path: Path) -> Path:
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    return path


def test_a_packed_cache_answers_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Complete and incomplete verdicts survive packing (no file is read again), a checkpoint that
    changed after it counted is still noticed, and what is no longer there is forgotten."""
    whole = _backdate(write_checkpoint(tmp_path / step_name(0, 100), payload=b"w" * 500))
    broken = _backdate(write_truncated(tmp_path / step_name(0, 200)))
    gone = _backdate(write_checkpoint(tmp_path / step_name(0, 300)))
    cache = CompletenessCache()
    first = _scan(tmp_path, cache)
    assert first[whole.name].complete
    assert not first[broken.name].complete
    assert len(cache) == 3

    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, *arguments: Any, **keywords: Any) -> int:
        opened.append(os.fsdecode(path))
        return real_open(path, *arguments, **keywords)

    monkeypatch.setattr(os, "open", counting_open)
    second = _scan(tmp_path, cache)
    assert not [path for path in opened if path.endswith(".ckpt")], "a packed verdict was not used"
    assert second[whole.name].complete
    assert second[broken.name].incomplete_reason == first[broken.name].incomplete_reason
    monkeypatch.undo()

    gone.unlink()
    _scan(tmp_path, cache)
    assert len(cache) == 2

    size = whole.stat().st_size
    with whole.open("r+b") as stream:  # rewritten in place, half of it for now
        stream.truncate(size // 2)
    with capture_logs() as logs:
        third = _scan(tmp_path, cache)
    assert not third[whole.name].complete
    changed = [record for record in logs if record["event"] == "checkpoint_changed"]
    assert [(record["old_bytes"], record["new_bytes"]) for record in changed] == [(size, size // 2)]


def test_release_memory_works_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    memory.release_memory()  # glibc here (Linux): malloc_trim is called
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    memory.release_memory()
    assert not memory.release_after(memory.LARGE_PASS_FILES - 1)
    assert memory.release_after(memory.LARGE_PASS_FILES)
