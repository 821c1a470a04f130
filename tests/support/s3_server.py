"""A real S3 server for the tests: moto's server mode as a child process on 127.0.0.1, on a free port.

The tests talk to it only through the real client stack (s3fs, botocore), configured the standard
way: ``AWS_ENDPOINT_URL`` and the credential variables (``environment``). Each test gets a bucket of
its own (``Bucket``); the server's request log (one line per request) is kept, so a test can count
the requests a pass made.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.support.daemon import wait_until

REGION = "us-east-1"
# Distinctive values: a test can grep every output for them (no credential may ever be shown).
ACCESS_KEY_ID = "AKIACKPTWATCHERTEST7"
SECRET_ACCESS_KEY = "ckpt-watcher/SECRET+test-value-9f3a71"
_REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some lines of its log
_bucket_numbers = itertools.count(1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class S3Server:
    """``python -m moto.server`` on a free port; ``stop`` and ``start`` again keep the same port (its
    state is lost when it stops: moto keeps it in memory)."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.log_path = log_path
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), timeout=60, what=f"the S3 server on port {self.port}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def requests(self) -> list[tuple[str, str, int]]:
        """Every request the server logged so far: (method, target, status)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        text = _COLOUR.sub("", text)
        return [
            (match["method"], match["target"], int(match["status"])) for match in _REQUEST_LINE.finditer(text)
        ]


def environment(endpoint: str) -> dict[str, str]:
    """The standard environment of the AWS client stack for this server (``AWS_MAX_ATTEMPTS=2``: a
    server that is down is reported after one retry, not after botocore's five)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_MAX_ATTEMPTS": "2",
        "AWS_RETRY_MODE": "standard",
    }


class Bucket:
    """A bucket of the test's own on the server, seeded and read through s3fs (the real client).

    ``url`` is ``s3://NAME``; keys are relative to the bucket.
    """

    def __init__(self, endpoint: str, name: str | None = None) -> None:
        import s3fs

        self.name = name or f"test-bucket-{os.getpid()}-{next(_bucket_numbers)}"
        self.endpoint = endpoint
        self.filesystem = s3fs.S3FileSystem(
            skip_instance_cache=True,
            use_listings_cache=False,
            endpoint_url=endpoint,
            key=ACCESS_KEY_ID,
            secret=SECRET_ACCESS_KEY,
            client_kwargs={"region_name": REGION},
        )

    @property
    def url(self) -> str:
        """``s3://NAME``."""
        return f"s3://{self.name}"

    def create(self) -> Bucket:
        """Create the bucket (idempotent)."""
        with contextlib.suppress(FileExistsError):
            self.filesystem.call_s3("create_bucket", Bucket=self.name)
        return self

    def put(self, key: str, data: bytes) -> None:
        """Write one object."""
        self.filesystem.pipe_file(f"{self.name}/{key}", data)

    def put_raw(self, key: str, data: bytes) -> None:
        """Write one object under exactly this key (PutObject; no path normalisation, so ``a//b`` stays)."""
        self.filesystem.call_s3("put_object", Bucket=self.name, Key=key, Body=data)

    def raw_keys(self) -> set[str]:
        """Every key of the bucket exactly as the server lists it (ListObjectsV2)."""
        keys: set[str] = set()
        arguments: dict[str, Any] = {"Bucket": self.name}
        while True:
            page = self.filesystem.call_s3("list_objects_v2", **arguments)
            keys.update(item["Key"] for item in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return keys
            arguments["ContinuationToken"] = page["NextContinuationToken"]

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        """Write many objects at once (s3fs sends them concurrently)."""
        if objects:
            self.filesystem.pipe({f"{self.name}/{key}": data for key, data in objects.items()})

    def get(self, key: str) -> bytes:
        """One object's bytes."""
        data: bytes = self.filesystem.cat_file(f"{self.name}/{key}")
        return data

    def keys(self, prefix: str = "") -> set[str]:
        """Every key below ``prefix`` (relative to the bucket)."""
        root = f"{self.name}/{prefix}".rstrip("/")
        names: Iterable[str] = self.filesystem.find(root)
        return {name.removeprefix(f"{self.name}/") for name in names}

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects."""
        paths = [f"{self.name}/{key}" for key in keys]
        if paths:
            self.filesystem.rm(paths)


def wait_for_port_closed(port: int, timeout: float = 20.0) -> None:
    """Wait until nothing accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while port_open(port):
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still open")
        time.sleep(0.05)


PROXY_SCRIPT = Path(__file__).with_name("fault_proxy.py")


class FaultProxy:
    """tests/support/fault_proxy.py in front of a server: the endpoint a watcher under test uses, so
    the test can take "the server" away and bring it back (``stop``, ``start``) while the server keeps
    its objects, fail listings halfway (``fail_continuation``) or one kind of request
    (``fail_requests``)."""

    def __init__(self, upstream_port: int, control: Path) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.control = control
        self.control.write_text("")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again, on the same port)."""
        self.process = subprocess.Popen(
            [sys.executable, str(PROXY_SCRIPT), str(self.port), str(self.upstream_port), str(self.control)],
            stdin=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), timeout=30, what=f"the proxy on port {self.port}")

    def stop(self) -> None:
        """Stop listening: connections are refused, as when a server is down."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        wait_for_port_closed(self.port)

    def fail_continuation(self, failing: bool) -> None:
        """Fail (or stop failing) every listing page after the first."""
        self.control.write_text("fail-continuation" if failing else "")

    def fail_requests(self, request_line_start: str) -> None:
        """Fail every request whose line starts so (``GET /bucket/key``) until told otherwise."""
        self.control.write_text(f"fail {request_line_start}")

    def serve_all(self) -> None:
        """Fail nothing any more."""
        self.control.write_text("")

    def drop_answer_once(self, request_line_start: str) -> None:
        """Do the next request whose line starts so, but drop its answer (the client retries)."""
        self.control.write_text(f"drop-answer {request_line_start}")

    def answer_dropped(self) -> bool:
        """True once the answer ``drop_answer_once`` asked for was dropped."""
        return not self.control.read_text()
