"""Objects in a bucket, through fsspec: list a prefix whole, read a range, write and delete conditionally.

The only module that talks to an object store. fsspec and the scheme's backend (s3fs, gcsfs, adlfs)
are imported by ``open_store`` only, so the core install never needs them; a missing backend is a
``BackendMissingError`` naming the extra to install. Credentials and the endpoint come from the
backend's standard environment (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``; retries: ``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``), as every
tool of the ecosystem reads them. Every error becomes a ``StoreError`` whose text is redacted of
credentials (credentials.py) and never carries a response body.

``S3Store`` speaks S3's API through s3fs's client: a listing is ListObjectsV2 pages of 1000 keys, a
read is a ranged GetObject with ``If-Match`` (so the bytes are of the object that was listed), a
delete is DeleteObject with ``If-Match`` (where the store refuses the condition, the caller's HEAD
re-check is the guard), a batch is DeleteObjects (1000 keys a request) and the lease is written
with ``If-None-Match: *`` and ``If-Match``. ``FsspecStore`` (gs://, az://) uses fsspec's generic calls:
listing, ranged reads and deletes work, but it has no conditional writes, so no lease (no ``watch``).

Each store counts its requests by operation (``requests``), for the benchmarks and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import hashlib
import importlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from ckpt_watcher.credentials import redact
from ckpt_watcher.locations import StorageURL

COPY_PART = 1 << 30  # a server-side copy's part (S3: 5 MiB to 5 GiB, at most 10,000 parts)
DELETE_BATCH = 1000  # S3 DeleteObjects takes at most 1000 keys
LIST_PAGE = 1000
CONCURRENT_READS = 16  # ranged reads in flight at once (read_ranges)
_DOWNLOAD_CHUNK = 1 << 20
_CONNECT_TIMEOUT = 10
_READ_TIMEOUT = 60
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
_UNSUPPORTED = frozenset({"NotImplemented", "501"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden"})

T = TypeVar("T")


class BackendMissingError(Exception):
    """The URL's backend (or fsspec) is not installed: the message names the extra to install."""


class StoreError(Exception):
    """A request that failed; the message names the operation and the object, never a credential."""


class ObjectMissingError(StoreError):
    """The object (or the bucket) is not there."""


class BucketMissingError(ObjectMissingError):
    """The bucket itself is not there (``NoSuchBucket``): the store is unusable, which is neither an
    object that is gone nor a condition that failed (a lease write into it is not a lease lost)."""


class PreconditionFailedError(StoreError):
    """The object is no longer the one a condition named (If-Match), or is there already (If-None-Match)."""


class ConditionalUnsupportedError(StoreError):
    """The store does not implement the conditional request asked for."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing or a HEAD describes it. ``tag`` (the ETag, or GCS's generation) changes
    whenever the object does; ``mtime_ns`` is the store's last-modified time."""

    key: str
    size: int
    tag: str
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class RangeRead:
    """``length`` bytes at ``offset`` of the object ``key`` whose tag is ``tag``."""

    key: str
    offset: int
    length: int
    tag: str


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole (small) object, its description, and the store's clock when it answered (the HTTP
    ``Date``, epoch seconds; None if it did not say)."""

    data: bytes
    info: ObjectInfo
    server_time: float | None


@dataclass(frozen=True, slots=True)
class PendingCopy:
    """A server-side copy of ``source`` into ``destination`` whose parts are copied but which does not
    exist yet: ``finish_copy`` creates it (never over an existing object), ``abort_copy`` drops it.
    ``part_tags`` are the parts' ETags (each the MD5 of its bytes); ``tag`` the ETag it will have."""

    source: str
    destination: str
    upload_id: str
    part_tags: tuple[str, ...]
    size: int

    @property
    def tag(self) -> str:
        """The multipart ETag S3 gives the finished copy: MD5 of the parts' MD5s, then ``-N``."""
        digests = b"".join(bytes.fromhex(part.strip('"')) for part in self.part_tags)
        return f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(self.part_tags)}"'

    def copies_whole(self, source_tag: str) -> bool:
        """True when the copy provably holds the bytes of the object whose ETag is ``source_tag``: one
        part whose MD5 is that ETag (an object uploaded in one PUT has its MD5 as its ETag)."""
        return len(self.part_tags) == 1 and self.part_tags[0].strip('"') == source_tag.strip('"')


