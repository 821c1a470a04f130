"""The bucket trash's pure parts: what an entry's info object may say (hostile documents refused),
and the ETag a server-side copy will have (S3's multipart rule), which the pin of a restore is keyed by."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest

from ckpt_watcher import bucket_delete, bucket_trash_moves
from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.bucket_listing import object_identity
from ckpt_watcher.bucket_trash import (
    BucketTrashIndex,
    StoredCopy,
    StoredEntry,
    entry_document,
    parse_entry,
    pinned_inode,
)
from ckpt_watcher.bucket_trash_pass import BucketTrashPass
from ckpt_watcher.delete import DeletionResult, Outcome
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import (
    Fetched,
    ObjectInfo,
    ObjectMissingError,
    ObjectStore,
    PendingCopy,
    StoreError,
)
from ckpt_watcher.trash import RETRY_UNREAD_SECONDS, TrashEntry
from tests.support.purge_times import purge_times_asked

KEY = "20261129T161651.000001Z-i42"
INFO = ObjectInfo(f"root/.ckpt-trash/info/{KEY}.json", 100, '"info-tag"', 0)


def _entry(*, directory: bool = False, original: str = "run/x.ckpt") -> TrashEntry:
    return TrashEntry(KEY, original, 1.0e9, 3600, ("outside newest 1",), 10, directory, 0, 7, None)


def _document(**changes: Any) -> bytes:
    document = json.loads(entry_document(_entry(), [StoredCopy("", '"abc-1"', 10)]))
    document.update(changes)
    return json.dumps(document).encode()


def test_an_entry_reads_back_as_it_was_written() -> None:
    copies = [StoredCopy(f"zero/rank{index}.pt", f'"tag{index}-1"', 100) for index in range(3000)]
    data = entry_document(_entry(directory=True), copies)
    assert len(data) > 64 * 1024  # a large directory checkpoint: more than a file's metadata limit
    stored = parse_entry(KEY, data, INFO)
    assert stored.copies == tuple(copies)
    assert stored.entry == _entry(directory=True)
    assert (stored.info_key, stored.info_tag) == (INFO.key, INFO.tag)
    assert stored.data_key("root/.ckpt-trash", "zero/rank0.pt") == (
        f"root/.ckpt-trash/files/run/x.ckpt@{KEY}/zero/rank0.pt"
    )


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"original": "../outside.ckpt"}, "not a path inside the root"),
        ({"original": ".ckpt-trash/files/x.ckpt"}, "not a path inside the root"),
        ({"original": "/absolute.ckpt"}, "not a path inside the root"),
        ({"objects": []}, "'objects' is not a list"),
        ({"objects": [["", '"a"', -1]]}, "not [key, ETag, size]"),
        ({"objects": [["", '"a"', True]]}, "not [key, ETag, size]"),
        ({"objects": [["", '"a"', 1], ["other", '"b"', 1]]}, "more than its one copy"),
        ({"objects": [["../../elsewhere", '"a"', 1]], "type": "directory"}, "outside it"),
        ({"objects": [["a//b", '"a"', 1]], "type": "directory"}, "outside it"),
        ({"objects": [["a", '"a"', 1], ["a", '"b"', 1]], "type": "directory"}, "one copy twice"),
    ],
)
def test_a_hostile_entry_is_refused(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_entry(KEY, _document(**changes), INFO)


def test_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_entry(KEY, b"{" * 100_000, INFO)


def test_a_copy_knows_the_etag_it_will_have_and_whether_it_proves_its_source() -> None:
    first, second = hashlib.md5(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()  # noqa: S324  (S3's rule)
    pending = PendingCopy("src", "dst", "upload", (f'"{first}"', f'"{second}"'), 2)
    both = hashlib.md5(bytes.fromhex(first) + bytes.fromhex(second)).hexdigest()  # noqa: S324
    assert pending.tag == f'"{both}-2"'
    assert not pending.copies_whole(f'"{first}"')  # two parts: not one object's MD5
    single = PendingCopy("src", "dst", "upload", (f'"{first}"',), 1)
    assert single.copies_whole(f'"{first}"')
    assert single.copies_whole(first)
    assert not single.copies_whole(f'"{second}"')
    assert not single.copies_whole(f'"{first}-1"')
    assert pinned_inode(single.tag) == pinned_inode(single.tag)
    assert pinned_inode(single.tag) != pinned_inode(pending.tag)


def test_the_bucket_index_works_out_the_next_purge_once_a_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the local index: the daemon's loop asks at every turn; the entries are sorted once per change
    (a look, or an entry this process added or dropped), and every change is in the next answer."""
    index = BucketTrashIndex(StorageURL("s3", "bucket", "root"), cast(ObjectStore, None))
    first = StoredEntry(_entry(), (), "root/.ckpt-trash/info/a.json", '"a"')
    later = replace(_entry(), key="20261129T161652.000001Z-i43", trashed_at=1.0e9 + 10, grace_seconds=60)
    second = StoredEntry(later, (), "root/.ckpt-trash/info/b.json", '"b"')
    asked = purge_times_asked(monkeypatch, TrashEntry)
    assert index.next_purge_at() is None
    index.add(first)

    assert {index.next_purge_at() for _ in range(100)} == {1.0e9 + 3600}
    assert len(asked) == 1  # once for the one entry, not at each question
    index.add(second)
    assert index.next_purge_at() == 1.0e9 + 70  # added later, a shorter grace: purged first
    assert [stored.entry.key for stored in index.stored] == [KEY, later.key]  # oldest first
    index.drop(second)
    assert index.next_purge_at() == 1.0e9 + 3600
    summary = index.summary()
    assert summary is not None
    assert (summary.entries, summary.bytes, summary.oldest) == (1, 10, _entry())


