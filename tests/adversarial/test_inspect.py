"""``inspect`` and ``verify: load`` on hostile checkpoints: every file its row, in bounded time and memory.

Each case is a real process with a timeout; the memory cases run under ``RLIMIT_AS`` set just above
what inspecting a normal checkpoint needs (torch's import alone takes hundreds of MiB of address
space, so the limit is the measured baseline plus a margin).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher import contents
from ckpt_watcher.contents import CheckpointContents
from ckpt_watcher.naming import DEFAULT_NAMING
from tests.support.cli import STRICT_UTF8, log_records, peak_address_space, run_cli, run_python
from tests.support.factories import step_name, zip_bytes
from tests.support.hostile import deflate_bomb, replace_pickle, strings_in

pytestmark = pytest.mark.timeout(300)

MEMORY_MARGIN = 256 * 1024 * 1024
_BOMB_REFUSED = (
    "refused: archive member 'good/data.pkl' is compressed (deflate)"  # torch names it for the file
)
BOMB_EXPANDED_BYTES = 768 * 1024 * 1024  # ~750 KiB on disk

# One snippet writes every hostile but loadable checkpoint (torch is imported once).
_WRITE_HOSTILE = """
import math, sys, torch
from pathlib import Path
directory = Path(sys.argv[1])
key = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}"
def document(step, **state):
    callback = {"monitor": "val_loss", "best_model_score": torch.tensor(0.5),
                "best_model_path": "/runs/a.ckpt", "best_k_models": {"/runs/a.ckpt": torch.tensor(0.5)}}
    callback.update(state)
    return {"epoch": 0, "global_step": step, "state_dict": {"w": torch.zeros(3)},
            "optimizer_states": [{"state": {}}], "pytorch-lightning_version": "2.6.6",
            "callbacks": {key: callback}}
def save(name, value):
    torch.save(value, directory / name)
save("inf-score.ckpt", document(1, best_model_score=torch.tensor(math.inf)))
save("nan-score.ckpt", document(2, best_model_score=torch.tensor(math.nan),
                                 best_k_models={"/runs/a.ckpt": torch.tensor(-math.inf)}))
save("float-inf-score.ckpt", document(3, best_model_score=math.inf))
save("best-k-list.ckpt", document(4, best_k_models=["/runs/a.ckpt"]))
save("best-k-tensor.ckpt", document(5, best_k_models=torch.zeros(2)))
save("sparse.ckpt", {**document(6), "extra": torch.zeros(4, 4).to_sparse(),
                     "csr": torch.eye(3).to_sparse_csr()})
save("tensor-monitor.ckpt", document(7, monitor=torch.tensor([1.0, 2.0])))
save("tensor-path.ckpt", document(8, best_model_path=torch.tensor([1.0, 2.0])))
save("tensor-score.ckpt", document(9, best_model_score=torch.ones(2, 3)))
save("tensor-fields.ckpt", {**document(10), "epoch": torch.tensor([1, 2]), "global_step": "ten",
                            "optimizer_states": torch.zeros(3), "pytorch-lightning_version": torch.zeros(1)})
save("complex-score.ckpt", document(11, best_model_score=torch.tensor(1 + 2j)))
save("callback-list.ckpt", {**document(12), "callbacks": {key: [1, 2]}})
save("not-a-dict.ckpt", [torch.zeros(2), {"a": 1}])
shared = [torch.zeros(1)]
for _ in range(64):
    shared = [shared, shared]  # 2**64 paths through 65 lists
