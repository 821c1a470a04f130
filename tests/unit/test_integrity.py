"""The zip completeness check on in-memory files: every truncation is caught, every whole archive passes;
holes, wrong bytes (``verify: crc``) and lying sizes are caught with bounded reads."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_watcher.integrity import (
    COMPLETE,
    Completeness,
    DescriptorSource,
    SeenUnchanged,
    TailWindowSource,
    check_handle,
    check_zip_archive,
    check_zip_file,
    check_zip_path,
)
from tests.support.factories import zip_bytes
from tests.support.hostile_trees import make_fifo, make_socket
from tests.support.quiet_clock import QuietClock


@contextmanager
def memory_file(data: bytes) -> Iterator[int]:
    """An anonymous in-memory file holding ``data`` (no disk involved)."""
    file_descriptor = os.memfd_create("checkpoint")
    try:
        os.write(file_descriptor, data)
        yield file_descriptor
    finally:
        os.close(file_descriptor)


def judge(data: bytes) -> Completeness:
    with memory_file(data) as file_descriptor:
        return check_zip_file(file_descriptor, len(data))


def archive(
    *, entries: int = 3, comment: bytes = b"", zip64: bool = False, payload: bytes = b"w" * 200
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as writer:
        for index in range(entries):
            with writer.open(f"archive/data/{index}", "w", force_zip64=zip64) as stream:
                stream.write(payload)
        writer.comment = comment
    return buffer.getvalue()


WHOLE: list[tuple[str, bytes]] = [
    ("torch-like", zip_bytes(b"weights", entries=4)),
    ("one entry", archive(entries=1)),
    ("with a comment", archive(comment=b"saved by a tool that comments")),
    ("zip64 records", archive(zip64=True)),
]


@pytest.mark.parametrize(("label", "data"), WHOLE)
def test_whole_archives_are_complete(label: str, data: bytes) -> None:
    assert judge(data).complete, label


@pytest.mark.parametrize(("label", "data"), WHOLE)
def test_every_truncation_is_incomplete(label: str, data: bytes) -> None:
    for length in range(1, len(data)):
        verdict = judge(data[:length])
        assert not verdict.complete, f"{label}: a {length}-byte prefix of {len(data)} passed"


@settings(max_examples=100, deadline=None)
@given(entries=st.integers(1, 20), payload=st.binary(max_size=300), cut=st.integers(1, 10_000))
def test_any_prefix_of_any_archive_is_incomplete(entries: int, payload: bytes, cut: int) -> None:
    data = archive(entries=entries, payload=payload)
    assert judge(data).complete
    assert not judge(data[: min(cut, len(data) - 1)]).complete


CASES: list[tuple[str, bytes, str]] = [
    ("empty file", b"", "empty: still being written"),
    ("legacy pickle", b"\x80\x02}q\x00.", "not a zip archive"),
    ("text", b"hello", "not a zip archive"),
    ("no entries: starts with its end record", archive(entries=0), "not a zip archive"),
]


@pytest.mark.parametrize(("label", "data", "reason"), CASES)
def test_what_is_not_a_whole_checkpoint(label: str, data: bytes, reason: str) -> None:
    verdict = judge(data)
    assert not verdict.complete, label
    assert verdict.reason is not None
    assert verdict.reason.startswith(reason), verdict.reason


def test_a_damaged_central_directory_is_caught() -> None:
    data = bytearray(archive(entries=3))
    header = bytes(data).rfind(b"PK\x01\x02")
    data[header : header + 4] = b"XX\x01\x02"
    verdict = judge(bytes(data))
    assert not verdict.complete
    assert verdict.reason is not None
    assert "no entry header" in verdict.reason


def test_the_not_zip_flag_marks_only_foreign_files() -> None:
    assert judge(b"\x80\x02legacy").not_zip
    assert not judge(zip_bytes()[:10]).not_zip


def test_the_test_archive_is_the_same_bytes_whatever_the_clock_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests compare an object with a checkpoint built again (a replaced object, a restored one):
    ``zip_bytes`` must not stamp the current time, or a second ticking over fails them."""
    first = zip_bytes(b"weights of step 7", entries=2)
    monkeypatch.setattr("time.time", lambda: 4_000_000_000.0)
    monkeypatch.setattr("time.localtime", lambda *_: (2096, 10, 2, 7, 6, 40, 1, 276, 0))
    assert zip_bytes(b"weights of step 7", entries=2) == first
    assert judge(first).complete


