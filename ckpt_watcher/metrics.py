"""What the daemon has done, as its metrics show it: ``DaemonFigures``, updated by the worker from each
pass's ``PassResult`` and each policy reload outcome, read by the metrics endpoint as a snapshot.

The figures are plain numbers behind one lock: the worker's update and a scrape's copy each take
microseconds, so a scrape never holds the worker up, and nothing here imports prometheus-client
(``exporter`` does, only with ``watch --metrics``). Every figure is read from what the reconcile core
and the policy files already report, never counted a second time: the deletions from the pass's
outcomes, the reloads from the calls that log ``policy_reloaded``/``policy_unchanged``/``policy_rejected``.
Label values come from fixed sets (kinds, triggers, reload results), never from a name or a path.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ckpt_watcher import __version__
from ckpt_watcher.groups import Tally
from ckpt_watcher.locations import is_core_path_of_url
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.naming import Kind
from ckpt_watcher.policy_file import ReloadResult
from ckpt_watcher.reconcile import PassResult, Trigger

if TYPE_CHECKING:
    from ckpt_watcher.exporter import MetricsServer

logger = structlog.get_logger("ckpt_watcher.metrics")

KINDS = tuple(kind.value for kind in Kind if kind is not Kind.UNKNOWN)
TRIGGERS = tuple(trigger.value for trigger in Trigger if trigger is not Trigger.PRUNE)
RELOAD_RESULTS = tuple(result.value for result in ReloadResult)
# A pass takes milliseconds (a few events) to many minutes (the first pass over a large share).
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, math.inf)


@dataclass(frozen=True)
class Snapshot:
    """The figures at one moment, for one scrape (a copy: the worker goes on updating its own)."""

    kept: dict[str, int]
    kept_bytes: dict[str, int]
    deletions: dict[str, int]
    deleted_bytes: int
    delete_failures: int
    passes: dict[str, int]
    duration_counts: tuple[int, ...]  # per bucket of DURATION_BUCKETS, not cumulative
    duration_sum: float
    last_pass_at: float | None
    started_at: float
    reloads: dict[str, int]
    policy_valid: bool
    budget_unmet_bytes: int
    trash_bytes: int | None
    root: Path | None
    observer: str
    version: str = __version__


@dataclass
class DaemonFigures:
    """Counters since start and the latest pass's gauges; the worker writes, scrapes read."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _kept: Tally = field(default_factory=Tally)
    _deletions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    _deleted_bytes: int = 0
    _delete_failures: int = 0
    _passes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRIGGERS, 0))
    _duration_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    _duration_sum: float = 0.0
    _last_pass_at: float | None = None
    _started_at: float = field(default_factory=time.time)  # the stalled alert's reference before a pass
    _reloads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELOAD_RESULTS, 0))
    _policy_file_on_disk: bool = True
    _refused_overrides: int = 0
    _budget_unmet_bytes: int = 0
    _trash_bytes: int | None = None
    _root: Path | None = None
    _observer: str = "none"

    def record_pass(self, result: PassResult, finished_at: float) -> None:
        """Count one pass of the daemon (``finished_at``: wall-clock seconds)."""
        bucket = bisect.bisect_left(DURATION_BUCKETS, result.seconds)
        with self._lock:
            self._kept = result.kept_overall.copy()
            for kind, count in result.deleted_by_kind.checkpoints.items():
                self._deletions[kind] = self._deletions.get(kind, 0) + count
            self._deleted_bytes += result.bytes_freed + result.bytes_purged  # freed: deleted or purged
            self._delete_failures += result.failed
            self._passes[result.trigger.value] = self._passes.get(result.trigger.value, 0) + 1
            self._duration_counts[min(bucket, len(DURATION_BUCKETS) - 1)] += 1
            self._duration_sum += result.seconds
            self._refused_overrides = result.refused_overrides
            self._trash_bytes = result.trash_bytes
            if result.storage_error is None:  # (a pass stopped early is no pass to go by: not its
                self._last_pass_at = finished_at  # time, nor a budget its free-space step never saw)
                self._budget_unmet_bytes = result.budget_unmet_bytes

    def record_reload(self, result: ReloadResult) -> None:
        """One policy file re-read (an ``on_outcome`` listener of ``policy_file``)."""
        with self._lock:
            self._reloads[result.value] += 1

    def set_policy_file_on_disk(self, on_disk: bool) -> None:
        """Whether the main policy in force is the file on disk (False after a refused edit)."""
        with self._lock:
            self._policy_file_on_disk = on_disk

    def set_root(self, root: Path | None, observer: str) -> None:
        """The root being watched (None while waiting for it) and how: the observer's description
        (``polling every 15 s``; ``listing every 30 s`` for a bucket) is cut to its first word, so the
        label takes a few fixed values."""
        words = observer.split()
        with self._lock:
            self._root = None if root is None or is_core_path_of_url(root) else root  # a prefix: no statvfs
            self._observer = words[0] if words and words[0].isalpha() else "none"

    def snapshot(self) -> Snapshot:
        """A consistent copy of every figure."""
        with self._lock:
            return Snapshot(
                kept={kind: self._kept.checkpoints.get(kind, 0) for kind in KINDS},
                kept_bytes={kind: self._kept.bytes.get(kind, 0) for kind in KINDS},
                deletions=dict(self._deletions),
                deleted_bytes=self._deleted_bytes,
                delete_failures=self._delete_failures,
                passes=dict(self._passes),
                duration_counts=tuple(self._duration_counts),
                duration_sum=self._duration_sum,
                last_pass_at=self._last_pass_at,
                started_at=self._started_at,
                reloads=dict(self._reloads),
                policy_valid=self._policy_file_on_disk and self._refused_overrides == 0,
                budget_unmet_bytes=self._budget_unmet_bytes,
                trash_bytes=self._trash_bytes,
                root=self._root,
                observer=self._observer,
            )


@dataclass(frozen=True)
class MetricsAddress:
    """Where ``--metrics`` listens: ``host`` empty for every interface (IPv6 and IPv4; IPv4 alone on a
    system without IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_metrics_address(text: str) -> MetricsAddress:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``; ValueError with what is wrong."""
    host, separator, port_text = text.rpartition(":")
    if separator and not host:
        raise ValueError(f"expected [HOST:]PORT, got {text!r}: the host before ':' is empty")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"expected [HOST:]PORT, got {text!r}: write an IPv6 address in brackets, [::1]:9464")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected [HOST:]PORT with a port from 0 to 65535, got {text!r}")
    return MetricsAddress(host, int(port_text))


class MetricsUnavailableError(Exception):
    """``--metrics`` cannot be served: the extra is missing, or the address cannot be bound."""


def start_metrics(address: MetricsAddress, figures: DaemonFigures) -> MetricsServer:
    """Serve ``figures`` at ``address`` on a thread of its own; MetricsUnavailableError if impossible."""
    try:
        from ckpt_watcher.exporter import MetricsServer  # noqa: PLC0415  (prometheus-client, only if asked)
    except ModuleNotFoundError as error:
        if error.name is None or not error.name.startswith("prometheus_client"):
            raise
        raise MetricsUnavailableError(
            "--metrics needs prometheus-client, which is not installed: pip install 'ckpt-watcher[metrics]'"
        ) from None
    try:
        server = MetricsServer.start(address, figures)
    except OSError as error:
        raise MetricsUnavailableError(
            f"--metrics {address}: cannot listen there: {describe_os_error(error)}"
        ) from None
    logger.info("metrics_serving", host=server.host, port=server.port, path="/metrics")
    return server
