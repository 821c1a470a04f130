"""What a bucket root says, as real processes against a real S3 server (moto), when it is given
something it cannot use: one clear line and exit 2 at start (never a traceback), a warning and a pass
that goes on while running, and nothing deleted that was meant to be kept."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from tests.support.cli import assert_clean_exit, events, log_records, run_cli
from tests.support.daemon import running_daemon
from tests.support.factories import step_name, zip_bytes
from tests.support.s3_server import Bucket

pytestmark = pytest.mark.timeout(180)

STEPS = range(100, 900, 100)


def _seed(bucket: Bucket) -> set[str]:
    bucket.put_many({f"run/{step_name(0, step)}": zip_bytes(f"step {step}".encode() * 20) for step in STEPS})
    return bucket.keys("run")


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("ckpt-watcher: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# -- a pin or a resume source on a store whose backend is not installed ---------------------------------


def _without(module: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")


@pytest.mark.parametrize(("scheme", "module", "extra"), [("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure")])
def test_a_protect_url_whose_backend_is_missing_is_exit_2_naming_the_extra(
    s3: Bucket, scheme: str, module: str, extra: str
) -> None:
    _without(module)
    pin = f"{scheme}://other/run/{step_name(0, 100)}"
    _refused_by_prune_and_watch(s3, pin, f"pip install 'ckpt-watcher[{extra}]'")


def _refused_by_prune_and_watch(s3: Bucket, pin: str, says: str, cwd: Path | None = None) -> None:
    """``prune`` and ``watch`` on the seeded ``run`` prefix, each given ``--protect pin``: exit 2 with
    one line about that pin that ``says`` what to do, and nothing deleted."""
    before = _seed(s3)
    for command in ("prune", "watch"):
        result = run_cli(command, f"{s3.url}/run", "--protect", pin, cwd=cwd, timeout=60)
        assert_clean_exit(result, (2,), explained=True)
        line = _one_line(result.stderr)
        assert line.startswith(f"ckpt-watcher: --protect {pin}: "), line
        assert says in line, line
    assert s3.keys("run") == before


def _foreign_resume_source(tmp_path: Path) -> Path:
    config = tmp_path / "train.yaml"
    config.write_text(f"ckpt_path: gs://other-bucket/elsewhere/{step_name(0, 100)}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"save_top_k_checkpoints: 2\nprotect_from: [{config}]\n")
    return policy


def _warned_about_the_backend(stderr: str) -> None:
    warnings = [record["message"] for record in events(stderr, "protection_warning")]
    assert any(
        "gs://other-bucket/elsewhere/" in message
        and "pip install 'ckpt-watcher[gcs]'" in message
        and f"a checkpoint named {step_name(0, 100)!r} anywhere under the root is kept in doubt" in message
        for message in warnings
    ), stderr[-3000:]


def test_a_resume_source_whose_backend_is_missing_is_a_warning_and_its_namesake_is_kept(
    s3: Bucket, tmp_path: Path
) -> None:
    _without("gcsfs")
    _seed(s3)
    result = run_cli("prune", f"{s3.url}/run", "--policy", str(_foreign_resume_source(tmp_path)), timeout=60)
    assert_clean_exit(result, (0,))
    _warned_about_the_backend(result.stderr)
    assert s3.keys("run") == {f"run/{step_name(0, step)}" for step in (100, 700, 800)}


def test_a_watcher_with_such_a_resume_source_completes_its_passes(s3: Bucket, tmp_path: Path) -> None:
    _without("gcsfs")
    _seed(s3)
    policy = _foreign_resume_source(tmp_path)
    arguments = ["watch", f"{s3.url}/run", "--policy", str(policy), "--poll-interval", "0.5", "--settle", "0"]
    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_for("pass_completed", count=2, timeout=60)
        assert daemon.stop() == 0
    log = daemon.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert not events(log, "worker_error"), log[-3000:]
    _warned_about_the_backend(log)
    assert s3.keys("run") == {f"run/{step_name(0, step)}" for step in (100, 700, 800)}


# -- a local path given to --protect under a URL root -------------------------------------------------


@pytest.mark.parametrize("given", ["relative", "key", "absolute"])
def test_a_local_protect_path_under_a_url_root_is_refused(s3: Bucket, tmp_path: Path, given: str) -> None:
    """A local path can never name an object: it would warn "does not exist (yet)" and delete the very
    checkpoint meant. ``prune`` and ``watch`` refuse it, naming the URL to give instead."""
    name = step_name(0, 100)
    pin = {"relative": name, "key": f"run/{name}", "absolute": f"/run/{name}"}[given]
    _refused_by_prune_and_watch(s3, pin, f"give the object's URL ({s3.url}/...)", cwd=tmp_path)


# -- a bucket that does not exist, or goes away -----------------------------------------------------------


def test_watch_on_a_bucket_that_does_not_exist_says_so(s3: Bucket) -> None:
    missing = f"{s3.name}-missing"
    result = run_cli("watch", f"s3://{missing}/run", "--poll-interval", "0.5", timeout=60)
    assert_clean_exit(result, (2,), explained=True)
    line = _one_line(result.stderr)
    assert line.startswith(f"ckpt-watcher: s3://{missing}/run: the bucket {missing} does not exist"), line
    assert "another ckpt-watcher" not in line


def test_a_bucket_deleted_under_a_watcher_is_unavailable_not_a_lost_lease(s3: Bucket, tmp_path: Path) -> None:
    """The store going away, not another watcher: ``storage_unavailable``, retried, nothing deleted
    (the lease cannot be renewed: deletions stop), and the watcher goes on once the bucket is back."""
    _seed(s3)
    arguments = ["watch", f"{s3.url}/run", "--poll-interval", "0.5", "--settle", "0", "--lease-seconds", "6"]
    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_for("pass_completed", timeout=60)
        s3.delete(s3.raw_keys())
        _delete_bucket(s3)
        daemon.wait_for("storage_unavailable", count=3, timeout=60)
        daemon.wait_for("lease_renewal_failed", timeout=60)
        assert daemon.process.poll() is None
        s3.create()
        s3.put_many({f"run/{step_name(0, step)}": zip_bytes(f"again {step}".encode() * 20) for step in STEPS})
        daemon.wait_for("storage_restored", timeout=60)
        assert daemon.stop() == 0
    log = daemon.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert not events(log, "lease_lost"), log[-3000:]
    assert not events(log, "worker_error"), log[-3000:]
    # after the bucket went away, nothing was deleted before the lease was held again
    names = [record["event"] for record in log_records(log)]
    gone = names.index("storage_unavailable")
    assert "checkpoint_deleted" not in names[gone : names.index("lease_vanished")], names


def _delete_bucket(bucket: Bucket) -> None:
    """Empty and delete it (a watcher renewing its lease in between writes it again: try again)."""
    for _ in range(20):
        bucket.delete(bucket.raw_keys())
        try:
            bucket.filesystem.call_s3("delete_bucket", Bucket=bucket.name)
        except OSError:
            time.sleep(0.1)
            continue
        return
    raise AssertionError(f"{bucket.name} could not be deleted")


def test_a_protect_from_config_whose_backend_is_missing_is_unreadable(s3: Bucket, tmp_path: Path) -> None:
    """What it protects is unknown: ``prune`` stops at it (exit 2), the daemon holds deletions."""
    _without("gcsfs")
    before = _seed(s3)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\nprotect_from: [gs://other-bucket/configs/train.yaml]\n")
    result = run_cli("prune", f"{s3.url}/run", "--policy", str(policy), timeout=60)
    assert_clean_exit(result, (2,))
    assert "pip install 'ckpt-watcher[gcs]'" in result.stderr, result.stderr[-3000:]
    assert s3.keys("run") == before
    arguments = ["watch", f"{s3.url}/run", "--policy", str(policy), "--poll-interval", "0.5", "--settle", "0"]
    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_for("pass_completed", count=2, timeout=60)
        assert daemon.stop() == 0
    log = daemon.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert any("ckpt-watcher[gcs]" in record["error"] for record in events(log, "protection_rejected")), log
    assert s3.keys("run") == before


# -- a prune that deletes, beside a watcher of the prefix ---------------------------------------------------


def test_a_prune_that_deletes_does_not_run_beside_a_bucket_watcher(s3: Bucket, tmp_path: Path) -> None:
    """While a watcher holds the prefix's lease, ``prune`` (not ``--dry-run``) would apply its own
    policy beside it: exit 2 naming the holder, nothing deleted; the dry run runs there."""
    before = _seed(s3)
    keep_all = tmp_path / "keep-all.yaml"
    keep_all.write_text("save_top_k_checkpoints: -1\nsave_top_k_best: -1\n")
    keep_one = tmp_path / "keep-one.yaml"
    keep_one.write_text("save_top_k_checkpoints: 1\n")
    arguments = ["watch", f"{s3.url}/run", "--policy", str(keep_all), "--poll-interval", "0.5"]
    with running_daemon(arguments, tmp_path / "watch.log") as daemon:
        daemon.wait_for("pass_completed", timeout=60)
        refused = run_cli("prune", f"{s3.url}/run", "--policy", str(keep_one), timeout=60)
        audit = run_cli("prune", f"{s3.url}/run", "--policy", str(keep_one), "--dry-run", timeout=60)
        assert daemon.stop() == 0

    assert_clean_exit(refused, (2,), explained=True)
    line = _one_line(refused.stderr)
    assert line.startswith(f"ckpt-watcher: another ckpt-watcher is already pruning {s3.url}/run (held by "), (
        line
    )
    assert f"pid {daemon.process.pid}" in line, line
    assert line.endswith("stop it before a prune that deletes (--dry-run runs beside it)"), line
    assert audit.returncode == 0, audit.stderr
    assert s3.keys("run") == before
