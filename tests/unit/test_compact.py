"""What a daemon keeps per file between passes, packed (compact.py): the same answers after packing as
before it, for the verdict cache (scan.CompletenessCache.retain packs it) and what a group has seen;
and memory.release_memory, which must never fail where glibc is missing."""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ckpt_watcher import memory
from ckpt_watcher.compact import KeysPacking, PackedHashes, PackedKeys, PackedValues, ValuesPacking
from ckpt_watcher.integrity import COMPLETE, Completeness
from ckpt_watcher.policy import DEFAULT_POLICY
from ckpt_watcher.records import CheckpointRecord, FileIdentity
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


def test_entries_being_packed_come_back_in_the_order_appended() -> None:
    broken = Completeness(False, "truncated")
    keys = KeysPacking(32)
    for key, verdict in ((b"a" * 32, COMPLETE), (b"b" * 32, broken), (b"a" * 32, COMPLETE)):
        assert keys.append(key, verdict)
    assert len(keys) == 3
    assert [keys.key_at(index) for index in range(3)] == [b"a" * 32, b"b" * 32, b"a" * 32]
    assert list(keys.entries()) == [(b"a" * 32, COMPLETE), (b"b" * 32, broken), (b"a" * 32, COMPLETE)]
    assert not keys.append(b"short", COMPLETE)

    values = ValuesPacking(32)
    for hashed, value in ((1, b"x" * 32), (-(2**63), b"y" * 32), (1, b"z" * 32)):
        assert values.append(hashed, value)
    assert not values.append(2**64, b"x" * 32)
    assert not values.append(7, b"odd")
    assert [values.key_at(index) for index in range(3)] == [1, -(2**63), 1]
    assert list(values.entries()) == [(1, b"x" * 32), (-(2**63), b"y" * 32), (1, b"z" * 32)]
    assert PackedValues(values.entries(), width=32).unpacked() == {1: b"z" * 32, -(2**63): b"y" * 32}
    taken_over = PackedValues.of_packing(values)
    assert taken_over.unpacked() == {1: b"z" * 32, -(2**63): b"y" * 32}
    assert len(taken_over) == 3  # as PackedValues counts its packed entries (a key given twice, twice)


def _answers(cache: CompletenessCache, records: list[CheckpointRecord]) -> list[object]:
    """Everything the cache says about ``records``, through what a scan asks of it."""
    answers: list[object] = [len(cache), cache.is_empty()]
    for record in records:
        if record.identity is not None:
            answers.append(cache.get(record.identity, "zip"))
            answers.append(cache.counted_as(record.path_text, record.identity))
    return answers


def _group_of_every_sort(directory: Path, outside: Path) -> None:
    """Complete, broken, just written (counted, its verdict too new to store), a hard link, a link to
    a file outside the group (its verdict is looked up while the pass runs), a name that is no
    checkpoint."""
    whole = _backdate(write_checkpoint(directory / step_name(0, 100), payload=b"w" * 500))
    _backdate(write_truncated(directory / step_name(0, 200)))
    write_checkpoint(directory / step_name(0, 300))
    os.link(whole, directory / step_name(0, 400))
    (directory / "notes.txt").write_text("not a checkpoint")
    target = _backdate(write_checkpoint(outside / step_name(9, 900)))
    (directory / "last.ckpt").symlink_to(target)


@pytest.mark.parametrize("with_outside_link", [False, True])
def test_a_first_pass_packs_what_it_filled_as_the_dicts_would_have_kept_it(
    tmp_path: Path, with_outside_link: bool
) -> None:
    """A first pass appends what it stores (no dict) and ``retain`` packs that as it is: the cache then
    answers exactly as one that went through the dicts (here: one that held an unrelated entry, which
    ``retain`` drops). A lookup while the pass runs (the link's target) turns it into the dicts."""
    group, outside = tmp_path / "group", tmp_path / "outside"
    group.mkdir()
    outside.mkdir()
    _group_of_every_sort(group, outside)
    if not with_outside_link:
        (group / "last.ckpt").unlink()
    filled, through_dicts = CompletenessCache(), CompletenessCache()
    unrelated = FileIdentity(1, 2, 3, 4)
    through_dicts.store(unrelated, "zip", COMPLETE)
    assert through_dicts.get(unrelated, "zip") is COMPLETE  # a lookup: it holds dicts from here on

    # The clock a second after the just-written file's mtime (its verdict too new to store), however
    # long the test took to get here.
    options = dataclasses.replace(QUIET, now=(group / step_name(0, 300)).stat().st_mtime + 1.0)
    records = scan_directory(group, group, NAMING, options, filled)
    assert scan_directory(group, group, NAMING, options, through_dicts) == records
    filled.retain(records)
    through_dicts.retain(records)

    assert through_dicts.get(unrelated, "zip") is None
    assert _answers(filled, records) == _answers(through_dicts, records)
    assert len(filled) == 2  # the complete file (and its hard link: one identity), the broken one


