"""The console script's own work before ``cli``: SIGHUP blocked for ``watch`` from its first line."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence

import pytest

import ckpt_watcher.cli
from ckpt_watcher import console


@pytest.fixture
def restored_mask() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@pytest.mark.usefixtures("restored_mask")
@pytest.mark.parametrize(
    ("arguments", "blocked"),
    [
        (["watch", "/ckpt"], True),
        (["--log-level", "debug", "watch", "/ckpt"], True),
        (["prune", "/ckpt"], False),  # a one-shot command may be ended by SIGHUP, as any other
        (["--help"], False),
    ],
)
def test_sighup_is_blocked_before_the_daemon_is_imported(
    monkeypatch: pytest.MonkeyPatch, arguments: list[str], blocked: bool
) -> None:
    """A SIGHUP in the daemon's first half second (its imports) ended it: the default action. Blocked
    at once, it waits for the supervisor, which reads it as a reload."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    seen: list[set[int | signal.Signals]] = []

    def fake_cli(received: Sequence[str]) -> int:
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        return 0

    monkeypatch.setattr(ckpt_watcher.cli, "main", fake_cli)

    assert console.main(arguments) == 0
    assert (signal.SIGHUP in seen[0]) is blocked


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(received: Sequence[str]) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(ckpt_watcher.cli, "main", broken)
    monkeypatch.setattr(console, "reader_gone", lambda: 128 + signal.SIGPIPE)  # keeps pytest's stdout

    assert console.main(["prune", "/ckpt"]) == 128 + signal.SIGPIPE
