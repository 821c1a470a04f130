"""No credential of the environment in a log record or an error message (credentials.redact)."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from ckpt_watcher.credentials import REDACTED, redact
from ckpt_watcher.logs import configure_logging
from ckpt_watcher.records import display_name

SECRET = "wJalrXUtnFEMI/K7MDENG+ckptwatcherTEST"
KEY_ID = "AKIACKPTWATCHERTEST1"


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)


@pytest.mark.usefixtures("credentials")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"signature of {KEY_ID} with {SECRET} failed", f"signature of {REDACTED} with {REDACTED} failed"),
        ("http://user:pa55word@127.0.0.1:9000/bucket", f"http://{REDACTED}@127.0.0.1:9000/bucket"),
        ("nothing to hide here", "nothing to hide here"),
        ("mail me at someone@example.com", "mail me at someone@example.com"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_short_values_are_not_taken_for_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    text = "max of x and y"
    assert redact(text) is text


@pytest.mark.usefixtures("credentials")
def test_every_string_of_every_log_record_is_redacted() -> None:
    stream = io.StringIO()
    configure_logging("debug", stream)
    try:
        logger = structlog.get_logger("test")
        logger.error(
            "storage_unavailable",
            error=f"bad key {KEY_ID}",
            nested={"detail": [SECRET]},
            escaped=display_name(f"a\nname {SECRET}"),
        )
        try:
            raise RuntimeError(f"raised with {SECRET}")
        except RuntimeError:
            logger.exception("worker_error")
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert SECRET not in text
    assert KEY_ID not in text
    first = json.loads(text.splitlines()[0])
    assert first["error"] == f"bad key {REDACTED}"
    assert first["nested"] == {"detail": [REDACTED]}
    assert first["escaped"] == f"a\\nname {REDACTED}"  # escaped once, never twice
