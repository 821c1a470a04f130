"""One watcher per bucket prefix: a lease object under the prefix, written with conditional writes.

There is no ``flock`` on a bucket, so the single-instance lock of lock.py becomes a lease: the object
``PREFIX/.ckpt-watcher.lease`` names its holder (host, pid, a random token) and how long it holds
(``ttl_seconds``). It is

* **taken** with ``If-None-Match: *`` (created only if there is none);
* **renewed** by the running watcher every third of its time to live, with ``If-Match`` on the ETag
  it wrote last, so a renewal never overwrites another holder's lease;
* **taken over** only once it has expired: when the store's own clock (the ``Date`` of the response
  that read it) is past its last-modified time plus its ``ttl_seconds``, and then with ``If-Match``
  on the expired version, so of two watchers racing for it exactly one wins;
* **released** (deleted with ``If-Match``) when the watcher stops.

A watcher that finds the lease held exits 2 naming the holder, as on disk. A watcher deletes only
while its last successful renewal is recent enough that no other could have taken the lease over
(``refusal``); one that finds its lease taken over stops (``LeaseLostError``, exit 2). A bucket that
is not there (``BucketMissingError``) is the store being unusable, never a lease held or lost: at
start it is the caller's to report; later a renewal into it fails as any store error does, and
deletions stop once the lease may have expired.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ckpt_watcher.bucket_listing import LEASE_NAME
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.lock import LockHeldError
from ckpt_watcher.object_store import (
    BucketMissingError,
    Fetched,
    ObjectMissingError,
    ObjectStore,
    PreconditionFailedError,
    StoreError,
)

logger = structlog.get_logger("ckpt_watcher.lease")

DEFAULT_LEASE_SECONDS = 60.0
LEASE_LIMIT = 64 * 1024
# A lease's last-modified time has a resolution of one second (an HTTP date), and a request takes
# time: a holder stops deleting this long before another could take the lease over.
_MINIMUM_MARGIN = 2.0


def boot_clock() -> float:
    """Seconds on a clock that keeps running while the machine is suspended (CLOCK_BOOTTIME), as the
    store's clock does, by which another watcher takes an expired lease over: ``time.monotonic`` stops
    during a suspend, and a holder woken from one would think its lease still valid. Where there is
    no such clock (not Linux), ``time.monotonic``."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


class LeaseHeldError(LockHeldError):
    """Another watcher holds the prefix's lease (exit 2, as for a held lock)."""

    def __init__(self, url: StorageURL, holder: str, expires_in: float | None) -> None:
        super().__init__(url.core_path, None)
        when = f"; it expires in {expires_in:.0f} s unless renewed" if expires_in is not None else ""
        self.args = (f"another ckpt-watcher is already pruning {url.text} (held by {holder}{when})",)

    def __str__(self) -> str:
        return str(self.args[0])


class LeaseLostError(LeaseHeldError):
    """This watcher's lease was taken over (it could not renew it in time): it must stop."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease, as its object says."""

    host: str
    pid: int
    token: str
    ttl_seconds: float

    def describe(self) -> str:
        """``host gpu-7, pid 4242``."""
        return f"host {self.host}, pid {self.pid}"

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lease object names, or None if it is not a lease this tool wrote (anything
        else, however malformed: a pid of 1e999, arrays nested 5,000 deep, a ttl that is not a
        finite positive number of seconds)."""
        try:
            document: Any = json.loads(data)
            holder = cls(
                str(document["host"]),
                int(document["pid"]),
                str(document["token"]),
                float(document["ttl_seconds"]),
            )
        except (ValueError, KeyError, TypeError, ArithmeticError, RecursionError):
            return None
        return holder if math.isfinite(holder.ttl_seconds) and holder.ttl_seconds > 0 else None


def judge_lease(
    data: bytes, mtime_seconds: float, now: float, ttl_seconds: float = DEFAULT_LEASE_SECONDS
) -> tuple[Holder | None, float]:
    """Who a lease object names (None: not a lease this tool wrote, which lasts ``ttl_seconds``) and
    in how many seconds it expires (<= 0: expired), by the store's clock ``now``."""
    holder = Holder.parse(data)
    ttl = holder.ttl_seconds if holder is not None else ttl_seconds
    return holder, mtime_seconds + ttl - now


