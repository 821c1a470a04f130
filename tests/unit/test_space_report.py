"""How retention by bytes is shown: the line above the dry-run table, ``--json``'s ``space`` and
``STATUS=`` (``report.space_line``, ``report.space_document``, ``space.space_status``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_watcher.budget import FileSystemSpace, FreeSpacePlan, NextSave, Reclaimable
from ckpt_watcher.report import space_document, space_line
from ckpt_watcher.sizes import free_space_setting
from ckpt_watcher.space import space_status

MIB = 1024 * 1024
SPACE = FileSystemSpace(7, Path("/data/ckpt"), 64 * MIB, 20 * MIB, 4096)
NEXT = NextSave(4 * MIB, "as large as run/epoch=00-step=000900-train.ckpt, the newest complete checkpoint")
PREFIX = "free space on /data/ckpt: 20.0 MiB of 64.0 MiB (with this plan's other deletions done); "
NEXT_TEXT = (
    "next save 4.0 MiB (as large as run/epoch=00-step=000900-train.ckpt, the newest complete checkpoint)"
)


@pytest.mark.parametrize(
    ("plan", "dry_run", "line"),
    [
        (FreeSpacePlan(SPACE, None, 0, NEXT, 0), True, PREFIX + NEXT_TEXT),
        (
            FreeSpacePlan(SPACE, free_space_setting("16MiB"), 16 * MIB, NEXT, 0),
            True,
            PREFIX + "keep_free 16.0 MiB + " + NEXT_TEXT + ": met",
        ),
        (
            FreeSpacePlan(SPACE, free_space_setting("10%"), 7 * MIB, NEXT, 0),
            False,
            PREFIX + "keep_free 10% (7.0 MiB) + " + NEXT_TEXT + ": met",
        ),
        (
            FreeSpacePlan(
                SPACE,
                free_space_setting("24MiB"),
                24 * MIB,
                NEXT,
                8 * MIB,
                (Reclaimable("a", 7, MIB, 1.0),),
                (),
                7 * MIB,
            ),
            True,
            PREFIX
            + "keep_free 24.0 MiB + "
            + NEXT_TEXT
            + ": 8.0 MiB short, would take 1 trash entry (1.0 MiB); "
            "still 7.0 MiB short: the rest may not be evicted",
        ),
    ],
)
def test_the_line_above_the_table(plan: FreeSpacePlan, dry_run: bool, line: str) -> None:
    assert space_line(plan, dry_run) == line


def test_the_json_of_a_file_system() -> None:
    plan = FreeSpacePlan(SPACE, free_space_setting("10%"), 7 * MIB, NEXT, 0)
    assert space_document(plan) == {
        "path": "/data/ckpt",
        "device": 7,
        "total_bytes": 64 * MIB,
        "free_bytes": 20 * MIB,
        "keep_free": "10%",
        "keep_free_bytes": 7 * MIB,
        "next_save_bytes": 4 * MIB,
        "next_save_basis": NEXT.basis,
        "short_bytes": 0,
        "evicted": 0,
        "evicted_bytes": 0,
        "reclaimed": [],
        "reclaimed_bytes": 0,
        "unmet_bytes": 0,
    }


def test_the_status_line_shows_the_free_space_after_the_pass() -> None:
    plan = FreeSpacePlan(
        SPACE, free_space_setting("16MiB"), 16 * MIB, NEXT, 0, (Reclaimable("a", 7, MIB, 1.0),)
    )
    assert space_status(plan) == "21.0 MiB free on /data/ckpt (keep_free 16.0 MiB + next save 4.0 MiB)"