def general_verdict(data: bytes) -> Completeness:
    """The verdict of the general archive rules alone (no window fast path), on the same bytes."""
    with memory_file(data) as file_descriptor:
        source = TailWindowSource(DescriptorSource(file_descriptor), len(data))
        return check_zip_archive(source, len(data))


@settings(max_examples=300, deadline=None)
@given(
    entries=st.integers(0, 6),
    payload=st.binary(max_size=80),
    comment=st.sampled_from([b"", b"c", b"PK\x05\x06" + b"\x00" * 18]),
    zip64=st.booleans(),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 3),
    tail=st.sampled_from([b"", b"\x00", b"PK\x05\x06"]),
)
def test_the_window_fast_path_judges_as_the_general_rules(
    entries: int,
    payload: bytes,
    comment: bytes,
    zip64: bool,
    edits: list[tuple[int, int]],
    cut: int,
    tail: bytes,
) -> None:
    """Whole or spoiled (a byte changed anywhere, the end cut or added to), an archive gets the same
    verdict from ``check_zip_file`` (which judges the usual archive from one window) as from the
    general rules: the fast path only spares work, it never decides differently."""
    data = bytearray(archive(entries=entries, payload=payload, comment=comment, zip64=zip64))
    for offset, value in edits:
        data[offset % len(data)] = value
    spoiled = bytes(data[: len(data) - cut]) + tail
    assert judge(spoiled) == general_verdict(spoiled)


def test_the_window_fast_path_judges_each_byte_changed_as_the_general_rules() -> None:
    """Every single byte of a torch-like archive's central directory and end record, set to 0xFF:
    the same verdict either way (most of them say why it is not whole)."""
    data = zip_bytes(b"weights", entries=3)
    directory = data.find(b"PK\x01\x02")
    for offset in range(directory, len(data)):
        spoiled = data[:offset] + b"\xff" + data[offset + 1 :]
        assert judge(spoiled) == general_verdict(spoiled), offset


# -- sparse files, verify: crc, bounded reads -------------------------------------------------------


