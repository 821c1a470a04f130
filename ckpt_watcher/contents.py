"""What is inside a checkpoint, read without loading its tensors. The only module that imports torch.

torch is imported lazily, inside the functions that read contents, so ``watch`` and ``prune`` never pay
for it. Files are opened with ``torch.load(map_location="cpu", mmap=True, weights_only=True)``: tensor
data stays on disk (memory stays far below the file size) and no pickle code runs. Objects the safe
loader refuses are named (``get_unsafe_globals_in_checkpoint``); loading them needs ``unsafe=True``.
"""

from __future__ import annotations

import os
import pickle
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_watcher.integrity import check_directory, check_zip_path
from ckpt_watcher.naming import DEFAULT_NAMING, Kind, Naming

TORCH_MISSING = (
    "torch is not installed; reading checkpoint contents needs it: pip install 'ckpt-watcher[torch]'"
)
_MODEL_CHECKPOINT_PREFIX = "ModelCheckpoint"


class ContentsError(Exception):
    """A checkpoint whose contents cannot be read, with the reason."""


@dataclass
class CallbackState:
    """One ModelCheckpoint callback's saved state."""

    key: str
    monitor: str | None
    mode: str | None
    best_model_score: float | None
    best_model_path: str | None
    best_k_models: dict[str, float | None]