def read_lease(fetched: Fetched, ttl_seconds: float = DEFAULT_LEASE_SECONDS) -> tuple[Holder | None, float]:
    """``judge_lease`` of a fetched lease object, by the clock of the response that read it."""
    now = fetched.server_time if fetched.server_time is not None else time.time()
    return judge_lease(fetched.data, fetched.info.mtime_ns / 1e9, now, ttl_seconds)


def _standing(fetched: Fetched, ttl_seconds: float) -> tuple[str, float]:
    """Who a fetched lease object names, described, and in how many seconds it expires."""
    holder, expires_in = read_lease(fetched, ttl_seconds)
    return (holder.describe() if holder is not None else "an unreadable lease object"), expires_in


def refuse_if_held(store: ObjectStore, url: StorageURL) -> None:
    """LeaseHeldError if a watcher holds ``url``'s lease (it has not expired): a one-shot ``prune``
    that deletes does not run beside it. It takes no lease itself, so a watcher started after this
    look is not excluded (README). StoreError as for any request."""
    key = f"{url.prefix}/{LEASE_NAME}" if url.prefix else LEASE_NAME
    try:
        fetched = store.fetch(key, limit=LEASE_LIMIT)
    except ObjectMissingError:
        return
    described, expires_in = _standing(fetched, DEFAULT_LEASE_SECONDS)
    if expires_in > 0:
        raise LeaseHeldError(url, described, expires_in)


