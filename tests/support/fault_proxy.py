"""A TCP proxy in front of the S3 server that can fail requests on demand (run as its own process).

    python tests/support/fault_proxy.py LISTEN_PORT UPSTREAM_PORT CONTROL_FILE

Each connection is forwarded to 127.0.0.1:UPSTREAM_PORT as it is. Before forwarding, the request
line is read and the CONTROL_FILE consulted (it may change at any time):

* empty or missing: forward;
* ``fail-continuation``: a listing request for a page after the first (``continuation-token=`` in
  the query) gets ``500 InternalError``: a listing fails mid-pagination, after its first page of
  1000 keys was served;
* ``fail REQUEST-LINE-START``: every request whose line starts so (``GET /bucket/key``) gets
  ``500 InternalError`` until the control file changes: one kind of request failing, every retry
  of it too, while the rest are served;
* ``drop-answer REQUEST-LINE-START``: the first request whose line starts so (``DELETE /bucket/key``)
  is forwarded and done, but its answer is dropped (the connection closed): a response lost on the
  way, which the client retries. The control file is emptied, so it happens once.

The S3 server closes each connection after its response, so every request comes on a connection of
its own and is seen here. Stopping this process (and starting it again on the same port) is the
server going away and coming back, as the client sees it, while the server keeps its objects.
Bounded: it serves 127.0.0.1 only, one thread per connection, and each connection times out.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path

_TIMEOUT = 30.0
_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>injected by the test's fault proxy</Message></Error>"
)


def _mode(control: Path) -> str:
    try:
        return control.read_text().strip()
    except OSError:
        return ""


_FAIL = "fail "


def _fault(control: Path, request_line: bytes) -> bool:
    mode = _mode(control)
    if mode.startswith(_FAIL):
        return request_line.startswith(mode[len(_FAIL) :].encode())
    return mode == "fail-continuation" and b"continuation-token=" in request_line


_DROP = "drop-answer "
_ONCE = threading.Lock()


def _drops_answer(control: Path, request_line: bytes) -> bool:
    """True (once: the control file is emptied) if this request's answer is to be dropped."""
    with _ONCE:
        mode = _mode(control)
        if mode.startswith(_DROP) and request_line.startswith(mode[len(_DROP) :].encode()):
            control.write_text("")
            return True
    return False


def _pipe(source: socket.socket, destination: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            destination.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, destination):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def _serve(client: socket.socket, upstream_port: int, control: Path) -> None:
    client.settimeout(_TIMEOUT)
    try:
        head = b""
        while b"\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                return
            head += chunk
        if _fault(control, head.split(b"\r\n", 1)[0]):
            client.sendall(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(_ERROR_BODY)}\r\nConnection: close\r\n\r\n".encode()
                + _ERROR_BODY
            )
            return
        upstream = socket.create_connection(("127.0.0.1", upstream_port), timeout=_TIMEOUT)
        if _drops_answer(control, head.split(b"\r\n", 1)[0]):
            while b"\r\n\r\n" not in head and (chunk := client.recv(65536)):  # the whole request
                head += chunk
            upstream.sendall(head)  # (a request without a body: DELETE)
            while upstream.recv(65536):  # done by the server; its answer goes nowhere
                pass
            upstream.close()
            return
        upstream.sendall(head)
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join(_TIMEOUT)
        upstream.close()
    except OSError:
        pass
    finally:
        client.close()


def main(argv: list[str]) -> int:
    listen_port, upstream_port, control = int(argv[0]), int(argv[1]), Path(argv[2])
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_serve, args=(client, upstream_port, control), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
