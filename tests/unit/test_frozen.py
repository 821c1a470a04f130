"""frozen.quick_init: the faster __init__ makes the same instances as the dataclass's own, keeps the class
frozen, and refuses classes whose __init__ must do more than set slots."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.frozen import quick_init
from ckpt_watcher.naming import Kind, ParsedName
from ckpt_watcher.plan import Action, Decision, Hold
from ckpt_watcher.records import CheckpointRecord, EntryType, FileIdentity

IDENTITY = FileIdentity(2049, 12, 137, 1_800_000_000_123_456_789)
RECORD = CheckpointRecord(
    Path("/ckpt/run"), "epoch=01-step=000500-train.ckpt", "run/epoch=01-step=000500-train.ckpt",
    Kind.STEP, EntryType.FILE, 137, IDENTITY, True, None, 1, 500,
)  # fmt: skip
# Each class made with every field given by keyword, and with only the required ones.
CASES: list[tuple[type[Any], dict[str, Any], dict[str, Any]]] = [
    (FileIdentity, {"device": 1, "inode": 2, "size": 3, "mtime_ns": 4}, {}),
    (ParsedName, {"kind": Kind.BEST, "epoch": 3, "step": 9, "date": "20261128", "metric_name": "loss",
                  "metric": 0.5, "metric_text": "0.5000", "version": 2, "note": "n"}, {"kind": Kind.LAST}),
    (Decision, {"record": RECORD, "action": Action.KEEP, "told": ("r %d",), "holds": frozenset({Hold.BEST}),
                "evicted": True, "rank": 7}, {"record": RECORD, "action": Action.DELETE, "told": ()}),
    (CheckpointRecord, {field.name: getattr(RECORD, field.name) for field in dataclasses.fields(RECORD)},
     {field.name: getattr(RECORD, field.name) for field in dataclasses.fields(RECORD)
      if field.default is dataclasses.MISSING}),
]  # fmt: skip


def _reference(cls: type[Any]) -> type[Any]:
    """The same dataclass with the __init__ dataclasses generates."""
    fields = [(field.name, field.type, field) for field in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"Reference{cls.__name__}", fields, frozen=True, slots=True)


@pytest.mark.parametrize(
    ("cls", "every_field", "required"), CASES, ids=lambda case: getattr(case, "__name__", "")
)
def test_the_quick_init_makes_what_the_dataclass_init_makes(
    cls: type[Any], every_field: dict[str, Any], required: dict[str, Any]
) -> None:
    reference = _reference(cls)
    for keywords in (every_field, required or every_field):
        made, expected = cls(**keywords), reference(**keywords)
        assert dataclasses.asdict(made) == dataclasses.asdict(expected)
        assert cls(*keywords.values()) == made
        assert hash(made) == hash(cls(**keywords))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, next(iter(every_field)), None)
    with pytest.raises(TypeError):
        cls()
    with pytest.raises(TypeError):
        cls(**every_field, unknown=1)


def test_a_class_whose_init_does_more_than_set_slots_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithPostInit:
        value: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        value: int

    for cls in (WithFactory, WithPostInit, NotFrozen):
        with pytest.raises(TypeError):
            quick_init(cls)
