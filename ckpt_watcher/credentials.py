"""No credential ever appears in a log record or an error message.

Object stores take their credentials from the backend's standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ...). Error texts come from the backend's client libraries, which are not
ours to audit, so every text the tool shows passes through ``redact``: the value of each credential
variable set in the environment, and the user-info part of a URL (``http://user:password@host``),
are replaced by ``<redacted>``. The logging set-up applies it to every string of every record.
"""

from __future__ import annotations

import os
import re

REDACTED = "<redacted>"
# The credential variables of the stores ckpt-watcher reads (S3 and S3-compatible, GCS, Azure).
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)
# Shorter values (a test's "x") would redact ordinary words; real credentials are far longer.
_SHORTEST_SECRET = 6
_USER_INFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def _secrets() -> list[str]:
    values = (os.environ.get(name, "") for name in CREDENTIAL_VARIABLES)
    return [value for value in values if len(value) >= _SHORTEST_SECRET]


def redact(text: str) -> str:
    """``text`` without any credential of the environment or a URL's user info; ``text`` itself (the
    same object) when there is nothing to remove."""
    found = [secret for secret in _secrets() if secret in text]
    has_user_info = "@" in text and _USER_INFO.search(text) is not None
    if not found and not has_user_info:
        return text
    cleaned = str(text)
    for secret in sorted(found, key=len, reverse=True):
        cleaned = cleaned.replace(secret, REDACTED)
    return _USER_INFO.sub(lambda match: f"{match['scheme']}{REDACTED}@", cleaned)
