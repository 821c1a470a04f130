"""What a scan knows about one directory entry: the input of the pure planner."""

from __future__ import annotations

import enum
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_watcher.frozen import quick_init
from ckpt_watcher.locations import shown_as_url
from ckpt_watcher.naming import Kind, ParsedName

# A directory checkpoint being deleted is first renamed to this prefix, so it is never seen half
# deleted under its own name; scans ignore such names, and the delete step finishes them.
DELETING_PREFIX = ".ckpt-watcher-deleting-"
# The root's trash (trash.py). A directory of this name, at any depth (the trash of another root
# below this one), is never walked, scanned, planned or followed.
TRASH_DIRECTORY_NAME = ".ckpt-trash"


class EntryType(enum.StrEnum):
    """What the entry is on disk, never following a symlink."""

    FILE = "file"
    SYMLINK = "symlink"
    DIRECTORY = "directory"
    OTHER = "other"


@quick_init
@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Device, inode, size and mtime: the delete step removes a file only if all four still match."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of_path(cls, path: Path | None) -> FileIdentity | None:
        """The identity of ``path`` (through symlinks, as a config file is read), or None if absent.

        It changes when a file is edited in place, replaced by rename, or swapped by a symlink flip.
        """
        if path is None:
            return None
        try:
            status = os.stat(path)
        except OSError:
            return None
        return cls.of_stat(status)

    @classmethod
    def of_stat(cls, status: os.stat_result) -> FileIdentity:
        """The identity a ``stat`` (or ``lstat``) result describes."""
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


# filesystem.TreeSummary.signature of a directory checkpoint's walk (entries, bytes, their times)
TreeSignature = tuple[int, int, int]


@quick_init
@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """One entry of a checkpoint directory as the scan saw it.

    ``directory`` (the group, one ``Path`` shared by all its records) and ``name`` say where it is;
    its ``path`` is made from them when asked for, so 100,000 records hold no ``Path`` each.
    ``complete`` is False for anything that is not (yet) a whole checkpoint, with ``incomplete_reason``
    saying why. ``link_target`` is the resolved target of a symlink, kept so the planner can protect it.
    ``settles_at`` is the wall-clock time at which a file that is only waiting to settle will count.
    """

    directory: Path
    name: str
    relative_path: str
    kind: Kind
    entry_type: EntryType
    bytes: int
    identity: FileIdentity | None
    complete: bool
    incomplete_reason: str | None = None
    epoch: int | None = None
    step: int | None = None
    date: str | None = None
    metric_name: str | None = None
    metric: float | None = None
    metric_text: str | None = None
    version: int = 0
    link_target: Path | None = None
    note: str | None = None
    settles_at: float | None = None
    names_best: str | None = None  # a Hugging Face checkpoint's trainer_state.json best_model_checkpoint
    # A directory checkpoint's files as its scan walked them (filesystem.TreeSummary.signature: entries,
    # bytes, their times): its deletion walks it again and keeps it if anything in it was written since
    # (a re-save in place changes neither the directory's own mtime nor, maybe, its bytes).
    tree_signature: TreeSignature | None = None

    @property
    def path(self) -> Path:
        """The entry's path: its directory joined with its name (a new ``Path`` each time)."""
        return self.directory / self.name

    @property
    def path_text(self) -> str:
        """``str(self.path)``, without making the ``Path``."""
        return path_prefix(self.directory) + self.name

    @classmethod
    def at(cls, path: Path, **fields: Any) -> CheckpointRecord:
        """The record of the entry at ``path`` (its directory and name taken apart)."""
        return cls(directory=path.parent, name=path.name, **fields)

    @property
    def step_order(self) -> tuple[int, int, int]:
        """Newness as numbers: (step, epoch, version); never the name or the mtime."""
        return (self.step or 0, self.epoch or 0, self.version)

    @property
    def metric_is_nan(self) -> bool:
        """True when the metric is missing or NaN, which ranks worst."""
        return self.metric is None or math.isnan(self.metric)


def name_fields(parsed: ParsedName) -> dict[str, Any]:
    """The record fields a parsed checkpoint name fills in (kind, epoch, step, date, metric, version)."""
    return {
        "kind": parsed.kind,
        "epoch": parsed.epoch,
        "step": parsed.step,
        "date": parsed.date,
        "metric_name": parsed.metric_name,
        "metric": parsed.metric,
        "metric_text": parsed.metric_text,
        "version": parsed.version,
    }


class DisplayText(str):
    """Text that ``display_name`` already escaped: escaping it again returns it unchanged."""

    __slots__ = ()


# Printable ASCII other than the backslash is shown as it is; anything else is looked at closely.
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*")
_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control, format (bidi overrides, zero-width), surrogate, line and paragraph separator characters.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SURROGATE_ESCAPED_BYTES = range(0xDC80, 0xDD00)  # os.fsdecode keeps an undecodable byte B as U+DC00+B


def path_prefix(directory: Path) -> str:
    """The text before a name in ``str(directory / name)``, as pathlib joins them: ``""`` for ``.``,
    the directory's text for ``/``, else the directory's text and a ``/``. Every path that is made as
    text (a record's, a cache key, a ``--json`` entry's) is made with it, so they agree."""
    text = str(directory)  # a Path keeps its text once made: shared by a group's records
    if text == ".":
        return ""
    return text if text.endswith("/") else text + "/"


def display_name(name: str | os.PathLike[str]) -> str:
    """The one way a name (or any text holding names) is printed: valid UTF-8 on one line, unambiguous.

    Python-style escapes: ``\\\\`` for a backslash, ``\\n``, ``\\r``, ``\\t``; ``\\xNN`` for a
    byte that is not UTF-8 (NN >= 80) and for the other ASCII controls (NN < 80); ``\\uNNNN`` (or
    ``\\UNNNNNNNN``) for other control, format, surrogate and line-separator characters. Every other
    character is shown as it is, so ordinary names (also non-ASCII ones) print unchanged. Two
    different names never print the same, no name can start a new line or steer a terminal, and text
    this function returned is returned unchanged (plain text as it is, escaped text as a ``DisplayText``).
    The core path of an object (``/s3:/bucket/key``, see locations.py) is shown as its URL.
    """
    if isinstance(name, DisplayText):
        return name
    text = shown_as_url(os.fspath(name))
    if _PLAIN.fullmatch(text):
        return text  # nothing to escape: the same object (escaping it again changes nothing either)
    return DisplayText("".join(_escape_character(character) for character in text))


def is_plain_text(text: str) -> bool:
    """True when ``text`` is printable ASCII without a backslash: ``display_name`` shows such text as
    it is, unless it is a core path (which starts with ``/``)."""
    return _PLAIN.fullmatch(text) is not None


def _escape_character(character: str) -> str:
    if character in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[character]
    code = ord(character)
    if 0x20 <= code < 0x7F:
        return character
    if code in _SURROGATE_ESCAPED_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if unicodedata.category(character) in _INVISIBLE_CATEGORIES:
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return character


def metric_for_json(record: CheckpointRecord) -> float | str | None:
    """The metric as JSON can carry it: a number, or the text ``nan``/``inf``/``-inf``."""
    if record.metric is None:
        return None
    if math.isfinite(record.metric):
        return record.metric
    return record.metric_text
