"""Hostile names: undecodable bytes, newlines, terminal escapes and bidi controls, printed anywhere.

Every name goes through one escaping function (``records.display_name``): the output is always valid
UTF-8 on one line, and two different names never print the same. The real-process cases run with a
stdout and stderr that refuse anything that is not UTF-8 (``PYTHONIOENCODING=utf-8:strict``).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watcher.logs import configure_logging
from ckpt_watcher.records import display_name
from tests.support.cli import NOT_JSON, STRICT_UTF8, log_records, run_cli
from tests.support.factories import step_name, write_checkpoint, write_truncated
from tests.support.hostile import is_clean_text, strings_in

pytestmark = pytest.mark.timeout(300)

_ESCAPED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def _unescape(text: str) -> str:
    """The inverse of display_name, written independently: proof that the escaping is unambiguous."""
    pieces: list[str] = []
    index = 0
    while index < len(text):
        character = text[index]
        if character != "\\":
            pieces.append(character)
            index += 1
            continue
        kind = text[index + 1]
        if kind == "\\":
            pieces.append("\\")
            index += 2
        elif kind in "nrt":
            pieces.append({"n": "\n", "r": "\r", "t": "\t"}[kind])
            index += 2
        elif kind == "x":
            value = int(text[index + 2 : index + 4], 16)
            pieces.append(chr(value) if value < 0x80 else chr(0xDC00 + value))  # a byte, as os.fsdecode
            index += 4
        elif kind == "u":
            pieces.append(chr(int(text[index + 2 : index + 6], 16)))
            index += 6
        elif kind == "U":
            pieces.append(chr(int(text[index + 2 : index + 10], 16)))
            index += 10
        else:
            raise AssertionError(f"unknown escape {kind!r} in {text!r}")
    return "".join(pieces)


_any_text = st.text(
    st.one_of(
        st.characters(),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),  # lone surrogates
        st.sampled_from("\\\n\r\t\x1b\x7f\x85\u2028\u2029\u202e\u200f\ufeff"),
    )
)
_os_names = st.binary(min_size=1, max_size=40).map(os.fsdecode)


@given(st.one_of(_any_text, _os_names))
def test_escaped_names_are_clean_unambiguous_and_stable(name: str) -> None:
    shown = display_name(name)

    assert is_clean_text(shown)
    assert not any(unicodedata.category(character) in _ESCAPED_CATEGORIES for character in shown)
    assert _unescape(shown) == name
    assert display_name(shown) == shown  # escaping what is already escaped changes nothing


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\")))
def test_plain_names_are_shown_as_they_are(name: str) -> None:
    assert display_name(name) == name


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("epoch=00-step=000100-train.ckpt", "epoch=00-step=000100-train.ckpt"),
        ("run\nfake", "run\\nfake"),
        (os.fsdecode(b"run-\xff"), "run-\\xff"),
        ("a\\xff", "a\\\\xff"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("next\u0085line", "next\\u0085line"),
        ("evil\u202egpj.ckpt", "evil\\u202egpj.ckpt"),
        ("line\u2028break", "line\\u2028break"),
        ("lone\ud800", "lone\\ud800"),
        ("müde 😴.ckpt", "müde 😴.ckpt"),
        ("tab\there", "tab\\there"),
    ],
)
def test_escapes(name: str, shown: str) -> None:
    assert display_name(name) == shown


def test_paths_can_be_given_directly() -> None:
    assert display_name(Path(os.fsdecode(b"/ckpt/run-\xff"))) == "/ckpt/run-\\xff"


# -- log records: one processor escapes every string, so no call site can forget -----------------------


_CONSOLE_COLOURS = re.compile("\x1b\\[[0-9;]*m")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_type", [io.StringIO, _Terminal], ids=["json-lines", "console"])
def test_log_records_escape_every_string_value(stream_type: type[io.StringIO]) -> None:
    stream = stream_type()
    configure_logging("info", stream=stream)
    try:
        log = structlog.get_logger("test")
        raw = os.fsdecode(b"/ckpt/run\n-\xff/epoch=00-step=000100-train.ckpt")
        log.warning(
            "checkpoint_suspicious",
            path=raw,
            escaped=display_name(raw),
            directory=Path(raw).parent,
            reasons=[f"symlink to {raw}"],
            detail={"target": raw},
        )
        output = stream.getvalue()
    finally:
        structlog.reset_defaults()  # later tests must not write to this stream

    assert output.endswith("\n")
    assert output.count("\n") == 1  # one record, one line: a name cannot forge a second one
    assert is_clean_text(_CONSOLE_COLOURS.sub("", output.rstrip("\n")))  # only the renderer's own colours
    output.encode("utf-8", "strict")
    if stream_type is io.StringIO:
        record = json.loads(output)
        shown = "/ckpt/run\\n-\\xff/epoch=00-step=000100-train.ckpt"
        assert record["path"] == shown
        assert record["escaped"] == shown  # already escaped: not escaped twice
        assert record["directory"] == "/ckpt/run\\n-\\xff"
        assert record["reasons"] == [f"symlink to {shown}"]
        assert record["detail"] == {"target": shown}


# -- real processes with a strict UTF-8 stdout ---------------------------------------------------------

_NEWLINE_DIRECTORY = b"run\nfake"
_FORGED = b"x\n  delete  step      0      100             epoch=00-step=000100-train.ckpt  forged.ckpt"


def _hostile_tree(root: Path) -> dict[bytes, int]:
    """Groups with hostile names; returns how many entries each group directory holds."""
    base = os.fsencode(root)
    groups: dict[bytes, int] = {}
    for directory in (b"run-\xff", _NEWLINE_DIRECTORY, b"plain"):
        path = os.path.join(base, directory)
        os.mkdir(path)
        for step in range(100, 800, 100):
            write_checkpoint(Path(os.fsdecode(os.path.join(path, os.fsencode(step_name(0, step))))))
        groups[directory] = 7
    newline_group = os.path.join(base, _NEWLINE_DIRECTORY)
    write_checkpoint(Path(os.fsdecode(os.path.join(newline_group, _FORGED))))
    groups[_NEWLINE_DIRECTORY] += 1
    plain = os.path.join(base, b"plain")
    write_checkpoint(Path(os.fsdecode(os.path.join(plain, b"weird\xff\x1b[2J.ckpt"))))
    os.symlink(b"weird\xff\x1b[2J.ckpt", os.path.join(plain, b"last.ckpt"))
    write_checkpoint(Path(os.fsdecode(os.path.join(plain, b"bidi\xe2\x80\xaegpj.ckpt"))))
    groups[b"plain"] += 3
    return groups


def _table_rows(output: str) -> dict[str, list[str]]:
    """Group header -> its rows (without the column header), from the dry-run table."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if not line:
            current = None
        elif not line.startswith(" ") and current is None and not line.startswith("kept "):
            current = groups.setdefault(line.split("  (policy:")[0], [])
        elif current is not None and not line.startswith("  ACTION"):
            current.append(line)
    return groups


