"""Per-run policies: a ``.ckpt-watcher.yaml`` in a directory overrides the policy there and below.

The nearest file wins key by key; keys it does not set fall through to its parent, up to the root
policy (``--policy`` or the embedded default). ``naming`` merges template by template. Protection only
ever adds up: ``protect`` globs and ``protect_from`` configs of every level apply together, so an
override can never silently unprotect a resume source named higher up.

A per-run file is found in the tree, not named by the user, so it is read without quoting its
contents in errors, and its ``protect_from`` may only name configs under the root or beside the
``--policy`` file (anything else is refused), so a file planted in a run cannot make the tool read,
and report on, any file it can read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ckpt_watcher.config_access import LOCAL_FILES, ConfigAccess
from ckpt_watcher.config_files import QuietFiles
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.locations import LocationError, StorageURL, is_url, parse_location
from ckpt_watcher.naming import Naming
from ckpt_watcher.policy import LoadedPolicy, Policy, PolicyCheck, PolicyError, load_checked_policy
from ckpt_watcher.policy_file import OutcomeListener, log_loaded, log_rejected, log_warnings
from ckpt_watcher.protection import ConfigLabel, unreadable_configs
from ckpt_watcher.records import FileIdentity, display_name

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
    """One override file as last seen: its identity, the last valid contents, and whether it is bad now.

    Only directories that have an override file have a layer; ``good`` is None while a file that was
    never valid blocks its subtree.
    """

    identity: FileIdentity
    good: LoadedPolicy | None
    rejected: bool = False
    # A read that failed for now (a store's 503): the file is read again from this monotonic time on,
    # however long it stays the same, and a retry that fails the same way is not logged again.
    retry_at: float | None = None
    problems: tuple[str, ...] = ()

    def is_current(self, identity: FileIdentity | None) -> bool:
        """True if the file is still the one last seen, and no failed read is due to be tried again."""
        return self.identity == identity and (self.retry_at is None or time.monotonic() < self.retry_at)


@dataclass(frozen=True, slots=True)
class _Resolved:
    """The answer for one directory: the valid layers from the root down, and the merged policy."""

    layers: tuple[tuple[Path, _Layer], ...]
    effective: EffectivePolicy | None  # None: an invalid override here or above blocks it


# A per-run file whose read failed for now (a store's 503) is read again after this long, though it
# did not change: an edit that raised retention must not stay unapplied for good.
RETRY_SECONDS = 10.0

# State for this many directories may pile up before the tree drops those that are gone; after a
# sweep the threshold is twice what survived, so sweeping costs O(1) per directory seen.
MINIMUM_SWEEP = 4096


class SettlingFiles:
    """The per-run files changed a moment ago, maybe still being written: their last good contents
    stay in force until they are quiet (``QuietFiles``; a partial file asks for less), and each
    directory is due to be asked about again then (``take``), as no event may come by then. A file
    read before that is missing now is one too, until it has been missing for the quiet time: one
    replaced by unlink + create (``rm && cp``, ``git checkout``) is missing for a moment."""

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict  # a one-shot prune reads every file as it is
        self._quiet = QuietFiles(missing_waits=True)
        self._due: dict[Path, float] = {}  # directory -> monotonic time to look again

    def quiet(self, directory: Path, identity: FileIdentity | None) -> bool:
        """True if ``directory``'s changed per-run file may be read now; if not, it is due again."""
        if self.strict or self._quiet.quiet(directory / OVERRIDE_FILE_NAME, identity):
            return True
        self._due[directory] = time.monotonic() + self._quiet.quiet_seconds
        return False

    def take(self) -> dict[Path, float]:
        """The directories to look at again, and when (each given once)."""
        due, self._due = self._due, {}
        return due