class ObjectStore:
    """What the bucket backend needs of an object store; ``S3Store`` and ``FsspecStore`` implement it."""

    url: StorageURL
    requests: Counter[str]
    conditional_writes = False

    def list_prefix(self, prefix: str) -> list[ObjectInfo]:
        """Every object below ``prefix`` (a key prefix; "" for the whole bucket), all or nothing: an
        error on any page raises, so no caller ever sees part of a listing."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo:
        """The object as it is now (ObjectMissingError if it is not there)."""
        raise NotImplementedError

    def read_range(self, key: str, offset: int, length: int, *, tag: str) -> bytes:
        """``length`` bytes at ``offset`` of the object whose tag is ``tag`` (PreconditionFailedError
        if it changed)."""
        raise NotImplementedError

    def read_ranges(self, reads: list[RangeRead]) -> list[bytes | StoreError]:
        """Several ranged reads (at once where the store allows); each one's bytes or its error."""
        results: list[bytes | StoreError] = []
        for read in reads:
            try:
                results.append(self.read_range(read.key, read.offset, read.length, tag=read.tag))
            except StoreError as error:
                results.append(error)
        return results

    def fetch(self, key: str, *, limit: int) -> Fetched:
        """A whole object of at most ``limit`` bytes (StoreError if larger)."""
        raise NotImplementedError

    def download(self, key: str, destination: IO[bytes], *, tag: str, limit: int) -> int:
        """Copy the object (tag ``tag``, at most ``limit`` bytes) into ``destination``; its size."""
        raise NotImplementedError

    def delete(self, key: str, *, tag: str) -> None:
        """Delete the object if it is still the one with ``tag`` (as far as the store can promise)."""
        raise NotImplementedError

    def delete_many(self, objects: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Delete the (key, tag) objects in batches, each only if it still has that tag where the store
        can say so; each key that was not deleted, with why."""
        raise NotImplementedError

    def uploads_in_progress(self, prefix: str) -> set[str]:
        """The keys under ``prefix`` that an unfinished multipart upload is writing (a listing does not
        show them until they are complete); empty where the store cannot say (fsspec stores)."""
        del prefix
        return set()

    def put_new(self, key: str, data: bytes) -> str:
        """Create the object only if there is none (PreconditionFailedError otherwise); its tag."""
        raise ConditionalUnsupportedError(
            f"{self.url.scheme}:// stores: conditional writes are not supported"
        )

    def put_replacing(self, key: str, data: bytes, *, tag: str) -> str:
        """Replace the object only if it is still the one with ``tag``; the new tag."""
        raise ConditionalUnsupportedError(
            f"{self.url.scheme}:// stores: conditional writes are not supported"
        )

    def start_copy(self, source: str, destination: str, *, tag: str, size: int) -> PendingCopy:
        """Copy the object ``source`` (its tag ``tag``, ``size`` bytes) server-side, not yet visible at
        ``destination`` (see PendingCopy)."""
        raise ConditionalUnsupportedError(
            f"{self.url.scheme}:// stores: conditional server-side copies are not supported"
        )

    def finish_copy(self, pending: PendingCopy) -> str:
        """Make the copy visible at its destination only if nothing is there (PreconditionFailedError
        otherwise: nothing is overwritten); its tag."""
        raise ConditionalUnsupportedError(
            f"{self.url.scheme}:// stores: conditional server-side copies are not supported"
        )

    def abort_copy(self, pending: PendingCopy) -> None:
        """Drop a copy that will not be finished (its parts are freed)."""
        raise ConditionalUnsupportedError(
            f"{self.url.scheme}:// stores: conditional server-side copies are not supported"
        )


def open_store(url: StorageURL) -> ObjectStore:
    """The store of ``url``'s bucket; BackendMissingError if fsspec or its backend is not installed."""
    try:
        importlib.import_module("fsspec")
        importlib.import_module(url.backend_module)
    except ImportError:
        raise BackendMissingError(
            f"{url.text}: {url.scheme}:// needs fsspec and {url.backend_module}, which are not installed: "
            f"pip install 'ckpt-watcher[{url.extra}]'"
        ) from None
    if url.backend_module == "s3fs":
        return S3Store(url)
    return FsspecStore(url)


def _epoch_ns(value: Any) -> int:
    """A last-modified time (datetime, ISO text, or epoch seconds) in epoch nanoseconds (0 if unknown)."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return int(value.timestamp() * 1_000_000_000)
    if isinstance(value, int | float):
        return int(value * 1_000_000_000)
    if isinstance(value, str):
        try:
            return _epoch_ns(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return 0
    return 0


def _http_date(headers: Any) -> float | None:
    text = headers.get("date") if isinstance(headers, dict) else None
    if not text:
        return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


class _S3Copies(ObjectStore):
    """S3Store's server-side copies (the trash on a bucket): multipart uploads whose parts are copies."""

    def _run(self, operation: str, key: str, request: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _count(self, operation: str) -> None:
        raise NotImplementedError

    def start_copy(self, source: str, destination: str, *, tag: str, size: int) -> PendingCopy:
        """CreateMultipartUpload, then UploadPartCopy of ``source`` with ``x-amz-copy-source-if-match``
        (COPY_PART bytes a part): a copy of any size, server-side, of that very version where the store
        honours the condition (callers check the part tags or the source again where it may not)."""
        bucket = self.url.bucket

        async def create(client: Any) -> str:
            self._count("CreateMultipartUpload")
            response = await client.create_multipart_upload(Bucket=bucket, Key=destination)
            return str(response["UploadId"])

        upload_id = self._run("CreateMultipartUpload", destination, create)
        ranges = [(start, min(size, start + COPY_PART) - 1) for start in range(0, max(size, 1), COPY_PART)]

        async def copy_parts(client: Any) -> tuple[str, ...]:
            tags = []
            for number, (first, last) in enumerate(ranges, start=1):
                self._count("UploadPartCopy")
                response = await client.upload_part_copy(
                    Bucket=bucket,
                    Key=destination,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": bucket, "Key": source},
                    CopySourceIfMatch=tag,
                    **({"CopySourceRange": f"bytes={first}-{last}"} if size > 0 else {}),
                )
                tags.append(str(response["CopyPartResult"]["ETag"]))
            return tuple(tags)

        pending = PendingCopy(source, destination, upload_id, (), size)
        try:
            part_tags = self._run("UploadPartCopy", source, copy_parts)
        except StoreError:
            self._abort_quietly(pending)
            raise
        return PendingCopy(source, destination, upload_id, part_tags, size)

    def finish_copy(self, pending: PendingCopy) -> str:
        """CompleteMultipartUpload with If-None-Match: * (S3, and moto, refuse it over an object)."""

        async def request(client: Any) -> str:
            self._count("CompleteMultipartUpload")
            parts = [{"ETag": tag, "PartNumber": number} for number, tag in enumerate(pending.part_tags, 1)]
            response = await client.complete_multipart_upload(
                Bucket=self.url.bucket,
                Key=pending.destination,
                UploadId=pending.upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
            return str(response["ETag"])

        try:
            return self._run("CompleteMultipartUpload", pending.destination, request)
        except StoreError:
            self._abort_quietly(pending)
            raise

    def abort_copy(self, pending: PendingCopy) -> None:
        """AbortMultipartUpload."""

        async def request(client: Any) -> None:
            self._count("AbortMultipartUpload")
            await client.abort_multipart_upload(
                Bucket=self.url.bucket, Key=pending.destination, UploadId=pending.upload_id
            )

        self._run("AbortMultipartUpload", pending.destination, request)

    def _abort_quietly(self, pending: PendingCopy) -> None:
        with contextlib.suppress(StoreError):
            self.abort_copy(pending)


class S3Store(_S3Copies):
    """An S3 (or S3-compatible: MinIO, R2, Ceph) bucket, through s3fs's aiobotocore client."""

    conditional_writes = True

    def __init__(self, url: StorageURL) -> None:
        import s3fs  # noqa: PLC0415  (lazy: only a bucket root needs it)

        self.url = url
        self.requests = Counter()
        self._filesystem = s3fs.S3FileSystem(
            skip_instance_cache=True,
            use_listings_cache=False,
            config_kwargs={"connect_timeout": _CONNECT_TIMEOUT, "read_timeout": _READ_TIMEOUT},
        )
        self.conditional_delete = True  # until the store says it has none

    # -- running a request --------------------------------------------------------------------------

    def _run(self, operation: str, key: str, request: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``request(client)`` on s3fs's event loop; every failure becomes a StoreError."""
        from fsspec.asyn import sync  # noqa: PLC0415  (lazy, as above)

        async def call() -> T:
            await self._filesystem.set_session()
            return await request(self._filesystem._s3)

        try:
            return sync(self._filesystem.loop, call)  # type: ignore[no-any-return]
        except StoreError:
            raise
        except Exception as error:
            raise _store_error(operation, f"{self.url.scheme}://{self.url.bucket}/{key}", error) from None

    def _count(self, operation: str) -> None:
        self.requests[operation] += 1

    # -- reading ------------------------------------------------------------------------------------

    def list_prefix(self, prefix: str) -> list[ObjectInfo]:
        """ListObjectsV2 pages of up to 1000 keys; the first failing page fails the whole listing."""
        bucket = self.url.bucket
        listed_prefix = f"{prefix}/" if prefix else ""

        async def request(client: Any) -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            arguments: dict[str, Any] = {"Bucket": bucket, "Prefix": listed_prefix, "MaxKeys": LIST_PAGE}
            while True:
                self._count("ListObjectsV2")
                page = await client.list_objects_v2(**arguments)
                for item in page.get("Contents", ()):
                    found.append(
                        ObjectInfo(
                            item["Key"], int(item["Size"]), str(item["ETag"]), _epoch_ns(item["LastModified"])
                        )
                    )
                if not page.get("IsTruncated"):
                    return found
                token = page.get("NextContinuationToken")
                if not token:
                    raise StoreError("the listing says it is truncated but gives no continuation token")
                arguments["ContinuationToken"] = token

        return self._run("ListObjectsV2", listed_prefix, request)

    def uploads_in_progress(self, prefix: str) -> set[str]:
        """ListMultipartUploads pages; the first failing page fails the whole answer (StoreError)."""
        bucket = self.url.bucket
        listed_prefix = f"{prefix}/" if prefix else ""

        async def request(client: Any) -> set[str]:
            keys: set[str] = set()
            arguments: dict[str, Any] = {"Bucket": bucket, "Prefix": listed_prefix, "MaxUploads": LIST_PAGE}
            while True:
                self._count("ListMultipartUploads")
                page = await client.list_multipart_uploads(**arguments)
                keys.update(str(upload["Key"]) for upload in page.get("Uploads", ()))
                if not page.get("IsTruncated"):
                    return keys
                arguments["KeyMarker"] = page.get("NextKeyMarker", "")
                arguments["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
                if not arguments["KeyMarker"] and not arguments["UploadIdMarker"]:
                    raise StoreError("the upload listing says it is truncated but gives no marker")

        return self._run("ListMultipartUploads", listed_prefix, request)

    def head(self, key: str) -> ObjectInfo:
        """HeadObject."""

        async def request(client: Any) -> ObjectInfo:
            self._count("HeadObject")
            response = await client.head_object(Bucket=self.url.bucket, Key=key)
            return ObjectInfo(
                key,
                int(response["ContentLength"]),
                str(response["ETag"]),
                _epoch_ns(response["LastModified"]),
            )

        return self._run("HeadObject", key, request)

    def read_range(self, key: str, offset: int, length: int, *, tag: str) -> bytes:
        """A ranged GetObject with If-Match; never more than ``length`` bytes kept."""
        if length <= 0:
            return b""

        async def request(client: Any) -> bytes:
            return await self._get_range(client, RangeRead(key, offset, length, tag))

        return self._run("GetObject", key, request)

    async def _get_range(self, client: Any, read: RangeRead) -> bytes:
        self._count("GetObject")
        response = await client.get_object(
            Bucket=self.url.bucket,
            Key=read.key,
            Range=f"bytes={read.offset}-{read.offset + read.length - 1}",
            IfMatch=read.tag,
        )
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data[: read.length]

    def read_ranges(self, reads: list[RangeRead]) -> list[bytes | StoreError]:
        """The reads as GetObject requests, ``CONCURRENT_READS`` in flight at once."""
        if not reads:
            return []
        where = f"{self.url.scheme}://{self.url.bucket}/"

        async def request(client: Any) -> list[bytes | StoreError]:
            slots = asyncio.Semaphore(CONCURRENT_READS)

            async def one(read: RangeRead) -> bytes | StoreError:
                async with slots:
                    try:
                        return await self._get_range(client, read)
                    except Exception as error:
                        return _store_error("GetObject", where + read.key, error)

            return list(await asyncio.gather(*(one(read) for read in reads)))

        return self._run("GetObject", reads[0].key, request)

    def fetch(self, key: str, *, limit: int) -> Fetched:
        """GetObject of at most ``limit`` bytes (a larger object is refused without reading it)."""

        async def request(client: Any) -> Fetched:
            self._count("GetObject")
            response = await client.get_object(Bucket=self.url.bucket, Key=key)
            size = int(response.get("ContentLength") or 0)
            async with response["Body"] as body:
                if size > limit:  # the body is streamed: closing it unread reads none of it
                    raise StoreError(f"{key}: larger than {limit} bytes")
                data: bytes = await body.read(limit + 1)
            if len(data) > limit:
                raise StoreError(f"{key}: larger than {limit} bytes")
            info = ObjectInfo(key, len(data), str(response["ETag"]), _epoch_ns(response["LastModified"]))
            return Fetched(data, info, _http_date(response["ResponseMetadata"].get("HTTPHeaders", {})))

        return self._run("GetObject", key, request)

    def download(self, key: str, destination: IO[bytes], *, tag: str, limit: int) -> int:
        """GetObject with If-Match, streamed 1 MiB at a time; refused past ``limit`` bytes."""

        async def request(client: Any) -> int:
            self._count("GetObject")
            response = await client.get_object(Bucket=self.url.bucket, Key=key, IfMatch=tag)
            written = 0
            async with response["Body"] as body:
                while chunk := await body.read(_DOWNLOAD_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise StoreError(f"{key}: larger than {limit} bytes")
                    destination.write(chunk)
            return written

        return self._run("GetObject", key, request)

    # -- writing ------------------------------------------------------------------------------------

    def delete(self, key: str, *, tag: str) -> None:
        """DeleteObject with If-Match; a store without conditional deletes gets a plain one (the caller
        re-checked the object just before)."""

        async def request(client: Any) -> None:
            self._count("DeleteObject")
            if self.conditional_delete:
                try:
                    await client.delete_object(Bucket=self.url.bucket, Key=key, IfMatch=tag)
                    return
                except Exception as error:
                    if _code_of(error) not in _UNSUPPORTED:
                        raise
                    self.conditional_delete = False
                    self._count("DeleteObject")
            await client.delete_object(Bucket=self.url.bucket, Key=key)

        self._run("DeleteObject", key, request)

    def delete_many(self, objects: Iterable[tuple[str, str]]) -> dict[str, str]:
        """DeleteObjects, 1000 objects a request, each with its ETag: one replaced since it was listed
        is not deleted (``PreconditionFailed``: a shard written again after the plan). A failed request
        fails each of its keys."""
        pending = list(objects)
        failures: dict[str, str] = {}
        for start in range(0, len(pending), DELETE_BATCH):
            batch = pending[start : start + DELETE_BATCH]

            async def request(client: Any, batch: list[tuple[str, str]] = batch) -> list[dict[str, Any]]:
                self._count("DeleteObjects")
                response = await client.delete_objects(
                    Bucket=self.url.bucket,
                    Delete={"Objects": [{"Key": key, "ETag": tag} for key, tag in batch], "Quiet": True},
                )
                errors: list[dict[str, Any]] = response.get("Errors", [])
                return errors

            try:
                errors = self._run("DeleteObjects", batch[0][0], request)
            except StoreError as error:
                failures.update(dict.fromkeys((key for key, _ in batch), str(error)))
                continue
            for item in errors:
                failures[str(item.get("Key"))] = redact(f"{item.get('Code')}: {item.get('Message')}")
        return failures

    def put_new(self, key: str, data: bytes) -> str:
        """PutObject with If-None-Match: * (PreconditionFailedError if the object exists;
        BucketMissingError if the bucket does not)."""
        return self._put(key, data, {"IfNoneMatch": "*"})

    def put_replacing(self, key: str, data: bytes, *, tag: str) -> str:
        """PutObject with If-Match (PreconditionFailedError if the object changed or is gone;
        BucketMissingError if the bucket is)."""
        return self._put(key, data, {"IfMatch": tag})

    def _put(self, key: str, data: bytes, condition: dict[str, str]) -> str:
        async def request(client: Any) -> str:
            self._count("PutObject")
            response = await client.put_object(Bucket=self.url.bucket, Key=key, Body=data, **condition)
            return str(response["ETag"])

        try:
            return self._run("PutObject", key, request)
        except BucketMissingError:
            raise  # no bucket: not a condition that failed
        except ObjectMissingError as error:  # If-Match on an object that is gone
            raise PreconditionFailedError(str(error)) from None


def _code_of(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code or status


def _store_error(operation: str, where: str, error: BaseException) -> StoreError:
    """A StoreError of the right kind for a client library's exception: its code and message only."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        details = response.get("Error", {})
        code = str(details.get("Code", "")) or str(
            response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = redact(f"{operation} {where}: {code or 'error'}: {details.get('Message') or 'no message'}")
        kinds = (
            ({"NoSuchBucket"}, BucketMissingError),  # (before _MISSING: its status is a 404 too)
            (_MISSING, ObjectMissingError),
            (_PRECONDITION, PreconditionFailedError),
            (_UNSUPPORTED, ConditionalUnsupportedError),
        )
        for codes, kind in kinds:
            if code in codes or status in codes:
                return kind(message)
        return StoreError(message)
    if isinstance(error, FileNotFoundError):
        return ObjectMissingError(redact(f"{operation} {where}: not found"))
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return StoreError(redact(f"{operation} {where}: timed out"))
    text = str(error) or type(error).__name__
    return StoreError(redact(f"{operation} {where}: {type(error).__name__}: {text}"))


class FsspecStore(ObjectStore):
    """Any other fsspec object store (gs://, az://): generic calls, no conditional writes.

    Reads compare the object's tag before and after; deletes re-check it just before (the narrow race
    a conditional delete closes on S3 stays open here).
    """

    def __init__(self, url: StorageURL, filesystem: Any = None) -> None:
        import fsspec  # noqa: PLC0415  (lazy: only a bucket root needs it)

        self.url = url
        self.requests = Counter()
        self._filesystem = filesystem or fsspec.filesystem(url.scheme, skip_instance_cache=True)

    def _path(self, key: str) -> str:
        return f"{self.url.bucket}/{key}"

    def _call(self, operation: str, key: str, function: Callable[[], T]) -> T:
        self.requests[operation] += 1
        try:
            return function()
        except StoreError:
            raise
        except Exception as error:
            raise _store_error(operation, f"{self.url.scheme}://{self._path(key)}", error) from None

    def _info(self, key: str, info: dict[str, Any]) -> ObjectInfo:
        modified = _epoch_ns(
            info.get("LastModified")
            or info.get("last_modified")
            or info.get("updated")
            or info.get("mtime")
            or info.get("created")
        )
        size = int(info.get("size") or 0)
        tag = info.get("generation") or info.get("ETag") or info.get("etag") or info.get("md5Hash")
        # A store that gives no version tag: the object's own key, size and time stand for it (so a
        # verdict is never shared between two objects).
        return ObjectInfo(key, size, str(tag) if tag else f"{key}\0{size}\0{modified}", modified)

    def list_prefix(self, prefix: str) -> list[ObjectInfo]:
        """fsspec's ``find`` (which raises on a failed page, never returning part of a listing)."""
        root = self._path(prefix).rstrip("/")
        found = self._call("list", prefix, lambda: self._filesystem.find(root, detail=True, withdirs=False))
        bucket_prefix = f"{self.url.bucket}/"
        return [
            self._info(name.removeprefix("/").removeprefix(bucket_prefix), info)  # some say "/bucket/..."
            for name, info in found.items()
            if info.get("type") != "directory" and not name.endswith("/")
        ]

    def head(self, key: str) -> ObjectInfo:
        """fsspec's ``info``."""
        return self._info(key, self._call("info", key, lambda: self._filesystem.info(self._path(key))))

    def read_range(self, key: str, offset: int, length: int, *, tag: str) -> bytes:
        """``cat_file`` of the range, then the tag compared again."""
        data: bytes = self._call(
            "read", key, lambda: self._filesystem.cat_file(self._path(key), start=offset, end=offset + length)
        )
        if self.head(key).tag != tag:
            raise PreconditionFailedError(f"{key}: changed while being read")
        return data[:length]

    def fetch(self, key: str, *, limit: int) -> Fetched:
        """``info`` then ``cat_file``."""
        info = self.head(key)
        if info.size > limit:
            raise StoreError(f"{key}: larger than {limit} bytes")
        data: bytes = self._call("read", key, lambda: self._filesystem.cat_file(self._path(key)))
        return Fetched(data[: limit + 1], info, None)

    def download(self, key: str, destination: IO[bytes], *, tag: str, limit: int) -> int:
        """``open`` and copy 1 MiB at a time, then the tag compared again."""
        written = 0

        def copy() -> int:
            nonlocal written
            with self._filesystem.open(self._path(key), "rb") as source:
                while chunk := source.read(_DOWNLOAD_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise StoreError(f"{key}: larger than {limit} bytes")
                    destination.write(chunk)
            return written

        size = self._call("read", key, copy)
        if self.head(key).tag != tag:
            raise PreconditionFailedError(f"{key}: changed while being read")
        return size

    def delete(self, key: str, *, tag: str) -> None:
        """``rm_file`` (the caller re-checked the tag just before)."""
        self._call("delete", key, lambda: self._filesystem.rm_file(self._path(key)))

    def delete_many(self, objects: Iterable[tuple[str, str]]) -> dict[str, str]:
        """``rm`` of each batch (fsspec has no conditional delete: the tags are not checked); a failed
        batch fails each of its keys."""
        pending = [key for key, _ in objects]
        failures: dict[str, str] = {}
        for start in range(0, len(pending), DELETE_BATCH):
            batch = pending[start : start + DELETE_BATCH]
            paths = [self._path(key) for key in batch]

            def remove(paths: list[str] = paths) -> None:
                self._filesystem.rm(paths)

            try:
                self._call("delete", batch[0], remove)
            except StoreError as error:
                failures.update(dict.fromkeys(batch, str(error)))
        return failures
