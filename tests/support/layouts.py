"""One checkpoint layout, written as files under a directory or as objects under a bucket prefix.

The names of the project's seed (step, best, ``last.ckpt``), Lightning's ``-vN`` versions, steps past
999,999, names no template matches, a file whose tail is not a zip end record, a legacy non-zip file,
a ``.keep`` pin, per-run policies, and directory checkpoints (DeepSpeed's ``latest`` marker; one
without its marker). Keys are relative to the root, ``/``-separated; a key ending in ``/`` is a
directory (made on disk; nothing on a bucket, which has no empty directories).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.factories import best_name, step_name, zip_bytes

ZIP = zip_bytes(b"weights" * 40)
HALF_WRITTEN = ZIP[: len(ZIP) // 2]  # its tail is not a zip end record
LEGACY = b"\x80\x02}q\x00(X\x05\x00\x00\x00epochq\x01K\x00u." * 4  # a pre-1.6 torch.save pickle


def directory_checkpoints() -> dict[str, bytes]:
    """stage3: two complete DeepSpeed-style directory checkpoints (``latest`` written last) and one
    without its marker; a per-run policy keeps the newest one step checkpoint."""
    return {
        "stage3/.ckpt-watcher.yaml": b"save_top_k_checkpoints: 1\n",
        f"stage3/{step_name(0, 100)}/zero/rank0.pt": ZIP,
        f"stage3/{step_name(0, 100)}/latest": b"global_step100",
        f"stage3/{step_name(0, 200)}/zero/rank0.pt": ZIP,
        f"stage3/{step_name(0, 200)}/zero/rank1.pt": ZIP,
        f"stage3/{step_name(0, 200)}/latest": b"global_step200",
        f"stage3/{step_name(0, 300)}/zero/rank0.pt": ZIP,  # no marker: still being written
    }


def file_checkpoints() -> dict[str, bytes]:
    """Everything else: stage1 (the seed's names and their troubles), big (steps past 999,999),
    stage2 (a per-run policy), and an unknown object at the root."""
    layout: dict[str, bytes] = {"README.txt": b"checkpoints of run 42\n"}
    for step in range(500, 4001, 500):
        layout[f"stage1/{step_name(step // 1000, step)}"] = ZIP
    layout[f"stage1/{step_name(3, 3500, version=1)}"] = ZIP
    layout[f"stage1/{step_name(3, 3500, version=2)}"] = ZIP
    for epoch, step, loss in [
        (0, 1000, 0.6123),
        (1, 2000, 0.4410),
        (2, 3000, float("nan")),
        (3, 3500, 0.3987),
    ]:
        layout[f"stage1/{best_name(epoch, step, loss)}"] = ZIP
    layout["stage1/last.ckpt"] = ZIP
    layout["stage1/hparams.yaml"] = b"lr: 0.1\n"
    layout[f"stage1/{step_name(4, 4500)}"] = HALF_WRITTEN
    layout[f"stage1/{step_name(0, 100)}"] = LEGACY
    layout[f"stage1/{step_name(0, 600)}.tmp"] = ZIP
    layout[f"stage1/{step_name(1, 1000)}.keep"] = b""
    layout["stage1/Epoch=00-step=000700-train.ckpt"] = ZIP
    for step in range(998_500, 1_001_001, 500):
        layout[f"big/{step_name(step // 10_000, step)}"] = ZIP
    layout["stage2/.ckpt-watcher.yaml"] = b"save_top_k_checkpoints: 1\n"
    for step in (100, 200, 300):
        layout[f"stage2/{step_name(0, step)}"] = ZIP
    return layout


def write_files(root: Path, layout: dict[str, bytes]) -> None:
    """The layout as files under ``root``."""
    for key, data in layout.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
