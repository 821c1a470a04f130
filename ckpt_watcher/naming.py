"""Classify checkpoint file names by templates written like Lightning's ``ModelCheckpoint(filename=...)``.

A template such as ``epoch={epoch:02d}-step={step:06d}-train`` compiles once into a parser. A name
parses only if formatting the parsed values with the template's own format specs gives the name
back, so a format width is a minimum (``step=1234567`` parses) while names the trainer could never
have produced (``step=15`` for ``{step:06d}``, ``Epoch=``, a trailing space) are ``unknown``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import re
import string
from dataclasses import dataclass

from ckpt_watcher.frozen import quick_init

CHECKPOINT_EXTENSION = ".ckpt"
INTEGER_FIELDS = frozenset({"epoch", "step"})
DATE_FIELD = "date"

DEFAULT_STEP_TEMPLATE = "epoch={epoch:02d}-step={step:06d}-train"
DEFAULT_BEST_TEMPLATE = "best_{date}_epoch={epoch:02d}_step={step:06d}_loss={loss:.4f}"
DEFAULT_LAST_TEMPLATE = "last"

_LONGEST_FIELD = 255  # characters of one field of a name (no file name is longer)
_SPEC_NUMBERS = re.compile(r"[0-9]+")  # a format spec's width and precision
# Lightning's collision suffix: CHECKPOINT_JOIN_CHAR "-" + "v" + a version counted from 1.
_VERSION_SUFFIX = r"(?:-v(?P<_version>[1-9][0-9]*))?"
_INTEGER_PATTERN = r"[0-9]+"
_DATE_PATTERN = r"[0-9]{8}"
_METRIC_PATTERN = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+|nan|inf|NAN|INF)"


class Kind(enum.StrEnum):
    """What a file name says a file is."""

    STEP = "step"
    BEST = "best"
    LAST = "last"
    UNKNOWN = "unknown"


class TemplateError(ValueError):
    """A naming template that cannot describe checkpoint names of its kind."""


@quick_init
@dataclass(frozen=True, slots=True)
class ParsedName:
    """The fields a checkpoint name carries."""

    kind: Kind
    epoch: int | None = None
    step: int | None = None
    date: str | None = None
    metric_name: str | None = None
    metric: float | None = None
    metric_text: str | None = None
    version: int = 0
    note: str | None = None


UNKNOWN_NAME = ParsedName(kind=Kind.UNKNOWN)


# A field's role, compared as a small int while parsing (an integer field is <= _EPOCH).
_STEP, _EPOCH, _DATE, _METRIC = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    format_spec: str  # as written in the template ("d" for an integer field written without one)
    role: int  # _STEP, _EPOCH, _DATE or _METRIC


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """One template compiled into a regular expression plus the format specs to verify against."""

    kind: Kind
    template: str
    pattern: re.Pattern[str]
    directory_pattern: re.Pattern[str]
    fields: tuple[_Field, ...]
    metric_name: str | None
    literal_prefix: str

    def parse(self, name: str, directory: bool = False) -> ParsedName | None:  # noqa: C901  (one branch per kind of field, inline: a scan parses every entry)
        """Return the parsed fields of ``name``, or None if the template could not have produced it.

        A directory checkpoint may also lack the extension (Hugging Face's ``checkpoint-500``).
        """
        if not name.startswith(self.literal_prefix):
            return None  # cheap rejection before the regular expression
        match = (self.directory_pattern if directory else self.pattern).fullmatch(name)
        if match is None:
            return None
        epoch: int | None = None
        step: int | None = None
        date: str | None = None
        metric: float | None = None
        metric_text: str | None = None
        texts = match.groups()  # the fields' texts in the template's order, then the version's
        for field, text in zip(self.fields, texts, strict=False):
            if len(text) > _LONGEST_FIELD:
                return None  # no file name is this long; also keeps int() within its digit limit
            role = field.role
            if role <= _EPOCH:
                value = int(text)
                if format(value, field.format_spec) != text:
                    return None
                if role == _STEP:
                    step = value
                else:
                    epoch = value
            elif role == _DATE:
                if not _is_calendar_date(text):
                    return None
                date = text
            else:
                metric = float(text)
                if format(metric, field.format_spec) != text:
                    return None
                metric_text = text
        version_text = texts[-1]
        # positional, in the order of ParsedName's fields (a name is parsed per entry of a scan)
        return ParsedName(
            self.kind,
            epoch,
            step,
            date,
            self.metric_name,
            metric,
            metric_text,
            int(version_text) if version_text else 0,
        )


@functools.lru_cache(maxsize=1024)
def _is_calendar_date(text: str) -> bool:
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def compile_template(kind: Kind, template: str) -> CompiledTemplate:  # noqa: C901, PLR0912, PLR0915  (long: one pass over the template's fields, each kind checked where it is met)
    """Compile ``template`` for ``kind``; raise TemplateError saying what is wrong with it."""
    if not template:
        raise TemplateError("a template must not be empty")
    if "/" in template or "\\" in template or "\0" in template:
        raise TemplateError("a template names a file, so it cannot contain '/', '\\' or NUL")
    if template.endswith(CHECKPOINT_EXTENSION):
        raise TemplateError(f"write the template without the '{CHECKPOINT_EXTENSION}' extension")
    parts: list[str] = []
    fields: list[_Field] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise TemplateError(f"not a valid format string: {error}") from None
    for literal, field_name, format_spec, conversion in parsed:
        parts.append(re.escape(literal))
        if field_name is None:
            continue
        if fields and not literal:
            raise TemplateError(
                f"'{{{fields[-1].name}}}' and '{{{field_name}}}' must be separated by some text, "
                "or their digits cannot be told apart"
            )
        if not field_name.isidentifier() or field_name.startswith("_"):
            raise TemplateError(f"'{{{field_name}}}' is not a plain field name")
        if conversion:
            raise TemplateError(f"'{{{field_name}!{conversion}}}': conversions are not supported")
        if any(existing.name == field_name for existing in fields):
            raise TemplateError(f"'{{{field_name}}}' appears twice")
        spec = format_spec or ""
        _check_format_spec(field_name, spec)
        if field_name in INTEGER_FIELDS:
            pattern = _INTEGER_PATTERN
        elif field_name == DATE_FIELD:
            if spec:
                raise TemplateError("'{date}' takes no format spec; it is always YYYYMMDD")
            pattern = _DATE_PATTERN
        else:
            pattern = _METRIC_PATTERN
        parts.append(f"(?P<{field_name}>{pattern})")
        fields.append(
            _Field(field_name, spec or ("d" if field_name in INTEGER_FIELDS else ""), _role(field_name))
        )
    metric_names = [field.name for field in fields if field.name not in INTEGER_FIELDS | {DATE_FIELD}]
    field_names = {field.name for field in fields}
    if kind is Kind.STEP:
        if "step" not in field_names:
            raise TemplateError("a step template must contain '{step}'")
        if metric_names:
            raise TemplateError(
                f"a step template may contain only '{{epoch}}', '{{step}}' and '{{date}}', "
                f"not '{{{metric_names[0]}}}'"
            )
    elif kind is Kind.BEST:
        if len(metric_names) != 1:
            raise TemplateError(
                f"a best template must contain exactly one metric field (such as '{{val_loss:.4f}}'), "
                f"found {len(metric_names)}"
            )
    elif kind is Kind.LAST:
        if fields:
            raise TemplateError("the last template takes no fields")
    else:
        raise TemplateError(f"no template for kind {kind}")
    stem = "".join(parts) + _VERSION_SUFFIX
    return CompiledTemplate(
        kind=kind,
        template=template,
        pattern=re.compile(stem + re.escape(CHECKPOINT_EXTENSION), re.ASCII),
        directory_pattern=re.compile(stem + f"(?:{re.escape(CHECKPOINT_EXTENSION)})?", re.ASCII),
        fields=tuple(fields),
        metric_name=metric_names[0] if metric_names else None,
        literal_prefix=parsed[0][0] if parsed else "",
    )


def _role(field_name: str) -> int:
    """The role of a template's field, by its name."""
    if field_name == "step":
        return _STEP
    if field_name == "epoch":
        return _EPOCH
    return _DATE if field_name == DATE_FIELD else _METRIC


def _check_format_spec(field_name: str, spec: str) -> None:
    """Reject a spec that format() refuses, or one whose output the parser could not read back."""
    if field_name == DATE_FIELD:
        return
    is_integer = field_name in INTEGER_FIELDS
    # Before format() is asked: a width or precision is that many characters to make, and a template
    # is read from files planted in the tree too (a per-run .ckpt-watcher.yaml).
    for number in _SPEC_NUMBERS.findall(spec):
        digits = number.lstrip("0")  # '0' is the zero-padding flag before a width: '06d'
        if len(digits) > len(str(_LONGEST_FIELD)) or int(digits or "0") > _LONGEST_FIELD:
            raise TemplateError(
                f"'{{{field_name}:{spec}}}': a width or precision is at most {_LONGEST_FIELD} "
                "(no file name is longer)"
            )
    try:
        format(1 if is_integer else 1.5, spec)
    except ValueError as error:
        raise TemplateError(f"'{{{field_name}:{spec}}}': {error}") from None
    if any(character in spec for character in "%,_ #<>^=+"):
        raise TemplateError(f"'{{{field_name}:{spec}}}': use a plain format such as '06d' or '.4f'")
    if spec[:1].isdigit() and not spec.startswith("0"):
        # format(500, "6d") pads with spaces; a file name with blanks in it is not worth guessing at.
        raise TemplateError(f"'{{{field_name}:{spec}}}': a width must be zero-padded, such as '0{spec}'")
    if is_integer and spec and spec[-1] not in "d0123456789":
        raise TemplateError(f"'{{{field_name}:{spec}}}': an integer field takes a 'd' format")
    if not is_integer and spec and spec[-1] not in "fFeEgG0123456789":
        raise TemplateError(f"'{{{field_name}:{spec}}}': a metric is a float, use a float format")


@dataclass(frozen=True, slots=True)
class Naming:
    """The compiled step, best and last templates of one policy."""

    step: CompiledTemplate
    best: CompiledTemplate
    last: CompiledTemplate
    # The templates a name may match, by the name's first character: each template's literal prefix
    # dispatches it before any regular expression runs (a template that starts with a field is tried
    # for every name). Made once, in __post_init__; the order is always last, best, step.
    _by_first: dict[str, tuple[CompiledTemplate, ...]] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    _unprefixed: tuple[CompiledTemplate, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        templates = (self.last, self.best, self.step)
        unprefixed = tuple(template for template in templates if not template.literal_prefix)
        by_first = {
            first: tuple(template for template in templates if template.literal_prefix[:1] in ("", first))
            for first in {template.literal_prefix[0] for template in templates if template.literal_prefix}
        }
        object.__setattr__(self, "_by_first", by_first)
        object.__setattr__(self, "_unprefixed", unprefixed)

    @classmethod
    def from_templates(
        cls,
        step: str = DEFAULT_STEP_TEMPLATE,
        best: str = DEFAULT_BEST_TEMPLATE,
        last: str = DEFAULT_LAST_TEMPLATE,
    ) -> Naming:
        """Compile three templates; raise TemplateError naming the first bad one."""
        return cls(
            step=compile_template(Kind.STEP, step),
            best=compile_template(Kind.BEST, best),
            last=compile_template(Kind.LAST, last),
        )

    def classify(self, name: str, *, directory: bool = False) -> ParsedName:
        """Return what ``name`` is; a name two templates both accept is ambiguous, hence unknown.

        With ``directory``, the ``.ckpt`` extension is optional (``checkpoint-{step}`` directories).
        """
        if not directory and not name.endswith(CHECKPOINT_EXTENSION):
            return UNKNOWN_NAME
        found: ParsedName | None = None
        also: list[ParsedName] = []  # the other templates' matches (an ambiguous name)
        for template in self._by_first.get(name[:1], self._unprefixed):
            parsed = template.parse(name, directory)
            if parsed is None:
                continue
            if found is None:
                found = parsed
            else:
                also.append(parsed)
        if found is None:
            return UNKNOWN_NAME
        if also:
            kinds = " and ".join(match.kind.value for match in (found, *also))
            return ParsedName(kind=Kind.UNKNOWN, note=f"ambiguous: matches the {kinds} templates")
        return found


DEFAULT_NAMING = Naming.from_templates()
