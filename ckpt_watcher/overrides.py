"""Per-run policies: a ``.ckpt-watcher.yaml`` in a directory overrides the policy there and below.

The nearest file wins key by key; keys it does not set fall through to its parent, up to the root
policy (``--policy`` or the embedded default). ``naming`` merges template by template. Protection only
ever adds up: ``protect`` globs and ``protect_from`` configs of every level apply together, so an
override can never silently unprotect a resume source named higher up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ckpt_watcher.naming import Naming
from ckpt_watcher.policy import LoadedPolicy, Policy, PolicyError, load_policy
from ckpt_watcher.policy_file import log_loaded, log_rejected, log_warnings
from ckpt_watcher.records import FileIdentity

logger = structlog.get_logger("ckpt_watcher.overrides")

OVERRIDE_FILE_NAME = ".ckpt-watcher.yaml"
_ACCUMULATED_KEYS = ("protect", "protect_from")


@dataclass(frozen=True)
class EffectivePolicy:
    """The policy in force in one directory, the files it came from, and its protect_from configs."""

    policy: Policy
    sources: tuple[str, ...]
    protect_from: Mapping[Path, str] = field(default_factory=dict)


@dataclass
class _Layer:
    """One override file as last seen: its identity, the last valid contents, and whether it is bad now."""

    identity: FileIdentity | None
    good: LoadedPolicy | None
    rejected: bool = False


class PolicyTree:
    """Answers "which policy applies in this directory?" for one root, re-reading files that changed.

    ``strict`` (one-shot prune): every invalid file is collected in ``errors`` and nothing may be
    deleted. Otherwise (the daemon) an invalid edit is logged as ``policy_rejected`` and the file's
    previous valid contents stay in force; a file that was never valid blocks its subtree (``None``).
    """

    def __init__(self, root: Path, base: LoadedPolicy, *, strict: bool) -> None:
        self.root = root
        self.base = base
        self.strict = strict
        self.errors: list[PolicyError] = []
        self._layers: dict[Path, _Layer] = {}
        self._memo: dict[tuple[Any, ...], EffectivePolicy] = {}

    def set_base(self, base: LoadedPolicy) -> None:
        """A reloaded root policy."""
        self.base = base
        self._memo.clear()

    def for_directory(self, directory: Path) -> EffectivePolicy | None:
        """The effective policy in ``directory``; None while an invalid override blocks it."""
        chain = self._chain(directory)
        layers: list[tuple[Path, LoadedPolicy]] = []
        for ancestor in chain:
            layer = self._layer(ancestor)
            if layer is None:
                continue
            if layer.good is None:
                return None
            layers.append((ancestor, layer.good))
        # The root policy object is held for as long as it is in force, so its id is a stable key; an
        # override is keyed by its file identity, which changes with every edit.
        key = (id(self.base), *((ancestor, self._layers[ancestor].identity) for ancestor, _ in layers))
        memo = self._memo.get(key)
        if memo is None:
            memo = self._merge(layers)
            self._memo[key] = memo
        return memo

    def naming_for(self, directory: Path) -> Naming:
        """The naming templates in force in ``directory`` (the root's while it is blocked)."""
        effective = self.for_directory(directory)
        policy = effective.policy if effective is not None else self.base.policy
        return policy.compiled_naming

    def _chain(self, directory: Path) -> list[Path]:
        relative = os.path.relpath(directory, self.root)
        if relative == "." or relative.startswith(".."):
            return [self.root]
        parts = Path(relative).parts
        return [self.root, *(self.root.joinpath(*parts[: index + 1]) for index in range(len(parts)))]

    def _layer(self, directory: Path) -> _Layer | None:
        path = directory / OVERRIDE_FILE_NAME
        identity = FileIdentity.of_path(path)
        cached = self._layers.get(directory)
        if cached is not None and cached.identity == identity:
            return cached if (cached.good is not None or cached.rejected) else None
        self._memo.clear()  # a file changed: recompute (and never let the memo grow with edits)
        if identity is None:
            if cached is not None and cached.good is not None:
                logger.info("policy_override_removed", source=str(path))
            self._layers[directory] = _Layer(identity=None, good=None)
            return None
        try:
            loaded = load_policy(path)
        except PolicyError as error:
            if self.strict:
                self.errors.append(error)
            else:
                log_rejected(
                    str(path),
                    error,
                    "the previous contents of this file stay in force"
                    if cached is not None and cached.good is not None
                    else "nothing is deleted in this directory until the file is fixed",
                )
            previous = cached.good if cached is not None else None
            layer = _Layer(identity=identity, good=previous, rejected=True)
            self._layers[directory] = layer
            return layer
        if cached is not None and not self.strict:
            log_loaded(str(path), cached.good.settings if cached.good is not None else {}, loaded)
        else:
            log_warnings(loaded)
        layer = _Layer(identity=identity, good=loaded)
        self._layers[directory] = layer
        return layer

    def _merge(self, layers: list[tuple[Path, LoadedPolicy]]) -> EffectivePolicy:
        settings: dict[str, Any] = {
            key: value for key, value in self.base.settings.items() if key not in _ACCUMULATED_KEYS
        }
        protect = list(self.base.policy.protect)
        protect_from: dict[Path, str] = {}
        base_directory = self.base.source.parent if self.base.source is not None else Path.cwd()
        for entry in self.base.policy.protect_from:
            protect_from[_resolve(base_directory, entry)] = entry
        sources = [self.base.source_label]
        for directory, loaded in layers:
            for key, value in loaded.settings.items():
                if key in _ACCUMULATED_KEYS:
                    continue
                if key == "naming" and isinstance(value, dict) and isinstance(settings.get(key), dict):
                    settings[key] = {**settings[key], **value}
                else:
                    settings[key] = value
            protect.extend(pattern for pattern in loaded.policy.protect if pattern not in protect)
            for entry in loaded.policy.protect_from:
                label = os.path.relpath(_resolve(directory, entry), self.root)
                protect_from.setdefault(_resolve(directory, entry), label)
            sources.append(os.path.relpath(directory / OVERRIDE_FILE_NAME, self.root))
        settings["protect"] = protect
        settings["protect_from"] = [str(path) for path in protect_from]
        return EffectivePolicy(
            policy=Policy.model_validate(settings), sources=tuple(sources), protect_from=protect_from
        )


def _resolve(directory: Path, entry: str) -> Path:
    return Path(os.path.abspath(directory / os.path.expanduser(entry)))
