"""The command line: every spelling of the watch options, and what ``ckpt-watcher policy`` explains."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from ckpt_watcher.cli import build_parser, main
from ckpt_watcher.policy import POLICY_DESCRIPTIONS, POLICY_KEYS

DEFAULT_POLL = 5.0

POLL_SPELLINGS = [
    # (arguments after "watch", the poll interval they ask for: None = inotify)
    (["/data"], None),
    (["--poll", "/data"], DEFAULT_POLL),
    (["/data", "--poll"], DEFAULT_POLL),
    (["--poll", "--settle", "1", "/data"], DEFAULT_POLL),
    (["--poll-interval", "2", "/data"], 2.0),
    (["/data", "--poll-interval", "0.5"], 0.5),
    (["--poll-interval=2", "/data"], 2.0),
    # the old spelling, still accepted where it is unambiguous: a number right after --poll
    (["--poll", "2", "/data"], 2.0),
    (["/data", "--poll", "15", "--settle", "60"], 15.0),
    (["--poll=2", "/data"], 2.0),
]


@pytest.mark.parametrize(("arguments", "interval"), POLL_SPELLINGS)
def test_every_poll_spelling_names_the_path_and_the_interval(
    arguments: list[str], interval: float | None
) -> None:
    parsed = build_parser().parse_args(["watch", *arguments])

    assert parsed.path == Path("/data")
    assert parsed.poll == interval


@pytest.mark.parametrize(
    "arguments",
    [["--poll-interval", "0", "/data"], ["--poll-interval", "/data"], ["--poll", "2"], ["--poll=x", "/data"]],
)
def test_a_poll_spelling_that_cannot_mean_anything_is_a_usage_error(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["watch", *arguments])

    assert exit_.value.code == 2
    assert "ckpt-watcher watch: error:" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", ["0", "-5", "3601", "1e9", "inf", "nan"])
def test_a_lease_that_is_not_positive_or_outlasts_an_hour_is_a_usage_error(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A watcher killed without releasing its lease holds its prefix for the lease's time to live."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["watch", "s3://bucket/run", "--lease-seconds", seconds])

    assert exit_.value.code == 2
    assert "argument --lease-seconds: expected" in capsys.readouterr().err


@pytest.mark.parametrize(("seconds", "expected"), [("0.5", 0.5), ("60", 60.0), ("3600", 3600.0)])
def test_a_lease_of_up_to_an_hour_is_taken(seconds: str, expected: float) -> None:
    parsed = build_parser().parse_args(["watch", "s3://bucket/run", "--lease-seconds", seconds])

    assert parsed.lease_seconds == expected


@pytest.fixture
def reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("reset_logging")
def test_policy_explains_every_key_with_the_models_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy"]) == 0
    lines = capsys.readouterr().out.splitlines()

    for key, description in POLICY_DESCRIPTIONS.items():
        key_line = next(index for index, line in enumerate(lines) if line.startswith(f"{key}:"))
        assert lines[key_line - 1] == f"# {description}"


@pytest.mark.usefixtures("reset_logging")
def test_policy_json_carries_the_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)

    assert document["descriptions"] == POLICY_DESCRIPTIONS
    assert set(document["descriptions"]) == set(POLICY_KEYS)