save("shared-references.ckpt", {**document(13), "tree": shared})
"""

_CASES = [
    "inf-score.ckpt",
    "nan-score.ckpt",
    "float-inf-score.ckpt",
    "best-k-list.ckpt",
    "best-k-tensor.ckpt",
    "sparse.ckpt",
    "tensor-monitor.ckpt",
    "tensor-path.ckpt",
    "tensor-score.ckpt",
    "tensor-fields.ckpt",
    "complex-score.ckpt",
    "callback-list.ckpt",
    "not-a-dict.ckpt",
    "shared-references.ckpt",
]


def _refuse_constant(text: str) -> Any:
    raise AssertionError(f"the JSON carries the non-standard constant {text}")


def _strict_json(stdout: bytes) -> Any:
    return json.loads(stdout.decode("utf-8"), parse_constant=_refuse_constant)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hostile")
    run_python(_WRITE_HOSTILE, str(directory), check=True)
    run_python(
        """
        import sys, torch
        torch.save({"epoch": 1, "global_step": 200, "state_dict": {"w": torch.zeros(3)},
                    "optimizer_states": [{"state": {}}]}, sys.argv[1])
        """,
        str(directory / "good.ckpt"),
        check=True,
    )
    return directory


def _callback(document: dict[str, Any]) -> dict[str, Any]:
    states = document["model_checkpoints"]
    assert len(states) == 1
    state: dict[str, Any] = states[0]
    return state


@pytest.mark.parametrize("name", _CASES)
def test_every_file_gets_its_row_whatever_a_loadable_pickle_holds(hostile: Path, name: str) -> None:
    arguments = ["inspect", str(hostile / name), str(hostile / "good.ckpt")]
    as_json = run_cli(*arguments, "--json", environment=STRICT_UTF8, text=False)
    as_table = run_cli(*arguments, environment=STRICT_UTF8, text=False)

    for completed in (as_json, as_table):
        assert b"Traceback" not in completed.stderr, completed.stderr.decode(errors="replace")
        assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    documents = {Path(document["path"]).name: document for document in _strict_json(as_json.stdout)}
    assert set(documents) == {name, "good.ckpt"}
    assert documents[name]["loaded"] is True
    assert documents[name]["error"] is None
    assert documents["good.ckpt"]["global_step"] == 200
    rows = as_table.stdout.decode("utf-8").splitlines()
    assert rows[1].split()[0] == name
    assert rows[2].split()[:3] == ["good.ckpt", "1", "200"]


def test_non_finite_numbers_and_tensors_are_described_values(hostile: Path) -> None:
    names = [
        "inf-score.ckpt",
        "nan-score.ckpt",
        "float-inf-score.ckpt",
        "tensor-monitor.ckpt",
        "tensor-path.ckpt",
        "tensor-score.ckpt",
        "complex-score.ckpt",
        "best-k-list.ckpt",
        "sparse.ckpt",
        "tensor-fields.ckpt",
        "shared-references.ckpt",
    ]
    completed = run_cli("inspect", *(str(hostile / name) for name in names), "--json", text=False)

    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    documents = {Path(document["path"]).name: document for document in _strict_json(completed.stdout)}
    assert _callback(documents["inf-score.ckpt"])["best_model_score"] == "inf"
    assert _callback(documents["float-inf-score.ckpt"])["best_model_score"] == "inf"
    nan_state = _callback(documents["nan-score.ckpt"])
    assert nan_state["best_model_score"] == "nan"
    assert nan_state["best_k_models"] == {"/runs/a.ckpt": "-inf"}
    assert _callback(documents["tensor-monitor.ckpt"])["monitor"] == {
        "tensor": {"dtype": "float32", "shape": [2]}
    }
    assert _callback(documents["tensor-path.ckpt"])["best_model_path"] == {
        "tensor": {"dtype": "float32", "shape": [2]}
    }
    assert _callback(documents["tensor-score.ckpt"])["best_model_score"] == {
        "tensor": {"dtype": "float32", "shape": [2, 3]}
    }
    assert _callback(documents["complex-score.ckpt"])["best_model_score"] == {
        "tensor": {"dtype": "complex64", "shape": []}
    }
    best_k_list = documents["best-k-list.ckpt"]
    assert _callback(best_k_list)["best_k_models"] == {}
    assert any("best_k_models" in warning for warning in best_k_list["warnings"])
    sparse = documents["sparse.ckpt"]
    assert sparse["tensor_count"] == 5  # state_dict w, the two sparse tensors, two callback scores
    assert sparse["dtypes"] == {"float32": 5}
    fields = documents["tensor-fields.ckpt"]
    assert fields["epoch"] is None
    assert fields["global_step"] is None
    assert fields["resumable"] is False
    assert fields["lightning_version"] == {"tensor": {"dtype": "float32", "shape": [1]}}
    shared = documents["shared-references.ckpt"]
    assert shared["tensor_count"] == 4  # w, the shared leaf once, the two callback scores
    for document in documents.values():
        assert all(isinstance(text, str) for text in strings_in(document))


def test_table_shows_described_values(hostile: Path) -> None:
    completed = run_cli(
        "inspect", str(hostile / "inf-score.ckpt"), str(hostile / "tensor-score.ckpt"), text=False
    )

    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    output = completed.stdout.decode("utf-8")
    assert "best_model_score=inf " in output
    assert "best_model_score=tensor(float32, shape [2, 3])" in output


def test_one_failing_file_costs_no_other_row(hostile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever escapes the known cases turns into that file's error row (the per-file catch-all)."""
    original = contents.inspect_checkpoint

    def failing(path: Path, **options: Any) -> CheckpointContents:
        if path.name == "inf-score.ckpt":
            raise RecursionError("maximum recursion depth exceeded")
        return original(path, **options)

    monkeypatch.setattr(contents, "inspect_checkpoint", failing)

    results = contents.inspect_paths(
        [hostile / "inf-score.ckpt", hostile / "good.ckpt"], unsafe=False, naming=DEFAULT_NAMING
    )

    assert [result.path.name for result in results] == ["inf-score.ckpt", "good.ckpt"]
    assert results[0].error == "could not be inspected: RecursionError: maximum recursion depth exceeded"
    assert results[1].ok
    assert results[1].global_step == 200