def big_archive(*, compression: int = zipfile.ZIP_STORED, payload: bytes | None = None) -> bytes:
    """Three 64 KiB members: big enough for a page-sized hole in the middle."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as writer:
        writer.writestr("archive/data.pkl", b"pickle" * 100)
        for index in range(3):
            writer.writestr(f"archive/data/{index}", payload if payload is not None else os.urandom(1 << 16))
    return buffer.getvalue()


@contextmanager
def sparse_memory_file(data: bytes, hole: tuple[int, int]) -> Iterator[int]:
    """``data`` with the page-aligned range ``hole`` never written (a hole, as a downloader leaves it)."""
    start, end = hole
    file_descriptor = os.memfd_create("checkpoint")
    try:
        os.ftruncate(file_descriptor, len(data))
        os.pwrite(file_descriptor, data[:start], 0)
        os.pwrite(file_descriptor, data[end:], end)
        yield file_descriptor
    finally:
        os.close(file_descriptor)


def judge_with(data: bytes, verify: str) -> Completeness:
    with memory_file(data) as file_descriptor:
        return check_zip_file(file_descriptor, len(data), verify=verify)


def test_a_file_with_a_hole_before_its_end_is_not_complete() -> None:
    """Pre-sized and written in parallel ranges, tail first: the end record is there, the middle is not."""
    data = big_archive()
    with sparse_memory_file(data, (8192, 8192 * 8)) as file_descriptor:
        verdict = check_zip_file(file_descriptor, len(data))
    assert not verdict.complete
    assert verdict.reason is not None
    assert verdict.reason.startswith("sparse"), verdict.reason


def test_the_window_fast_path_reads_a_big_archives_head_apart() -> None:
    """An archive longer than the tail window: its head is read on its own, judged as the general
    rules judge it (whole, and with its first byte changed)."""
    data = big_archive()
    assert len(data) > 1 << 16
    assert judge(data) == general_verdict(data) == Completeness(True)
    spoiled = b"X" + data[1:]
    assert judge(spoiled) == general_verdict(spoiled)
    assert judge(spoiled).not_zip


@pytest.mark.parametrize(
    ("label", "data"), [*WHOLE, ("deflated", big_archive(compression=zipfile.ZIP_DEFLATED))]
)
def test_verify_crc_accepts_every_whole_archive(label: str, data: bytes) -> None:
    assert judge_with(data, "crc").complete, label


def test_verify_crc_finds_a_presized_file_whose_middle_is_still_zeros() -> None:
    data = bytearray(big_archive())
    data[8192 : 8192 * 8] = bytes(8192 * 7)  # written as zeros, not a hole: only the CRCs tell
    assert judge_with(bytes(data), "zip").complete
    verdict = judge_with(bytes(data), "crc")
    assert not verdict.complete
    assert verdict.reason is not None
    assert "CRC" in verdict.reason, verdict.reason


def test_verify_crc_accepts_holes_whose_bytes_are_right() -> None:
    """A hole reads as zeros: where the data really is zeros, every CRC still matches."""
    data = big_archive(payload=bytes(1 << 16))
    with sparse_memory_file(data, (8192, 8192 * 4)) as file_descriptor:
        assert not check_zip_file(file_descriptor, len(data)).complete
        assert check_zip_file(file_descriptor, len(data), verify="crc").complete


def test_verify_crc_stops_a_member_that_inflates_past_its_declared_size() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as writer:
        writer.writestr("archive/data.pkl", bytes(16 << 20))
    data = bytearray(buffer.getvalue())
    for header, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size: 16 MiB -> 100
        position = bytes(data).find(header)
        data[position + offset : position + offset + 4] = (100).to_bytes(4, "little")
    verdict = judge_with(bytes(data), "crc")
    assert not verdict.complete
    assert verdict.reason is not None
    assert "inflates" in verdict.reason, verdict.reason


def claims_a_huge_central_directory(size: int, directory_size: int) -> bytes:
    """The last bytes of a file whose end record claims ``directory_size`` bytes of central directory."""
    end_offset = size - 22
    record = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, directory_size, end_offset - directory_size, 0
    )
    return record


def test_a_huge_claimed_central_directory_is_read_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    size = (1 << 30) + (1 << 20)
    requested: list[int] = []
    real_pread = os.pread

    def recording_pread(file_descriptor: int, length: int, offset: int) -> bytes:
        requested.append(length)
        if length > 16 << 20:
            return b""  # what the old code asked for: a whole GiB at once (not allocated here)
        return real_pread(file_descriptor, length, offset)

    monkeypatch.setattr(os, "pread", recording_pread)
    file_descriptor = os.memfd_create("bomb")
    try:
        os.ftruncate(file_descriptor, size)
        os.pwrite(file_descriptor, b"PK\x03\x04", 0)
        os.pwrite(file_descriptor, claims_a_huge_central_directory(size, (1 << 30) - 1), size - 22)
        for verify in ("zip", "crc"):
            verdict = check_zip_file(file_descriptor, size, verify=verify)
            assert not verdict.complete, verify
    finally:
        os.close(file_descriptor)
    assert max(requested) <= 1 << 20, max(requested)


@pytest.mark.timeout(20)
def test_nothing_but_a_regular_file_is_ever_opened(tmp_path: Path) -> None:
    """A FIFO (no writer: opening it for reading would block forever), a symlink to one, a socket."""
    fifo = make_fifo(tmp_path / "pipe")
    os.symlink(fifo, tmp_path / "link-to-pipe")
    make_socket(tmp_path / "socket")
    os.symlink("/dev/zero", tmp_path / "link-to-zero")
    for name in ("pipe", "link-to-pipe", "socket", "link-to-zero"):
        for follow in (False, True):
            verdict = check_zip_path(str(tmp_path / name), follow_symlinks=follow)
            assert not verdict.complete, name
            assert verdict.reason is not None


def _without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a system without /proc: re-opening a handle through /proc/self/fd fails."""
    real_open = os.open

    def no_proc(path: str, flags: int, *arguments: object, **options: object) -> int:
        if str(path).startswith("/proc/self/fd/"):
            raise FileNotFoundError(2, "no /proc", path)
        return real_open(path, flags, *arguments, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_proc)


