"""Checkpoints that look whole but are not: still being downloaded (pre-sized, filled out of order,
with a tool's marker beside them), with wrong bytes, or not files at all. None of them may count, so
none may push a complete checkpoint out; none may hang a scan."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from tests.support.cli import assert_clean_exit, prune_entries, run_cli
from tests.support.factories import step_name, write_checkpoint
from tests.support.hostile_trees import make_device, make_fifo, make_socket

pytestmark = pytest.mark.timeout(120)

PAGE = 4096


def torch_like_archive() -> bytes:
    """A stored archive laid out like torch.save's, with 1 MiB of tensor data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02pickle" * 50)
        for index in range(4):
            archive.writestr(f"archive/data/{index}", os.urandom(256 << 10))
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


def tail_first(path: Path, data: bytes, *, preallocate: bool = False, zeros: bool = False) -> Path:
    """What a parallel downloader leaves half-way: the file has its final size, its head and its tail
    (end record and central directory included) are written, the middle is not yet.

    ``preallocate``: the space is reserved with fallocate first (aria2's default); ``zeros``: the
    middle is written as zeros (a tool that fills the file before downloading into it).
    """
    middle = (PAGE * 4, len(data) - PAGE * 16)
    file_descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if preallocate:
            os.posix_fallocate(file_descriptor, 0, len(data))
        else:
            os.ftruncate(file_descriptor, len(data))
        if zeros:
            os.pwrite(file_descriptor, bytes(middle[1] - middle[0]), middle[0])
        os.pwrite(file_descriptor, data[middle[1] :], middle[1])
        os.pwrite(file_descriptor, data[: middle[0]], 0)
    finally:
        os.close(file_descriptor)
    return path


def policy(tmp_path: Path, verify: str = "zip") -> str:
    path = tmp_path / f"policy-{verify}.yaml"
    path.write_text(f"save_top_k_checkpoints: 2\nverify: {verify}\n")
    return str(path)


def two_complete(root: Path) -> None:
    for step in (100, 200):
        write_checkpoint(root / step_name(0, step))


@pytest.mark.parametrize("preallocate", [False, True], ids=["sparse", "fallocate"])
def test_a_presized_download_filled_tail_first_pushes_nothing_out(tmp_path: Path, preallocate: bool) -> None:
    root = tmp_path / "run"
    two_complete(root)
    downloading = tail_first(root / step_name(0, 300), torch_like_archive(), preallocate=preallocate)

    completed = run_cli("prune", str(root), "--policy", policy(tmp_path), "--json")

    assert_clean_exit(completed, allowed=(0,))
    entries = prune_entries(completed)
    assert entries[downloading.name]["action"] == "skip"
    assert "sparse" in str(entries[downloading.name]["reasons"])
    assert (root / step_name(0, 100)).exists()


def test_verify_crc_catches_a_download_whose_missing_middle_is_written_as_zeros(tmp_path: Path) -> None:
    """No holes and a whole zip structure: only the member CRCs can tell (verify: crc)."""
    root = tmp_path / "run"
    two_complete(root)
    downloading = tail_first(root / step_name(0, 300), torch_like_archive(), zeros=True)

    by_zip = prune_entries(run_cli("prune", str(root), "--policy", policy(tmp_path), "--json", "--dry-run"))
    completed = run_cli("prune", str(root), "--policy", policy(tmp_path, "crc"), "--json")

    assert by_zip[downloading.name]["action"] == "keep"  # what `zip` cannot know (README)
    assert_clean_exit(completed, allowed=(0,))
    entries = prune_entries(completed)
    assert entries[downloading.name]["action"] == "skip"
    assert "CRC" in str(entries[downloading.name]["reasons"])
    assert (root / step_name(0, 100)).exists()


@pytest.mark.parametrize(
    "suffix", [".aria2", ".part", ".incomplete", ".crdownload", ".st", ".lftp-pget-status"]
)
def test_a_download_tools_marker_keeps_a_file_from_counting(tmp_path: Path, suffix: str) -> None:
    root = tmp_path / "run"
    two_complete(root)
    downloading = write_checkpoint(root / step_name(0, 300))  # looks whole: its marker says otherwise
    (root / f"{downloading.name}{suffix}").write_bytes(b"\x00\x01download state")

    completed = run_cli("prune", str(root), "--policy", policy(tmp_path), "--json")

    assert_clean_exit(completed, allowed=(0,))
    assert prune_entries(completed)[downloading.name]["action"] == "skip"
    assert (root / step_name(0, 100)).exists()


@pytest.mark.parametrize("verify", ["zip", "crc", "load"])
def test_pipes_sockets_devices_and_links_to_them_never_hang_prune(tmp_path: Path, verify: str) -> None:
    root = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    two_complete(root)
    make_fifo(root / step_name(0, 300))
    make_socket(root / step_name(0, 400))
    make_device(root / step_name(0, 500))
    os.symlink(make_fifo(outside / "pipe"), root / step_name(0, 600))
    os.symlink(outside / "pipe", root / "last.ckpt")
    os.symlink("/dev/zero", root / "last-v1.ckpt")
    os.symlink("/", root / "last-v2.ckpt")

    completed = run_cli("prune", str(root), "--policy", policy(tmp_path, verify), "--json", timeout=60)

    assert_clean_exit(completed, allowed=(0,))
    entries = prune_entries(completed)
    if verify != "load":  # (these stand-ins are zips, not torch.save files: `load` finds them corrupt)
        assert entries[step_name(0, 100)]["action"] == "keep"
        assert entries[step_name(0, 200)]["action"] == "keep"
    assert all(entry["action"] in {"keep", "skip"} for entry in entries.values())
    assert "not usable" in str(entries["last.ckpt"]["reasons"])
