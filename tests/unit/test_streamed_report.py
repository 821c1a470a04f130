"""``prune``'s streamed output (``write_plan_json``, ``write_table``) is the document and the table the
whole-plan renderers make: the same parsed JSON (compact now), the same text, every string escaped the
same way, on plans with hostile names, reasons that need escaping, non-finite metrics, object paths,
a trash and more entries than one write holds.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.plan import plan
from ckpt_watcher.policy import DEFAULT_POLICY, Policy, load_policy
from ckpt_watcher.records import CheckpointRecord, EntryType
from ckpt_watcher.report import (
    TrashView,
    plan_document,
    render_json,
    render_table,
    write_plan_json,
    write_table,
)
from ckpt_watcher.trash import TrashSummary
from tests.support.factories import best_name, make_record, step_name
from tests.support.hostile import is_clean_text, strings_in

ROOT = Path("/ckpt")
HOSTILE = ROOT / os.fsdecode(b"run\n-\xff\x1b[2J")


def _refuse_constant(text: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {text}")


def _records(directory: Path, count: int) -> list[CheckpointRecord]:
    records = [make_record(step_name(step // 2000, step), directory) for step in range(10, 10 * count, 10)]
    records += [make_record(best_name(0, 100, loss), directory) for loss in (0.5, float("nan"), float("inf"))]
    records += [
        make_record("last.ckpt", directory),
        make_record(os.fsdecode(b"odd\n\xff") + "\u202e.ckpt", directory),
        make_record("epoch=00-step=000001-train.ckpt", directory, complete=False, incomplete_reason="a/b\n"),
        make_record("link.ckpt", directory, entry_type=EntryType.SYMLINK),
    ]
    return records


CASES = {
    "plain": ([ROOT / "run"], 50, DEFAULT_POLICY, TrashView()),
    "hostile directory, many entries": ([HOSTILE, ROOT / "b"], 2600, DEFAULT_POLICY, TrashView()),
    "protect patterns with slashes and a trash": (
        [ROOT / "a", ROOT / "b"],
        30,
        Policy(protect=("a/epoch=00-step=00005*", "*\u202e*")),
        TrashView({ROOT / "a": 3600}, TrashSummary(0, 0, None), frozenset({ROOT / "a" / step_name(0, 10)})),
    ),
    "object paths": ([Path("/s3:/bucket/runs/a")], 20, DEFAULT_POLICY, TrashView()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_streamed_json_is_the_plan_document(case: str) -> None:
    directories, count, policy, trash = CASES[case]
    the_plan = plan([record for directory in directories for record in _records(directory, count)], policy)
    loaded = load_policy(None)
    whole = render_json(plan_document(the_plan, loaded, True, None, {directories[0]: ("x\n",)}, trash))
    out = io.StringIO()

    write_plan_json(out, the_plan, loaded, True, None, {directories[0]: ("x\n",)}, trash)

    text = out.getvalue()
    assert text.endswith("}\n")
    assert text.count("\n") == 1  # one compact line
    streamed = json.loads(text, parse_constant=_refuse_constant)
    assert streamed == json.loads(whole, parse_constant=_refuse_constant)
    assert all(is_clean_text(string) for string in strings_in(streamed))
    assert sum(len(group["entries"]) for group in streamed["groups"]) == len(the_plan.decisions)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_streamed_table_is_the_rendered_table(case: str) -> None:
    directories, count, policy, trash = CASES[case]
    the_plan = plan([record for directory in directories for record in _records(directory, count)], policy)
    out = io.StringIO()

    write_table(out, the_plan, True, None, {directories[0]: ("x\n",)}, trash)

    table = render_table(the_plan, True, None, {directories[0]: ("x\n",)}, trash)
    assert out.getvalue() == table + "\n"
    assert all(is_clean_text(line) for line in table.splitlines())