class NewFiles:
    """The per-run files that appear while the daemon runs (where a look found none): read only once
    quiet, as an edit is (``SettlingFiles``), for read at once one may be half-written
    ("save_top_k_checkpoints: 1" of a "10") and prune its run by the part that was there. Meanwhile
    nothing is planned in its directory or below (not by the policy above either: it may keep fewer).
    A file there at the first look (the daemon's start) is read at once, as the root policy is; a
    one-shot prune (``strict``) reads every file as it is."""

    def __init__(self, settling: SettlingFiles, *, on_change: Callable[[], None]) -> None:
        self._settling = settling
        self._on_change = on_change  # (a directory blocked or unblocked: every answer may have changed)
        self._without_file: set[Path] = set()  # looked at, and no file there
        self._waiting: set[Path] = set()  # whose new file is left unread for now

    def unread(self, directory: Path, identity: FileIdentity | None) -> bool:
        """True if ``directory`` has no file to read now (``identity`` None: none at all, remembered)
        or a new one not yet quiet; False if a file there may be read."""
        if identity is None:
            if not self._settling.strict:
                self._without_file.add(directory)
            self._set_waiting(directory, False)  # (gone before it was read: unblocked)
            return True
        waiting = directory in self._without_file and not self._settling.quiet(directory, identity)
        if not waiting:
            self._without_file.discard(directory)  # (read now: an edit of it waits as edits do)
        self._set_waiting(directory, waiting)
        return waiting

    def _set_waiting(self, directory: Path, waiting: bool) -> None:
        if waiting != (directory in self._waiting):
            (self._waiting.add if waiting else self._waiting.discard)(directory)
            self._on_change()

    def retain(self, keep: Callable[[Path], bool]) -> None:
        """Forget the directories ``keep`` says are gone (one removed while its new file waited too:
        nothing asks about it again)."""
        self._without_file = {directory for directory in self._without_file if keep(directory)}
        self._waiting = {directory for directory in self._waiting if keep(directory)}

    def why_blocked(self, directory: Path) -> str | None:
        """Why nothing is planned in ``directory`` if a new file here or above is left unread, or None."""
        waiting = [above for above in self._waiting if above == directory or above in directory.parents]
        if not waiting:
            return None
        return (
            f"a new {OVERRIDE_FILE_NAME} in {display_name(str(min(waiting)))} is read once it has been "
            "left unchanged for a moment (it may be half-written); nothing is deleted here until then"
        )


