"""``watch --metrics`` as a real process, scraped over HTTP: the counters say what the log records say,
a refused policy edit shows, the series stay few whatever the tree holds, and promtool finds no fault."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.daemon import DaemonProcess, running_daemon, wait_until
from tests.support.factories import best_name, step_name, write_checkpoint
from tests.support.metrics import Scrape, metrics_port, scrape

pytestmark = pytest.mark.timeout(180)

# Every label the daemon's metrics may carry: none takes a name or a path.
ALLOWED_LABELS = {
    "kind": {"step", "best", "last"},
    "trigger": {"startup", "rearm", "event", "rescan", "full", "space"},
    "result": {"applied", "rejected"},
    "observer": {"inotify", "polling", "listing", "none"},
    "version": None,
    "le": None,
}


def _names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir() if not path.name.startswith(".ckpt-watcher")}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    return directory


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text("save_top_k_checkpoints: 3\nsave_top_k_best: 1\n")
    return path


def _watch_with_metrics(root: Path, policy: Path) -> list[str]:
    """The daemon's command line of these tests: logging at debug (every pass_completed is logged, so
    the scrape and the log can be compared), no settle time, metrics on a free loopback port."""
    return [
        "--log-level", "debug", "watch", str(root), "--policy", str(policy), "--settle", "0",
        "--metrics", "127.0.0.1:0",
    ]  # fmt: skip


@pytest.fixture
def daemon(root: Path, policy: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    for step in range(100, 700, 100):
        write_checkpoint(root / step_name(0, step))
    for step, loss in ((150, 0.5), (250, 0.25)):
        write_checkpoint(root / best_name(0, step, loss))
    with running_daemon(_watch_with_metrics(root, policy), tmp_path / "log") as process:
        process.wait_ready()
        yield process


def _agreeing_scrape(daemon: DaemonProcess, port: int) -> tuple[Scrape, list[dict[str, Any]]]:
    """A scrape and the log records of the same moment: the daemon reports a pass to the metrics, then
    logs it, so the two are read again until the scrape holds as many passes as the log."""
    found: list[tuple[Scrape, list[dict[str, Any]]]] = []

    def agree() -> bool:
        before = daemon.records()
        metrics = scrape(port)
        after = daemon.records()
        passes = [record for record in after if record["event"] == "pass_completed"]
        found[:] = [(metrics, after)]
        return before == after and metrics.total("ckpt_watcher_passes_total") == len(passes)

    wait_until(agree, what="a scrape that agrees with the log")
    return found[0]


def _expect_counts_match_the_log(metrics: Scrape, records: list[dict[str, Any]]) -> None:
    def events(name: str) -> list[dict[str, Any]]:
        return [record for record in records if record["event"] == name]

    deleted = events("checkpoint_deleted")
    gone = deleted + events("checkpoint_trashed")  # a checkpoint moved into the trash counts as deleted
    for kind in ("step", "best", "last"):
        expected = len([record for record in gone if record["kind"] == kind])
        assert metrics.value("ckpt_watcher_deletions_total", kind=kind) == expected, kind
    freed = deleted + events("checkpoint_purged")  # bytes are freed by a deletion or a purge, not a move
    assert metrics.value("ckpt_watcher_deleted_bytes_total") == sum(record["bytes"] for record in freed)
    assert metrics.value("ckpt_watcher_delete_failures_total") == len(events("checkpoint_delete_failed"))
    for trigger in ALLOWED_LABELS["trigger"] or ():
        expected = len([record for record in events("pass_completed") if record["trigger"] == trigger])
        assert metrics.value("ckpt_watcher_passes_total", trigger=trigger) == expected, trigger
    assert metrics.value("ckpt_watcher_pass_duration_seconds_count") == len(events("pass_completed"))
    assert metrics.value("ckpt_watcher_policy_reloads_total", result="applied") == len(
        events("policy_reloaded") + events("policy_unchanged")
    )
    assert metrics.value("ckpt_watcher_policy_reloads_total", result="rejected") == len(
        events("policy_rejected")
    )


def test_counters_move_by_exactly_what_the_log_records_say(daemon: DaemonProcess, root: Path) -> None:
    port = metrics_port(daemon)
    metrics, records = _agreeing_scrape(daemon, port)
    _expect_counts_match_the_log(metrics, records)
    assert metrics.value("ckpt_watcher_deletions_total", kind="step") == 3  # 6 steps, 3 kept
    assert metrics.value("ckpt_watcher_deletions_total", kind="best") == 1  # 2 best, 1 kept
    assert metrics.value("ckpt_watcher_checkpoints", kind="step") == 3
    assert metrics.value("ckpt_watcher_checkpoints", kind="best") == 1
    kept_bytes = sum(
        (root / name).stat().st_size for name in _names(root) if "step=" in name and "best" not in name
    )
    assert metrics.value("ckpt_watcher_checkpoint_bytes", kind="step") == kept_bytes
    assert metrics.value("ckpt_watcher_policy_valid") == 1
    assert metrics.value("ckpt_watcher_info", version="0.1.0", observer="inotify") == 1
    assert (
        metrics.value("ckpt_watcher_filesystem_size_bytes")
        > metrics.value("ckpt_watcher_filesystem_free_bytes")
        > 0
    )
    assert metrics.value("ckpt_watcher_budget_unmet_bytes") == 0
    last_pass = metrics.value("ckpt_watcher_last_pass_timestamp_seconds")

    write_checkpoint(root / step_name(0, 700))
    daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(step_name(0, 400)))
    later, later_records = _agreeing_scrape(daemon, port)
    _expect_counts_match_the_log(later, later_records)
    assert later.value("ckpt_watcher_deletions_total", kind="step") == 4
    assert later.value("ckpt_watcher_checkpoints", kind="step") == 3, (
        "kept over all groups, after an event pass"
    )
    assert later.value("ckpt_watcher_last_pass_timestamp_seconds") >= last_pass
    assert later.value("ckpt_watcher_passes_total", trigger="event") >= 1


def test_with_the_trash_a_move_counts_as_a_deletion_and_a_purge_frees_the_bytes(
    root: Path, policy: Path, tmp_path: Path
) -> None:
    """The trash on (as deploy/policy.yaml recommends): deletions_total counts the moves into the trash,
    trash_bytes holds their bytes until the grace is over, and deleted_bytes_total the purged bytes."""
    for step in range(100, 700, 100):
        write_checkpoint(root / step_name(0, step))
    policy.write_text("save_top_k_checkpoints: 3\ntrash:\n  grace: 3s\n")
    with running_daemon(_watch_with_metrics(root, policy), tmp_path / "log") as daemon:
        daemon.wait_ready()
        port = metrics_port(daemon)
        trashed = daemon.events("checkpoint_trashed")
        assert len(trashed) == 3
        metrics, records = _agreeing_scrape(daemon, port)
        _expect_counts_match_the_log(metrics, records)
        assert metrics.value("ckpt_watcher_deletions_total", kind="step") == 3
        if not [record for record in records if record["event"] == "checkpoint_purged"]:
            assert metrics.value("ckpt_watcher_trash_bytes") == sum(record["bytes"] for record in trashed)
            assert metrics.value("ckpt_watcher_deleted_bytes_total") == 0

        daemon.wait_for("checkpoint_purged", count=3)
        wait_until(lambda: scrape(port).value("ckpt_watcher_trash_bytes") == 0, what="the trash emptied")
        later, later_records = _agreeing_scrape(daemon, port)
        _expect_counts_match_the_log(later, later_records)
        assert later.value("ckpt_watcher_deletions_total", kind="step") == 3, "a purge is no new deletion"
        assert later.value("ckpt_watcher_deleted_bytes_total") == sum(record["bytes"] for record in trashed)
        assert not [record for record in later_records if record["event"] == "checkpoint_deleted"]


def test_an_unmet_budget_shows_by_how_much(root: Path, policy: Path, tmp_path: Path) -> None:
    """budget_unmet_bytes is the figure of the budget_unmet record: here the newest checkpoint alone
    is over max_size, and the newest is never evicted."""
    for step in range(100, 400, 100):
        write_checkpoint(root / step_name(0, step))
    policy.write_text("save_top_k_checkpoints: 3\nmax_size: 10\n")
    with running_daemon(_watch_with_metrics(root, policy), tmp_path / "log") as daemon:
        daemon.wait_ready()
        [unmet] = daemon.events("budget_unmet")
        assert unmet["unmet_bytes"] > 0
        metrics, records = _agreeing_scrape(daemon, metrics_port(daemon))
        _expect_counts_match_the_log(metrics, records)
        assert metrics.value("ckpt_watcher_budget_unmet_bytes") == unmet["unmet_bytes"]


def test_kept_figures_add_up_over_directories_that_event_passes_did_not_cover(
    daemon: DaemonProcess, root: Path
) -> None:
    port = metrics_port(daemon)
    for run in ("run-a", "run-b"):
        for step in (100, 200):
            write_checkpoint(root / run / step_name(0, step))
    wait_until(
        lambda: scrape(port).value("ckpt_watcher_checkpoints", kind="step") == 3 + 4, what="7 kept steps"
    )

    write_checkpoint(root / "run-a" / step_name(0, 300))  # an event pass over run-a alone
    wait_until(
        lambda: scrape(port).value("ckpt_watcher_checkpoints", kind="step") == 3 + 5, what="8 kept steps"
    )
    shutil.rmtree(root / "run-b")
    wait_until(
        lambda: scrape(port).value("ckpt_watcher_checkpoints", kind="step") == 3 + 3, what="6 kept steps"
    )


def test_a_refused_policy_edit_shows_until_it_is_fixed(daemon: DaemonProcess, policy: Path) -> None:
    port = metrics_port(daemon)
    policy.write_text("save_top_k_checkpoints: many\n")
    daemon.wait_for("policy_rejected")
    wait_until(lambda: scrape(port).value("ckpt_watcher_policy_valid") == 0, what="policy_valid 0")
    metrics = scrape(port)
    assert metrics.value("ckpt_watcher_policy_reloads_total", result="rejected") == 1
    assert metrics.value("ckpt_watcher_policy_reloads_total", result="applied") == 0

    policy.write_text("save_top_k_checkpoints: 4\nsave_top_k_best: 1\n")
    daemon.wait_for("policy_reloaded")
    wait_until(lambda: scrape(port).value("ckpt_watcher_policy_valid") == 1, what="policy_valid 1")
    metrics, records = _agreeing_scrape(daemon, port)
    _expect_counts_match_the_log(metrics, records)
    assert metrics.value("ckpt_watcher_policy_reloads_total", result="applied") == 1


def test_a_refused_per_run_policy_file_counts_too(daemon: DaemonProcess, root: Path) -> None:
    port = metrics_port(daemon)
    run = root / "run-a"
    write_checkpoint(run / step_name(0, 100))
    (run / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 2\n")
    wait_until(
        lambda: scrape(port).value("ckpt_watcher_checkpoints", kind="step") == 4, what="the run planned"
    )
    (run / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: [\n")
    daemon.wait_for("policy_rejected")
    wait_until(lambda: scrape(port).value("ckpt_watcher_policy_valid") == 0, what="policy_valid 0")
    assert scrape(port).value("ckpt_watcher_policy_reloads_total", result="rejected") == 1

    (run / ".ckpt-watcher.yaml").unlink()
    wait_until(lambda: scrape(port).value("ckpt_watcher_policy_valid") == 1, what="policy_valid 1")


def test_a_scrape_of_ten_thousand_checkpoints_has_the_same_series_as_one_of_none(
    root: Path, tmp_path: Path
) -> None:
    """No per-file (or per-directory) series: the scrape's size does not grow with the tree."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for run in range(10):
        for step in range(1000):
            write_checkpoint(root / f"run-{run}" / step_name(0, step + 1))
    keep_all = tmp_path / "keep-all.yaml"
    keep_all.write_text("save_top_k_checkpoints: -1\n")
    scrapes: list[Scrape] = []
    for directory in (empty, root):
        arguments = [
            "watch",
            str(directory),
            "--policy",
            str(keep_all),
            "--settle",
            "0",
            "--metrics",
            "127.0.0.1:0",
        ]
        with running_daemon(arguments, tmp_path / f"{directory.name}.log") as process:
            process.wait_ready(timeout=120)
            scrapes.append(scrape(metrics_port(process)))
            assert process.stop() == 0
    small, large = scrapes
    assert large.value("ckpt_watcher_checkpoints", kind="step") == 10_000
    assert set(large.samples) == set(small.samples)
    assert len(large.samples) == 41, "as README's Observing it says"
    assert len(large.text) < 8192
    for name, labels in large.samples:
        for label, value in labels:
            assert label in ALLOWED_LABELS, f"{name} has a label {label}"
            allowed = ALLOWED_LABELS[label]
            assert allowed is None or value in allowed, f"{name}{{{label}={value!r}}}"


