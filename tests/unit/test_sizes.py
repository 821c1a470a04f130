"""The size grammar of ``max_size`` and ``keep_free`` (``ckpt_watcher.sizes``), table-driven."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watcher.sizes import (
    LARGEST_SIZE,
    UNITS,
    FreeSpaceSetting,
    SizeError,
    free_space_setting,
    human_bytes,
    size_bytes,
)

SIZES: list[tuple[int | str, int]] = [
    (0, 0),
    (1, 1),
    (123456789, 123456789),
    ("0B", 0),
    ("17B", 17),
    ("1KB", 1000),
    ("1KiB", 1024),
    ("2MB", 2_000_000),
    ("2MiB", 2 * 1024**2),
    ("500GiB", 500 * 1024**3),
    ("500 GiB", 500 * 1024**3),
    ("  3 TB ", 3 * 1000**4),
    ("1.5TB", 1_500_000_000_000),
    ("1.5KiB", 1536),
    ("0.5KiB", 512),
    (".5KiB", 512),
    ("1.0001KB", 1000),  # rounds down to whole bytes
    ("1TiB", 1024**4),
    ("4TiB", 4 * 1024**4),
]


@pytest.mark.parametrize(("value", "expected"), SIZES, ids=[repr(value) for value, _ in SIZES])
def test_sizes_are_read_as_bytes(value: int | str, expected: int) -> None:
    assert size_bytes(value) == expected


NOT_SIZES: list[tuple[object, str]] = [
    (-1, "must be at least 0"),
    (True, "not a size"),
    (1.5, "not a size"),
    (None, "not a size"),
    ([1], "not a size"),
    ("", "not a number and a unit"),
    ("500", "not a number and a unit"),
    ("GiB", "not a number and a unit"),
    ("-5GiB", "not a number and a unit"),
    ("1e9B", "not a number and a unit"),
    ("5 gb", "unknown unit"),
    ("5 Gb", "unknown unit"),
    ("5 kib", "unknown unit"),
    ("5 PiB", "unknown unit"),
    ("5 G", "unknown unit"),
    ("1.5B", "a number of bytes must be whole"),
    ("5 GiB GiB", "not a number and a unit"),
    ("1,5GB", "not a number and a unit"),
    ("10%", "not a number and a unit"),
    (LARGEST_SIZE + 1, "must be at most"),
    ("9999999TiB", "must be at most"),
]


@pytest.mark.parametrize(("value", "problem"), NOT_SIZES, ids=[repr(value) for value, _ in NOT_SIZES])
def test_anything_else_is_not_a_size(value: object, problem: str) -> None:
    with pytest.raises(SizeError, match=problem):
        size_bytes(value)  # type: ignore[arg-type]


@given(st.integers(0, 10**6), st.sampled_from(sorted(UNITS)))
def test_a_whole_number_and_a_unit_is_that_many_units(number: int, unit: str) -> None:
    assert size_bytes(f"{number}{unit}") == number * UNITS[unit]
    assert size_bytes(f"{number} {unit}") == number * UNITS[unit]


PERCENTAGES: list[tuple[str, int, int]] = [
    ("10%", 1000, 100),
    ("0%", 1000, 0),
    ("12.5%", 1000, 125),
    (" 33 % ", 100, 33),
    ("1%", 150, 2),  # rounds up: never less free space than asked for
    ("99.9%", 1000, 999),
]


@pytest.mark.parametrize(("text", "total", "expected"), PERCENTAGES)
def test_a_percentage_is_of_the_file_system_size(text: str, total: int, expected: int) -> None:
    setting = free_space_setting(text)
    assert setting.fraction is not None
    assert setting.bytes is None
    assert setting.bytes_of(total) == expected
    assert setting.text == text.strip()


def test_keep_free_also_takes_a_size() -> None:
    assert free_space_setting("50GiB") == FreeSpaceSetting(text="50GiB", bytes=50 * 1024**3)
    assert free_space_setting(4096).bytes_of(10) == 4096
    assert free_space_setting("1%").fraction == Decimal("0.01")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("100%", "below 100%"), ("150%", "below 100%"), ("-1%", "not a percentage"), ("%", "not a percentage")],
)
def test_a_percentage_is_below_100(text: str, problem: str) -> None:
    with pytest.raises(SizeError, match=problem):
        free_space_setting(text)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (500 * 1024**3, "500.0 GiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text
