"""How soon a root whose pass could not read what it must is tried again (place.Retries): a bucket whose
prefix cannot be listed, a directory whose trash's pins cannot be read."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from structlog.testing import LogCapture

from ckpt_watcher.place import Retries
from ckpt_watcher.session import Session
from tests.support.logs import logged


@pytest.mark.parametrize(
    ("poll_seconds", "delays"),
    [
        (0.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        (30.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        (120.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 120.0]),
    ],
)
def test_the_delay_doubles_up_to_a_minute_or_the_poll_interval(
    poll_seconds: float, delays: list[float], captured: LogCapture
) -> None:
    retries = Retries("/data/run", poll_seconds, "nothing more is deleted")
    session: Any = SimpleNamespace(next_rescan=0.0)
    for _ in delays:
        retries.failed("EIO", cast(Session, session))

    records = logged(captured, "storage_unavailable")
    assert [record["retry_in"] for record in records] == delays
    assert [record["attempt"] for record in records] == list(range(1, len(delays) + 1))
    assert session.next_rescan == pytest.approx(retries.next_attempt)
    assert {record["detail"] for record in records} == {"nothing more is deleted"}


def test_a_long_outage_never_overflows_the_delay(captured: LogCapture) -> None:
    """The delay was 1.0 * 2 ** (failures - 1): after ~1,024 failures in a row (17 hours of a store
    down, at a minute each) that int no longer converts to a float, and every attempt after ended in
    an OverflowError (a ``worker_error``) instead of its retry. The exponent stops growing long
    before."""
    retries = Retries("s3://bucket/run", 30.0, "nothing is planned")
    for _ in range(1_100):
        retries.failed("connection refused", None)

    assert logged(captured, "storage_unavailable")[-1]["retry_in"] == 60.0


def test_the_first_pass_after_failures_says_so_once(captured: LogCapture) -> None:
    retries = Retries("/data/run", 0.0, "nothing more is deleted")
    retries.succeeded()
    retries.failed("EIO", None)
    retries.failed("EIO", None)
    retries.succeeded()
    retries.succeeded()

    assert [record["failed_attempts"] for record in logged(captured, "storage_restored")] == [2]