# -- corrupt pickles: an error, never the --unsafe hint ---------------------------------------------

_CORRUPT_PICKLES: dict[str, Callable[[bytes], bytes]] = {
    "zeros": lambda original: bytes(len(original)),
    "truncated": lambda original: original[: len(original) // 2],
    "bad-opcode": lambda original: original[:2] + b"\xfe\xfe\xfe" + original[5:],
    "bad-utf8": lambda original: original[:2] + b"X\x04\x00\x00\x00\xff\xfe\xfd\xfc." + original[2:],
}


@pytest.mark.parametrize("corruption", sorted(_CORRUPT_PICKLES))
def test_a_corrupt_pickle_is_an_error_not_an_unsafe_hint(
    hostile: Path, tmp_path: Path, corruption: str
) -> None:
    import zipfile

    with zipfile.ZipFile(hostile / "good.ckpt") as archive:
        name = next(info.filename for info in archive.infolist() if info.filename.endswith("/data.pkl"))
        original = archive.read(name)
    corrupt = replace_pickle(
        hostile / "good.ckpt", tmp_path / step_name(0, 100), _CORRUPT_PICKLES[corruption](original)
    )

    completed = run_cli("inspect", str(corrupt), str(hostile / "good.ckpt"), "--json", text=False)

    assert completed.returncode == 1
    documents = {Path(document["path"]).name: document for document in _strict_json(completed.stdout)}
    document = documents[corrupt.name]
    assert document["error"] is not None
    assert document["error"].startswith("its pickle is corrupt")
    assert not any("--unsafe" in warning for warning in document["warnings"])
    assert documents["good.ckpt"]["error"] is None
    reason = _verify_loadable(corrupt)
    assert reason is not None
    assert reason.startswith("its pickle is corrupt")


def _verify_loadable(path: Path, limit: int | None = None) -> str | None:
    code = """
        import json, sys
        from pathlib import Path
        from ckpt_watcher.contents import verify_loadable
        print(json.dumps(verify_loadable(Path(sys.argv[1]))))
        """
    completed = run_python(code, str(path), memory=limit, timeout=120, check=True)
    result: str | None = json.loads(completed.stdout)
    return result


# -- decompression bombs and what torch would read into memory ---------------------------------------


@pytest.mark.slow
def test_a_deflate_bomb_is_refused_in_bounded_memory(hostile: Path, tmp_path: Path) -> None:
    bomb = deflate_bomb(hostile / "good.ckpt", tmp_path / step_name(0, 900), BOMB_EXPANDED_BYTES)
    assert bomb.stat().st_size < BOMB_EXPANDED_BYTES / 500
    good = hostile / "good.ckpt"
    baseline = peak_address_space(["inspect", str(good), "--json"], tmp_path)
    limit = baseline + MEMORY_MARGIN

    control = run_cli("inspect", str(good), "--json", memory=limit, text=False)
    bounded = run_cli("inspect", str(bomb), str(good), "--json", memory=limit, text=False)

    assert control.returncode == 0, control.stderr.decode(errors="replace")
    assert bounded.returncode == 1, bounded.stderr.decode(errors="replace")
    assert b"Traceback" not in bounded.stderr
    documents = {Path(document["path"]).name: document for document in _strict_json(bounded.stdout)}
    assert documents[bomb.name]["error"].startswith(_BOMB_REFUSED)
    assert documents["good.ckpt"]["error"] is None
    failures = [record for record in log_records(bounded.stderr) if record["event"] == "inspect_failed"]
    assert [Path(record["path"]).name for record in failures] == [bomb.name]
    reason = _verify_loadable(bomb, limit)
    assert reason is not None
    assert reason.startswith(_BOMB_REFUSED)


@pytest.mark.slow
def test_a_pickle_that_builds_millions_of_objects_is_refused_in_bounded_memory(
    hostile: Path, tmp_path: Path
) -> None:
    """5 MB of EMPTY_LIST opcodes, stored as torch stores data.pkl: it loads, into ~360 MiB of lists."""
    opcode_bomb = replace_pickle(
        hostile / "good.ckpt", tmp_path / step_name(0, 900), b"\x80\x02" + b"]" * 5_000_000 + b"."
    )
    good = hostile / "good.ckpt"
    limit = peak_address_space(["inspect", str(good), "--json"], tmp_path) + MEMORY_MARGIN

    bounded = run_cli("inspect", str(opcode_bomb), str(good), "--json", memory=limit, text=False)

    assert bounded.returncode == 1, bounded.stderr.decode(errors="replace")
    documents = {Path(document["path"]).name: document for document in _strict_json(bounded.stdout)}
    refused = "refused: its pickle holds more than 4000000 opcodes"
    assert documents[opcode_bomb.name]["error"].startswith(refused)
    assert documents["good.ckpt"]["error"] is None
    reason = _verify_loadable(opcode_bomb, limit)
    assert reason is not None
    assert reason.startswith(refused)


@pytest.mark.slow
def test_a_huge_claimed_central_directory_is_refused_unread(hostile: Path, tmp_path: Path) -> None:
    """A sparse file whose end record claims a 1 GiB central directory: nothing that large is read."""
    sparse = tmp_path / step_name(0, 900)
    directory_size = 1 << 30
    size = directory_size + (1 << 20)
    with sparse.open("wb") as file:
        file.write(b"PK\x03\x04")
        file.truncate(size)
        file.seek(size - 22)
        file.write(
            struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, directory_size, size - 22 - directory_size, 0)
        )
    good = hostile / "good.ckpt"
    limit = peak_address_space(["inspect", str(good), "--json"], tmp_path) + MEMORY_MARGIN

    bounded = run_cli("inspect", str(sparse), str(good), "--json", memory=limit, text=False)

    assert bounded.returncode == 1, bounded.stderr.decode(errors="replace")
    documents = {Path(document["path"]).name: document for document in _strict_json(bounded.stdout)}
    assert documents[sparse.name]["error"] == (
        f"refused: its central directory holds {directory_size} bytes, "
        "more than the 67108864 ckpt-watcher reads"
    )
    assert documents["good.ckpt"]["error"] is None


