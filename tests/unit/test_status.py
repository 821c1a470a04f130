"""The status line: the sentence made from a ``pass_completed`` record's fields, the console form of
that record, the budget shown, and the progress line of a long pass on a terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from ckpt_watcher import terminal
from ckpt_watcher.groups import Tally
from ckpt_watcher.logs import configure_logging
from ckpt_watcher.policy import Policy
from ckpt_watcher.reconcile import PassResult, Trigger
from ckpt_watcher.status import budget_in_force, free_bytes, pass_fields, pass_sentence, readable_records
from ckpt_watcher.terminal import PROGRESS_DELAY, PROGRESS_INTERVAL, PassProgress, TerminalLine

GIB = 1024**3


def _fields(**changes: Any) -> dict[str, Any]:
    result = PassResult(
        Trigger.EVENT, kept_overall=Tally({"step": 10, "best": 2}, {"step": 40 * GIB, "best": 8 * GIB})
    )
    result.deleted, result.bytes_freed = 2, 8 * GIB
    fields = pass_fields(result, free=1536 * GIB, budget="none")
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    ("changes", "sentence"),
    [
        ({}, "kept 12 (48.0 GiB); event pass: deleted 2 (8.0 GiB); 1.5 TiB free; budget: none"),
        (
            {"skipped": 1, "failed": 3, "interrupted": True},
            "kept 12 (48.0 GiB); event pass: deleted 2 (8.0 GiB), skipped 1, 3 failed (retried next pass), "
            "interrupted; 1.5 TiB free; budget: none",
        ),
        ({"free_bytes": None}, "kept 12 (48.0 GiB); event pass: deleted 2 (8.0 GiB); budget: none"),
        (
            {"budget": "max_size 50GiB", "budget_unmet_bytes": 0},
            "kept 12 (48.0 GiB); event pass: deleted 2 (8.0 GiB); 1.5 TiB free; budget: max_size 50GiB (met)",
        ),
        (
            {"budget": "keep_free 10%", "budget_unmet_bytes": GIB, "trash_bytes": 3 * GIB},
            "kept 12 (48.0 GiB); event pass: deleted 2 (8.0 GiB); 1.5 TiB free; "
            "budget: keep_free 10% (unmet by 1.0 GiB); 3.0 GiB in the trash",
        ),
    ],
)
def test_the_sentence_says_kept_deleted_freed_free_space_and_budget(
    changes: dict[str, Any], sentence: str
) -> None:
    assert pass_sentence(_fields(**changes)) == sentence


def test_the_record_has_the_fields_the_sentence_is_made_of() -> None:
    fields = _fields()

    assert json.loads(json.dumps(fields)) == fields
    assert {key: fields[key] for key in ("kept_overall", "bytes_kept_overall", "free_bytes", "budget")} == {
        "kept_overall": 12,
        "bytes_kept_overall": 48 * GIB,
        "free_bytes": 1536 * GIB,
        "budget": "none",
    }
    assert "trash_bytes" not in fields, "no trash, no field"


def test_the_budget_is_none_until_the_policy_sets_one() -> None:
    class BudgetPolicy(Policy):  # the byte-budget keys, as the budget feature adds them to Policy
        max_size: str | None = None
        keep_free: str | None = None

    assert budget_in_force(Policy()) == "none"
    assert budget_in_force(BudgetPolicy()) == "none"
    assert (
        budget_in_force(BudgetPolicy(max_size="500GiB", keep_free="10%")) == "max_size 500GiB, keep_free 10%"
    )


def test_free_bytes_is_none_where_it_cannot_be_told(tmp_path: Path) -> None:
    assert (free_bytes(tmp_path) or 0) > 0
    assert free_bytes(None) is None
    assert free_bytes(tmp_path / "gone") is None


def test_on_the_console_a_pass_is_a_sentence_and_other_records_keep_their_fields() -> None:
    record = {"timestamp": "T", "level": "info", "event": "pass_completed", **_fields()}
    other = {"timestamp": "T", "level": "info", "event": "checkpoint_deleted", "path": "/x"}

    assert readable_records(None, "info", dict(record)) == {
        "timestamp": "T",
        "level": "info",
        "event": "pass completed: " + pass_sentence(record),
    }
    assert readable_records(None, "info", dict(other)) == other


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logging_to_a_terminal_shows_the_sentence_and_to_a_pipe_one_json_record() -> None:
    for stream in (FakeTerminal(), io.StringIO()):
        configure_logging("info", stream)
        structlog.get_logger("test").info("pass_completed", **_fields())
        structlog.reset_defaults()
        output = stream.getvalue()
        if isinstance(stream, FakeTerminal):
            assert "pass completed: kept 12 (48.0 GiB); event pass: deleted 2 (8.0 GiB)" in output
            assert "kept_overall=" not in output
        else:
            [line] = output.splitlines()
            assert json.loads(line)["kept_overall"] == 12
            assert terminal.current is None, "no progress line where stderr is not a terminal"


def test_a_record_goes_above_the_progress_line_which_is_drawn_again_below() -> None:
    stream = FakeTerminal()
    line = TerminalLine(stream)
    line.write("first record\n")
    line.show("reconciling: 1 of 4 directories (25%)")
    line.write("second record\n")
    line.clear()
    line.write("third record\n")

    assert stream.getvalue() == (
        "first record\n"
        "\r\x1b[Kreconciling: 1 of 4 directories (25%)"
        "\r\x1b[Ksecond record\nreconciling: 1 of 4 directories (25%)"
        "\r\x1b[K"
        "third record\n"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_shows_only_once_a_pass_is_long_at_most_every_interval_and_is_cleared_at_its_end() -> None:
    stream = FakeTerminal()
    clock = Clock()
    progress = PassProgress(TerminalLine(stream), clock)

    progress.update(1, 1000)
    clock.now += PROGRESS_DELAY / 2
    progress.update(2, 1000)
    assert stream.getvalue() == "", "a short pass shows nothing"

    clock.now += PROGRESS_DELAY
    progress.update(3, 1000)
    progress.update(4, 1000)  # too soon after the last figure
    clock.now += PROGRESS_INTERVAL
    progress.update(1234, 1000 * 5)
    assert stream.getvalue() == (
        "\r\x1b[Kreconciling: 3 of 1,000 directories (0%)"
        "\r\x1b[Kreconciling: 1,234 of 5,000 directories (25%)"
    )

    progress.update(5000, 5000)
    assert stream.getvalue().endswith("(25%)\r\x1b[K"), "cleared at the end of the pass"

    progress.update(1, 10)  # the next pass starts its own clock
    clock.now += PROGRESS_DELAY / 2
    progress.update(2, 10)
    assert stream.getvalue().endswith("(25%)\r\x1b[K")


def test_a_stopped_pass_says_so_in_its_record_and_its_status_line() -> None:
    result = PassResult(Trigger.RESCAN)
    fields = pass_fields(result, free=1536 * GIB, budget="none")
    assert "stopped" not in fields
    result.storage_error = "a pin of a restored checkpoint is unknown (restored/x.json cannot be read: EIO)"
    fields = pass_fields(result, free=1536 * GIB, budget="none")

    assert fields["stopped"] == result.storage_error
    assert "rescan pass: deleted 0 (0 B), stopped: nothing more deleted until it is retried" in pass_sentence(
        fields
    )
