"""The ledger of bytes released but not yet shown by ``statvfs`` (``ckpt_watcher.releases``): what a
reading is credited with, when a release is seen (dropped), and that no credit outlives
``UNSEEN_RELEASE_SECONDS`` or exceeds the bytes recorded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_watcher.releases import (
    UNSEEN_RELEASE_SECONDS,
    Release,
    ReleaseLedger,
    credit,
    recorded,
    unseen,
)

MIB = 1 << 20
FREE = 100 * MIB
BOUND = UNSEEN_RELEASE_SECONDS

ONE = (Release(0.0, 16 * MIB, FREE),)
# A second eviction read the stale free space credited with the first: it expects both.
TWO = (Release(0.0, 16 * MIB, FREE), Release(1.0, 16 * MIB, FREE + 16 * MIB))

CASES = [
    # (what, releases, free read, now, credit, releases still unseen)
    ("nothing released", (), FREE, 1.0, 0, 0),
    ("btrfs before its commit: all of it", ONE, FREE, 1.0, 16 * MIB, 1),
    ("seen: nothing more", ONE, FREE + 16 * MIB, 1.0, 0, 0),
    ("seen, and more freed since", ONE, FREE + 20 * MIB, 1.0, 0, 0),
    ("half shown: the other half", ONE, FREE + 8 * MIB, 1.0, 8 * MIB, 1),
    ("a writer took 4 MiB: credited up to what was expected", ONE, FREE - 4 * MIB, 1.0, 16 * MIB, 1),
    ("not seen within the bound: no longer credited", ONE, FREE, BOUND, 0, 0),
    ("just within the bound", ONE, FREE, BOUND - 0.001, 16 * MIB, 1),
    ("two unseen: both", TWO, FREE, 2.0, 32 * MIB, 2),
    ("the first seen: the second", TWO, FREE + 16 * MIB, 2.0, 16 * MIB, 1),
    ("both seen", TWO, FREE + 32 * MIB, 2.0, 0, 0),
    ("the first too old: only the second's bytes", TWO, FREE, BOUND + 0.5, 16 * MIB, 1),
    ("both too old", TWO, FREE, BOUND + 1.0, 0, 0),
    ("a writer took more than all of it: never more than the bytes", TWO, FREE - 64 * MIB, 2.0, 32 * MIB, 2),
]


@pytest.mark.parametrize(
    ("releases", "free", "now", "expected_credit", "still_unseen"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_a_reading_is_credited_with_what_its_unseen_releases_still_owe(
    releases: tuple[Release, ...], free: int, now: float, expected_credit: int, still_unseen: int
) -> None:
    kept = unseen(releases, free, now)

    assert len(kept) == still_unseen
    assert credit(kept, free) == expected_credit


def test_the_ledger_credits_each_device_on_its_own_and_forgets_what_it_saw() -> None:
    ledger = ReleaseLedger()
    ledger.record(1, Release(0.0, 16 * MIB, FREE))

    assert ledger.credited(2, FREE, 1.0) == FREE  # another file system
    assert ledger.credited(1, FREE, 1.0) == FREE + 16 * MIB
    assert ledger.credits == {1: 16 * MIB, 2: 0}
    assert ledger.credited(1, FREE + 16 * MIB, 2.0) == FREE + 16 * MIB  # seen: dropped
    assert ledger.credited(1, FREE, 3.0) == FREE  # and not credited again


def test_a_release_of_nothing_is_not_recorded_and_old_ones_go_when_one_is() -> None:
    old = Release(0.0, MIB, FREE)

    assert recorded((old,), Release(1.0, 0, FREE)) == (old,)
    assert recorded((old,), Release(BOUND, MIB, FREE)) == (Release(BOUND, MIB, FREE),)


releases = st.lists(
    st.builds(
        Release,
        at=st.floats(min_value=0.0, max_value=200.0),
        bytes=st.integers(min_value=0, max_value=1 << 40),
        free_before=st.integers(min_value=0, max_value=1 << 42),
    ),
    max_size=8,
)
readings = st.integers(min_value=0, max_value=1 << 43)
times = st.floats(min_value=0.0, max_value=400.0)


@settings(max_examples=300, deadline=None)
@given(releases, readings, times)
def test_a_credit_never_exceeds_the_bytes_recorded_nor_outlives_the_bound(
    recorded_releases: list[Release], free: int, now: float
) -> None:
    kept = unseen(recorded_releases, free, now)
    given_credit = credit(kept, free)

    assert 0 <= given_credit <= sum(release.bytes for release in kept)
    assert all(now - release.at < BOUND for release in kept)  # none outlives the bound
    assert all(free < release.expected_free for release in kept)  # a seen release is dropped
    assert free + given_credit <= max((release.expected_free for release in kept), default=free)
    if all(now - release.at >= BOUND for release in recorded_releases):
        assert given_credit == 0
