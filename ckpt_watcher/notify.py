"""The systemd notification protocol (sd_notify): one datagram of ``KEY=value`` lines to a unix socket.

Small enough to own rather than depend on: ``NOTIFY_SOCKET`` names the socket (a leading ``@`` means
the abstract namespace), ``WATCHDOG_USEC`` (for ``WATCHDOG_PID``, if set) asks for keep-alives.
Without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same outside systemd.
``Liveness`` decides when the keep-alive, the heartbeat file and the status line are due.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from ckpt_watcher.logs import describe_os_error

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
            logger.warning("notify_failed", error=describe_os_error(error), message=lines[0])
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


HEARTBEAT_INTERVAL = 5.0


class Liveness:
    """Proof that the worker loop turns: the systemd keep-alive, the heartbeat file and ``STATUS=``.

    All three are sent from the worker loop (``tick``), never from another thread, so a hung worker
    stops them and its supervisor restarts it.
    """

    def __init__(self, notifier: Notifier, heartbeat: Path | None) -> None:
        self.notifier = notifier
        self.heartbeat = heartbeat
        self.status_text = "starting"
        now = time.monotonic()
        self._next_keepalive = now
        self._next_heartbeat = now

    def tick(self) -> None:
        """Send the keep-alive and touch the heartbeat file, each when it is due."""
        now = time.monotonic()
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= self._next_keepalive:
            self.notifier.keepalive()
            self._next_keepalive = now + interval
        if self.heartbeat is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_INTERVAL
            _touch(self.heartbeat)

    def next_deadline(self) -> float:
        """The monotonic time at which ``tick`` next has something to do (infinity if never)."""
        deadlines = [float("inf")]
        if self.notifier.watchdog_interval is not None:
            deadlines.append(self._next_keepalive)
        if self.heartbeat is not None:
            deadlines.append(self._next_heartbeat)
        return min(deadlines)

    def status(self, text: str, *, ready: bool = False) -> None:
        """Show ``text`` in ``systemctl status``; ``ready`` also reports start-up (or a reload) done."""
        self.status_text = text
        if ready:
            self.notifier.ready(text)
            self.tick()
        else:
            self.notifier.status(text)

    def reloading(self) -> None:
        """A reload begins; always followed by ``reloaded``, so ``systemctl reload`` never hangs."""
        self.notifier.reloading()

    def reloaded(self) -> None:
        """The reload is over (applied or not)."""
        self.notifier.ready(self.status_text)


def _touch(path: Path) -> None:
    try:
        path.touch()
        os.utime(path)
    except OSError as error:
        logger.warning("heartbeat_failed", path=str(path), error=describe_os_error(error))