def test_promtool_finds_nothing_to_lint_in_a_live_scrape(daemon: DaemonProcess, root: Path) -> None:
    port = metrics_port(daemon)
    write_checkpoint(root / step_name(0, 700))
    daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(step_name(0, 400)))
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing (.ci/run installs Debian's prometheus package)"

    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape(port).text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def _blocked_signals(pid: int, thread: int) -> set[int]:
    status = Path(f"/proc/{pid}/task/{thread}/status").read_text()
    [mask] = [line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")]
    return {number for number in range(1, 65) if int(mask, 16) >> (number - 1) & 1}


def test_no_thread_but_the_supervisor_can_take_a_stop_signal(daemon: DaemonProcess) -> None:
    """The supervisor (the main thread) takes SIGTERM, SIGINT and SIGHUP with sigtimedwait, with them
    blocked in every thread. A thread with them unblocked (the metrics server's, if it did not block
    them) would be handed a signal whenever the supervisor is between two waits, and SIGTERM's default
    action would end the process without watch_stopped. Read from the kernel: /proc's SigBlk."""
    scrape(metrics_port(daemon))
    pid = daemon.process.pid
    threads = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir() if int(entry.name) != pid]
    assert len(threads) >= 3, "the worker, the observer and the metrics server"
    stop_signals = {signal.SIGTERM.value, signal.SIGINT.value, signal.SIGHUP.value}
    for thread in threads:
        assert stop_signals <= _blocked_signals(pid, thread), f"thread {thread} may take a stop signal"


def test_sigterm_still_stops_the_daemon_cleanly_with_the_metrics_thread_running(
    daemon: DaemonProcess,
) -> None:
    port = metrics_port(daemon)
    scrape(port)

    assert daemon.stop(signal.SIGTERM) == 0
    assert daemon.events("watch_stopped")


def test_a_polling_daemon_says_so_without_its_interval_in_a_label(root: Path, tmp_path: Path) -> None:
    write_checkpoint(root / step_name(0, 100))
    arguments = ["watch", str(root), "--poll-interval", "0.5", "--settle", "0", "--metrics", "127.0.0.1:0"]
    with running_daemon(arguments, tmp_path / "log") as process:
        process.wait_ready()
        metrics = scrape(metrics_port(process))

    assert metrics.value("ckpt_watcher_info", version="0.1.0", observer="polling") == 1


def test_sighup_reloads_and_is_counted_with_the_metrics_thread_running(daemon: DaemonProcess) -> None:
    port = metrics_port(daemon)
    daemon.send(signal.SIGHUP)
    daemon.wait_for("policy_unchanged")
    wait_until(
        lambda: scrape(port).value("ckpt_watcher_policy_reloads_total", result="applied") == 1,
        what="one applied reload",
    )
    assert daemon.process.poll() is None


def test_missing_extra_is_a_clear_error_and_exit_2(root: Path) -> None:
    """prometheus-client not importable (``sys.modules[name] = None`` makes every import of it fail)."""
    without_the_extra = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from ckpt_watcher.console import main; sys.exit(main())"
    )
    write_checkpoint(root / step_name(0, 100))

    result = subprocess.run(
        [sys.executable, "-c", without_the_extra, "watch", str(root), "--metrics", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "pip install 'ckpt-watcher[metrics]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_a_clear_error_and_exit_2_before_anything_is_deleted(root: Path) -> None:
    names = {step_name(0, step) for step in range(100, 1000, 100)}
    for name in names:
        write_checkpoint(root / name)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_cli("watch", str(root), "--settle", "0", "--metrics", f"127.0.0.1:{port}", timeout=60)

    assert result.returncode == 2
    assert f"--metrics 127.0.0.1:{port}: cannot listen there: Address already in use" in result.stderr
    assert _names(root) == names


@pytest.mark.parametrize("address", ["", "port", ":9464", "70000", "-1", "::1:9464", "host:", "[::1]:x"])
def test_a_metrics_address_that_cannot_mean_anything_is_a_usage_error(root: Path, address: str) -> None:
    result = run_cli("watch", str(root), "--metrics", address, timeout=60)

    assert result.returncode == 2
    assert "argument --metrics" in result.stderr
