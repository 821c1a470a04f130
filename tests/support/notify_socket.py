"""A datagram socket standing in for systemd's ``NOTIFY_SOCKET``, for the tests and for bench/.

Standard library only: bench/ imports it too (``bench/benchlib.py``), so one receiver serves both.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """Binds ``path`` and collects every sd_notify message in order; notes when READY=1 first arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self.ready_at: float | None = None  # time.perf_counter() at the first READY=1
        self._ready = threading.Event()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-socket", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            arrived = time.perf_counter()
            message = data.decode("utf-8", "replace")
            self.messages.append(message)
            if "READY=1" in message.splitlines() and self.ready_at is None:
                self.ready_at = arrived
                self._ready.set()

    def lines(self) -> list[str]:
        """Every ``KEY=value`` line received so far, in order."""
        return [line for message in list(self.messages) for line in message.splitlines()]

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first READY=1; True if it came."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Stop receiving and remove the socket."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()
        self.path.unlink(missing_ok=True)
