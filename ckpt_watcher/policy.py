"""The retention policy: read from a YAML file (often the trainer's own config), validated strictly.

Only the retention keys are read from the top level, so a trainer config with many other keys can
serve as the policy file. Every problem in a file is reported at once, one ``At 'key': ...`` line
each, so a user fixes a broken edit in one go. Files are read with ``config_files`` (bounded, regular
files only); a file the user did not name on the command line (a per-run ``.ckpt-watcher.yaml``) is
described by positions and kinds of values, never by its contents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from ckpt_watcher.config_files import ConfigFileError, parse_yaml, read_config_text, redact_quoted
from ckpt_watcher.durations import parse_duration
from ckpt_watcher.locations import shown_as_url
from ckpt_watcher.naming import DEFAULT_BEST_TEMPLATE, DEFAULT_LAST_TEMPLATE, DEFAULT_STEP_TEMPLATE, Naming
from ckpt_watcher.records import display_name
from ckpt_watcher.sizes import UNIT_LIST, FreeSpaceSetting, free_space_setting, size_bytes

if TYPE_CHECKING:
    import yaml
    from pydantic import BaseModel

# What each retention key means: the one reference. ``ckpt-watcher policy`` prints it, the validation
# models (``policy_model``) carry it as each field's description, and README's policy table is kept
# equal to it by a test.
POLICY_DESCRIPTIONS: dict[str, str] = {
    "save_top_k_checkpoints": "newest step checkpoints kept; -1 = all; 0 = none by this rule",
    "save_top_k_best": "best checkpoints kept (ranked by the metric in the name); -1 = all",
    "save_every_n_epochs": "also keep the newest step checkpoint of every epoch `e` with `(e + 1) % n == 0` "
    "(Lightning's `every_n_epochs` convention); 0 = off",
    "save_on_n_steps": "the trainer's save cadence; accepted and shown, no retention effect",
    "best_mode": "whether a lower or a higher metric is better",
    "naming": "template overrides: `step`, `best`, `last`",
    "protect": "names (or paths relative to the root) that are never deleted, "
    'e.g. `["*-release.ckpt", "stage1/*"]`',
    "protect_from": "training configs whose `ckpt_path` / `pretrained_ckpt_path` are never deleted "
    "(see Resume protection); relative to the policy file's directory",
    "verify": (
        "how a checkpoint file is judged complete (see below): `zip`, no holes and its archive is "
        "whole (cheap: a few small reads); `crc`, also every member's CRC-32 matches, which costs "
        "**one full sequential read of each file** (as long as `cat file > /dev/null`: a 10 GB "
        "checkpoint is 10 GB of reads, ~5 s at 2 GB/s, plus ~0.5 s of CPU per GB), once per file, "
        "in bounded memory (1 MiB at a time); `load`, the safe mmap'd `torch.load` must also "
        "succeed. A file that fails is reported corrupt and neither counted nor deleted (`load` "
        "needs torch; each file is verified once)"
    ),
    "max_size": "per group (one directory): the most bytes its kept checkpoints may take, counting "
    "every kept checkpoint file and directory, `last.ckpt` included (a symlink counts 0); over it, "
    "kept checkpoints are evicted for space (see Retention by bytes); a size such as `500GiB`, "
    "or null for no limit",
    "keep_free": "per file system holding the root (and per device, for a group on another mount): "
    "free space to keep, **counting the next save**; a size, or `N%` of the file system's size; "
    "the strictest value among the groups on a file system applies (see Retention by bytes)",
    "keep_every_n_steps": "milestones: also keep every step checkpoint whose `step % n == 0` (Orbax's "
    "`keep_period`), for evaluation later; evicted for space last; 0 = off",
    "trash": "`{grace: DURATION}` (`30s`, `15m`, `24h`, `7d`): a deleted checkpoint is first moved "
    "into the root's `.ckpt-trash/` and stays restorable that long (see The trash); `0` or no "
    "`trash` key = deleted at once",
}


def size_hint(percentage: bool) -> str:
    """What a size is, for an error message."""
    hint = f"a size is a whole number of bytes or a number and a unit ({UNIT_LIST}), e.g. 500GiB or 1.5TB"
    return hint + (", or a percentage of the file system's size, e.g. 10%" if percentage else "")


_Value = TypeVar("_Value", bound="_ValidatedValue")


class _ValidatedValue:
    """A frozen policy value whose constructor validates with its pydantic model (``policy_model``),
    imported on first use; ``_trusted`` builds one from values already known to be valid."""

    _model_name: ClassVar[str]

    def __init__(self, **values: Any) -> None:
        self._take(self._validated(values, None))

    @classmethod
    def model_validate(cls: type[_Value], values: Any, *, context: Mapping[str, Any] | None = None) -> _Value:
        """Validate ``values`` (a mapping); pydantic's ValidationError lists every problem."""
        value = object.__new__(cls)
        value._take(cls._validated(values, context))
        return value

    @classmethod
    def _validated(cls, values: Any, context: Mapping[str, Any] | None) -> BaseModel:
        from ckpt_watcher import policy_model  # noqa: PLC0415  (pydantic: only when something is validated)

        model: type[BaseModel] = getattr(policy_model, cls._model_name)
        if isinstance(values, _ValidatedValue):  # a value (or a part) given whole, as pydantic took one
            values = values.model_dump()
        elif isinstance(values, Mapping):
            values = {
                key: part.model_dump() if isinstance(part, _ValidatedValue) else part
                for key, part in values.items()
            }
        return model.model_validate(values, context=context)

    @classmethod
    def _trusted(cls: type[_Value], values: Mapping[str, Any]) -> _Value:
        value = object.__new__(cls)
        for one in fields(cls):  # type: ignore[arg-type]  # every subclass is a dataclass
            object.__setattr__(value, one.name, values.get(one.name, one.default))
        return value

    def _take(self, model: BaseModel) -> None:
        for one in fields(self):  # type: ignore[arg-type]
            found = getattr(model, one.name)
            if isinstance(one.default, _ValidatedValue):  # a nested part: its own plain value
                found = type(one.default)._trusted(found.model_dump())
            object.__setattr__(self, one.name, found)

    def model_dump(self, *, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """The values as plain data, nested parts as mappings (``json``: lists instead of tuples)."""
        dumped: dict[str, Any] = {}
        for one in fields(self):  # type: ignore[arg-type]
            value = getattr(self, one.name)
            if isinstance(value, _ValidatedValue):
                value = value.model_dump(mode=mode)
            elif isinstance(value, tuple) and mode == "json":
                value = list(value)
            dumped[one.name] = value
        return dumped

    def model_copy(self: _Value, *, update: Mapping[str, Any] | None = None) -> _Value:
        """A copy with ``update`` applied, not validated (as pydantic's ``model_copy``)."""
        current = {one.name: getattr(self, one.name) for one in fields(self)}  # type: ignore[arg-type]
        return type(self)._trusted({**current, **(update or {})})


@dataclass(frozen=True, init=False)
class NamingTemplates(_ValidatedValue):
    """Template overrides, one per checkpoint kind, written as for ``ModelCheckpoint(filename=...)``."""

    _model_name = "NamingTemplates"

    step: str = DEFAULT_STEP_TEMPLATE
    best: str = DEFAULT_BEST_TEMPLATE
    last: str = DEFAULT_LAST_TEMPLATE


@dataclass(frozen=True, init=False)
class TrashSettings(_ValidatedValue):
    """The trash (README, "The trash"): how long a deleted checkpoint stays restorable; 0 = off."""

    _model_name = "TrashSettings"

    grace: str = "0"

    @property
    def grace_seconds(self) -> int:
        """The grace in seconds; 0 when the trash is off."""
        return parse_duration(self.grace)

    @property
    def enabled(self) -> bool:
        """True when deletions go to the trash."""
        return self.grace_seconds > 0


_DEFAULT_NAMING = NamingTemplates._trusted({})
_TRASH_OFF = TrashSettings._trusted({})


@dataclass(frozen=True, init=False)
class Policy(_ValidatedValue):
    """What to keep; the meaning of each key is ``POLICY_DESCRIPTIONS``'s. ``Policy(**values)`` and
    ``Policy.model_validate`` validate strictly (``policy_model``); ``DEFAULT_POLICY`` is the embedded
    default, built without pydantic."""

    _model_name = "Policy"

    save_top_k_checkpoints: int = 5
    save_top_k_best: int = 3
    save_every_n_epochs: int = 0
    save_on_n_steps: int = 500
    best_mode: Literal["min", "max"] = "min"
    naming: NamingTemplates = _DEFAULT_NAMING
    protect: tuple[str, ...] = ()
    protect_from: tuple[str, ...] = ()
    verify: Literal["zip", "crc", "load"] = "zip"
    max_size: int | str | None = None
    keep_free: int | str | None = None
    keep_every_n_steps: int = 0
    trash: TrashSettings = _TRASH_OFF

    @cached_property
    def max_size_bytes(self) -> int | None:
        """``max_size`` in bytes, or None for no limit."""
        return None if self.max_size is None else size_bytes(self.max_size)

    @cached_property
    def keep_free_setting(self) -> FreeSpaceSetting | None:
        """``keep_free`` read (bytes, or a fraction of the file system), or None."""
        return None if self.keep_free is None else free_space_setting(self.keep_free)

    @cached_property
    def compiled_naming(self) -> Naming:
        """The naming templates compiled once for classification."""
        return Naming.from_templates(self.naming.step, self.naming.best, self.naming.last)


POLICY_KEYS: tuple[str, ...] = tuple(one.name for one in fields(Policy))
# The keys of the retention keys that are mappings, for "unknown key" and "set more than once".
_SUB_KEYS: dict[str, tuple[str, ...]] = {
    "naming": tuple(one.name for one in fields(NamingTemplates)),
    "trash": tuple(one.name for one in fields(TrashSettings)),
}
DEFAULT_POLICY = Policy._trusted({})  # equal to Policy() (validated): tests/unit/test_policy.py


class PolicyError(Exception):
    """A policy file that cannot be used; ``problems`` lists every ``At 'key': ...`` line.

    ``partial``: the keys that did validate, as a policy (None if the file could not be read as a
    mapping), so the checks that need a valid policy (``load_checked_policy``) still run on them.
    """

    def __init__(
        self,
        source: str,
        problems: list[str],
        *,
        transient: bool = False,
        partial: LoadedPolicy | None = None,
    ) -> None:
        self.source = source
        self.problems = problems
        self.transient = transient  # the file could not be read for now (ConfigFileError.transient)
        self.partial = partial
        super().__init__(self.render())

    def render(self) -> str:
        """The message a user sees: the file, then one line per problem."""
        lines = [f"invalid policy {display_name(self.source)}:"]  # an object by its URL, a name escaped
        lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy plus where each value came from and any warnings worth logging.

    ``settings`` holds only the keys the file itself sets, for layering per-directory overrides.
    """

    policy: Policy
    source: Path | None
    origins: Mapping[str, str]
    warnings: tuple[str, ...] = field(default=())
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def source_label(self) -> str:
        """The file the policy came from, or 'embedded default'."""
        return shown_as_url(str(self.source)) if self.source is not None else "embedded default"


# bool before int: True is an int too.
_SCALAR_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number with a fraction"),
    (str, "a string"),
)


def describe_value(value: Any, *, quote: bool = True) -> str:  # noqa: C901  (one branch per YAML value type)
    """A YAML-flavoured description of a value for error messages: ``true (a boolean)``.

    Without ``quote`` only the kind is given (``a string``), for files whose contents must not be
    printed.
    """
    if value is None:
        return "null"
    if not quote:
        for kind, name in _SCALAR_KINDS:
            if isinstance(value, kind):
                return name
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value!r} (a number with a fraction)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _message_for(error: Mapping[str, Any], quote: bool) -> str:
    kind = error["type"]
    value = error.get("input")
    context = error.get("ctx") or {}
    described = describe_value(value, quote=quote)
    if kind in {"int_type", "int_from_float", "int_parsing"}:
        return f"expected a whole number, got {described}"
    if kind == "greater_than_equal":
        return f"must be at least {context.get('ge')}, got {described}"
    if kind == "literal_error":
        return f"must be one of {context.get('expected')}, got {described}"
    if kind == "string_type":
        return f"expected a string, got {described}"
    if kind == "extra_forbidden":
        known = _SUB_KEYS.get(str(error["loc"][0]), ())
        if len(known) == 1:
            return f"unknown key (the only known one is {known[0]})"
        return f"unknown key (the known ones are {_listed(known)})"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return f"expected a mapping, got {described}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return message if quote else redact_quoted(message)


def _listed(keys: tuple[str, ...]) -> str:
    """``step, best and last``."""
    if len(keys) <= 1:
        return keys[0] if keys else "none"
    return f"{', '.join(keys[:-1])} and {keys[-1]}"


def _location(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location)


def _edit_distance(left: str, right: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    previous_previous: list[int] = []
    previous = list(range(len(right) + 1))
    for i, left_char in enumerate(left, start=1):
        current = [i] + [0] * len(right)
        for j, right_char in enumerate(right, start=1):
            cost = 0 if left_char == right_char else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and left_char == right[j - 2] and left[i - 2] == right_char:
                current[j] = min(current[j], previous_previous[j - 2] + 1)
        previous_previous, previous = previous, current
    return previous[-1]


# Common trainer-config keys that sit within two edits of a retention key but mean something else.
_NEVER_SUGGESTED = frozenset({"project", "best_model", "name", "mode", "model", "protected"})


def suggest_key(key: str) -> str | None:
    """The retention key a misspelt top-level key probably meant, if it is within two edits."""
    if key in _NEVER_SUGGESTED:
        return None
    for known in POLICY_KEYS:
        distance = _edit_distance(key, known)
        # Short keys need closer matches, or a trainer's own 'name:' would be taken for 'naming:'.
        if 0 < distance <= 2 and distance * 4 < len(known):
            return known
    return None


def validate_policy(
    document: Any, source: str, duplicates: tuple[str, ...] = (), *, quote_contents: bool = True
) -> LoadedPolicy:
    """Validate a parsed YAML document; raise PolicyError listing every problem at once.

    ``duplicates`` are problems found while parsing (a retention key set twice). Without
    ``quote_contents`` no value from the document appears in a message.
    """
    if not isinstance(document, dict):
        described = describe_value(document, quote=quote_contents)
        raise PolicyError(source, [f"At '<top level>': expected a mapping of keys, got {described}"])
    problems: list[str] = list(duplicates)
    warnings: list[str] = []
    for key in document:
        if not isinstance(key, str):
            continue
        suggestion = suggest_key(key)
        if suggestion is not None:
            warnings.append(f"At '{key}': unknown key, did you mean '{suggestion}'? It is ignored.")
    present = [key for key in POLICY_KEYS if key in document]
    if not present:
        problems.append(
            "At '<top level>': sets none of the retention keys "
            f"({', '.join(POLICY_KEYS)}); is this the right file?"
        )
        problems.extend(warnings)  # a misspelt key is the likely reason; say so in the error itself
    retention = {key: document[key] for key in present}
    from pydantic import ValidationError  # noqa: PLC0415  (pydantic: only when a document is validated)

    context = {"quote_contents": quote_contents}
    try:
        policy = Policy.model_validate(retention, context=context)
    except ValidationError as error:
        for item in error.errors():
            problems.append(f"At '{_location(item['loc'])}': {_message_for(item, quote_contents)}")
        failed = {item["loc"][0] for item in error.errors() if item["loc"]}
        retention = {key: value for key, value in retention.items() if key not in failed}
        try:  # the keys that did validate: each is validated on its own, so they still do
            policy = Policy.model_validate(retention, context=context)
        except ValidationError:
            policy, retention = DEFAULT_POLICY, {}
    origins = {key: (source if key in retention else "default") for key in POLICY_KEYS}
    loaded = LoadedPolicy(
        policy=policy, source=Path(source), origins=origins, warnings=tuple(warnings), settings=retention
    )
    if problems:
        raise PolicyError(source, problems, partial=loaded)
    return loaded


PolicyCheck = Callable[[LoadedPolicy], list[str]]


def load_checked_policy(
    path: Path,
    checks: Sequence[PolicyCheck] = (),
    *,
    when_invalid: Sequence[PolicyCheck] = (),
    quote_contents: bool = True,
    read: Callable[[Path], str] = read_config_text,
) -> LoadedPolicy:
    """``load_policy``, then ``checks``: what a valid policy must also pass where it is used (what a
    bucket cannot give, what a per-run file may not name), each problem an ``At 'key': ...`` line.

    Every problem is reported at once, in one PolicyError: the checks run on the keys that validated
    (``PolicyError.partial``) even when other keys did not, and so do ``when_invalid``, the checks
    that otherwise run later, where the policy is used (its protect_from configs can be read).
    """
    try:
        loaded = load_policy(path, quote_contents=quote_contents, read=read)
    except PolicyError as error:
        if error.partial is None:
            raise
        more = [problem for check in (*checks, *when_invalid) for problem in check(error.partial)]
        if not more:
            raise
        raise PolicyError(error.source, [*error.problems, *more], partial=error.partial) from None
    problems = [problem for check in checks for problem in check(loaded)]
    if problems:
        raise PolicyError(str(path), problems, partial=loaded)
    return loaded


def load_policy(
    path: Path | None, *, quote_contents: bool = True, read: Callable[[Path], str] = read_config_text
) -> LoadedPolicy:
    """Read and validate the policy at ``path``; None gives the embedded default.

    ``quote_contents`` is for the file the user named on the command line; a file found in the tree
    (a per-run override, possibly a link to anything readable) gets positions, not contents. ``read``
    gets the file's text (an object's, for a per-run policy in a bucket).
    """
    if path is None:
        return LoadedPolicy(
            policy=DEFAULT_POLICY,
            source=None,
            origins=dict.fromkeys(POLICY_KEYS, "default"),
        )
    source = str(path)
    try:
        document = parse_yaml(read(path), quote_contents=quote_contents)
    except ConfigFileError as error:
        raise PolicyError(source, [f"At '<file>': {error.message}"], transient=error.transient) from None
    duplicates = _duplicate_retention_keys(document.node)
    return validate_policy(document.value, source, duplicates, quote_contents=quote_contents)


def _duplicate_retention_keys(node: yaml.Node | None) -> tuple[str, ...]:
    """Retention keys (and naming keys) set twice: YAML keeps the last silently, we refuse."""
    import yaml  # noqa: PLC0415  (the nodes of a parsed file: config_files has imported yaml)

    problems: list[str] = []

    def check(mapping: yaml.Node, prefix: str, keys: tuple[str, ...]) -> None:
        if not isinstance(mapping, yaml.MappingNode):
            return
        lines: dict[str, list[int]] = {}
        for key_node, value_node in mapping.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value in keys:
                lines.setdefault(key_node.value, []).append(key_node.start_mark.line + 1)
                if key_node.value in _SUB_KEYS and not prefix:
                    check(value_node, f"{key_node.value}.", _SUB_KEYS[key_node.value])
        for key, key_lines in lines.items():
            if len(key_lines) > 1:
                listed = ", ".join(str(line) for line in key_lines)
                problems.append(f"At '{prefix}{key}': set more than once (lines {listed}); keep one")

    if node is not None:
        check(node, "", POLICY_KEYS)
    return tuple(problems)
