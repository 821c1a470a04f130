"""The pydantic models that validate a policy (``policy.Policy`` and its parts are the validated values).

Imported only when a policy is validated (a policy file, a per-run override, ``Policy(...)``): building
pydantic's models costs more at start-up than a one-shot ``prune`` with the embedded default policy
spends on everything else, and the embedded default needs no validation at run time (a unit test
validates it: ``DEFAULT_POLICY == Policy()``). The classes keep the names of the values they
validate, so pydantic's messages (the few ``_message_for`` passes on) read as they always did.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ckpt_watcher.durations import DurationError, parse_duration
from ckpt_watcher.naming import (
    DEFAULT_BEST_TEMPLATE,
    DEFAULT_LAST_TEMPLATE,
    DEFAULT_STEP_TEMPLATE,
    Kind,
    TemplateError,
    compile_template,
)
from ckpt_watcher.policy import POLICY_DESCRIPTIONS, describe_value, size_hint
from ckpt_watcher.sizes import SizeError, free_space_setting, size_bytes


def _non_empty_pattern(pattern: str) -> str:
    if not pattern.strip():
        raise ValueError("must not be empty")
    return pattern


ProtectPattern = Annotated[str, AfterValidator(_non_empty_pattern)]


def _described(key: str) -> Any:
    """``Field(description=...)`` of a policy key: the one text README's table and ``policy`` show."""
    return POLICY_DESCRIPTIONS[key]


class NamingTemplates(BaseModel):
    """Template overrides, one per checkpoint kind, written as for ``ModelCheckpoint(filename=...)``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    step: str = DEFAULT_STEP_TEMPLATE
    best: str = DEFAULT_BEST_TEMPLATE
    last: str = DEFAULT_LAST_TEMPLATE

    @field_validator("step", "best", "last")
    @classmethod
    def _compiles(cls, template: str, info: Any) -> str:
        try:
            compile_template(Kind(info.field_name), template)
        except TemplateError as error:
            raise ValueError(str(error)) from None
        return template


class TrashSettings(BaseModel):
    """The trash (README, "The trash"): how long a deleted checkpoint stays restorable; 0 = off."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    grace: str = "0"

    @field_validator("grace", mode="before")
    @classmethod
    def _is_duration(cls, value: Any, info: ValidationInfo) -> str:
        quote = (info.context or {}).get("quote_contents", True)
        if isinstance(value, int) and not isinstance(value, bool) and value == 0:
            return "0"
        if not isinstance(value, str):
            raise ValueError(
                "expected a duration such as 24h (units s, m, h, d) or 0 for off, "
                f"got {describe_value(value, quote=quote)}"
            )
        try:
            parse_duration(value)
        except DurationError as error:
            raise ValueError(str(error)) from None
        return value.strip()


class Policy(BaseModel):
    """What to keep, validated strictly; each field's description is ``POLICY_DESCRIPTIONS``'s."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    save_top_k_checkpoints: int = Field(default=5, ge=-1, description=_described("save_top_k_checkpoints"))
    save_top_k_best: int = Field(default=3, ge=-1, description=_described("save_top_k_best"))
    save_every_n_epochs: int = Field(default=0, ge=0, description=_described("save_every_n_epochs"))
    save_on_n_steps: int = Field(default=500, ge=0, description=_described("save_on_n_steps"))
    best_mode: Literal["min", "max"] = Field(default="min", description=_described("best_mode"))
    naming: NamingTemplates = Field(default=NamingTemplates(), description=_described("naming"))
    protect: tuple[ProtectPattern, ...] = Field(default=(), description=_described("protect"))
    protect_from: tuple[ProtectPattern, ...] = Field(default=(), description=_described("protect_from"))
    verify: Literal["zip", "crc", "load"] = Field(default="zip", description=_described("verify"))
    max_size: int | str | None = Field(default=None, description=_described("max_size"))
    keep_free: int | str | None = Field(default=None, description=_described("keep_free"))
    keep_every_n_steps: int = Field(default=0, ge=0, description=_described("keep_every_n_steps"))
    trash: TrashSettings = Field(default=TrashSettings(), description=_described("trash"))

    @field_validator("max_size", "keep_free", mode="before")
    @classmethod
    def _is_size(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        quote = (info.context or {}).get("quote_contents", True)
        described = describe_value(value, quote=quote)
        percentage = info.field_name == "keep_free"
        try:
            free_space_setting(value) if percentage else size_bytes(value)
        except SizeError as error:
            if isinstance(value, int) and not isinstance(value, bool):
                raise ValueError(f"{error}, got {described}") from None
            if isinstance(value, str):
                raise ValueError(f"got {described}: {error}; {size_hint(percentage)}") from None
            raise ValueError(f"expected a size, got {described}; {size_hint(percentage)}") from None
        return value.strip() if isinstance(value, str) else value

    @field_validator("verify")
    @classmethod
    def _load_needs_torch(cls, value: str) -> str:
        if value == "load" and importlib.util.find_spec("torch") is None:
            raise ValueError(
                "'load' reads checkpoints with torch, which is not installed: "
                "pip install 'ckpt-watcher[torch]'"
            )
        return value

    @field_validator("protect", "protect_from", mode="before")
    @classmethod
    def _is_list(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list | tuple):
            return tuple(value)
        what = "glob patterns" if info.field_name == "protect" else "training config files"
        quote = (info.context or {}).get("quote_contents", True)
        raise ValueError(f"expected a list of {what}, got {describe_value(value, quote=quote)}")
