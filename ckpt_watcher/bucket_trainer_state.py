"""The ``trainer_state.json`` of a Hugging Face checkpoint in a bucket, read as on disk.

A directory checkpoint of a Hugging Face run (``checkpoint-N/``, or one saved with DeepSpeed that holds
a ``trainer_state.json`` at its top) counts only once its ``trainer_state.json`` is whole JSON, and
what it names as ``best_model_checkpoint`` is kept (plan._keep_hugging_face_best), in a bucket as on
disk. An upload is atomic, so a cut object is a cut source file: skipped and warned about
(suspicious), as on disk. One that cannot be read now (a store error, gone or replaced since the
listing) leaves the checkpoint uncounted this pass: it is never counted without its best known.

The object is read whole (one GET naming the listed ETag, at most the same 64 MiB as on disk) and
only once while it is unchanged: its verdict is kept by the object as listed (key, size, ETag,
last-modified) on the storage across passes, so a pass over an unchanged prefix costs its list
requests only. What is kept is dropped once its key is no longer listed.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from ckpt_watcher.bucket_listing import Listing
from ckpt_watcher.integrity import (
    COMPLETE,
    TRAINER_STATE_MAX_BYTES,
    TRAINER_STATE_NAME,
    TRAINER_STATE_TOO_LARGE,
    Completeness,
    reads_trainer_state,
    trainer_state_best,
)
from ckpt_watcher.object_store import (
    ObjectInfo,
    ObjectMissingError,
    ObjectStore,
    PreconditionFailedError,
    StoreError,
)
from ckpt_watcher.scan import ScanProblem


def _not_now(reason: str) -> Completeness:
    return Completeness(False, f"its {TRAINER_STATE_NAME} {reason}", transient=True)


class TrainerStates:
    """What each listed ``trainer_state.json`` object says: (why it is not whole, or None; the name of
    the checkpoint it calls the best), by key, for the object as it was listed."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._known: dict[str, tuple[ObjectInfo, str | None, str | None]] = {}

    def __len__(self) -> int:
        return len(self._known)

    def forget_unlisted(self, listing: Listing) -> None:
        """Drop what is kept of each key ``listing`` no longer holds."""
        everything = listing.everything  # sorted by key
        for key in list(self._known):
            index = bisect.bisect_left(everything, key, key=lambda info: info.key)
            if index == len(everything) or everything[index].key != key:
                del self._known[key]

    def judge(
        self, checkpoint: Path, layout: str | None, listing: Listing, problems: list[ScanProblem]
    ) -> tuple[Completeness, str | None]:
        """The verdict on the directory checkpoint ``checkpoint`` (complete by its marker and quiet
        time, of ``layout``) from its ``trainer_state.json``, and the checkpoint that calls the best."""
        info = listing.object_at(checkpoint / TRAINER_STATE_NAME)
        if not reads_trainer_state(layout, info is not None):
            return COMPLETE, None
        if info is None:  # only keys below trainer_state.json/: no object of that name
            return Completeness(
                False,
                f"its {TRAINER_STATE_NAME}, written last, is not an object",
                transient=True,
                suspicious=True,
            ), None
        known = self._known.get(info.key)
        if known is None or known[0] != info:
            try:
                doubt, best = self._read(info)
            except PreconditionFailedError:
                return _not_now("was replaced while being read; judged again"), None
            except ObjectMissingError:
                return _not_now("vanished while being read; judged again"), None
            except (StoreError, OSError) as error:
                problems.append(ScanProblem(checkpoint / TRAINER_STATE_NAME, f"cannot be read: {error}"))
                return _not_now(f"cannot be read: {error}"), None
            known = (info, doubt, best)
            self._known[info.key] = known
        _, doubt, best = known
        if doubt is not None:
            return Completeness(False, doubt, transient=True, suspicious=True), None
        return COMPLETE, best

    def _read(self, info: ObjectInfo) -> tuple[str | None, str | None]:
        """integrity.trainer_state_best of the object as listed (a ranged GET naming its ETag)."""
        if info.size > TRAINER_STATE_MAX_BYTES:
            return TRAINER_STATE_TOO_LARGE, None
        data = b""
        if info.size > 0:
            data = self._store.read_range(info.key, 0, info.size, tag=info.tag)
            if len(data) != info.size:
                raise OSError(f"a read of {info.size} bytes returned {len(data)}")
        return trainer_state_best(data)