class _FlakyStore:
    """A store whose ``fetch`` fails (a 500 on every retry) for the keys in ``failing``, says a key in
    ``missing`` is gone, and counts what it was asked for."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.failing: set[str] = set()
        self.missing: set[str] = set()
        self.fetched: list[str] = []
        self.listed: list[ObjectInfo] = []  # what ``list_prefix`` answers

    def list_prefix(self, prefix: str) -> list[ObjectInfo]:
        return [info for info in self.listed if info.key.startswith(prefix)]

    def fetch(self, key: str, *, limit: int) -> Fetched:
        self.fetched.append(key)
        if key in self.missing:
            raise ObjectMissingError(key)
        if key in self.failing:
            raise StoreError(f"{key}: InternalError")
        data = self.objects[key]
        return Fetched(data, ObjectInfo(key, len(data), '"info-tag"', 0), None)


def test_what_the_store_failed_to_give_is_fetched_again_and_a_pin_is_in_doubt_until_then() -> None:
    """A fetch that failed was remembered under the object's ETag as unreadable: an entry's bytes
    left out of the trash's figures, a pin's restored checkpoint planned as never restored, until the
    daemon restarted. A pin that failed is fetched again at the next look, and until then the pins are
    in doubt (the pass deletes nothing: bucket_trash_pass); an entry, RETRY_UNREAD_SECONDS later (not
    100,000 GETs at every poll); what is not an entry at all, never again."""
    pin_key = f"root/.ckpt-trash/restored/{KEY}.json"
    pin = json.dumps({"original": "run/x.ckpt", "device": 1, "inode": 2, "until": 2.0e9}).encode()
    junk_key = "root/.ckpt-trash/info/20261129T161651.000002Z-i43.json"
    store = _FlakyStore({INFO.key: _document(), pin_key: pin, junk_key: b"{"})
    store.failing = {INFO.key, pin_key}
    listing = [INFO, ObjectInfo(pin_key, len(pin), '"pin-tag"', 0), ObjectInfo(junk_key, 1, '"junk"', 0)]
    now = [1000.0]
    index = BucketTrashIndex(
        StorageURL("s3", "bucket", "root"), cast(ObjectStore, store), clock=lambda: now[0]
    )
    index.look(listing)
    assert index.stored == ()
    assert index.pins == []
    assert index.pins_in_doubt == f"{pin_key} cannot be read: {pin_key}: InternalError"

    store.failing = set()
    index.look(listing)
    assert [(pin.device, pin.inode) for pin in index.pins] == [(1, 2)]
    assert index.pins_in_doubt is None
    assert index.stored == ()  # (the entry: not asked for again yet)
    now[0] += RETRY_UNREAD_SECONDS
    index.look(listing)
    index.look(listing)

    assert [entry.key for entry in index.entries] == [KEY]
    assert sorted(store.fetched) == sorted([INFO.key, INFO.key, pin_key, pin_key, junk_key])


def test_an_object_gone_since_the_listing_or_too_large_is_not_fetched_for_nothing() -> None:
    """A pin purged between the listing and its fetch is no doubt about anything (the next listing
    has it not); an object larger than an entry can be is refused from its listed size, once."""
    pin_key = f"root/.ckpt-trash/restored/{KEY}.json"
    store = _FlakyStore({})
    store.missing = {pin_key}
    index = BucketTrashIndex(StorageURL("s3", "bucket", "root"), cast(ObjectStore, store))
    huge = ObjectInfo(INFO.key, 1 << 40, '"huge"', 0)
    index.look([huge, ObjectInfo(pin_key, 10, '"pin-tag"', 0)])
    index.look([huge])

    assert index.pins_in_doubt is None
    assert store.fetched == [pin_key]
    assert index.stored == ()


def test_the_pins_are_listed_again_when_an_entry_is_listed_even_one_not_read() -> None:
    """A listing's pages are not one snapshot, so a pass lists the pins again once while the trash has
    entries (a restore may be under way). It asked whether any entry was *read*: with the one entry's
    info object failing to come, the pins were not listed again, and a restore racing the listing could
    go unseen. Any entry listed is enough."""
    pin_key = f"root/.ckpt-trash/restored/{KEY}.json"
    pin = json.dumps({"original": "run/x.ckpt", "device": 1, "inode": 2, "until": 2.0e9}).encode()
    store = _FlakyStore({INFO.key: _document(), pin_key: pin})
    store.failing = {INFO.key}
    storage = SimpleNamespace(url=StorageURL("s3", "bucket", "root"), store=store)
    keeper = BucketTrashPass(cast(BucketStorage, storage))
    keeper.index.look([INFO])  # the pass's listing: an entry, no pin yet (its page came first)
    assert keeper.index.stored == ()
    store.listed = [ObjectInfo(pin_key, len(pin), '"pin-tag"', 0)]

    assert keeper.pinned_identities() == {(1, 2): keeper.index.pins[0].reason}


def test_a_look_at_the_pins_alone_replaces_the_pins_and_leaves_the_entries() -> None:
    """A move into the trash looks at the pins again each time; that look rebuilt the mapping of every
    object under the trash and went over every one (a second of CPU per move at 400,000 entries, a
    review measured). It now replaces only the pins: a pin gone is gone, a new one read, an entry as it
    was and not fetched again."""
    old_pin, new_pin = (f"root/.ckpt-trash/restored/{KEY[:-1]}{digit}.json" for digit in "12")
    pin = json.dumps({"original": "run/x.ckpt", "device": 1, "inode": 2, "until": 2.0e9}).encode()
    store = _FlakyStore({INFO.key: _document(), old_pin: pin, new_pin: pin})
    index = BucketTrashIndex(StorageURL("s3", "bucket", "root"), cast(ObjectStore, store))
    index.look([INFO, ObjectInfo(old_pin, len(pin), '"old"', 0)])
    store.listed = [ObjectInfo(new_pin, len(pin), '"new"', 0)]
    index.look_pins()

    assert sorted(index.objects) == sorted([INFO.key, new_pin])
    assert [entry.key for entry in index.entries] == [KEY]
    assert [(pin.key, pin.inode) for pin in index.pins] == [(new_pin.rsplit("/", 1)[1][:-5], 2)]
    assert sorted(store.fetched) == sorted([INFO.key, old_pin, new_pin])


class _OtherETagStore:
    """A store whose completed copies get ETags other than S3's multipart rule (as some S3-compatible
    stores give), and whose replacing write fails (``failing``); it notes each delete."""

    def __init__(self) -> None:
        self.failing = True
        self.deleted: list[tuple[str, str]] = []
        self.written: dict[str, bytes] = {}

    def put_new(self, key: str, data: bytes) -> str:
        self.written[key] = data
        return '"pin-1"'

    def put_replacing(self, key: str, data: bytes, *, tag: str) -> str:
        if self.failing:
            raise StoreError(f"{key}: InternalError")
        self.written[key] = data
        return '"pin-2"'

    def finish_copy(self, pending: PendingCopy) -> str:
        return '"not-s3s-rule"'

    def delete(self, key: str, *, tag: str) -> None:
        self.deleted.append((key, tag))


@pytest.mark.parametrize("failing", [True, False])
def test_a_restore_whose_pin_cannot_be_corrected_is_undone(failing: bool) -> None:
    """Where a store's ETags are not S3's, a restore's pin (written before the copies land, with the
    identity they should have) is written again with the identity they got. That write's failure was
    ignored: the restored checkpoint stood pinned under an identity it does not have, so the next pass
    could take it again at once. Now the restore is undone (the copies and the pin deleted, the entry
    left in the trash) and says why."""
    store = _OtherETagStore()
    store.failing = failing
    index = BucketTrashIndex(StorageURL("s3", "bucket", "root"), cast(ObjectStore, store))
    stored = StoredEntry(_entry(), (StoredCopy("", '"abc-1"', 10),), INFO.key, INFO.tag)
    index.add(stored)
    pending = [
        PendingCopy(
            "root/.ckpt-trash/files/run/x.ckpt@k", "root/run/x.ckpt", "upload", ('"' + "ab" * 16 + '"',), 10
        )
    ]

    problem = bucket_trash_moves._land(index, stored, pending, now=1.0e9)

    pin = f"root/.ckpt-trash/restored/{KEY}.json"
    if failing:
        assert problem is not None
        assert problem.startswith(f"its pin could not be written ({pin}: InternalError); not restored")
        assert problem.endswith("still in the trash")
        assert store.deleted == [("root/run/x.ckpt", '"not-s3s-rule"'), (pin, '"pin-1"')]
        assert [stored.entry.key for stored in index.stored] == [KEY]
    else:
        assert problem is None
        assert json.loads(store.written[pin])["inode"] == pinned_inode('"not-s3s-rule"')
        assert index.stored == ()


def test_the_lease_is_asked_after_the_moves_look_at_the_pins_right_before_the_delete() -> None:
    """The move's look at the pins (a LIST, GETs: seconds with retries) came between the lease check
    and the DELETE, so a lease lapsing during it no longer stopped the DELETE, a review showed. The
    lease is asked last."""
    url = StorageURL("s3", "bucket", "root")
    info = ObjectInfo("root/run/x.ckpt", 10, '"t"', 0)
    path = url.path_of(info.key)
    record = SimpleNamespace(path=path, identity=object_identity(info), name="x.ckpt")
    decision = SimpleNamespace(record=record, reasons=("old",))
    listing = SimpleNamespace(object_at=lambda asked: info if asked == path else None)
    deleted: list[str] = []
    store = SimpleNamespace(head=lambda key: info, delete=lambda key, tag: deleted.append(key))
    lease = {"held": True}

    def the_pins_looked_at_while_the_lease_lapses() -> None:
        lease["held"] = False

    result = bucket_delete.remove_object(
        cast(Any, decision),
        url,
        cast(ObjectStore, store),
        cast(Any, listing),
        lambda done: DeletionResult(done, Outcome.DELETED),
        may_delete=lambda: None if lease["held"] else "the lease could not be renewed in time",
        last_check=the_pins_looked_at_while_the_lease_lapses,
    )

    assert deleted == []
    assert result.outcome is Outcome.FAILED
    assert result.error == "the lease could not be renewed in time"