@pytest.mark.slow
def test_verify_load_keeps_a_deflate_bomb_in_bounded_memory(hostile: Path, tmp_path: Path) -> None:
    """``prune`` with ``verify: load``: the bomb is not complete, so it neither counts nor is deleted."""
    root = tmp_path / "root"
    root.mkdir()
    for step in (100, 200):
        (root / step_name(0, step)).write_bytes((hostile / "good.ckpt").read_bytes())
    deflate_bomb(hostile / "good.ckpt", root / step_name(0, 300), BOMB_EXPANDED_BYTES)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nverify: load\n")
    arguments = ["prune", str(root), "--policy", str(policy), "--json"]
    baseline = peak_address_space(["inspect", str(hostile / "good.ckpt"), "--json"], tmp_path)

    completed = run_cli(*arguments, memory=baseline + MEMORY_MARGIN, text=False)

    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    assert sorted(os.listdir(root)) == [step_name(0, 200), step_name(0, 300)]
    entries = {
        entry["name"]: entry
        for group in _strict_json(completed.stdout)["groups"]
        for entry in group["entries"]
    }
    assert entries[step_name(0, 300)]["action"] != "delete"
    assert any("compressed" in reason for reason in entries[step_name(0, 300)]["reasons"])


def _listing_of(archive: bytes, scratch: Path) -> list[contents.ArchiveMember]:
    path = scratch / "listing.zip"
    path.write_bytes(archive)
    with path.open("rb") as file:
        listing = contents.list_archive(file.fileno(), len(archive))
    assert not isinstance(listing, str), listing
    return listing


