"""Never delete what a run resumes or fine-tunes from.

Training configs name their resume source (``ckpt_path``) or fine-tuning source
(``pretrained_ckpt_path``). The policy's ``protect_from`` lists such configs; every checkpoint they name
is pinned. So are paths given with ``--protect`` (a resume on the trainer's command line). Lightning's
own ModelCheckpoint refuses to delete the path it resumed from; a watcher outside the trainer must do
at least as well.

A pin is matched by path and by file identity (device, inode), so a resume source named through
another path of the same file (a hard link, a bind mount of the root, a second mount of the volume)
is kept too. Configs are read with ``config_files`` (bounded, regular files only); their errors give
positions, never contents.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ckpt_watcher.config_access import LOCAL_FILES, ConfigAccess, UnreachableError
from ckpt_watcher.config_files import ConfigFileError, QuietFiles, parse_yaml
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.locations import LocationError, StorageURL, is_url, parse_location
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.policy import describe_value
from ckpt_watcher.records import FileIdentity

logger = structlog.get_logger("ckpt_watcher.protection")

RESUME_KEYS = ("ckpt_path", "pretrained_ckpt_path")
_KEY_ROLES = {"ckpt_path": "resume source", "pretrained_ckpt_path": "fine-tuning source"}

# A file identity as pins are matched: (st_dev, st_ino).
FileKey = tuple[int, int]


class ConfigLabel(str):
    """A protect_from config's label that also says where the file may be read from.

    A per-run ``.ckpt-watcher.yaml`` may only name configs under the checkpoint root or beside the
    ``--policy`` file; the label carries those directories (``allowed_directories``) to the moment
    the config is opened, so a link swapped in later is refused too. A plain ``str`` label (a config
    the ``--policy`` file names) may be read from anywhere.
    """

    allowed_directories: tuple[Path, ...]

    def __new__(cls, label: str, *, allowed_directories: Sequence[Path] = ()) -> ConfigLabel:
        instance = super().__new__(cls, label)
        instance.allowed_directories = tuple(allowed_directories)
        return instance


class ProtectionError(Exception):
    """A protect_from config that cannot be read; the previous protection set stays."""

    def __init__(self, config: str, message: str, *, transient: bool = False, missing: bool = False) -> None:
        self.config = config
        self.message = message
        self.transient = transient  # it could not be read (ConfigFileError.transient): try again
        self.missing = missing  # there is no such file (ConfigFileError.missing)
        super().__init__(f"{config}: {message}")


class UnreadableConfigsError(ProtectionError):
    """Every protect_from config a strict refresh (prune) could not read, not only the first: the
    ProtectionError of the first, with ``errors`` holding each (the first included)."""

    def __init__(self, errors: Sequence[ProtectionError]) -> None:
        first = errors[0]
        super().__init__(first.config, first.message, transient=first.transient, missing=first.missing)
        self.errors = tuple(errors)


@dataclass(frozen=True, slots=True)
class ResumeReference:
    """One checkpoint path named by a config, with every place it may resolve to."""

    config_label: str
    key: str
    value: str
    candidates: tuple[Path, ...]
    found: bool = True  # False: none of the candidates was there when the config was read

    @property
    def reason(self) -> str:
        """``resume source in configs/train_llada.yaml (ckpt_path)``."""
        role = _KEY_ROLES[self.key.rsplit(".", 1)[-1]]
        return f"{role} in {self.config_label} ({self.key})"


@dataclass(frozen=True)
class ConfigProtection:
    """What one protect_from config names, and what is odd about it."""

    config: Path
    label: str
    references: tuple[ResumeReference, ...]
    warnings: tuple[str, ...] = field(default=())


def _find_resume_keys(document: Mapping[Any, Any]) -> Iterator[tuple[str, Any]]:
    """``ckpt_path`` and ``pretrained_ckpt_path`` anywhere in the document, in document order.

    Keys may be nested (``trainer.ckpt_path``), dotted (``"model.ckpt_path": ...``) or inside lists
    (``callbacks[1].ckpt_path``). The whole document is searched: the loader's bounds (values after
    alias expansion, depth, no loops) bound this walk too.
    """
    pending: list[tuple[str, Any]] = [("", document)]
    while pending:
        prefix, value = pending.pop()
        children: list[tuple[str, Any]] = []
        if isinstance(value, Mapping):
            for key, child in value.items():
                if not isinstance(key, str):
                    continue
                dotted = f"{prefix}{key}"
                if key.rsplit(".", 1)[-1] in RESUME_KEYS:
                    yield dotted, child
                else:
                    children.append((f"{dotted}.", child))
        elif isinstance(value, list):
            stem = prefix.removesuffix(".")
            children = [(f"{stem}[{index}].", child) for index, child in enumerate(value)]
        pending.extend(reversed(children))


def candidate_paths(value: str, config_directory: Path, working_directory: Path) -> tuple[Path, ...]:
    """Where a configured path may point: relative to the config and to the working directory, both.

    Each candidate is given as written (absolute) and with symlinks resolved, so ``last.ckpt`` protects
    both the link and its target. A URL (``s3://bucket/run/last.ckpt``) is its object's core path (see
    locations.py): a bucket has no symlinks, and the value is not relative to anything.
    """
    if is_url(value):
        try:
            location = parse_location(value)
        except LocationError:
            return ()  # names nothing that could be in a root: a warning says it does not exist
        if isinstance(location, StorageURL):
            return (location.core_path,)
        value = str(location)
    expanded = Path(os.path.expanduser(value))
    bases = [Path("/")] if expanded.is_absolute() else [config_directory, working_directory]
    found: list[Path] = []
    for base in bases:
        absolute = Path(os.path.abspath(base / expanded))
        for candidate in (absolute, real_path(absolute)):
            if candidate not in found:
                found.append(candidate)
    return tuple(found)


def read_config_protection(
    config: Path,
    label: str,
    working_directory: Path,
    *,
    confined_to: Sequence[Path] = (),
    files: ConfigAccess = LOCAL_FILES,
) -> ConfigProtection:
    """Read one training config; raise ProtectionError if it cannot be read as a YAML mapping.

    With ``confined_to`` the file (after every symlink) must lie under one of those directories.
    Messages give positions in the file, never its contents: nobody named it on the command line.
    ``files`` reads it (a config named by a URL is an object in a bucket).
    """
    document = _config_document(config, label, confined_to, files)
    references: list[ResumeReference] = []
    warnings: list[str] = []
    set_keys: list[str] = []
    for key, value in _find_resume_keys(document):
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            got = describe_value(value, quote=False)
            warnings.append(f"{label}: '{key}' should be a path, got {got}; ignored")
            continue
        set_keys.append(key)
        reference = ResumeReference(
            config_label=label,
            key=key,
            value=value,
            candidates=candidate_paths(value, config.parent, working_directory),
        )
        absent = why_absent(reference.candidates, files.exists)
        if absent is not None:
            reference = dataclasses.replace(reference, found=False)
            doubt = _namesake_note(value)
            warnings.append(f"{label}: '{key}' names {value!r}, which {absent}{doubt}")
        references.append(reference)
    kinds = {key.rsplit(".", 1)[-1] for key in set_keys}
    if kinds == set(RESUME_KEYS):
        warnings.append(
            f"{label}: both ckpt_path (full resume) and pretrained_ckpt_path (weights only, for "
            "fine-tuning) are set, but only one may be used; both are protected"
        )
    return ConfigProtection(
        config=config, label=label, references=tuple(references), warnings=tuple(warnings)
    )


def _config_document(
    config: Path, label: str, confined_to: Sequence[Path], files: ConfigAccess
) -> dict[Any, Any]:
    """The training config as a mapping; ProtectionError if it cannot be read as one."""
    try:
        document = parse_yaml(files.read_text(config, confined_to=confined_to), quote_contents=False).value
    except ConfigFileError as error:
        raise ProtectionError(
            label, error.message, transient=error.transient, missing=error.missing
        ) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ProtectionError(label, "expected a mapping of keys at the top level")
    return document


def protect_from_problem(error: ProtectionError) -> str:
    """A config that cannot be read, as the policy problem ``prune`` stops at (exit 2)."""
    return f"At 'protect_from': {error}"


def unreadable_configs(configs: Mapping[Path, str], *, files: ConfigAccess = LOCAL_FILES) -> list[str]:
    """``protect_from_problem`` of every config in ``configs`` (path -> label) that cannot be read as
    a YAML mapping, all at once: what a one-shot prune would stop at, for a policy that is refused
    for other problems too (so its configs are not read by a pass). Confined as each label says."""
    problems: list[str] = []
    for config, label in configs.items():
        confined_to = label.allowed_directories if isinstance(label, ConfigLabel) else ()
        try:
            _config_document(config, label, confined_to, files)
        except ProtectionError as error:
            problems.append(protect_from_problem(error))
    return problems


def namesake(value: str) -> str | None:
    """The file name a resume value ends with, if it is written out: what a checkpoint must be named
    to be the one meant, wherever the value's directory really is. None where the name itself is
    left to an interpolation (``${...}``) or there is no name."""
    name = value.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", "..", "~") or "${" in name or "}" in name:
        return None
    return name


def _namesake_note(value: str) -> str:
    name = namesake(value)
    if name is None:
        return ""
    return f"; a checkpoint named {name!r} anywhere under the root is kept in doubt"


def namesakes_from(protections: Iterable[ConfigProtection]) -> dict[str, str]:
    """For every reference found nowhere, its file name, with the reason that keeps a checkpoint of
    that name in any group: a value the watcher cannot resolve as the trainer does (a Hydra or
    OmegaConf interpolation, ``${paths.ckpt_dir}/...``; a path relative to the trainer's working
    directory, which is not the watcher's) still names the checkpoint it is about."""
    names: dict[str, str] = {}
    for protection in protections:
        for reference in protection.references:
            name = None if reference.found else namesake(reference.value)
            if name is not None:
                names.setdefault(
                    name, f"named like the {reference.reason}, which is not found as written (kept in doubt)"
                )
    return names


def why_absent(candidates: Iterable[Path], exists: Callable[[Path], bool]) -> str | None:
    """None if any candidate exists; else why none is seen: it does not exist, or it cannot be looked
    at (a directory the watcher may not search: the trainer's home, say). Either way the path stays
    pinned as written; what cannot be looked at is not resolved through links, hence the warning."""
    unseen: OSError | None = None
    for candidate in candidates:
        try:
            if exists(candidate):
                return None
        except OSError as error:  # Path.exists raises all but "not found" (EACCES on the way, say)
            unseen = error
    if unseen is None:
        return "does not exist (yet)"
    if isinstance(unseen, UnreachableError):
        return f"cannot be looked at ({unseen})"
    return (
        f"cannot be looked at ({describe_os_error(unseen)}): it is protected by that path, but a file it "
        "reaches through a link or a mount is not recognised"
    )


def command_line_pins(paths: Iterable[Path | StorageURL], working_directory: Path) -> dict[Path, str]:
    """``--protect PATH`` pins: the path as given and with symlinks resolved."""
    pins: dict[Path, str] = {}
    for path in paths:
        candidates = candidate_paths(str(path), working_directory, working_directory)
        absent = why_absent(candidates, LOCAL_FILES.exists)
        if absent is not None:
            logger.warning(
                "protected_path_missing", path=str(path), detail=f"--protect names a file which {absent}"
            )
        for candidate in candidates:
            pins.setdefault(candidate, f"protected by --protect {path}")
    return pins


def pins_from(protections: Iterable[ConfigProtection]) -> dict[Path, str]:
    """Every candidate path of every reference, with its reason."""
    pins: dict[Path, str] = {}
    for protection in protections:
        for reference in protection.references:
            for candidate in reference.candidates:
                pins.setdefault(candidate, reference.reason)
    return pins


def identities_of(pins: Mapping[Path, str]) -> dict[FileKey, str]:
    """(device, inode) of every pinned path that exists, following symlinks, with its reason.

    ``plan(..., pinned_identities=...)`` keeps a record whose identity is here, however its path is
    spelt: the same file reached through a hard link, a bind mount or another mount of the volume.
    """
    identities: dict[FileKey, str] = {}
    walked: set[Path] = set()  # holders already stat'ed, with all above them, for an earlier pin
    for path, reason in pins.items():
        try:
            status = os.stat(path)
        except (OSError, ValueError):
            continue
        identities.setdefault((status.st_dev, status.st_ino), reason)
        # Each directory above it too, as plan's _protect_holders keeps a directory checkpoint that
        # holds a pinned file ("holds model.safetensors: ..."): through another path of the root, the
        # checkpoint is only known by its identity. (Only a checkpoint-named directory is a record.)
        real = real_path(path)  # the holders of the file a symlinked pin leads to
        inner, holder = real.name, real.parent
        while holder.parent != holder and holder not in walked:
            walked.add(holder)
            try:
                held = os.stat(holder)
            except (OSError, ValueError):
                break
            identities.setdefault((held.st_dev, held.st_ino), f"holds {inner}: {reason}")
            inner, holder = f"{holder.name}/{inner}", holder.parent
    return identities


@dataclass
class _LoadedConfig:
    identity: FileIdentity | None  # None after a read that failed for now: read again next pass
    label: str
    protection: ConfigProtection | None
    error: str | None = None  # why the last read was refused (a retry failing so is not logged again)
    missing: bool = False  # the last read found no such file
    # Read while it was still being written (not yet quiet): what that read names is pinned as well as
    # what ``protection`` names, until a read of the quiet file replaces both (pins are only added).
    settling: ConfigProtection | None = None

    @property
    def holding(self) -> bool:
        """Never read, yet there: what it names is unknown, so its groups delete nothing (``holding``)."""
        return self.protection is None and not self.missing


def _rejected_detail(read_before: bool, error: ProtectionError) -> str:
    """What a refused read of a protect_from config means for what it protects."""
    if read_before:
        detail = "the previous protection set from this file stays in force"
    elif error.missing:
        detail = "it protects nothing until it exists"
    else:
        detail = (
            "it was never read, so what it names is unknown: no checkpoint under the root is deleted "
            "until it is read (deletions_held)"
        )
    return detail + ("; it is read again at the next pass" if error.transient else "")


class ProtectionRegistry:
    """Keeps the protect_from configs loaded; an unreadable edit keeps that config's previous set."""

    def __init__(self, working_directory: Path, *, files: ConfigAccess = LOCAL_FILES) -> None:
        self.working_directory = working_directory
        self.files = files  # where configs are read: the disk, and a bucket for URLs (config_access.py)
        self._loaded: dict[Path, _LoadedConfig] = {}
        # A config read before and missing now is said missing only once gone for the quiet time: an
        # editor that moves the old file aside before writing the new one leaves a gap (its previous
        # protection stays in force meanwhile, as it does once the config is said missing).
        self._quiet = QuietFiles(missing_waits=True)

    def retain(self, configs: Mapping[Path, str]) -> bool:
        """Forget configs no policy names any more; True if any was dropped."""
        dropped = [config for config in self._loaded if config not in configs]
        for config in dropped:
            del self._loaded[config]
        return bool(dropped)

    def refresh(self, configs: Mapping[Path, str], *, strict: bool = False) -> bool:
        """Bring every config in ``configs`` (path -> label) up to date; True if any protection changed.

        With ``strict`` (one-shot prune) the configs that cannot be read raise UnreadableConfigsError,
        once every config was read; otherwise each is logged as ``protection_rejected`` and its
        previous references stay in force.
        """
        changed = False
        unreadable: list[ProtectionError] = []
        for config, label in configs.items():
            identity = self.files.entry_identity(config)  # (a dangling link is there: read, refused)
            previous = self._loaded.get(config)
            # Unchanged since it was read, or refused for its contents: not read again. A read that
            # failed for now (identity None) is tried at every pass, whatever the file looks like.
            if previous is not None and previous.identity is not None and previous.identity == identity:
                continue
            old_protection = previous.protection if previous is not None else None
            if old_protection is not None and not strict and not self._quiet.quiet(config, identity):
                changed = self._settle(config, label, old_protection, previous) or changed
                continue
            try:
                protection = self._read(config, label)
            except ProtectionError as error:
                if strict:
                    unreadable.append(error)
                    continue
                # Logged, but for a retry (identity None) of a read that failed the same way before.
                if previous is None or previous.identity is not None or previous.error != error.message:
                    logger.error(
                        "protection_rejected",
                        config=label,
                        error=error.message,
                        detail=_rejected_detail(old_protection is not None, error),
                    )
                # A read that failed for now (a store's 503) is tried again at every pass, however
                # long the file stays the same: its protection must not stay away for good.
                seen = None if error.transient else identity
                loaded = _LoadedConfig(seen, label, old_protection, error.message, error.missing)
                self._loaded[config] = loaded
                # (a config that starts or stops holding deletions changes what every group may do)
                changed = changed or previous is None or previous.holding != loaded.holding
                continue
            for warning in protection.warnings:
                logger.warning("protection_warning", config=label, message=warning)
            old_pins = pins_from([old_protection]) if old_protection is not None else {}
            new_pins = pins_from([protection])
            if previous is not None and new_pins != old_pins:
                logger.info(
                    "protection_reloaded",
                    config=label,
                    sources=[reference.value for reference in protection.references],
                )
            # (a config read at last after holding deletions releases its groups, pins or not)
            changed = changed or previous is None or new_pins != old_pins or previous.holding
            self._loaded[config] = _LoadedConfig(identity, label, protection)
        if unreadable:
            raise UnreadableConfigsError(unreadable)
        return changed

    def _read(self, config: Path, label: str) -> ConfigProtection:
        """What ``config`` protects now (ProtectionError if it cannot be used), confined as its label
        says (a config named by a per-run file stays under the root or beside the --policy file)."""
        confined_to = label.allowed_directories if isinstance(label, ConfigLabel) else ()
        return read_config_protection(
            config, label, self.working_directory, confined_to=confined_to, files=self.files
        )

    def _settle(
        self, config: Path, label: str, old: ConfigProtection, previous: _LoadedConfig | None
    ) -> bool:
        """A config read before that changed a moment ago, maybe still being written (``QuietFiles``):
        it is read again at every pass until it is quiet, and until then its pins are kept and what
        this read names is pinned too (a partial file names less: nothing it dropped is unpinned yet).
        True if what is protected changed."""
        try:
            partial = self._read(config, label)
        except ProtectionError:
            partial = None  # (what it says once quiet is logged then)
        settling = previous.settling if previous is not None else None
        in_force = pins_from([old, settling] if settling is not None else [old])
        # (why the last read was refused stays: a config missing for good is read once every quiet
        # time, and that refusal is not said again each time)
        error, missing = (previous.error, previous.missing) if previous is not None else (None, False)
        self._loaded[config] = _LoadedConfig(None, label, old, error, missing, settling=partial)
        return pins_from([old, partial] if partial is not None else [old]) != in_force

    def holding(self) -> dict[Path, str]:
        """The configs (path -> label) that exist but were never read: what they protect is unknown
        (a checkpoint anywhere under the root), so nothing is deleted until they are read (in doubt,
        keep). A config that was read once keeps its last protection through later failures; one
        that does not exist protects nothing (its ``protection_rejected`` says so)."""
        return {config: loaded.label for config, loaded in self._loaded.items() if loaded.holding}

    def configs(self) -> dict[Path, str]:
        """The configs loaded (or tried), path -> label."""
        return {config: loaded.label for config, loaded in self._loaded.items()}

    def pins(self) -> dict[Path, str]:
        """The union of every loaded config's pins (and of what a config being written names already)."""
        protections = [loaded.protection for loaded in self._loaded.values() if loaded.protection is not None]
        protections += [loaded.settling for loaded in self._loaded.values() if loaded.settling is not None]
        return pins_from(protections)

    def namesakes(self) -> dict[str, str]:
        """Names kept in any group: those of references found nowhere (``namesakes_from``)."""
        protections = [loaded.protection for loaded in self._loaded.values() if loaded.protection is not None]
        protections += [loaded.settling for loaded in self._loaded.values() if loaded.settling is not None]
        return namesakes_from(protections)