class PolicyTree:
    """Answers "which policy applies in this directory?" for one root, re-reading files that changed.

    ``strict`` (one-shot prune): every invalid file is collected in ``errors`` and nothing may be
    deleted. Otherwise (the daemon) an invalid edit is logged as ``policy_rejected`` and the file's
    previous valid contents stay in force; a file that was never valid blocks its subtree (``None``).

    Cost is linear in the number of directories: a directory's answer is its parent's plus its own
    file, computed once and kept until any override file is seen to change. Each question looks at
    the directory's own file again, so an edit is seen the next time its directory is asked about (a
    scan asks about every directory, parents first; the daemon does on the file's event and on every
    full pass). State for directories that are gone is dropped (``retain``, and a sweep as it grows).
    """

    def __init__(
        self,
        root: Path,
        base: LoadedPolicy,
        *,
        strict: bool,
        on_outcome: OutcomeListener | None = None,
        files: ConfigAccess = LOCAL_FILES,
        refuse: Callable[[LoadedPolicy], list[str]] | None = None,
    ) -> None:
        self.root = root
        self.base = base
        self.strict = strict
        self.on_outcome = on_outcome
        self.files = files  # where per-run files are read: the disk, or a bucket (config_access.py)
        # What a per-run file may not ask for where this root is (a bucket: keep_free), as ``At 'key':
        # ...`` problems: such a file is invalid, exactly as one that does not parse.
        self.refuse = refuse
        self.errors: list[PolicyError] = []
        self._layers: dict[Path, _Layer] = {}
        self._resolved: dict[Path, _Resolved] = {}
        self._memo: dict[tuple[Any, ...], EffectivePolicy] = {}
        self._sweep_at = MINIMUM_SWEEP
        self.settling = SettlingFiles(strict=strict)  # edits left unread for now (being written)
        self.new_files = NewFiles(self.settling, on_change=self._invalidate)  # appeared, unread yet

    @property
    def tracked_directories(self) -> int:
        """How many directories the tree holds state for."""
        return len(self._resolved.keys() | self._layers.keys())

    @property
    def refused_overrides(self) -> int:
        """How many override files (of directories still there) had their latest edit refused."""
        return sum(layer.rejected for layer in self._layers.values())

    def set_base(self, base: LoadedPolicy) -> None:
        """A reloaded root policy."""
        self.base = base
        self._invalidate()

    def retain(self, present: Collection[Path]) -> None:
        """Forget every directory not in ``present`` (the directories a full pass found)."""
        gone_layers = [directory for directory in self._layers if directory not in present]
        for directory in gone_layers:
            del self._layers[directory]
        for directory in [directory for directory in self._resolved if directory not in present]:
            del self._resolved[directory]
        self.new_files.retain(present.__contains__)
        if gone_layers:
            self._invalidate()
        self._sweep_at = max(MINIMUM_SWEEP, 2 * (len(self._resolved) + len(self._layers)))

    def for_directory(self, directory: Path) -> EffectivePolicy | None:
        """The effective policy in ``directory``; None while an invalid override blocks it."""
        if len(self._resolved) + len(self._layers) >= self._sweep_at:
            self._sweep()
        return self._resolve(self._within_root(directory)).effective

    def naming_for(self, directory: Path) -> Naming:
        """The naming templates in force in ``directory`` (the root's while it is blocked)."""
        effective = self.for_directory(directory)
        policy = effective.policy if effective is not None else self.base.policy
        return policy.compiled_naming

    def _within_root(self, directory: Path) -> Path:
        """``directory`` normalised, or the root for the root itself and anything outside it."""
        text = os.path.abspath(directory)
        root = str(self.root)
        if text != root and text.startswith(root.rstrip(os.sep) + os.sep):
            return directory if text == str(directory) else Path(text)
        return self.root

    def _resolve(self, directory: Path) -> _Resolved:
        layer = self._layer(directory)  # its own file, looked at on every question
        resolved = self._resolved.get(directory)
        if resolved is not None:
            return resolved
        # Up to the nearest directory already answered (the parent, in a scan), each file once.
        chain = [(directory, layer)]
        current = directory
        above: _Resolved | None = None
        while current != self.root:
            current = current.parent
            above = self._resolved.get(current)
            if above is not None:
                break
            chain.append((current, self._layer(current)))
        for current, current_layer in reversed(chain):
            above = self._store(current, current_layer, above)
        assert above is not None
        return above

    def _store(self, directory: Path, layer: _Layer | None, above: _Resolved | None) -> _Resolved:
        if above is not None and (above.effective is None or layer is None):
            resolved = above  # blocked above, or nothing new here: the parent's answer, shared
        elif layer is not None and layer.good is None:
            resolved = _Resolved(layers=(), effective=None)
        else:
            layers = above.layers if above is not None else ()
            if layer is not None:
                layers = (*layers, (directory, layer))
            resolved = _Resolved(layers=layers, effective=self._merged(layers))
        self._resolved[directory] = resolved
        return resolved

    def _merged(self, layers: tuple[tuple[Path, _Layer], ...]) -> EffectivePolicy:
        # The root policy object is held for as long as it is in force, so its id is a stable key; an
        # override is keyed by its file identity, which changes with every edit.
        key = (id(self.base), *((directory, layer.identity) for directory, layer in layers))
        memo = self._memo.get(key)
        if memo is None:
            memo = self._merge([(directory, layer.good) for directory, layer in layers if layer.good])
            self._memo[key] = memo
        return memo

    def _invalidate(self) -> None:
        """A file changed: every answer may have (and the memo must not grow with edits)."""
        self._resolved.clear()
        self._memo.clear()

    def _sweep(self) -> None:
        """Drop the state of directories that no longer exist."""
        is_directory = self.files.is_directory
        for directory in [directory for directory in self._resolved if not is_directory(directory)]:
            del self._resolved[directory]
        gone_layers = [directory for directory in self._layers if not is_directory(directory)]
        for directory in gone_layers:
            del self._layers[directory]
        self.new_files.retain(is_directory)
        if gone_layers:
            self._invalidate()
        self._sweep_at = max(MINIMUM_SWEEP, 2 * (len(self._resolved) + len(self._layers)))

    def _layer(self, directory: Path) -> _Layer | None:
        """The override file in ``directory`` as it is now, or None if it has none."""
        path = directory / OVERRIDE_FILE_NAME
        identity = self.files.entry_identity(path)
        cached = self._layers.get(directory)
        if cached is None and self.new_files.unread(directory, identity):
            return _Layer(identity, None) if identity is not None else None  # (not kept: asked again)
        if cached is not None and cached.is_current(identity):
            return cached
        # Its last contents stay in force while an edit may be half-written, or while the file may be
        # being replaced (missing); a file never valid blocks its subtree until it is gone for good.
        waits = cached is not None and (cached.good is not None or identity is None)
        if waits and not self.settling.quiet(directory, identity):
            return cached
        self._invalidate()
        if identity is None:
            assert cached is not None
            del self._layers[directory]
            self.new_files.unread(directory, None)  # (none there now: one that appears later waits)
            if cached.good is not None:
                logger.info("policy_override_removed", source=str(path))
            return None
        checks: list[PolicyCheck] = [lambda loaded: _outside_root(self, directory, loaded)]
        if self.refuse is not None:
            checks.append(self.refuse)
        # (prune: the configs of a file refused anyway are read now, as the pass reads none of them)
        unread: list[PolicyCheck] = (
            [lambda loaded: _unreadable(self, directory, loaded)] if self.strict else []
        )
        try:
            loaded = load_checked_policy(
                path, checks, when_invalid=unread, quote_contents=False, read=self.files.read_text
            )
        except PolicyError as error:
            layer = _rejected_layer(self, path, cached, identity, error)
            self._layers[directory] = layer
            return layer
        if cached is not None and not self.strict:
            log_loaded(
                str(path), cached.good.settings if cached.good is not None else {}, loaded, self.on_outcome
            )
        else:
            log_warnings(loaded)
        layer = _Layer(identity=identity, good=loaded)
        self._layers[directory] = layer
        return layer

    def why_blocked(self, directory: Path) -> str:
        """Why nothing is planned in ``directory`` (``for_directory`` gave None)."""
        return self.new_files.why_blocked(directory) or (
            f"an invalid {OVERRIDE_FILE_NAME} applies here; nothing is deleted here until it is fixed"
        )

    def allowed_directories(self) -> tuple[Path, ...]:
        """Where configs named by a per-run file may be: under the root, or beside the --policy file."""
        allowed = [self.files.real_path(self.root)]
        if self.base.source is not None:
            allowed.append(real_path(self.base.source.parent))
        return tuple(allowed)

    def _merge(self, layers: list[tuple[Path, LoadedPolicy]]) -> EffectivePolicy:
        settings: dict[str, Any] = {
            key: value for key, value in self.base.settings.items() if key not in _ACCUMULATED_KEYS
        }
        protect = list(self.base.policy.protect)
        protect_from = root_configs(self.base)
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
            for config, label in _configs_named(self, directory, loaded).items():
                protect_from.setdefault(config, label)
            sources.append(os.path.relpath(directory / OVERRIDE_FILE_NAME, self.root))
        settings["protect"] = protect
        settings["protect_from"] = [str(path) for path in protect_from]
        if not layers:  # the root policy alone: its values are validated already (no pydantic needed)
            policy = self.base.policy.model_copy(
                update={"protect": tuple(protect), "protect_from": tuple(settings["protect_from"])}
            )
        else:
            policy = Policy.model_validate(settings)
        if self.base.source is not None and not is_url(str(self.base.source)):
            # The policy may be the trainer's own config: a resume key in it protects what it names,
            # as in any protect_from config (not shown among the policy's own protect_from).
            protect_from.setdefault(self.base.source, self.base.source_label)
        return EffectivePolicy(policy=policy, sources=tuple(sources), protect_from=protect_from)