@pytest.mark.parametrize("order", ["stray first", "stray last", "records reversed"])
def test_what_an_empty_cache_filled_but_a_retain_does_not_concern_is_dropped(
    tmp_path: Path, order: str
) -> None:
    """Entries filled into an empty cache out of the records' order, or about no record, are kept the
    general way: only what concerns the records."""
    for step in (100, 200, 300):
        _backdate(write_checkpoint(tmp_path / step_name(0, step)))
    records = scan_directory(tmp_path, tmp_path, NAMING, QUIET)
    stray = FileIdentity(1, 2, 3, 4)
    stored = [(record.identity, record.path_text) for record in records if record.identity is not None]
    if order == "records reversed":
        stored.reverse()
    else:
        stored.insert(0 if order == "stray first" else len(stored), (stray, "/elsewhere/x.ckpt"))
    cache = CompletenessCache()
    for identity, path in stored:
        cache.store(identity, "zip", COMPLETE)
        cache.counted(path, identity)

    cache.retain(records)

    assert cache.get(stray, "zip") is None
    assert not cache.counted_as("/elsewhere/x.ckpt", stray)
    for record in records:
        assert record.identity is not None
        assert cache.get(record.identity, "zip") is COMPLETE
        assert cache.counted_as(record.path_text, record.identity)
    assert len(cache) == 3


def test_a_first_pass_stopped_before_retain_is_recalled_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass stopped mid-scan never reaches ``retain``: what it filled is there for the next pass,
    which then reads nothing again."""
    for step in (100, 200, 300):
        _backdate(write_checkpoint(tmp_path / step_name(0, step)))
    cache = CompletenessCache()
    scan_directory(tmp_path, tmp_path, NAMING, QUIET, cache)  # no retain
    assert not cache.is_empty()
    opened = _record_opens(monkeypatch)
    again = _scan(tmp_path, cache)
    assert all(record.complete for record in again.values())
    assert not [path for path in opened if path.endswith(".ckpt")], "a filled verdict was not used"
    assert len(cache) == 3


def _scan(directory: Path, cache: CompletenessCache) -> dict[str, CheckpointRecord]:
    """One daemon pass over ``directory``: scan with the cache, then keep (pack) what concerns it."""
    records = scan_directory(directory, directory, NAMING, QUIET, cache)
    cache.retain(records)
    return {record.name: record for record in records}


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``os.open`` is given from now on (until the monkeypatch is undone)."""
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: Any, *arguments: Any, **keywords: Any) -> int:
        opened.append(os.fsdecode(path))
        return real_open(path, *arguments, **keywords)

    monkeypatch.setattr(os, "open", recording_open)
    return opened


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

    opened = _record_opens(monkeypatch)
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


@pytest.mark.parametrize("enabled_before", [True, False])
def test_no_cyclic_collection_inside_the_block_and_as_it_was_after(enabled_before: bool) -> None:
    """Off inside, also in a nested block and after an exception; as it was before once the outermost
    block is left (a test that had turned it off keeps it off)."""
    inside: list[bool] = []

    def failing_pass() -> None:
        with memory.no_cyclic_collection():
            inside.append(gc.isenabled())
            with memory.no_cyclic_collection():
                inside.append(gc.isenabled())
            inside.append(gc.isenabled())  # the inner block leaves it to the outermost
            raise RuntimeError("a pass that failed")

    if not enabled_before:
        gc.disable()
    try:
        with pytest.raises(RuntimeError, match="a pass that failed"):
            failing_pass()
        assert inside == [False, False, False]
        assert gc.isenabled() is enabled_before
    finally:
        gc.enable()
