"""The YAML loader of ``config_files`` (bounded: aliases, nesting; YAML 1.2 integers), in a module of
its own so that PyYAML is imported only when a config file is parsed (``config_files.parse_yaml``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.reader import ReaderError

from ckpt_watcher.config_files import (
    MAXIMUM_YAML_DEPTH,
    MAXIMUM_YAML_VALUES,
    ConfigFileError,
    YamlDocument,
    redact_quoted,
)


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
    """Parse one YAML document with BoundedLoader; any failure is a ConfigFileError (``config_files``).

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