def _is_allowed(tree: PolicyTree, config: Path, allowed: tuple[Path, ...]) -> bool:
    real = tree.files.real_path(config)
    return any(real == place or place in real.parents for place in allowed)


def _outside_root(tree: PolicyTree, directory: Path, loaded: LoadedPolicy) -> list[str]:
    """Refuse a per-run file that names a config elsewhere: it could make us read any file."""
    allowed = tree.allowed_directories()
    return [
        f"At 'protect_from.{index}': names a file outside the checkpoint root; a per-run "
        "file may only name configs under the root or beside the --policy file (name it "
        "in the --policy file's protect_from instead)"
        for index, entry in enumerate(loaded.policy.protect_from)
        if not _is_allowed(tree, _resolve(directory, entry), allowed)
    ]


def _configs_named(tree: PolicyTree, directory: Path, loaded: LoadedPolicy) -> dict[Path, str]:
    """The protect_from configs ``directory``'s file names, each labelled relative to the root and
    confined where a per-run file's configs may be (``ConfigLabel``)."""
    allowed = tree.allowed_directories()
    configs: dict[Path, str] = {}
    for entry in loaded.policy.protect_from:
        config = _resolve(directory, entry)
        configs.setdefault(
            config, ConfigLabel(os.path.relpath(config, tree.root), allowed_directories=allowed)
        )
    return configs


