"""``prune``'s streamed output (``write_plan_json``, ``write_table``) is the document and the table the
whole-plan renderers make: the same parsed JSON (compact now), the same text, every string escaped the
same way, on plans with hostile names, reasons that need escaping, non-finite metrics, object paths,
a trash and more entries than one write holds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_watcher.plan import Action, Decision, plan
from ckpt_watcher.policy import DEFAULT_POLICY, Policy, load_policy
from ckpt_watcher.records import CheckpointRecord, EntryType
from ckpt_watcher.report import (
    _ENCODE,
    PlanJSONStream,
    TrashView,
    _entry_maker,
    _entry_ready,
    _entry_text_maker,
    json_ready,
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_plan_streamed_group_by_group_during_a_pass_is_the_plan_document(case: str) -> None:
    """``prune --dry-run --json`` writes each group as the pass plans it (no keep_free: nothing is
    evicted from a group afterwards, so no group is evicted at once), then the rest."""
    directories, count, policy, view = CASES[case]
    trash = TrashView(view.graces, view.summary)
    the_plan = plan([record for directory in directories for record in _records(directory, count)], policy)
    loaded = load_policy(None)
    sources = {directories[0]: ("x\n",)}
    out = io.StringIO()
    stream = PlanJSONStream(out, loaded)

    for group in the_plan.groups:
        stream.group(group, sources.get(group.directory), trash.graces.get(group.directory))
    stream.finish(the_plan.summary, trash.summary, (), 0)

    whole = render_json(plan_document(the_plan, loaded, True, None, sources, trash))
    streamed = json.loads(out.getvalue(), parse_constant=_refuse_constant)
    assert streamed == json.loads(whole, parse_constant=_refuse_constant)
    assert out.getvalue().count("\n") == 1


def test_an_empty_plan_streams_a_whole_document() -> None:
    out = io.StringIO()
    stream = PlanJSONStream(out, load_policy(None))
    stream.finish(plan([], DEFAULT_POLICY).summary, None, (), 0)
    document = json.loads(out.getvalue())
    assert document == json.loads(
        render_json(plan_document(plan([], DEFAULT_POLICY), load_policy(None), True))
    )


NAME_TEXT = st.text(
    st.sampled_from(["a", "Z", "0", "=", "-", "_", ".", " ", "/", "\\", "\n", "\u202e", "é", "\udcff", '"']),
    min_size=1,
    max_size=12,
)
DIRECTORIES = [Path("/ckpt/run"), Path("."), Path("/"), HOSTILE, Path("/s3:/bucket/runs/a"), Path("/ckpt/é")]


@settings(max_examples=300, deadline=None)
@given(
    directory=st.sampled_from(DIRECTORIES),
    name=st.one_of(
        NAME_TEXT, st.builds(step_name, st.integers(0, 120), st.integers(0, 10**7), st.integers(0, 12))
    ),
    metric=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(["loss", "val/loss", "acc\n"]), st.floats(allow_nan=True, allow_infinity=True)
        ),
    ),
    reasons=st.lists(st.one_of(NAME_TEXT, st.sampled_from(["kept: newest 5 (#2)", "target of a/last.ckpt"]))),
    evicted=st.booleans(),
    outcome=st.one_of(st.none(), st.sampled_from(["deleted", "changed\n", "gone/é"])),
    trashed=st.booleans(),
)
def test_an_entry_written_directly_is_the_text_of_its_escaped_dict(
    directory: Path,
    name: str,
    metric: tuple[str, float] | None,
    reasons: list[str],
    evicted: bool,
    outcome: str | None,
    trashed: bool,
) -> None:
    """The --json entries are written as text where nothing needs escaping: byte for byte the text
    the encoder gives for the entry's escaped dict, whatever the names, metrics and reasons."""
    record = make_record(name, directory)
    if metric is not None:
        record = dataclasses.replace(
            record, metric_name=metric[0], metric=metric[1], metric_text=repr(metric[1])
        )
    decision = Decision(record, Action.DELETE, tuple(reasons), evicted=evicted)
    outcomes = {id(decision): outcome} if outcome is not None else {}
    trash = TrashView({directory: 60} if trashed else {})

    written = _entry_text_maker(directory, trash, outcomes)(decision)

    assert written == _ENCODE(_entry_ready(_entry_maker(directory, trash, outcomes)(decision)))
    assert json.loads(written)["reasons"] == json.loads(_ENCODE(json_ready(reasons)))
