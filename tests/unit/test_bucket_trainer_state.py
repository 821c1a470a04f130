"""A bucket's trainer_state.json objects (bucket_trainer_state.TrainerStates): read once per object as
listed, kept across passes while listed, never counted complete without being read."""

from __future__ import annotations

from ckpt_watcher.bucket_listing import Listing
from ckpt_watcher.bucket_trainer_state import TrainerStates
from ckpt_watcher.integrity import COMPLETE, TRAINER_STATE_MAX_BYTES, TRAINER_STATE_TOO_LARGE
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import ObjectInfo, ObjectMissingError, ObjectStore, StoreError
from ckpt_watcher.scan import ScanProblem

URL = StorageURL("s3", "bucket", "out")
CHECKPOINT = URL.core_path / "checkpoint-2000"
KEY = "out/checkpoint-2000/trainer_state.json"
STATE = (
    b'{"global_step": 2000, "log_history": [{"loss": 1.0}], "best_model_checkpoint": "/o/checkpoint-1000"}'
)
HUGGING_FACE = "Hugging Face Trainer"


class Objects(ObjectStore):
    """Objects by key; each ranged read counted; ``failure`` raised instead while set."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.url = URL
        self.objects = objects
        self.reads: list[str] = []
        self.failure: StoreError | None = None

    def read_range(self, key: str, offset: int, length: int, *, tag: str) -> bytes:
        self.reads.append(key)
        if self.failure is not None:
            raise self.failure
        return self.objects[key][offset : offset + length]


def _listing(objects: dict[str, bytes], tag: str = '"1"', size: int | None = None) -> Listing:
    infos = [
        ObjectInfo(key, len(data) if size is None else size, tag, 1_000_000_000)
        for key, data in objects.items()
    ]
    return Listing.of(URL, infos)


def test_an_object_is_read_once_while_it_is_listed_unchanged() -> None:
    objects = {KEY: STATE, "out/checkpoint-2000/model.safetensors": b"x"}
    store = Objects(objects)
    states = TrainerStates(store)
    problems: list[ScanProblem] = []

    for _ in range(3):
        listing = _listing(objects)
        states.forget_unlisted(listing)
        assert states.judge(CHECKPOINT, HUGGING_FACE, listing, problems) == (COMPLETE, "checkpoint-1000")
    assert store.reads == [KEY]

    replaced = _listing(objects, tag='"2"')  # the same key, another ETag: read again
    assert states.judge(CHECKPOINT, HUGGING_FACE, replaced, problems) == (COMPLETE, "checkpoint-1000")
    assert store.reads == [KEY, KEY]

    states.forget_unlisted(_listing({"out/checkpoint-2000/model.safetensors": b"x"}))
    assert len(states) == 0
    assert problems == []


def test_a_checkpoint_whose_trainer_state_cannot_be_read_does_not_count_this_pass() -> None:
    store = Objects({KEY: STATE})
    states = TrainerStates(store)
    listing = _listing(store.objects)
    problems: list[ScanProblem] = []

    store.failure = StoreError("GetObject: InternalError")
    completeness, best = states.judge(CHECKPOINT, HUGGING_FACE, listing, problems)
    assert (completeness.complete, completeness.transient, completeness.suspicious, best) == (
        False,
        True,
        False,
        None,
    )
    assert completeness.reason == "its trainer_state.json cannot be read: GetObject: InternalError"
    assert [problem.path for problem in problems] == [CHECKPOINT / "trainer_state.json"]

    store.failure = ObjectMissingError("gone")
    completeness, _ = states.judge(CHECKPOINT, HUGGING_FACE, listing, problems)
    assert completeness.reason == "its trainer_state.json vanished while being read; judged again"
    assert not completeness.complete

    store.failure = None  # no failure was kept: the next pass reads it
    assert states.judge(CHECKPOINT, HUGGING_FACE, listing, problems) == (COMPLETE, "checkpoint-1000")
    assert len(store.reads) == 3


def test_a_cut_or_oversized_trainer_state_is_suspicious_and_an_oversized_one_is_not_read() -> None:
    store = Objects({KEY: STATE[:40]})
    states = TrainerStates(store)

    completeness, best = states.judge(CHECKPOINT, HUGGING_FACE, _listing(store.objects), [])
    assert (completeness.complete, completeness.suspicious, best) == (False, True, None)
    assert completeness.reason == "its trainer_state.json, written last, is not whole JSON: truncated"

    huge = _listing(store.objects, tag='"2"', size=TRAINER_STATE_MAX_BYTES + 1)
    completeness, _ = states.judge(CHECKPOINT, HUGGING_FACE, huge, [])
    assert (completeness.complete, completeness.suspicious) == (False, True)
    assert completeness.reason == TRAINER_STATE_TOO_LARGE
    assert store.reads == [KEY]


def test_only_a_hugging_face_checkpoint_has_its_trainer_state_read() -> None:
    deepspeed = {"out/checkpoint-2000/latest": b"global_step2000", "out/checkpoint-2000/zero/rank0.pt": b"x"}
    store = Objects(deepspeed)
    states = TrainerStates(store)

    assert states.judge(CHECKPOINT, "DeepSpeed", _listing(deepspeed), []) == (COMPLETE, None)
    assert store.reads == []

    store.objects = {**deepspeed, KEY: STATE}  # the Trainer saving with DeepSpeed
    assert states.judge(CHECKPOINT, "DeepSpeed", _listing(store.objects), []) == (COMPLETE, "checkpoint-1000")
    assert store.reads == [KEY]


def test_a_trainer_state_that_is_only_a_prefix_does_not_count() -> None:
    objects = {f"{KEY}/odd": b"{}"}
    completeness, _ = TrainerStates(Objects(objects)).judge(CHECKPOINT, HUGGING_FACE, _listing(objects), [])
    assert not completeness.complete
    assert completeness.reason == "its trainer_state.json, written last, is not an object"
