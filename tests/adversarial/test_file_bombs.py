"""Files built to exhaust memory or CPU: every read is bounded whatever a file claims (run under
RLIMIT_AS in a subprocess, with a timeout)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from tests.support.cli import assert_clean_exit, prune_entries, run_cli
from tests.support.factories import backdate_tree, step_name, write_checkpoint

pytestmark = pytest.mark.timeout(300)

MEMORY = 256 << 20  # the sidecar's limit in deploy/
GIB = 1 << 30


def policy(tmp_path: Path, verify: str) -> Path:
    path = tmp_path / f"{verify}.yaml"
    path.write_text(f"save_top_k_checkpoints: 2\nverify: {verify}\n")
    return path


def sparse_central_directory_bomb(path: Path, claimed: int = GIB - 1) -> Path:
    """A 1.5 GiB sparse file: a zip local header, then nothing, then an end record claiming
    ``claimed`` bytes of central directory (all zeros, never written)."""
    size = GIB + GIB // 2
    end_offset = size - 22
    record = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, claimed, end_offset - claimed, 0)
    with path.open("wb") as stream:
        stream.write(b"PK\x03\x04")
        stream.truncate(size)
        stream.seek(end_offset)
        stream.write(record)
    return path


@pytest.mark.parametrize("verify", ["zip", "crc"])
def test_a_sparse_file_claiming_a_huge_central_directory_is_judged_in_bounded_memory(
    tmp_path: Path, verify: str
) -> None:
    root = tmp_path / "run"
    for step in (100, 200):
        write_checkpoint(root / step_name(0, step))
    bomb = sparse_central_directory_bomb(root / step_name(0, 300))

    completed = run_cli(
        "prune", str(root), "--policy", str(policy(tmp_path, verify)), "--json", memory=MEMORY
    )

    assert_clean_exit(completed, allowed=(0,))
    entries = prune_entries(completed)
    assert entries[bomb.name]["action"] == "skip"
    assert entries[step_name(0, 100)]["action"] == "keep"  # the bomb pushed nothing out
    assert bomb.exists()


def deflate_bomb(path: Path, inflated: int, declared: int | None = None) -> Path:
    """A checkpoint-named zip whose one member inflates to ``inflated`` bytes of zeros (stored
    compressed in a few hundred KiB); ``declared`` is the size its headers claim."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    compressed = bytearray()
    crc = 0
    for _ in range(inflated >> 20):
        compressed += compressor.compress(chunk)
        crc = zlib.crc32(chunk, crc)
    compressed += compressor.flush()
    size = inflated if declared is None else declared
    name = b"archive/data.pkl"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(compressed), size, len(name), 0)
    central = struct.pack(
        "<4s6H3L5H2L",
        b"PK\x01\x02",
        20,
        20,
        0,
        8,
        0,
        0,
        crc,
        len(compressed),
        size,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    directory_offset = len(local) + len(name) + len(compressed)
    directory_size = len(central) + len(name)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, directory_size, directory_offset, 0)
    path.write_bytes(local + name + bytes(compressed) + central + name + end)
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:  # a well-formed archive
        assert archive.infolist()[0].file_size == size
    return path


def test_verify_crc_inflates_a_deflate_bomb_in_bounded_memory(tmp_path: Path) -> None:
    root = tmp_path / "run"
    write_checkpoint(root / step_name(0, 100))
    honest = deflate_bomb(root / step_name(0, 200), inflated=512 << 20)
    lying = deflate_bomb(root / step_name(0, 300), inflated=512 << 20, declared=1000)

    completed = run_cli(
        "prune", str(root), "--policy", str(policy(tmp_path, "crc")), "--json", "--dry-run", memory=MEMORY
    )

    assert_clean_exit(completed, allowed=(0,))
    entries = prune_entries(completed)
    assert entries[honest.name]["action"] == "keep"  # 512 MiB inflated 1 MiB at a time, CRC right
    assert entries[lying.name]["action"] == "skip"
    assert "inflates past" in str(entries[lying.name]["reasons"])


def test_a_trainer_state_json_at_its_size_limit_is_read_within_the_sidecars_memory(tmp_path: Path) -> None:
    """A long Hugging Face run logging every step writes a trainer_state.json of tens of MB (one
    log_history object per step). Read whole at every pass (is it whole JSON? which checkpoint is the
    best?), parsed into dicts and floats it took ~4x its size: at the 64 MiB limit, more than the
    sidecar's 256 MiB. Under that limit the checkpoints count and the best is kept."""
    root = tmp_path / "output"
    fields = ('"epoch": 0.001', '"grad_norm": 0.5', '"learning_rate": 1e-05', '"loss": 2.5', '"step": 1')
    entry = "    {\n" + ",\n".join(f"      {field}" for field in fields) + "\n    }"  # as the Trainer indents
    entries = ",\n".join([entry] * ((60 << 20) // (len(entry) + 2)))
    for step, best in ((500, None), (1000, "checkpoint-500"), (1500, "checkpoint-500")):
        checkpoint = root / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(b"x" * 100)
        named = f'"{root}/{best}"' if best else "null"
        (checkpoint / "trainer_state.json").write_text(
            f'{{\n  "best_model_checkpoint": {named},\n  "global_step": {step},\n'
            f'  "log_history": [\n{entries}\n  ]\n}}\n'
        )
    backdate_tree(root)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")

    result = run_cli("prune", str(root), "--policy", str(policy), "--json", "--dry-run", memory=MEMORY)

    assert_clean_exit(result, (0,))
    entries_by_name = prune_entries(result)
    assert {name: entry["action"] for name, entry in entries_by_name.items()} == {
        "checkpoint-500": "keep",
        "checkpoint-1000": "delete",
        "checkpoint-1500": "keep",
    }
    assert entries_by_name["checkpoint-500"]["reasons"] == [
        "best_model_checkpoint in checkpoint-1500/trainer_state.json (Hugging Face)"
    ]
