"""Reading the files the tool takes settings from, safely: one reader and one YAML loader for all.

The policy file, every per-run ``.ckpt-watcher.yaml`` and every ``protect_from`` training config go
through here. Anyone who can write into a checkpoint directory can plant such a file, so reading one
must never hang (a FIFO), never read forever (``/dev/zero``), never use unbounded memory or CPU (a
YAML alias bomb, nesting thousands deep), and never fail with anything but a clear message. And since
the messages go to logs, they quote positions, never contents, of files the user did not name on the
command line.

Symlinks are followed on purpose: configs are often links (a Kubernetes ConfigMap is a chain of them).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.reader import ReaderError

from ckpt_watcher.filesystem import real_path
from ckpt_watcher.logs import describe_os_error

# A training config is a few KiB; a megabyte is already far more than any real one.
MAXIMUM_CONFIG_BYTES = 1024 * 1024
# Values after expanding every alias as often as it is used. Each one costs PyYAML about 0.7 KiB
# while it is read, so this keeps a config under ~35 MiB; a large real config has a few thousand.
MAXIMUM_YAML_VALUES = 50_000
# Nesting of mappings and lists; real configs nest about ten deep.
MAXIMUM_YAML_DEPTH = 64


class ConfigFileError(Exception):
    """A config file that cannot be used; ``message`` is what follows ``At '<file>': ``."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file: the Python value and the node tree it came from (for line numbers)."""

    value: Any
    node: yaml.Node | None


def read_config_text(
    path: Path, *, confined_to: Sequence[Path] = (), limit: int = MAXIMUM_CONFIG_BYTES
) -> str:
    """The text of the regular file at ``path``; ConfigFileError for anything else.

    Never opens a FIFO, socket or device (it is refused after a ``stat``, and the file is opened
    non-blocking and checked again with ``fstat`` in case it was swapped in between), never reads
    more than ``limit`` bytes. With ``confined_to``, the file actually opened (after every symlink)
    must lie under one of those directories.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise ConfigFileError("no such file") from None
    except OSError as error:
        raise ConfigFileError(_open_problem(error)) from None
    _require_regular(status, limit)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigFileError("no such file") from None
    except OSError as error:
        raise ConfigFileError(_open_problem(error)) from None
    try:
        _require_regular(os.fstat(descriptor), limit)
        if confined_to:
            _require_inside(_opened_path(descriptor, path), confined_to)
        data = _read_at_most(descriptor, limit)
    finally:
        os.close(descriptor)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"not UTF-8 text ({error.reason})") from None


def _open_problem(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "a symlink loop"
    if error.errno == errno.ENXIO:
        return "not a regular file (a socket or device); refused"
    return f"cannot read it ({describe_os_error(error)})"


def _require_regular(status: os.stat_result, limit: int) -> None:
    mode = status.st_mode
    if stat.S_ISDIR(mode):
        raise ConfigFileError("is a directory, not a YAML file")
    if not stat.S_ISREG(mode):
        raise ConfigFileError(f"not a regular file ({_file_kind(mode)}); refused")
    if status.st_size > limit:
        raise ConfigFileError(
            f"{status.st_size} bytes, more than a config file may have ({limit} bytes); refused"
        )


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


def _opened_path(descriptor: int, path: Path) -> Path:
    """The real path of the open file: /proc knows it without a race; else resolve the name."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{descriptor}"))
    except OSError:
        return real_path(path)


def _require_inside(resolved: Path, directories: Sequence[Path]) -> None:
    for directory in directories:
        real_directory = real_path(directory)
        if resolved == real_directory or real_directory in resolved.parents:
            return
    raise ConfigFileError(
        "the file is outside the directories it may be read from "
        f"({', '.join(str(directory) for directory in directories)}); refused"
    )