def _unreadable(tree: PolicyTree, directory: Path, loaded: LoadedPolicy) -> list[str]:
    """The configs a refused file names (but for those it may not name) that cannot be read."""
    allowed = tree.allowed_directories()
    named = _configs_named(tree, directory, loaded)
    inside = {config: label for config, label in named.items() if _is_allowed(tree, config, allowed)}
    return unreadable_configs(inside, files=tree.files)


def root_configs(loaded: LoadedPolicy) -> dict[Path, str]:
    """The protect_from configs the root policy names (path -> the entry as written), relative to
    its file's directory."""
    base_directory = loaded.source.parent if loaded.source is not None else Path.cwd()
    return {_resolve(base_directory, entry): entry for entry in loaded.policy.protect_from}


def _resolve(directory: Path, entry: str) -> Path:
    """A protect_from entry as a path: relative to ``directory``; a URL as its object's core path."""
    if is_url(entry):
        try:
            location = parse_location(entry)
        except LocationError:  # read as a file name, which is missing: an error that names the entry
            return Path(os.path.abspath(directory / entry))
        return location.core_path if isinstance(location, StorageURL) else Path(os.path.abspath(location))
    return Path(os.path.abspath(directory / os.path.expanduser(entry)))


def _rejected_layer(
    tree: PolicyTree, path: Path, cached: _Layer | None, identity: FileIdentity, error: PolicyError
) -> _Layer:
    """The layer of a file ``tree`` refused (strict: the error is kept; else logged); a read that failed
    for now is tried again after RETRY_SECONDS, and a retry that fails the same way is not logged
    again (an edit always is)."""
    if tree.strict:
        tree.errors.append(error)
    elif cached is None or cached.retry_at is None or cached.problems != tuple(error.problems):
        log_rejected(
            str(path),
            error,
            "the previous contents of this file stay in force"
            if cached is not None and cached.good is not None
            else "nothing is deleted in this directory until the file is fixed",
            tree.on_outcome,
        )
    previous = cached.good if cached is not None else None
    retry_at = time.monotonic() + RETRY_SECONDS if error.transient else None
    return _Layer(identity, previous, True, retry_at, tuple(error.problems))
