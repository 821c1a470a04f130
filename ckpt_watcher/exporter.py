"""``watch --metrics``: the daemon's figures in the Prometheus text format, at ``/metrics``.

prometheus-client (the ``metrics`` extra) is imported here only, and this module only when
``--metrics`` is given. The endpoint has a registry of its own holding one collector, which reads a
``DaemonFigures`` snapshot at each scrape: the worker never waits on a scrape, and no label is ever a
checkpoint's name or a path, so a scrape has the same few series whatever the tree holds. The root's
file system figures are read (statvfs) at scrape time, by one scrape at a time: a hung file system
stalls at most one scrape thread, the others leave those two gauges out.

The server runs on a thread of its own (a thread per request) with every signal blocked, so SIGTERM,
SIGINT and SIGHUP still reach only the daemon's supervising thread.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

from ckpt_watcher.metrics import DURATION_BUCKETS, KINDS, DaemonFigures, MetricsAddress, Snapshot

PREFIX = "ckpt_watcher_"


class FiguresCollector(Collector):
    """Every metric of the daemon, made from one snapshot of its figures per scrape."""

    def __init__(self, figures: DaemonFigures) -> None:
        self._figures = figures
        self._statvfs_running = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        snapshot = self._figures.snapshot()
        yield from _checkpoints(snapshot)
        yield from _passes(snapshot)
        yield from _policy(snapshot)
        yield from self._filesystem(snapshot)
        yield from _space(snapshot)
        info = GaugeMetricFamily(
            PREFIX + "info",
            "What is running: the version, and how the root is watched.",
            labels=["version", "observer"],
        )
        info.add_metric([snapshot.version, snapshot.observer], 1)
        yield info

    def _filesystem(self, snapshot: Snapshot) -> Iterator[Metric]:
        """Free and total bytes of the root's file system; nothing for no root, a root that is not a
        local path, or while another scrape's statvfs has not returned."""
        if snapshot.root is None or not self._statvfs_running.acquire(blocking=False):
            return
        try:
            status = os.statvfs(snapshot.root)
        except (OSError, ValueError):
            return
        finally:
            self._statvfs_running.release()
        yield GaugeMetricFamily(
            PREFIX + "filesystem_free_bytes",
            "Bytes available to the daemon on the root's file system (df's Avail).",
            value=status.f_bavail * status.f_frsize,
        )
        yield GaugeMetricFamily(
            PREFIX + "filesystem_size_bytes",
            "Size of the root's file system in bytes.",
            value=status.f_blocks * status.f_frsize,
        )


def _checkpoints(snapshot: Snapshot) -> Iterator[Metric]:
    kept = GaugeMetricFamily(
        PREFIX + "checkpoints",
        "Checkpoints kept after the last pass, over all directories, by kind.",
        labels=["kind"],
    )
    kept_bytes = GaugeMetricFamily(
        PREFIX + "checkpoint_bytes",
        "Bytes of the checkpoints kept after the last pass, by kind.",
        labels=["kind"],
    )
    deletions = CounterMetricFamily(
        PREFIX + "deletions", "Checkpoints deleted since the daemon started, by kind.", labels=["kind"]
    )
    for kind in KINDS:
        kept.add_metric([kind], snapshot.kept[kind])
        kept_bytes.add_metric([kind], snapshot.kept_bytes[kind])
        deletions.add_metric([kind], snapshot.deletions.get(kind, 0))
    yield kept
    yield kept_bytes
    yield deletions
    yield CounterMetricFamily(
        PREFIX + "deleted_bytes",
        "Bytes freed by deletions since the daemon started.",
        value=snapshot.deleted_bytes,
    )
    yield CounterMetricFamily(
        PREFIX + "delete_failures",
        "Deletions that failed (each is retried next pass).",
        value=snapshot.delete_failures,
    )


