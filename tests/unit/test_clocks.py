"""clocks.SeenSince: the one memory behind every "seen unchanged for the quiet time"."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watcher.clocks import SeenSince


@pytest.mark.parametrize(
    ("sightings", "expected"),
    [
        # (key, value, now) in order -> what each sighting answers
        pytest.param([("a", 1, 10.0)], [None], id="first sighting starts the watch"),
        pytest.param([("a", 1, 10.0), ("a", 1, 12.5)], [None, 2.5], id="same value: seconds since the first"),
        pytest.param(
            [("a", 1, 10.0), ("a", 2, 11.0), ("a", 2, 14.0)], [None, None, 3.0], id="a new value restarts it"
        ),
        pytest.param(
            [("a", 1, 10.0), ("a", 2, 11.0), ("a", 1, 12.0), ("a", 1, 13.0)],
            [None, None, None, 1.0],
            id="back to an old value is a new value",
        ),
        pytest.param(
            [("a", 1, 10.0), ("b", 1, 11.0), ("a", 1, 15.0), ("b", 1, 15.0)],
            [None, None, 5.0, 4.0],
            id="keys are watched apart",
        ),
    ],
)
def test_watched_answers_seconds_since_the_value_was_first_seen(
    sightings: list[tuple[str, int, float]], expected: list[float | None]
) -> None:
    seen: SeenSince[str, int] = SeenSince()

    assert [seen.watched(key, value, now) for key, value, now in sightings] == expected


def test_forget_restarts_a_watch() -> None:
    seen: SeenSince[str, int] = SeenSince()
    seen.watched("a", 1, 10.0)

    seen.forget("a")
    seen.forget("never seen")  # nothing to forget: no error

    assert seen.watched("a", 1, 20.0) is None
    assert seen.watched("a", 1, 21.0) == 1.0


def test_retain_keeps_only_the_keys_still_there() -> None:
    seen: SeenSince[str, int] = SeenSince()
    for key in ("a", "b", "c"):
        seen.watched(key, 1, 10.0)

    seen.retain(["c", "a", "not seen yet"])

    assert len(seen) == 2
    assert seen.watched("a", 1, 12.0) == 2.0
    assert seen.watched("b", 1, 12.0) is None  # dropped: watched again from now


def test_forget_watched_for_drops_only_the_keys_already_quiet() -> None:
    seen: SeenSince[str, int] = SeenSince()
    seen.watched("old", 1, 10.0)
    seen.watched("new", 1, 19.0)

    seen.forget_watched_for(2.0, now=20.0)

    assert len(seen) == 1
    assert seen.watched("new", 1, 20.0) == 1.0
    assert seen.watched("old", 1, 20.0) is None  # asked again: waits once more, never less


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 2), st.floats(0.0, 5.0)),
        max_size=40,
    )
)
def test_watched_is_the_time_since_the_last_change_of_value(steps: list[tuple[str, int, float]]) -> None:
    """Against a model that keeps the whole history: the answer is ``now`` minus the time of the
    sighting that began the key's current run of equal values (None at that sighting)."""
    seen: SeenSince[str, int] = SeenSince()
    history: dict[str, list[tuple[int, float]]] = {}
    now = 0.0
    for key, value, advance in steps:
        now += advance
        runs = history.setdefault(key, [])
        if not runs or runs[-1][0] != value:
            runs.append((value, now))
            expected = None
        else:
            expected = now - runs[-1][1]

        assert seen.watched(key, value, now) == expected
