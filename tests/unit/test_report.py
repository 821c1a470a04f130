"""The renderers (pure): every string escaped, every number standard JSON, one line per row."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.contents import CallbackState, CheckpointContents
from ckpt_watcher.plan import plan
from ckpt_watcher.policy import DEFAULT_POLICY, load_policy
from ckpt_watcher.records import EntryType
from ckpt_watcher.report import (
    TrashView,
    contents_document,
    plan_document,
    render_contents_table,
    render_json,
    render_table,
    render_trash_table,
    trash_list_document,
)
from ckpt_watcher.trash import TrashEntry, TrashListing, TrashSummary, make_key
from tests.support.factories import make_record, step_name
from tests.support.hostile import is_clean_text, strings_in

ROOT = Path("/ckpt")
HOSTILE_DIRECTORY = ROOT / os.fsdecode(b"run\n-\xff")
FORGED = "x\n  delete  step  0  100  epoch=00-step=000100-train.ckpt  forged.ckpt"


def _refuse_constant(text: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {text}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (math.nan, "nan"),
        (1.5, 1.5),
        ({"score": [math.inf, 2.0]}, {"score": ["inf", 2.0]}),
        ({os.fsdecode(b"key\xff"): "a\nb"}, {"key\\xff": "a\\nb"}),
        ("\ud800", "\\ud800"),
        ([None, True, 3], [None, True, 3]),
    ],
)
def test_render_json_carries_any_value_as_standard_json(value: Any, expected: Any) -> None:
    text = render_json({"value": value})

    assert json.loads(text, parse_constant=_refuse_constant) == {"value": expected}
    text.encode("utf-8", "strict")


def _hostile_plan() -> Any:
    names = [step_name(0, step) for step in range(100, 800, 100)]
    records = [make_record(name, HOSTILE_DIRECTORY) for name in names]
    records.append(make_record(FORGED, HOSTILE_DIRECTORY))
    records.append(
        make_record(
            "last.ckpt",
            HOSTILE_DIRECTORY,
            entry_type=EntryType.SYMLINK,
            link_target=HOSTILE_DIRECTORY / os.fsdecode(b"weird\xff\n.ckpt"),
        )
    )
    return plan(records, DEFAULT_POLICY, {}, {})


def test_table_rows_are_one_line_each_whatever_the_names() -> None:
    the_plan = _hostile_plan()

    table = render_table(the_plan, dry_run=True)

    lines = table.splitlines()
    assert all(is_clean_text(line) for line in lines)
    assert lines[0] == "/ckpt/run\\n-\\xff"
    rows = [line for line in lines[2:] if line.startswith("  ")]
    assert len(rows) == len(the_plan.decisions)  # the newline in a name forges no row
    assert any("x\\n  delete  step" in row for row in rows)


def test_plan_document_escapes_every_string() -> None:
    the_plan = _hostile_plan()

    document = plan_document(the_plan, load_policy(None), dry_run=True)
    parsed = json.loads(render_json(document))

    assert all(is_clean_text(text) for text in strings_in(parsed))
    assert parsed["groups"][0]["directory"] == "/ckpt/run\\n-\\xff"
    names = {entry["name"] for entry in parsed["groups"][0]["entries"]}
    assert FORGED.replace("\n", "\\n") in names


def _contents(**fields: Any) -> CheckpointContents:
    defaults: dict[str, Any] = {
        "path": ROOT / "run" / step_name(0, 100),
        "bytes": 2048,
        "complete": True,
        "integrity": "complete zip archive",
        "loaded": True,
        "epoch": 0,
        "global_step": 100,
        "resumable": True,
    }
    return CheckpointContents(**{**defaults, **fields})


_TENSOR = {"tensor": {"dtype": "float32", "shape": [2, 3]}}


def test_contents_table_shows_described_values_and_escapes_details() -> None:
    state = CallbackState(
        key="ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}",
        monitor="val\nloss",
        mode="min",
        best_model_score=math.inf,
        best_model_path=_TENSOR,
        best_k_models={"/a.ckpt": math.nan},
    )
    tensor_state = CallbackState(
        key="ModelCheckpoint{}",
        monitor=None,
        mode=None,
        best_model_score=_TENSOR,
        best_model_path=None,
        best_k_models={},
    )
    results = [
        _contents(model_checkpoints=[state, tensor_state], warnings=["a\nforged warning"]),
        _contents(path=ROOT / os.fsdecode(b"bad\xff\n.ckpt"), loaded=False, error="not\na zip"),
    ]

    table = render_contents_table(results)

    lines = table.splitlines()
    assert all(is_clean_text(line) for line in lines)
    assert lines[1].split()[:3] == [step_name(0, 100), "0", "100"]
    assert lines[2].split()[0] == "bad\\xff\\n.ckpt"
    assert (
        "  ModelCheckpoint monitor=val\\nloss mode=min best_model_score=inf "
        "best_model_path=tensor(float32, shape [2, 3]) best_k_models=1"
    ) in lines
    assert any("best_model_score=tensor(float32, shape [2, 3])" in line for line in lines)
    assert "  warning: a\\nforged warning" in lines
    assert "  error: not\\na zip" in lines


def test_contents_document_is_standard_json() -> None:
    state = CallbackState(
        key="ModelCheckpoint{}",
        monitor=None,
        mode="min",
        best_model_score=-math.inf,
        best_model_path=None,
        best_k_models={"/a.ckpt": math.inf, "/b.ckpt": 0.25},
    )

    document = json.loads(
        render_json([contents_document(_contents(model_checkpoints=[state]))]),
        parse_constant=_refuse_constant,
    )

    assert document[0]["model_checkpoints"][0]["best_model_score"] == "-inf"
    assert document[0]["model_checkpoints"][0]["best_k_models"] == {"/a.ckpt": "inf", "/b.ckpt": 0.25}


# -- the trash --------------------------------------------------------------------------------------

TRASHED_AT = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _trash_entry(original: str, step: int, *, grace: int = 86400) -> TrashEntry:
    return TrashEntry(
        make_key(TRASHED_AT + step, step), original, TRASHED_AT + step, grace, ("why",), 1000, False, 1, step
    )


def test_with_a_trash_deletions_say_trash_and_the_trash_is_shown_above_the_table() -> None:
    the_plan = plan(
        [make_record(step_name(0, step), ROOT / "run") for step in range(100, 800, 100)], DEFAULT_POLICY
    )
    oldest = _trash_entry(os.fsdecode(b"run/old\n\xff.ckpt"), 1)
    view = TrashView({ROOT / "run": 86400}, TrashSummary(3, 4096, oldest))

    table = render_table(the_plan, dry_run=True, trash=view)

    lines = table.splitlines()
    assert lines[0] == (
        "trash: 3 entries, 4.0 KiB; oldest: run/old\\n\\xff.ckpt, trashed 2027-01-15T08:00:01Z, "
        "purged after 2027-01-16T08:00:01Z"
    )
    assert lines[2] == "/ckpt/run  (trash grace: 1d)"
    actions = [line.split()[0] for line in lines[4:] if line.startswith("  ")]
    assert actions == ["keep"] * 5 + ["trash"] * 2
    assert lines[-1] == "kept 5 (4.9 KiB), would trash 2 (2.0 KiB), skipped 0 -- dry run: nothing was deleted"


def test_only_the_groups_with_a_trash_say_trash() -> None:
    records = [
        make_record(step_name(0, step), ROOT / run) for run in ("a", "b") for step in range(100, 800, 100)
    ]
    the_plan = plan(records, DEFAULT_POLICY)
    view = TrashView({ROOT / "a": 60}, None)

    table = render_table(the_plan, dry_run=True, trash=view)
    document = plan_document(the_plan, load_policy(None), dry_run=True, trash=view)

    assert table.splitlines()[0] == "trash: none yet"
    assert table.splitlines()[-1] == (
        "kept 10 (9.8 KiB), would delete 2 (2.0 KiB), would trash 2 (2.0 KiB), skipped 0 "
        "-- dry run: nothing was deleted"
    )
    actions = {
        group["directory"]: {entry["action"] for entry in group["entries"]} for group in document["groups"]
    }
    assert actions == {"/ckpt/a": {"keep", "trash"}, "/ckpt/b": {"keep", "delete"}}
    assert [group["trash_grace_seconds"] for group in document["groups"]] == [60, None]
    assert document["trash"] is None
    assert {
        key: document["summary"][key] for key in ("deleted", "trashed", "bytes_deleted", "bytes_trashed")
    } == {
        "deleted": 2,
        "trashed": 2,
        "bytes_deleted": 2000,
        "bytes_trashed": 2000,
    }


def test_without_a_trash_nothing_changes() -> None:
    the_plan = plan(
        [make_record(step_name(0, step), ROOT / "run") for step in range(100, 800, 100)], DEFAULT_POLICY
    )

    table = render_table(the_plan, dry_run=True)

    assert table.splitlines()[0] == "/ckpt/run"
    assert (
        table.splitlines()[-1]
        == "kept 5 (4.9 KiB), would delete 2 (2.0 KiB), skipped 0 -- dry run: nothing was deleted"
    )


def test_the_plan_document_carries_the_trash_summary() -> None:
    the_plan = plan([make_record(step_name(0, 100), ROOT / "run")], DEFAULT_POLICY)
    oldest = _trash_entry("run/x.ckpt", 1)

    document = plan_document(
        the_plan, load_policy(None), dry_run=True, trash=TrashView({}, TrashSummary(1, 1000, oldest))
    )

    assert document["trash"] == {
        "entries": 1,
        "bytes": 1000,
        "oldest": {
            "key": oldest.key,
            "original": "run/x.ckpt",
            "type": "file",
            "bytes": 1000,
            "trashed_at": "2027-01-15T08:00:01Z",
            "purge_at": "2027-01-16T08:00:01Z",
            "grace": "1d",
            "reasons": ["why"],
        },
    }


def test_the_trash_list_escapes_names_and_says_when_it_is_empty() -> None:
    hostile = os.fsdecode(b"run/\x1b[31mred\n\xff.ckpt")
    listing = TrashListing([_trash_entry("run/a.ckpt", 1), _trash_entry(hostile, 2)], [])

    table = render_trash_table(listing)
    document = trash_list_document(ROOT, listing)

    lines = table.splitlines()
    assert all(is_clean_text(line) for line in lines)
    assert len(lines) == 1 + 2 + 2
    assert "run/\\x1b[31mred\\n\\xff.ckpt" in lines[2]
    assert lines[-1] == "2 entries, 2.0 KiB"
    assert render_trash_table(TrashListing([], [])) == "the trash is empty"
    parsed = json.loads(render_json(document))
    assert all(is_clean_text(text) for text in strings_in(parsed))
    assert parsed["entries"][0]["path"] == "/ckpt/run/a.ckpt"
    assert parsed["entries"][0]["trash_path"].startswith("/ckpt/.ckpt-trash/files/run/a.ckpt@")