@pytest.mark.parametrize("replaced", [False, True])
def test_a_handle_judged_by_name_without_proc_is_the_file_it_holds_or_no_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replaced: bool
) -> None:
    """Without /proc the handle's file is opened by its name again: if another file is there now, the
    verdict is transient (about neither file, never cached), never the other file's."""
    (tmp_path / "a.ckpt").write_bytes(zip_bytes(b"weights"))
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    handle = os.open("a.ckpt", os.O_PATH | os.O_NOFOLLOW, dir_fd=directory)
    try:
        status = os.fstat(handle)
        if replaced:
            (tmp_path / "b.ckpt").write_bytes(zip_bytes(b"other weights"))
            (tmp_path / "b.ckpt").replace(tmp_path / "a.ckpt")
        _without_proc(monkeypatch)
        verdict = check_handle(handle, status, "a.ckpt", dir_fd=directory, process_descriptors=None)
    finally:
        os.close(handle)
        os.close(directory)
    if replaced:
        assert not verdict.complete
        assert verdict.transient
    else:
        assert verdict.complete


# --- a directory checkpoint seen unchanged by the watcher's own clock (SeenUnchanged) ---------------

_SIGNATURE = (2, 10, 7)
_NOT_WHOLE = Completeness(False, "no `latest` file yet")


@pytest.mark.parametrize(
    ("looks", "expected"),
    [
        # (seconds on the watcher's clock since the first look, the signature then) per look
        ([(0, (2, 10, 7))], [False]),
        ([(0, (2, 10, 7)), (29.9, (2, 10, 7))], [False, False]),
        ([(0, (2, 10, 7)), (30, (2, 10, 7)), (31, (2, 10, 7))], [False, True, True]),
        (
            [(0, (2, 10, 7)), (20, (3, 10, 7)), (40, (3, 10, 7)), (50, (3, 10, 7))],
            [False, False, False, True],
        ),
        ([(0, (2, 10, 7)), (20, (2, 11, 7)), (50, (2, 11, 7))], [False, False, True]),
        ([(0, (2, 10, 7)), (20, (2, 10, 8)), (49, (2, 10, 8))], [False, False, False]),
    ],
    ids=["first-look", "not-yet", "quiet", "an-entry-came", "a-file-grew", "a-time-moved"],
)
def test_a_directory_counts_once_seen_unchanged_for_the_quiet_time(
    quiet_clock: QuietClock, looks: list[tuple[float, tuple[int, int, int]]], expected: list[bool]
) -> None:
    """Its files' times said quiet each time; only this process's clock decides."""
    seen = SeenUnchanged()
    start = quiet_clock.now
    answers = []
    for at, signature in looks:
        quiet_clock.now = start + at
        judged = seen.judge("ckpt", signature, COMPLETE, quiet_seconds=30, now=1e9)
        answers.append(judged.complete)
        if not judged.complete:
            assert judged.transient
            assert judged.settles_at is not None
            assert 1e9 < judged.settles_at <= 1e9 + 30
    assert answers == expected


def test_a_verdict_not_whole_or_never_walked_is_left_as_it_is(quiet_clock: QuietClock) -> None:
    seen = SeenUnchanged()
    assert seen.judge("a", _SIGNATURE, _NOT_WHOLE, quiet_seconds=30, now=0) is _NOT_WHOLE
    assert seen.judge("b", None, COMPLETE, quiet_seconds=30, now=0) is COMPLETE
    quiet_clock.now += 30
    assert seen.judge("a", _SIGNATURE, COMPLETE, quiet_seconds=30, now=0) is COMPLETE  # seen since the first


def test_what_a_scan_no_longer_sees_is_forgotten(quiet_clock: QuietClock) -> None:
    seen = SeenUnchanged()
    seen.judge("a", _SIGNATURE, COMPLETE, quiet_seconds=30, now=0)
    seen.retain(["b"])
    quiet_clock.now += 30
    assert not seen.judge("a", _SIGNATURE, COMPLETE, quiet_seconds=30, now=0).complete  # a first look again
