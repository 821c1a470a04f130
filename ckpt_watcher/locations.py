"""Where a root is: a local directory, or a prefix in an object store named by an fsspec URL.

``s3://bucket/prefix``, ``gs://...`` and ``az://...`` name a prefix in a bucket (``file://PATH`` is the
plain path PATH). The reconcile core names everything with ``Path``s, so an object is given a *core
path* in a namespace of its own: ``s3://bucket/run/x.ckpt`` is ``/s3:/bucket/run/x.ckpt``. Only the
bucket backend ever turns a core path back into a key, and ``display_name`` shows a core path as its
URL again, so every table, JSON document and log record names objects as the user does. (A local
directory called ``s3:``, ``gs:`` or ``az:`` at the file system's root is therefore not supported.)

An object key that cannot be named by a path faithfully (an empty, ``.`` or ``..`` component, as in
``run//x.ckpt``) is never given one: the bucket backend leaves such objects alone.

Pure string work: no fsspec, no network; importing this module costs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# scheme -> (the pip extra that installs its backend, the module fsspec imports for it)
BACKENDS: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
}
# Schemes that are another name for one of the above (the same store, the same objects): a URL is
# held under its canonical scheme, so s3a://b/k and s3://b/k are one path (a pin written one way keeps
# the object a root written the other way lists).
CANONICAL_SCHEMES = {"s3a": "s3", "gcs": "gs", "abfs": "az"}
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
_CORE_PREFIXES = tuple(f"/{scheme}:/" for scheme in BACKENDS)


class LocationError(ValueError):
    """A URL that names no usable root (unknown scheme, no bucket, a path-like key it cannot hold)."""


@dataclass(frozen=True, slots=True)
class StorageURL:
    """A prefix in a bucket: ``scheme://bucket/prefix`` (``prefix`` has no leading or trailing slash)."""

    scheme: str
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return self.text

    @property
    def text(self) -> str:
        """The canonical URL, ``s3://bucket/prefix``."""
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    @property
    def extra(self) -> str:
        """The pip extra that installs this scheme's backend (``s3``, ``gcs``, ``azure``)."""
        return BACKENDS[self.scheme][0]

    @property
    def backend_module(self) -> str:
        """The module fsspec needs for this scheme (``s3fs``, ``gcsfs``, ``adlfs``)."""
        return BACKENDS[self.scheme][1]

    @property
    def core_path(self) -> Path:
        """The path the reconcile core names this prefix by: ``/s3:/bucket/prefix``."""
        return Path("/", f"{self.scheme}:", self.bucket, *(key_parts(self.prefix) or ()))

    def key_of(self, path: Path) -> str | None:
        """The object key of a core path at or below this prefix, or None if it is not below it."""
        text = str(path)
        root = str(self.core_path)
        if text == root:
            return self.prefix
        if not text.startswith(root + "/"):
            return None
        relative = text[len(root) + 1 :]
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def path_of(self, key: str) -> Path | None:
        """The core path of an object key of this bucket, or None if a path cannot name it faithfully."""
        parts = key_parts(key)
        if parts is None:
            return None
        return Path("/", f"{self.scheme}:", self.bucket, *parts)

    def below(self, relative: str) -> StorageURL:
        """The URL of ``relative`` (a key relative to this prefix)."""
        prefix = f"{self.prefix}/{relative}" if self.prefix else relative
        return StorageURL(self.scheme, self.bucket, prefix.strip("/"))


def key_parts(key: str) -> tuple[str, ...] | None:
    """A key's components, or None when a path cannot hold them exactly (empty, ``.`` or ``..``)."""
    if key == "":
        return ()
    parts = tuple(key.split("/"))
    if any(part in {"", ".", ".."} for part in parts):
        return None
    return parts


def is_url(text: str) -> bool:
    """True for ``scheme://...`` text (``file://`` included); a plain path is not a URL."""
    return _URL.fullmatch(text) is not None


def parse_location(text: str) -> Path | StorageURL:
    """A command-line root: a plain path, ``file://PATH`` (that path) or a bucket URL.

    Raises LocationError for a URL of an unknown scheme, without a bucket, or with a prefix that a
    path cannot name (``s3://bucket/a//b``).
    """
    match = _URL.fullmatch(text)
    if match is None:
        return Path(text)
    scheme = match["scheme"].lower()
    rest = match["rest"]
    if scheme == "file":
        return Path(rest or "/")
    if scheme not in BACKENDS:
        known = ", ".join(f"{name}://" for name in ("s3", "gs", "az"))
        raise LocationError(f"{text}: unsupported URL scheme {scheme!r} (supported: {known}, file://)")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.rstrip("/")
    if not bucket:
        raise LocationError(f"{text}: no bucket in the URL")
    if key_parts(prefix) is None or "/" in bucket:
        raise LocationError(f"{text}: the prefix has an empty, '.' or '..' component")
    return StorageURL(CANONICAL_SCHEMES.get(scheme, scheme), bucket, prefix)


def url_of_core_path(text: str) -> str | None:
    """``s3://bucket/key`` for the core path ``/s3:/bucket/key``; None for any other path."""
    if not text.startswith(_CORE_PREFIXES):
        return None
    scheme, _, rest = text[1:].partition(":/")
    return f"{scheme}://{rest}"


def shown_as_url(text: str) -> str:
    """A core path as the URL it stands for; any other text as it is (``display_name`` calls this)."""
    if not text.startswith(_CORE_PREFIXES):
        return text
    url = url_of_core_path(text)
    return text if url is None else url


def is_core_path_of_url(path: Path | str) -> bool:
    """True for a core path standing for an object (``/s3:/bucket/...``): never a local file."""
    return str(path).startswith(_CORE_PREFIXES)


def storage_url_of(path: Path | str) -> StorageURL | None:
    """The URL of a core path (``/s3:/bucket/key`` -> ``s3://bucket/key``), or None for a local path."""
    url = url_of_core_path(str(path))
    if url is None:
        return None
    parsed = parse_location(url)
    return parsed if isinstance(parsed, StorageURL) else None