@dataclass
class CheckpointContents:
    """Everything ``inspect`` reports about one file."""

    path: Path
    bytes: int = 0
    complete: bool = False
    integrity: str = ""
    loaded: bool = False
    epoch: int | None = None
    global_step: int | None = None
    lightning_version: str | None = None
    resumable: bool | None = None
    has_optimizer_states: bool = False
    has_lr_schedulers: bool = False
    top_level_keys: list[str] = field(default_factory=list)
    model_checkpoints: list[CallbackState] = field(default_factory=list)
    tensor_count: int = 0
    tensor_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    archive_entries: int = 0
    layout: str | None = None
    unsafe_globals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True unless the file could not be read as a checkpoint at all."""
        return self.error is None


def _import_torch() -> Any:
    try:
        import torch  # noqa: PLC0415  (lazy by design: keep torch off the daemon's hot path)
    except ImportError:
        raise ContentsError(TORCH_MISSING) from None
    return torch


def inspect_checkpoint(  # long: the steps of one inspection, each guarded so a bad file never raises
    path: Path, *, unsafe: bool = False, naming: Naming = DEFAULT_NAMING
) -> CheckpointContents:
    """Read ``path`` (a file or a symlink to one) and describe it; never raises for a bad file."""
    contents = CheckpointContents(path=path)
    try:
        status = path.stat()
    except OSError as error:
        contents.error = f"cannot read it: {error.strerror}"
        return contents
    if path.is_dir():
        directory = check_directory(
            str(path), Path(os.path.realpath(path)).name, quiet_seconds=0.0, now=time.time()
        )
        contents.bytes = directory.bytes
        contents.layout = directory.layout
        contents.complete = directory.completeness.complete
        contents.integrity = (
            "complete" if contents.complete else (directory.completeness.reason or "incomplete")
        )
        if not contents.complete:
            contents.error = f"not a complete directory checkpoint: {contents.integrity}"
        else:
            contents.warnings.append(f"a {directory.layout} directory checkpoint: its files are not loaded")
        return contents

    contents.bytes = status.st_size
    verdict = check_zip_path(str(path), follow_symlinks=True)
    contents.complete = verdict.complete
    contents.integrity = "complete zip archive" if verdict.complete else (verdict.reason or "incomplete")
    if not verdict.complete:
        contents.error = f"not a complete checkpoint: {contents.integrity}"
        return contents
    contents.archive_entries = _count_entries(path)
    try:
        torch = _import_torch()
    except ContentsError as error:
        contents.error = str(error)
        return contents
    try:
        document = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        contents.unsafe_globals = _unsafe_globals(torch, path)
        if not unsafe:
            contents.warnings.append(
                "the safe loader refuses objects in this checkpoint "
                f"({', '.join(contents.unsafe_globals) or 'unknown globals'}); "
                "use --unsafe to load it anyway (runs its pickle code: only for files you trust)"
            )
            _describe_archive(path, contents)
            return contents
        try:
            document = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
        except Exception as unsafe_error:  # a corrupt pickle can raise anything
            contents.error = f"cannot be loaded even unsafely: {unsafe_error}"
            return contents
        del error
    except Exception as error:  # torch raises RuntimeError, EOFError, ValueError... for corrupt files
        contents.error = f"cannot be loaded: {type(error).__name__}: {error}"
        return contents
    contents.loaded = True
    _describe_document(torch, document, contents)
    _check_name(path, contents, naming)
    return contents


def verify_loadable(path: Path) -> str | None:
    """For ``verify: load``: None if the safe, mmap'd load succeeds, else why it fails.

    A checkpoint whose pickle is well formed but holds objects the safe loader refuses still counts
    as loadable: its structure parsed (``get_unsafe_globals_in_checkpoint`` read all of it).
    """
    torch = _import_torch()
    try:
        torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        try:
            torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as parse_error:
            return f"pickle does not parse: {parse_error}"
        if "Unsupported global" in str(error) or "weights_only" in str(error):
            return None
        return f"cannot be loaded: {error}"
    except Exception as error:
        return f"cannot be loaded: {type(error).__name__}: {error}"
    return None


def _count_entries(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return len(archive.infolist())


def _describe_archive(path: Path, contents: CheckpointContents) -> None:
    """What the archive itself says when the pickle may not be loaded: tensor storages and their bytes."""
    with zipfile.ZipFile(path) as archive:
        storages = [info for info in archive.infolist() if "/data/" in info.filename]
    contents.tensor_count = len(storages)
    contents.tensor_bytes = sum(info.file_size for info in storages)
    contents.warnings.append(
        "tensor count and bytes are of storages in the archive (the pickle was not loaded)"
    )


def _unsafe_globals(torch: Any, path: Path) -> list[str]:
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


def _walk_tensors(torch: Any, value: Any, depth: int = 0) -> Iterator[Any]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 64 and isinstance(value, dict):
        for item in value.values():
            yield from _walk_tensors(torch, item, depth + 1)
    elif depth < 64 and isinstance(value, list | tuple):
        for item in value:
            yield from _walk_tensors(torch, item, depth + 1)


def _describe_document(torch: Any, document: Any, contents: CheckpointContents) -> None:
    if isinstance(document, dict):
        contents.top_level_keys = [str(key) for key in document]
        contents.epoch = _as_int(document.get("epoch"))
        contents.global_step = _as_int(document.get("global_step"))
        version = document.get("pytorch-lightning_version")
        contents.lightning_version = str(version) if version is not None else None
        contents.has_optimizer_states = bool(document.get("optimizer_states"))
        contents.has_lr_schedulers = "lr_schedulers" in document
        contents.resumable = contents.has_optimizer_states  # without optimizer state: weights only
        callbacks = document.get("callbacks")
        if isinstance(callbacks, dict):
            contents.model_checkpoints = [
                _callback_state(str(key), state)
                for key, state in callbacks.items()
                if str(key).startswith(_MODEL_CHECKPOINT_PREFIX) and isinstance(state, dict)
            ]
    seen_storages: set[tuple[int, int]] = set()
    dtypes: Counter[str] = Counter()
    for tensor in _walk_tensors(torch, document):
        contents.tensor_count += 1
        dtypes[str(tensor.dtype).removeprefix("torch.")] += 1
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen_storages:
            seen_storages.add(key)
            contents.tensor_bytes += storage.nbytes()
    contents.dtypes = dict(dtypes.most_common())


def _callback_state(key: str, state: dict[str, Any]) -> CallbackState:
    best_k = state.get("best_k_models") or {}
    return CallbackState(
        key=key,
        monitor=state.get("monitor"),
        mode=_mode_from_key(key),
        best_model_score=_as_float(state.get("best_model_score")),
        best_model_path=state.get("best_model_path") or None,
        best_k_models={str(path): _as_float(score) for path, score in best_k.items()},
    )


def _mode_from_key(key: str) -> str | None:
    """Lightning keys the state as ``ModelCheckpoint{'monitor': ..., 'mode': 'min', ...}``."""
    marker = "'mode': '"
    start = key.find(marker)
    if start == -1:
        return None
    start += len(marker)
    end = key.find("'", start)
    return key[start:end] if end != -1 else None


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _check_name(path: Path, contents: CheckpointContents, naming: Naming) -> None:
    """A name that says one step while the contents say another is worth a warning."""
    resolved = Path(os.path.realpath(path))
    parsed = naming.classify(resolved.name)
    if parsed.kind is Kind.UNKNOWN or parsed.step is None or contents.global_step is None:
        return
    if parsed.step != contents.global_step:
        contents.warnings.append(
            f"the name says step {parsed.step} but global_step is {contents.global_step}"
        )
    if parsed.epoch is not None and contents.epoch is not None and parsed.epoch != contents.epoch:
        contents.warnings.append(f"the name says epoch {parsed.epoch} but the contents say {contents.epoch}")
