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
    contents_document,
    plan_document,
    render_contents_table,
    render_json,
    render_table,
)
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