class Lease:
    """The lease of one prefix, as its would-be holder sees it."""

    def __init__(
        self,
        store: ObjectStore,
        url: StorageURL,
        *,
        ttl_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = boot_clock,
    ) -> None:
        self.store = store
        self.url = url
        self.key = f"{url.prefix}/{LEASE_NAME}" if url.prefix else LEASE_NAME
        self.ttl_seconds = ttl_seconds
        self.holder = Holder(socket.gethostname(), os.getpid(), secrets.token_hex(8), ttl_seconds)
        self._clock = clock
        self._tag: str | None = None
        self._sent_at = 0.0  # when the last write that succeeded was sent (this process's clock)
        self._retry_at = 0.0  # after a failed renewal, when to try again
        self._renewals = 0

    @property
    def held(self) -> bool:
        """True while this watcher believes it holds the lease (see ``refusal`` for deleting)."""
        return self._tag is not None

    @property
    def margin(self) -> float:
        """How long before its lease could be taken over a holder stops deleting."""
        return max(_MINIMUM_MARGIN, self.ttl_seconds / 10)

    def _body(self) -> bytes:
        self._renewals += 1
        document = {
            "host": self.holder.host,
            "pid": self.holder.pid,
            "token": self.holder.token,
            "ttl_seconds": self.ttl_seconds,
            "renewal": self._renewals,  # the ETag changes with every renewal
            "detail": "ckpt-watcher's single-instance lease on this prefix; do not edit",
        }
        return json.dumps(document).encode()

    def _wrote(self, tag: str, sent_at: float) -> None:
        self._tag = tag
        self._sent_at = sent_at

    @property
    def _valid_until(self) -> float:
        """Until when no other watcher can have taken the lease over (this process's clock)."""
        return self._sent_at + self.ttl_seconds - self.margin

    def acquire(self) -> None:
        """Take the lease (or take over an expired one); LeaseHeldError if another holds it.

        StoreError if the store cannot be reached (BucketMissingError: the bucket does not exist);
        ConditionalUnsupportedError if it has no conditional writes (no lease can be had: the watcher
        must not run).
        """
        for _ in range(3):  # the lease may vanish or change between two requests: look again
            sent_at = self._clock()
            try:
                self._wrote(self.store.put_new(self.key, self._body()), sent_at)
                logger.info(
                    "lease_taken", path=self.url.text, holder=self.holder.describe(), ttl=self.ttl_seconds
                )
                return
            except PreconditionFailedError:
                pass
            try:
                fetched = self.store.fetch(self.key, limit=LEASE_LIMIT)
            except ObjectMissingError:
                continue
            described, expires_in = _standing(fetched, self.ttl_seconds)
            if expires_in > 0:
                raise LeaseHeldError(self.url, described, expires_in)
            sent_at = self._clock()
            try:
                self._wrote(self.store.put_replacing(self.key, self._body(), tag=fetched.info.tag), sent_at)
            except PreconditionFailedError:
                continue  # someone renewed it or took it over first: look again
            logger.warning(
                "lease_taken_over",
                path=self.url.text,
                holder=self.holder.describe(),
                previous_holder=described,
                expired_seconds_ago=round(-expires_in, 1),
            )
            return
        raise LeaseHeldError(self.url, "another watcher (it changed each time it was read)", None)

    def renew_if_due(self) -> None:
        """Renew when a third of the time to live has passed since the last renewal.

        LeaseLostError if another watcher took it over; a store that cannot be reached is logged and
        tried again at the next call (deleting stops once ``refusal`` says so).
        """
        if self._tag is None:
            raise LeaseLostError(self.url, "another watcher, or nobody (it was released)", None)
        now = self._clock()
        if now < max(self._sent_at + self.ttl_seconds / 3, self._retry_at):
            return
        try:
            self._wrote(self.store.put_replacing(self.key, self._body(), tag=self._tag), now)
        except PreconditionFailedError:
            try:
                if self._taken_again(now):
                    return
            except StoreError as error:
                self._renewal_failed(now, error)
                return
            self._tag = None
            logger.error(
                "lease_lost",
                path=self.url.text,
                detail="another watcher took the lease over (this one could not renew it in time); stopping",
            )
            raise LeaseLostError(self.url, "another watcher", None) from None
        except StoreError as error:
            self._renewal_failed(now, error)

    def _renewal_failed(self, now: float, error: StoreError) -> None:
        self._retry_at = now + min(5.0, self.ttl_seconds / 6)
        logger.warning(
            "lease_renewal_failed",
            path=self.url.text,
            error=str(error),
            detail="retried; nothing is deleted once the lease could have expired",
        )

    def _taken_again(self, now: float) -> bool:
        """A renewal's If-Match failed. If the lease object is simply gone (deleted by hand, or by a
        lifecycle rule), not taken over, take it again as at start (If-None-Match); True if this
        watcher holds it now. StoreError if the store cannot say."""
        try:
            self.store.fetch(self.key, limit=LEASE_LIMIT)
        except BucketMissingError:
            raise  # the bucket is gone, not the lease: the store is unusable (a failed renewal)
        except ObjectMissingError:
            pass
        else:
            return False  # there, and not the one this watcher wrote: another holder's
        try:
            self._wrote(self.store.put_new(self.key, self._body()), now)
        except PreconditionFailedError:
            return False  # another watcher took it in between
        logger.warning(
            "lease_vanished",
            path=self.url.text,
            holder=self.holder.describe(),
            detail="the lease object was deleted by something else; this watcher took it again",
        )
        return True

    def refusal(self) -> str | None:
        """Why nothing may be deleted now (the lease is not, or may no longer be, held), else None."""
        if self._tag is None:
            return f"the lease on {self.url.text} is not held"
        if self._clock() >= self._valid_until:
            return f"the lease on {self.url.text} could not be renewed in time; deletions wait until it is"
        return None

    def release(self) -> None:
        """Delete the lease (only if it is still ours); errors are logged, never raised."""
        if self._tag is None:
            return
        tag, self._tag = self._tag, None
        try:
            self.store.delete(self.key, tag=tag)
        except (ObjectMissingError, PreconditionFailedError):
            return
        except StoreError as error:
            logger.warning(
                "lease_not_released",
                path=self.url.text,
                error=str(error),
                detail="the lease could not be released; it expires by itself",
            )
            return
        logger.info("lease_released", path=self.url.text)