def test_members_torch_reads_into_memory_are_capped(tmp_path: Path) -> None:
    archive = tmp_path / step_name(0, 100)
    archive.write_bytes(zip_bytes(b"x" * 4096, entries=3))

    with archive.open("rb") as file:
        size = archive.stat().st_size
        small_cap = contents.check_archive(file.fileno(), size, maximum_record_bytes=1024)
        default_cap = contents.check_archive(file.fileno(), size)

    assert small_cap == (
        "refused: archive member 'archive/data.pkl' holds 4096 bytes, more than the 1024 "
        "ckpt-watcher reads into memory"
    )
    assert default_cap is None  # archive/data/N are tensor storages: mmap'd, never read whole


def test_archive_listing_reads_sizes_and_methods(tmp_path: Path) -> None:
    listing = _listing_of(zip_bytes(b"abc", entries=2), tmp_path)

    assert [(member.name, member.method, member.size) for member in listing] == [
        ("archive/data.pkl", 0, 3),
        ("archive/data/1", 0, 3),
    ]


@pytest.mark.parametrize(
    ("entry_kind", "expected"),
    [
        ("fifo", "not a regular file"),
        ("device", "not a regular file"),
    ],
)
def test_a_special_file_with_a_checkpoint_name_is_an_error_row_not_a_hang(
    hostile: Path, tmp_path: Path, entry_kind: str, expected: str
) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "good.ckpt").write_bytes((hostile / "good.ckpt").read_bytes())
    special = directory / step_name(0, 100)
    if entry_kind == "fifo":
        os.mkfifo(special)
    else:
        special.symlink_to("/dev/zero")

    completed = run_cli("inspect", str(directory), "--json", timeout=60, text=False)

    assert completed.returncode == 1
    documents = {Path(document["path"]).name: document for document in _strict_json(completed.stdout)}
    assert expected in documents[special.name]["error"]
    assert documents["good.ckpt"]["error"] is None


def test_json_numbers_stay_standard(hostile: Path) -> None:
    """No NaN or Infinity literal reaches the document (a strict parser would refuse it)."""
    completed = run_cli("inspect", str(hostile / "nan-score.ckpt"), "--json", text=False)

    text = completed.stdout.decode("utf-8")
    assert "NaN" not in text
    assert "Infinity" not in text
    assert not any(
        isinstance(value, float) and not math.isfinite(value) for value in _numbers(json.loads(text))
    )


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [number for item in value.values() for number in _numbers(item)]
    if isinstance(value, list):
        return [number for item in value for number in _numbers(item)]
    return [value] if isinstance(value, float) else []