def _check_output_is_clean(completed: subprocess.CompletedProcess[bytes]) -> tuple[str, list[dict[str, Any]]]:
    stdout = completed.stdout.decode("utf-8", "strict")
    stderr = completed.stderr.decode("utf-8", "strict")
    assert "Traceback" not in stderr, stderr
    assert all(is_clean_text(line) for line in stdout.splitlines())
    records = log_records(completed.stderr)
    assert len(records) == len([line for line in stderr.splitlines() if line])
    assert [record["line"] for record in records if record["event"] == NOT_JSON] == []
    for record in records:
        assert all(is_clean_text(text) for text in strings_in(record))
    return stdout, records


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "prune"])
def test_prune_table_with_hostile_names(tmp_path: Path, dry_run: bool) -> None:
    root = tmp_path / "root"
    root.mkdir()
    groups = _hostile_tree(root)

    arguments = ["prune", str(root), *(["--dry-run"] if dry_run else [])]
    completed = run_cli(*arguments, environment=STRICT_UTF8, text=False)

    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    stdout, records = _check_output_is_clean(completed)
    rows = _table_rows(stdout)
    shown = {f"{root}/run-\\xff": 7, f"{root}/run\\nfake": 8, f"{root}/plain": 10}
    assert {header: len(lines) for header, lines in rows.items()} == shown  # no forged row
    plain = "\n".join(rows[f"{root}/plain"])
    assert "weird\\xff\\x1b[2J.ckpt" in plain
    assert "bidi\\u202egpj.ckpt" in plain
    assert "x\\n  delete  step" in "\n".join(rows[f"{root}/run\\nfake"])
    deleted = [record for record in records if record["event"] == "checkpoint_deleted"]
    if dry_run:
        assert deleted == []
    else:
        assert len(deleted) == 6  # the two oldest of each group
        assert {Path(record["path"]).parent.name for record in deleted} == {
            "run-\\xff",
            "run\\nfake",
            "plain",
        }
        for directory in groups:
            names = os.listdir(os.path.join(os.fsencode(root), directory))
            assert os.fsencode(step_name(0, 100)) not in names
            assert os.fsencode(step_name(0, 300)) in names


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "prune"])
def test_prune_json_with_hostile_names(tmp_path: Path, dry_run: bool) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _hostile_tree(root)

    arguments = ["prune", str(root), "--json", *(["--dry-run"] if dry_run else [])]
    completed = run_cli(*arguments, environment=STRICT_UTF8, text=False)

    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    stdout, _ = _check_output_is_clean(completed)
    document = json.loads(stdout)
    assert all(is_clean_text(text) for text in strings_in(document))
    directories = {group["directory"]: group for group in document["groups"]}
    assert set(directories) == {f"{root}/run-\\xff", f"{root}/run\\nfake", f"{root}/plain"}
    names = {entry["name"] for group in document["groups"] for entry in group["entries"]}
    assert "weird\\xff\\x1b[2J.ckpt" in names
    assert _FORGED.decode().replace("\n", "\\n") in names
    last = next(entry for entry in directories[f"{root}/plain"]["entries"] if entry["name"] == "last.ckpt")
    assert any("weird\\xff\\x1b[2J.ckpt" in reason for reason in last["reasons"])