def _passes(snapshot: Snapshot) -> Iterator[Metric]:
    passes = CounterMetricFamily(
        PREFIX + "passes", "Reconcile passes run, by what triggered them.", labels=["trigger"]
    )
    for trigger, count in snapshot.passes.items():
        passes.add_metric([trigger], count)
    yield passes
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(DURATION_BUCKETS, snapshot.duration_counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if math.isinf(bound) else repr(bound), cumulative))
    yield HistogramMetricFamily(
        PREFIX + "pass_duration_seconds",
        "How long a reconcile pass took.",
        buckets=buckets,
        sum_value=snapshot.duration_sum,
    )
    if snapshot.last_pass_at is not None:
        yield GaugeMetricFamily(
            PREFIX + "last_pass_timestamp_seconds",
            "When the last pass finished (Unix time); alert when it is stale.",
            value=snapshot.last_pass_at,
        )
    yield GaugeMetricFamily(
        PREFIX + "start_timestamp_seconds",
        "When the daemon started (Unix time): what a stalled alert compares with before the first pass.",
        value=snapshot.started_at,
    )


def _policy(snapshot: Snapshot) -> Iterator[Metric]:
    reloads = CounterMetricFamily(
        PREFIX + "policy_reloads",
        "Policy files re-read (the --policy file and per-run files), by result.",
        labels=["result"],
    )
    for result, count in snapshot.reloads.items():
        reloads.add_metric([result], count)
    yield reloads
    yield GaugeMetricFamily(
        PREFIX + "policy_valid",
        "1 while every policy file in force is the one on disk; 0 after a refused edit or a missing file.",
        value=1 if snapshot.policy_valid else 0,
    )


def _space(snapshot: Snapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        PREFIX + "budget_unmet_bytes",
        "How far the worst byte budget was from being met after the last pass (0 when met).",
        value=snapshot.budget_unmet_bytes,
    )
    if snapshot.trash_bytes is not None:
        yield GaugeMetricFamily(
            PREFIX + "trash_bytes",
            "Bytes in the root's trash after the last pass.",
            value=snapshot.trash_bytes,
        )


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: stderr is the daemon's JSON log."""

    def log_message(self, format: str, *arguments: object) -> None:
        """Log nothing."""


class _Server(ThreadingWSGIServer):
    """A thread per request (daemon threads: a scrape stuck in statvfs never holds up the exit), on
    the address family of the address it binds; ``dual_stack``: an IPv6 socket that takes IPv4 too."""

    def __init__(
        self, family: socket.AddressFamily, address: tuple[str, int], *, dual_stack: bool = False
    ) -> None:
        self.address_family = family
        self.dual_stack = dual_stack
        super().__init__(address, _QuietHandler)

    def server_bind(self) -> None:
        """Bind, first clearing ``IPV6_V6ONLY`` for a dual-stack socket (whatever the system's default,
        net.ipv6.bindv6only, says)."""
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


# Errors of an IPv6 socket on a system without IPv6 (a kernel built without it, or booted with
# ipv6.disable=1): a bare PORT is then served on every IPv4 interface alone.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})


def _every_interface(port: int) -> _Server:
    """A server on every interface, IPv6 and IPv4 (``::`` without ``IPV6_V6ONLY``), as a bare PORT
    asks: a pod of an IPv6-only or dual-stack cluster is scraped on its IPv6 address. Without IPv6,
    on every IPv4 interface (``0.0.0.0``); a port in use is an error either way."""
    try:
        return _Server(socket.AF_INET6, ("::", port), dual_stack=True)
    except OSError as error:
        if error.errno not in _NO_IPV6:
            raise
    return _Server(socket.AF_INET, ("0.0.0.0", port))  # noqa: S104  (a bare PORT: every interface)


@dataclass
class MetricsServer:
    """``/metrics`` served on a thread of its own until ``close``."""

    server: _Server
    thread: threading.Thread

    @property
    def host(self) -> str:
        """The address listened on."""
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        """The port listened on (the one chosen, for port 0)."""
        return int(self.server.server_address[1])

    @classmethod
    def start(cls, address: MetricsAddress, figures: DaemonFigures) -> MetricsServer:
        """Bind ``address`` (OSError if impossible) and serve ``figures`` from then on."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FiguresCollector(figures))
        if address.host:
            family, _, _, _, socket_address = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            server = _Server(family, (str(socket_address[0]), address.port))
        else:
            server = _every_interface(address.port)
        server.set_app(make_wsgi_app(registry))
        thread = threading.Thread(target=server.serve_forever, name="ckpt-watcher-metrics", daemon=True)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            thread.start()  # the thread, and the request threads it starts, inherit the blocked mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return cls(server, thread)

    def close(self) -> None:
        """Stop serving and wait for the serving thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
