"""The zip completeness check on in-memory files: every truncation is caught, every whole archive passes."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_watcher.integrity import Completeness, check_zip_file
from tests.support.factories import zip_bytes


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
