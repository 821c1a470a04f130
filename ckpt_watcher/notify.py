"""The systemd notification protocol (sd_notify): one datagram of ``KEY=value`` lines to a unix socket.

Small enough to own rather than depend on: ``NOTIFY_SOCKET`` names the socket (a leading ``@`` means
the abstract namespace), ``WATCHDOG_USEC`` (for ``WATCHDOG_PID``, if set) asks for keep-alives.
Without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

logger = structlog.get_logger("ckpt_watcher.notify")


class Notifier:
    """Sends sd_notify messages if the service manager asked for them."""

    def __init__(self, environment: Mapping[str, str] | None = None) -> None:
        environment = os.environ if environment is None else environment
        address = environment.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(environment)

    @property
    def enabled(self) -> bool:
        """True when NOTIFY_SOCKET is set."""
        return bool(self._address)

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; failures are logged, never raised."""
        if not self._address:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as error:
            logger.warning("notify_failed", error=error.strerror or str(error), message=lines[0])
            return False
        return True

    def ready(self, status: str) -> None:
        """Start-up (or a reload) is done."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A one-line summary shown by ``systemctl status``."""
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        """A reload begins; systemd ≥ 253 wants the monotonic timestamp with it."""
        monotonic_microseconds = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_microseconds}")

    def stopping(self) -> None:
        """Shutdown begins."""
        self.send("STOPPING=1")

    def keepalive(self) -> None:
        """The watchdog keep-alive, sent from the worker loop so a hung worker gets restarted."""
        self.send("WATCHDOG=1")


def _watchdog_interval(environment: Mapping[str, str]) -> float | None:
    """Half the watchdog timeout in seconds, or None if no watchdog is asked of this process."""
    microseconds = environment.get("WATCHDOG_USEC", "")
    watchdog_pid = environment.get("WATCHDOG_PID", "")
    if not microseconds.isdigit() or int(microseconds) == 0:
        return None
    if watchdog_pid and watchdog_pid != str(os.getpid()):
        return None
    return int(microseconds) / 1e6 / 2