def test_inspect_with_hostile_names(tmp_path: Path) -> None:
    directory = tmp_path / os.fsdecode(b"insp\xff\nect")
    directory.mkdir()
    write_truncated(directory / os.fsdecode(b"half\xfe\n  forged row.ckpt"))
    write_checkpoint(directory / "bidi\u202egpj.ckpt")

    table = run_cli("inspect", str(directory), environment=STRICT_UTF8, text=False)
    as_json = run_cli("inspect", str(directory), "--json", environment=STRICT_UTF8, text=False)

    for completed in (table, as_json):
        assert completed.returncode == 1
        _, records = _check_output_is_clean(completed)
        failures = [record for record in records if record["event"] == "inspect_failed"]
        assert len(failures) == 2
        assert {Path(record["path"]).name for record in failures} == {
            "half\\xfe\\n  forged row.ckpt",
            "bidi\\u202egpj.ckpt",
        }
    lines = table.stdout.decode("utf-8").splitlines()
    assert lines[0].startswith("NAME")
    assert sorted(line.split()[0] for line in lines[1:3]) == ["bidi\\u202egpj.ckpt", "half\\xfe\\n"]
    assert f"{display_name(str(directory))}/half\\xfe\\n  forged row.ckpt:" in lines
    documents = json.loads(as_json.stdout.decode("utf-8"))
    assert {document["path"] for document in documents} == {
        f"{display_name(str(directory))}/half\\xfe\\n  forged row.ckpt",
        f"{display_name(str(directory))}/bidi\\u202egpj.ckpt",
    }


HOSTILE_ROOT = b"root-\xff\nforged line"


@pytest.mark.parametrize(
    ("arguments", "exit_code"),
    [
        (["trash", "list", "{root}"], 0),
        (["trash", "list", "{root}", "--json"], 0),
        (["trash", "empty", "{root}"], 0),
        (["restore", "{root}", "--all"], 1),
        (["prune", "{root}", "--dry-run"], 0),
        (["prune", "{root}/missing\xff"], 2),
        (["trash", "list", "{root}/missing"], 2),
        (["policy", "{root}/policy.yaml"], 2),
        (["prune", "{root}", "--policy", "{root}/policy.yaml"], 2),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else str(value),
)
def test_every_command_on_a_hostile_root_prints_clean_lines(
    tmp_path: Path, arguments: list[str], exit_code: int
) -> None:
    """A root whose name is not UTF-8 and holds a newline: every command's output and every message is
    strict UTF-8, one line per message, without a traceback."""
    root = os.fsdecode(os.path.join(os.fsencode(tmp_path), HOSTILE_ROOT))
    os.mkdir(root)
    write_checkpoint(Path(root) / step_name(0, 100))
    (Path(root) / "policy.yaml").write_text("save_top_k_checkpoints: nine\n")
    command = [argument.replace("{root}", root) for argument in arguments]
    if "missing\xff" in command[-1]:
        command[-1] = os.fsdecode(os.fsencode(root) + b"/missing\xff")

    completed = run_cli(*command, environment=STRICT_UTF8, text=False)

    stdout = completed.stdout.decode("utf-8", "strict")
    stderr = completed.stderr.decode("utf-8", "strict")
    assert completed.returncode == exit_code, stderr
    assert "Traceback" not in stderr, stderr
    assert all(is_clean_text(line) for line in [*stdout.splitlines(), *stderr.splitlines()])
    for line in stderr.splitlines():
        assert not line.startswith("forged line"), "a name started a line of its own"
    for line in stdout.splitlines():
        assert not line.startswith("forged line"), "a name started a line of its own"
