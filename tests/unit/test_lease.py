"""The lease's rules, against an in-memory store with conditional writes and a clock the test moves:
who may take it, when it is renewed, when its holder stops deleting, when another may take it over."""

from __future__ import annotations

import itertools
import json
import time

import pytest
from structlog.testing import capture_logs

from ckpt_watcher.lease import Holder, Lease, LeaseHeldError, LeaseLostError
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import (
    BucketMissingError,
    Fetched,
    ObjectInfo,
    ObjectMissingError,
    ObjectStore,
    PreconditionFailedError,
    StoreError,
)

URL = StorageURL("s3", "bucket", "run")
TTL = 30.0


class Clock:
    """Seconds since the start of the test: the store's clock and every watcher's (no skew)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore(ObjectStore):
    """Objects with ETags; If-None-Match and If-Match as S3 has them; ``down`` fails every request."""

    def __init__(self, clock: Clock) -> None:
        self.url = URL
        self.clock = clock
        self.objects: dict[str, tuple[bytes, str, float]] = {}
        self.tags = (f'"{number}"' for number in itertools.count(1))
        self.down = False
        self.no_bucket = False  # the bucket deleted: every request is NoSuchBucket

    def _check(self) -> None:
        if self.no_bucket:
            raise BucketMissingError("PutObject s3://bucket/run/.ckpt-watcher.lease: NoSuchBucket")
        if self.down:
            raise StoreError("PutObject s3://bucket/run/.ckpt-watcher.lease: connection refused")

    def put_new(self, key: str, data: bytes) -> str:
        self._check()
        if key in self.objects:
            raise PreconditionFailedError("exists")
        tag = next(self.tags)
        self.objects[key] = (data, tag, self.clock.now)
        return tag

    def put_replacing(self, key: str, data: bytes, *, tag: str) -> str:
        self._check()
        if key not in self.objects or self.objects[key][1] != tag:
            raise PreconditionFailedError("changed")
        new = next(self.tags)
        self.objects[key] = (data, new, self.clock.now)
        return new

    def fetch(self, key: str, *, limit: int) -> Fetched:
        self._check()
        if key not in self.objects:
            raise ObjectMissingError("missing")
        data, tag, modified = self.objects[key]
        return Fetched(data, ObjectInfo(key, len(data), tag, int(modified * 1e9)), self.clock.now)

    def delete(self, key: str, *, tag: str) -> None:
        self._check()
        if self.objects.get(key, (b"", None, 0.0))[1] != tag:
            raise PreconditionFailedError("changed")
        del self.objects[key]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock)


def _lease(store: MemoryStore, clock: Clock) -> Lease:
    return Lease(store, URL, ttl_seconds=TTL, clock=clock)


def test_the_first_takes_it_a_second_is_refused_naming_the_holder(store: MemoryStore, clock: Clock) -> None:
    first, second = _lease(store, clock), _lease(store, clock)
    first.acquire()
    clock.now += 5
    with pytest.raises(LeaseHeldError, match=r"held by host .*, pid \d+; it expires in 25 s unless renewed"):
        second.acquire()
    assert json.loads(store.objects["run/.ckpt-watcher.lease"][0])["token"] == first.holder.token


def test_it_is_renewed_every_third_of_its_time_and_then_never_expires(
    store: MemoryStore, clock: Clock
) -> None:
    holder, contender = _lease(store, clock), _lease(store, clock)
    holder.acquire()
    tags = [store.objects["run/.ckpt-watcher.lease"][1]]
    for _ in range(12):
        clock.now += TTL / 3
        holder.renew_if_due()
        tags.append(store.objects["run/.ckpt-watcher.lease"][1])
        assert holder.refusal() is None
        with pytest.raises(LeaseHeldError):
            contender.acquire()
    assert len(set(tags)) == len(tags)  # each renewal a new version


@pytest.mark.parametrize(
    ("seconds", "may_delete"),
    [(0.0, True), (TTL - 3.1, True), (TTL - 3.0, False), (TTL + 60, False)],  # the margin: TTL/10 = 3 s
)
def test_its_holder_stops_deleting_before_another_could_take_it_over(
    store: MemoryStore, clock: Clock, seconds: float, may_delete: bool
) -> None:
    holder = _lease(store, clock)
    holder.acquire()
    store.down = True  # no renewal gets through
    clock.now += seconds
    holder.renew_if_due()  # fails quietly (logged), retried later
    assert (holder.refusal() is None) is may_delete


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(store: MemoryStore, clock: Clock) -> None:
    old, new = _lease(store, clock), _lease(store, clock)
    old.acquire()
    clock.now += TTL - 1
    with pytest.raises(LeaseHeldError):
        new.acquire()
    clock.now += 1
    new.acquire()  # expired by the store's clock: taken over
    assert new.refusal() is None
    with pytest.raises(LeaseLostError):
        old.renew_if_due()
    assert old.refusal() is not None
    old.release()  # not its lease any more: left alone
    assert json.loads(store.objects["run/.ckpt-watcher.lease"][0])["token"] == new.holder.token


def test_a_lease_object_deleted_by_something_else_is_taken_again(store: MemoryStore, clock: Clock) -> None:
    """The lease object deleted under its holder (``aws s3 rm``, a lifecycle rule): the renewal's
    If-Match failed, which was taken as a takeover, and the watcher stopped for good (exit 2, not
    restarted by systemd) with no other watcher anywhere. It takes the lease again instead."""
    holder, contender = _lease(store, clock), _lease(store, clock)
    holder.acquire()
    del store.objects["run/.ckpt-watcher.lease"]
    clock.now += TTL / 3

    with capture_logs() as logs:
        holder.renew_if_due()

    assert holder.held
    assert holder.refusal() is None
    assert json.loads(store.objects["run/.ckpt-watcher.lease"][0])["token"] == holder.holder.token
    assert [log["event"] for log in logs] == ["lease_vanished"]
    with pytest.raises(LeaseHeldError):
        contender.acquire()


def test_a_lease_deleted_and_taken_by_another_first_is_lost(store: MemoryStore, clock: Clock) -> None:
    holder, contender = _lease(store, clock), _lease(store, clock)
    holder.acquire()
    del store.objects["run/.ckpt-watcher.lease"]
    contender.acquire()
    clock.now += TTL / 3

    with pytest.raises(LeaseLostError):
        holder.renew_if_due()

    assert not holder.held
    assert json.loads(store.objects["run/.ckpt-watcher.lease"][0])["token"] == contender.holder.token


def test_a_bucket_that_went_away_is_a_failed_renewal_never_a_lost_lease(
    store: MemoryStore, clock: Clock
) -> None:
    """NoSuchBucket was a failed If-Match, so the lease was "taken over" and the watcher stopped (exit
    2). The store went away: renewals fail and are retried, deleting stops as for a store that cannot
    be reached, a new watcher cannot start (the caller says the bucket does not exist), and once the
    bucket is back the holder takes its lease again."""
    holder = _lease(store, clock)
    holder.acquire()
    store.objects.clear()
    store.no_bucket = True

    with capture_logs() as logs:
        for _ in range(6):
            clock.now += TTL / 3
            holder.renew_if_due()

    assert holder.held
    assert holder.refusal() is not None  # nothing is deleted while it cannot be renewed
    assert {log["event"] for log in logs} == {"lease_renewal_failed"}
    with pytest.raises(BucketMissingError):
        _lease(store, clock).acquire()

    store.no_bucket = False
    clock.now += TTL
    with capture_logs() as logs:
        holder.renew_if_due()
    assert [log["event"] for log in logs] == ["lease_vanished"]
    assert holder.refusal() is None


def test_release_deletes_it_and_the_next_watcher_takes_it_at_once(store: MemoryStore, clock: Clock) -> None:
    first, second = _lease(store, clock), _lease(store, clock)
    first.acquire()
    first.release()
    assert store.objects == {}
    second.acquire()
    assert second.held


VALID_LEASE = {"host": "gpu-7", "pid": 4242, "token": "t", "ttl_seconds": 60}


@pytest.mark.parametrize(
    "data",
    [
        json.dumps({**VALID_LEASE, "pid": 1e999}).replace("Infinity", "1e999").encode(),  # OverflowError
        json.dumps({**VALID_LEASE, "pid": float("nan")}).encode(),  # ValueError
        b"[" * 5000,  # RecursionError in the decoder
        json.dumps({**VALID_LEASE, "ttl_seconds": "inf"}).encode(),  # held forever: not ours
        json.dumps({**VALID_LEASE, "ttl_seconds": -5}).encode(),
        json.dumps({**VALID_LEASE, "ttl_seconds": 0}).encode(),
        json.dumps([VALID_LEASE]).encode(),
        b"\xff\xfe not json",
        b"",
    ],
    ids=[
        "pid-1e999",
        "pid-nan",
        "nested-5000",
        "ttl-inf",
        "ttl-negative",
        "ttl-zero",
        "a-list",
        "bytes",
        "empty",
    ],
)
def test_a_malformed_lease_object_is_unreadable_never_an_exception(data: bytes) -> None:
    """Anyone who can write the prefix can write its lease object: whatever it holds, the watcher sees
    "an unreadable lease object" (held until it expires by the watcher's own time to live)."""
    assert Holder.parse(data) is None


def test_a_lease_this_tool_wrote_is_read_back() -> None:
    assert Holder.parse(json.dumps(VALID_LEASE).encode()) == Holder("gpu-7", 4242, "t", 60.0)


def test_a_malformed_lease_that_is_fresh_is_held_by_an_unreadable_lease_object(
    store: MemoryStore, clock: Clock
) -> None:
    store.put_new("run/.ckpt-watcher.lease", b'{"host": "h", "pid": 1e999, "token": "t", "ttl_seconds": 60}')
    with pytest.raises(LeaseHeldError, match="an unreadable lease object"):
        _lease(store, clock).acquire()


def test_a_suspend_longer_than_the_lease_stops_deleting(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine suspended (CLOCK_MONOTONIC stops, the store's clock and CLOCK_BOOTTIME run on) for
    longer than the lease: woken, the holder must not delete on its stale plan before it renews."""
    real = time.clock_gettime
    slept = {"seconds": 0.0}

    def clock_gettime(clock_id: int) -> float:
        extra = slept["seconds"] if clock_id == time.CLOCK_BOOTTIME else 0.0
        return real(clock_id) + extra

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    holder = Lease(store, URL, ttl_seconds=TTL)  # the clock a watcher runs with
    holder.acquire()
    assert holder.refusal() is None
    slept["seconds"] = 3 * TTL  # time.monotonic does not move

    assert holder.refusal() is not None
