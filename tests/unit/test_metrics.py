"""The daemon's figures and their Prometheus form, without a daemon: what a pass adds, what a scrape
shows (and leaves out), the --metrics address, the kept tally the group index keeps, the reload
outcomes of a policy file."""

from __future__ import annotations

import errno
import math
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from ckpt_watcher.delete import ApplyResult, DeletionResult, Outcome
from ckpt_watcher.exporter import FiguresCollector, MetricsServer
from ckpt_watcher.groups import GroupIndex, Tally
from ckpt_watcher.metrics import (
    DURATION_BUCKETS,
    TRIGGERS,
    DaemonFigures,
    MetricsAddress,
    parse_metrics_address,
)
from ckpt_watcher.naming import DEFAULT_NAMING
from ckpt_watcher.plan import Action, Decision, GroupPlan
from ckpt_watcher.policy import load_policy
from ckpt_watcher.policy_file import PolicyFile, ReloadResult
from ckpt_watcher.reconcile import PassResult, Trigger
from tests.support.factories import best_name, make_record, step_name

ROOT = Path("/ckpt")


# -- the address ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("9464", MetricsAddress("", 9464)),
        ("0", MetricsAddress("", 0)),
        ("127.0.0.1:9464", MetricsAddress("127.0.0.1", 9464)),
        ("localhost:1", MetricsAddress("localhost", 1)),
        ("[::1]:9464", MetricsAddress("::1", 9464)),
        ("[::]:65535", MetricsAddress("::", 65535)),
    ],
)
def test_a_metrics_address_is_port_or_host_and_port(text: str, address: MetricsAddress) -> None:
    assert parse_metrics_address(text) == address


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "port from 0 to 65535"),
        (":9464", "the host before ':' is empty"),
        ("::1:9464", "IPv6 address in brackets"),
        ("65536", "port from 0 to 65535"),
        ("host:", "port from 0 to 65535"),
        ("host:-1", "port from 0 to 65535"),
        ("host:٣", "port from 0 to 65535"),  # a digit, but not an ASCII one
    ],
)
def test_a_metrics_address_that_cannot_mean_anything_says_why(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_metrics_address(text)


def test_an_address_prints_as_it_is_written() -> None:
    assert [str(parse_metrics_address(text)) for text in ("9464", "h:1", "[::1]:2")] == [
        ":9464",
        "h:1",
        "[::1]:2",
    ]


# -- the kept tally, over every group the index knows ----------------------------------------------


def _tally(**kinds: tuple[int, int]) -> Tally:
    return Tally(
        {kind: count for kind, (count, _) in kinds.items()}, {kind: size for kind, (_, size) in kinds.items()}
    )


def test_the_index_sums_what_each_groups_latest_plan_keeps() -> None:
    index = GroupIndex(ROOT, lambda directory: DEFAULT_NAMING)
    index.set_kept(ROOT / "a", _tally(step=(3, 300), best=(1, 50)))
    index.set_kept(ROOT / "a" / "deep", _tally(step=(2, 20)))
    index.set_kept(ROOT / "b", _tally(step=(1, 7)))
    assert index.kept() == _tally(step=(6, 327), best=(1, 50))

    index.set_kept(ROOT / "a", _tally(step=(2, 200)))  # planned again: replaces, never adds
    assert index.kept() == _tally(step=(5, 227))

    index.forget(ROOT / "a")  # with its subtree
    assert index.kept() == _tally(step=(1, 7))
    index.forget(ROOT / "b")
    assert index.kept() == Tally()


def test_the_sum_is_a_copy() -> None:
    index = GroupIndex(ROOT, lambda directory: DEFAULT_NAMING)
    index.set_kept(ROOT / "a", _tally(step=(1, 1)))
    index.kept().add("step", 5)

    assert index.kept() == _tally(step=(1, 1))


# -- what a pass adds to the figures -----------------------------------------------------------------


def _applied_pass(trigger: Trigger, seconds: float) -> PassResult:
    records = [make_record(step_name(0, 100), size=10), make_record(best_name(0, 50, 0.5), size=20)]
    decisions = tuple(Decision(record, Action.DELETE, ("test",)) for record in records)
    applied = ApplyResult(
        [
            DeletionResult(decisions[0], Outcome.DELETED),
            DeletionResult(decisions[1], Outcome.FAILED, "Permission denied"),
        ]
    )
    result = PassResult(trigger, seconds=seconds)
    result.add_group(GroupPlan(ROOT / "run", decisions), applied)
    return result


def test_a_pass_adds_its_outcomes_to_the_counters_and_sets_the_gauges() -> None:
    figures = DaemonFigures()
    first = _applied_pass(Trigger.STARTUP, seconds=0.1)
    first.kept_overall = _tally(step=(5, 500))
    first.budget_unmet_bytes = 123
    first.trash_bytes = 456
    figures.record_pass(first, finished_at=1000.0)
    figures.record_pass(_applied_pass(Trigger.EVENT, seconds=7.0), finished_at=1001.0)

    snapshot = figures.snapshot()

    assert snapshot.deletions == {"step": 2, "best": 0, "last": 0}  # the failed best is not a deletion
    assert snapshot.deleted_bytes == 20
    assert snapshot.delete_failures == 2
    assert snapshot.passes == {"startup": 1, "rearm": 0, "event": 1, "rescan": 0, "full": 0, "space": 0}
    assert snapshot.last_pass_at == 1001.0
    assert snapshot.duration_sum == pytest.approx(7.1)
    assert sum(snapshot.duration_counts) == 2
    assert snapshot.duration_counts[DURATION_BUCKETS.index(0.1)] == 1, "a bucket's bound is inclusive"
    assert snapshot.duration_counts[DURATION_BUCKETS.index(10.0)] == 1
    # gauges: the latest pass's (its kept figures are over all groups, so an empty tally is 0)
    assert snapshot.kept == {"step": 0, "best": 0, "last": 0}
    assert (snapshot.budget_unmet_bytes, snapshot.trash_bytes) == (0, None)


def test_a_pass_longer_than_the_last_bound_lands_in_the_infinite_bucket() -> None:
    figures = DaemonFigures()
    figures.record_pass(PassResult(Trigger.FULL, seconds=1e9), finished_at=1.0)

    assert figures.snapshot().duration_counts[-1] == 1
    assert math.isinf(DURATION_BUCKETS[-1])


def test_policy_valid_is_false_while_the_main_file_or_any_per_run_file_is_refused() -> None:
    figures = DaemonFigures()
    assert figures.snapshot().policy_valid
    figures.set_policy_file_on_disk(False)
    assert not figures.snapshot().policy_valid
    figures.set_policy_file_on_disk(True)
    refused = PassResult(Trigger.EVENT, refused_overrides=1)
    figures.record_pass(refused, finished_at=1.0)
    assert not figures.snapshot().policy_valid
    figures.record_pass(PassResult(Trigger.EVENT), finished_at=2.0)
    assert figures.snapshot().policy_valid


# -- the policy file's outcomes ----------------------------------------------------------------------


def test_a_policy_file_reports_each_reload_outcome_once_and_whether_it_is_the_file_on_disk(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("save_top_k_checkpoints: 3\n")
    outcomes: list[ReloadResult] = []
    policy = PolicyFile(path, load_policy(path), on_outcome=outcomes.append)

    path.write_text("save_top_k_checkpoints: many\n")
    assert not policy.reload()
    assert (outcomes, policy.on_disk) == ([ReloadResult.REJECTED], False)

    path.write_text("save_top_k_checkpoints: 4\n")
    assert policy.reload()
    assert (outcomes[1:], policy.on_disk) == ([ReloadResult.APPLIED], True)

    assert not policy.reload()  # unchanged, read again (SIGHUP)
    assert (outcomes[2:], policy.on_disk) == ([ReloadResult.APPLIED], True)

    path.unlink()
    assert not policy.reload()
    assert (outcomes[3:], policy.on_disk) == ([], False)


# -- the scrape ---------------------------------------------------------------------------------------


def _scrape(figures: DaemonFigures, collector: FiguresCollector | None = None) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or FiguresCollector(figures))
    text = generate_latest(registry).decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_the_filesystem_gauges_are_there_only_for_a_local_root(tmp_path: Path) -> None:
    figures = DaemonFigures()
    assert "ckpt_watcher_filesystem_free_bytes" not in _scrape(figures), "no root yet"

    figures.set_root(tmp_path, "inotify")
    samples = _scrape(figures)
    assert samples["ckpt_watcher_filesystem_size_bytes"] >= samples["ckpt_watcher_filesystem_free_bytes"] > 0
    assert samples["ckpt_watcher_info{observer=inotify,version=0.1.0}"] == 1

    figures.set_root(Path("s3://bucket/prefix"), "listing")  # not a local path: nothing to stat
    assert "ckpt_watcher_filesystem_free_bytes" not in _scrape(figures)


def test_a_scrape_leaves_the_filesystem_out_while_another_scrapes_statvfs_has_not_returned(
    tmp_path: Path,
) -> None:
    """One statvfs at a time: a hung file system holds one scrape, not one more thread per scrape."""
    figures = DaemonFigures()
    figures.set_root(tmp_path, "inotify")
    collector = FiguresCollector(figures)
    with collector._statvfs_running:  # a scrape stuck in statvfs holds this
        samples = _scrape(figures, collector)

    assert "ckpt_watcher_filesystem_free_bytes" not in samples
    assert "ckpt_watcher_checkpoints{kind=step}" in samples, "the rest of the scrape is there"
    assert "ckpt_watcher_filesystem_free_bytes" in _scrape(figures, collector)


@pytest.mark.parametrize(
    ("described", "label"),
    [
        ("inotify", "inotify"),
        ("polling every 15 s", "polling"),
        ("polling every 5 s (inotify unavailable)", "polling"),
        ("", "none"),
        ("none", "none"),
    ],
)
def test_the_observer_label_takes_a_few_fixed_values_never_the_interval(described: str, label: str) -> None:
    figures = DaemonFigures()
    figures.set_root(Path("/ckpt"), described)

    assert figures.snapshot().observer == label


def test_the_trash_gauge_is_there_only_when_there_is_a_trash() -> None:
    figures = DaemonFigures()
    figures.record_pass(PassResult(Trigger.FULL), finished_at=1.0)
    assert "ckpt_watcher_trash_bytes" not in _scrape(figures)

    figures.record_pass(PassResult(Trigger.FULL, trash_bytes=4096, budget_unmet_bytes=10), finished_at=2.0)
    samples = _scrape(figures)
    assert samples["ckpt_watcher_trash_bytes"] == 4096
    assert samples["ckpt_watcher_budget_unmet_bytes"] == 10


def test_no_pass_yet_means_no_last_pass_timestamp_and_every_counter_at_zero() -> None:
    before = time.time()
    samples = _scrape(DaemonFigures())

    assert "ckpt_watcher_last_pass_timestamp_seconds" not in samples
    assert before <= samples["ckpt_watcher_start_timestamp_seconds"] <= time.time()  # the alert's reference
    counters = {name: value for name, value in samples.items() if "_total" in name}
    assert len(counters) == 3 + 1 + 1 + len(TRIGGERS) + 2
    assert set(counters.values()) == {0.0}


# -- the server -----------------------------------------------------------------------------------


def test_the_server_serves_on_a_thread_that_blocks_every_signal_and_stops_when_closed() -> None:
    figures = DaemonFigures()
    server = MetricsServer.start(MetricsAddress("127.0.0.1", 0), figures)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as response:
            body = response.read().decode()
        status = Path(f"/proc/self/task/{server.thread.native_id}/status").read_text()
    finally:
        server.close()

    assert "ckpt_watcher_passes_total" in body
    [mask] = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:")]
    for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert mask >> (stop_signal - 1) & 1, stop_signal.name
    assert not server.thread.is_alive()


def _served(host: str, port: int) -> str:
    """``/metrics`` of the server at ``host`` (an IPv6 address in brackets) and ``port``."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def _has_ipv6_loopback() -> bool:
    """True where ``::1`` can be bound (a host booted with IPv6 disabled has no ``::1``)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_a_bare_port_is_one_dual_stack_socket_that_takes_ipv4() -> None:
    """``--metrics PORT``: one socket on ``::`` that also takes IPv4 (``IPV6_V6ONLY`` cleared, whatever
    net.ipv6.bindv6only says), so a pod is scraped on its IPv6 or its IPv4 address alike."""
    server = MetricsServer.start(MetricsAddress("", 0), DaemonFigures())
    try:
        v6only = server.server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        over_ipv4 = _served("127.0.0.1", server.port)
    finally:
        server.close()

    assert (server.host, v6only) == ("::", 0)
    assert "ckpt_watcher_passes_total" in over_ipv4


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 on this host (IPv6 disabled)")
def test_a_bare_port_is_served_over_ipv6() -> None:
    server = MetricsServer.start(MetricsAddress("", 0), DaemonFigures())
    try:
        over_ipv6 = _served("[::1]", server.port)
    finally:
        server.close()

    assert "ckpt_watcher_passes_total" in over_ipv6


@pytest.mark.parametrize("code", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
def test_a_bare_port_without_ipv6_is_served_on_every_ipv4_interface(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A system without IPv6 (ipv6.disable=1: no AF_INET6 socket) serves a bare PORT on 0.0.0.0."""
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *arguments: object, **keywords: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(code, os.strerror(code))
        return real_socket(family, *arguments, **keywords)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", no_ipv6)
    server = MetricsServer.start(MetricsAddress("", 0), DaemonFigures())
    monkeypatch.undo()
    try:
        body = _served("127.0.0.1", server.port)
    finally:
        server.close()

    assert server.host == "0.0.0.0"  # noqa: S104
    assert "ckpt_watcher_passes_total" in body


def test_a_bare_port_in_use_is_an_error_not_a_narrower_listener() -> None:
    """A port some other program holds on IPv4 is not quietly served on IPv6 alone: binding fails."""
    with socket.socket(socket.AF_INET) as holder:
        holder.bind(("0.0.0.0", 0))  # noqa: S104
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match="in use") as raised:
            MetricsServer.start(MetricsAddress("", port), DaemonFigures())

    assert raised.value.errno == errno.EADDRINUSE


def test_a_pass_stopped_by_an_unreadable_pin_counts_what_it_did_but_is_no_pass_to_go_by() -> None:
    """A pass that stopped before its next deletion (a pin of a restored checkpoint could not be read)
    moved ``last_pass_timestamp_seconds`` on, so an alert on a daemon that no longer prunes stayed
    quiet, and set ``budget_unmet_bytes`` from a free-space step that never ran (0). Its deletions
    still count."""
    figures = DaemonFigures()
    first = _applied_pass(Trigger.STARTUP, seconds=0.1)
    first.budget_unmet_bytes = 123
    figures.record_pass(first, finished_at=1000.0)
    stopped = _applied_pass(Trigger.RESCAN, seconds=0.1)
    stopped.storage_error = "a pin of a restored checkpoint is unknown (restored/x.json cannot be read: EIO)"
    figures.record_pass(stopped, finished_at=1060.0)

    snapshot = figures.snapshot()
    assert snapshot.last_pass_at == 1000.0
    assert snapshot.budget_unmet_bytes == 123
    assert snapshot.deletions["step"] == 2
    assert snapshot.passes["rescan"] == 1