def _read_at_most(descriptor: int, limit: int) -> bytes:
    """Read to the end, but fail once more than ``limit`` bytes arrive (a file that grows, /proc)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(descriptor, min(65536, limit + 1 - total))
        except OSError as error:
            raise ConfigFileError(f"cannot read it ({describe_os_error(error)})") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise ConfigFileError(f"more than a config file may have ({limit} bytes); refused")


class YamlLimitError(ComposerError):
    """A document over one of the bounds: too many values (aliases expanded), too deep, or a loop."""


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 integers and bounds on nesting and on values after alias expansion.

    ``0500`` is 500 (not octal 320) and ``1:30`` is a string (not 90). An alias counts as many values
    as the value it refers to, so a billion-laughs document is refused after reading a few lines; an
    alias inside the value it refers to (a recursive document) is refused outright. Any error a value's
    constructor raises (``2024-13-45`` as a date, say) becomes a ConstructorError with its position.
    """

    def __init__(
        self, text: str, *, maximum_values: int = MAXIMUM_YAML_VALUES, maximum_depth: int = MAXIMUM_YAML_DEPTH
    ) -> None:
        super().__init__(text)
        self.maximum_values = maximum_values
        self.maximum_depth = maximum_depth
        self._values = 0
        self._depth = 0
        self._anchored_sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose as PyYAML does, counting values (aliases expanded) and nesting as it goes."""
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._anchored_sizes.get(id(node))
            if size is None:
                raise YamlLimitError(None, None, "an alias inside the value it refers to (a loop)", mark)
            self._count(size, mark)
            return node
        self._depth += 1
        if self._depth > self.maximum_depth:
            raise YamlLimitError(None, None, f"nested deeper than {self.maximum_depth} levels", mark)
        before = self._values
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._count(1, mark)
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            self._anchored_sizes[id(node)] = self._values - before
        return node

    def _count(self, values: int, mark: Any) -> None:
        self._values += values
        if self._values > self.maximum_values:
            raise YamlLimitError(
                None, None, f"more than {self.maximum_values} values once aliases are expanded", mark
            )

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """Construct as PyYAML does; an error of any kind becomes a ConstructorError at the node."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as error:
            kind = node.tag.rsplit(":", 1)[-1] if node.tag.startswith("tag:yaml.org,2002:") else "tagged"
            raise ConstructorError(
                None, None, f"a {kind} value that cannot be read ({error})", node.start_mark
            ) from None


_INT_TAG = "tag:yaml.org,2002:int"
BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
BoundedLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"), list("-+0123456789")
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0x"):
        return int(text, 16)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 10)


BoundedLoader.add_constructor(_INT_TAG, _construct_int)


def parse_yaml(text: str, *, quote_contents: bool = True) -> YamlDocument:
    """Parse one YAML document with BoundedLoader; any failure is a ConfigFileError.

    Without ``quote_contents`` the message gives the position and the kind of problem only: what
    PyYAML quotes from the file (a character, a tag, an alias name) is left out.
    """
    try:
        loader = BoundedLoader(text)
        try:
            node = loader.get_single_node()
            value = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        raise ConfigFileError(_describe_marked(error, quote_contents)) from None
    except ReaderError as error:
        code = error.character
        character = f" (#x{code:04x})" if quote_contents and isinstance(code, int) else ""
        raise ConfigFileError(
            f"YAML syntax error: a character YAML does not allow{character} at position {error.position}"
        ) from None
    except yaml.YAMLError as error:
        detail = f": {error}" if quote_contents else ""
        raise ConfigFileError(f"YAML syntax error{detail}") from None
    except Exception as error:  # nothing PyYAML raises may escape; not reachable within the bounds
        raise ConfigFileError(f"YAML could not be read ({type(error).__name__})") from None
    return YamlDocument(value=value, node=node)


def _describe_marked(error: yaml.MarkedYAMLError, quote_contents: bool) -> str:
    mark = error.problem_mark or error.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = error.problem or error.context or "invalid YAML"
    if not quote_contents:
        problem = redact_quoted(problem)
    if isinstance(error, YamlLimitError):
        return f"YAML refused{where}: {problem}"
    return f"YAML syntax error{where}: {problem}"


# A quoted part of a message ('x' or "x", with backslash escapes, as repr() writes them).
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
# Quoted parts that are PyYAML's own words, not the file's: '<block end>', ':', ...
_OWN_WORDS = re.compile(r"^['\"](?:<[a-z ]+>|.)['\"]$")


def redact_quoted(message: str) -> str:
    """``message`` with every quoted part longer than one character replaced by ``'…'``."""
    return _QUOTED.sub(lambda match: match[0] if _OWN_WORDS.match(match[0]) else "'…'", message)
