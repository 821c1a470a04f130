"""6. A bucket prefix: one pass over N objects on a local S3 server (moto), and the requests it costs.

The server is moto's server mode on 127.0.0.1 (the tests' own, tests/support/s3_server.py); the tool
reaches it only through s3fs/botocore with ``AWS_ENDPOINT_URL``. Requests are counted from the
server's own request log (one line per request), by kind.

* a cold pass: ``prune s3://... --dry-run`` as a child process, which reads every checkpoint
  object's tail once (one ranged GET each: these objects are smaller than one tail read);
* passes over the unchanged prefix: ``watch s3://... --poll-interval 2`` with a policy that keeps
  everything, after its start-up pass: each pass lists the prefix and reads nothing else (the verdicts
  are remembered by ETag, size and mtime). Its time is the daemon's own ``pass_completed``
  ``duration_ms``.
"""

from __future__ import annotations

import collections
import math
import time
import urllib.parse

from benchlib import (
    DAEMON,
    Config,
    Measured,
    Section,
    Target,
    checkpoint_bytes,
    fresh_directory,
    markdown_table,
    median,
    megabytes,
    run_measured,
    run_names,
    seconds_text,
    write_policy,
)

from tests.support.daemon import DaemonProcess
from tests.support.s3_server import Bucket, S3Server, environment

BUCKET = "bench"
PREFIX = "run"
POLL_SECONDS = 2.0
UNCHANGED_PASSES = 5
_SEED_BATCH = 1000


def _kind(method: str, target: str) -> str:
    """ListObjectsV2, GetObject, HeadObject, PutObject (the lease), the copies of the trash, ..."""
    if method == "GET" and "list-type=2" in target:
        return "ListObjectsV2"
    if method == "POST" and target.endswith("?uploads"):
        return "CreateMultipartUpload"
    if method == "PUT" and "uploadId=" in target:
        return "UploadPartCopy"
    if method == "POST" and "uploadId=" in target:
        return "CompleteMultipartUpload"
    return {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}.get(
        method, method
    )


def _requests(server: S3Server, since: int) -> tuple[collections.Counter[str], int]:
    """The requests to the benchmark's bucket logged after the first ``since``, by kind; and the total."""
    logged = [
        (method, urllib.parse.unquote(target))
        for method, target, _ in server.requests()
        if target.startswith((f"/{BUCKET}/", f"/{BUCKET}?"))
    ]
    return collections.Counter(_kind(method, target) for method, target in logged[since:]), len(logged)


def _described(counts: collections.Counter[str], passes: int = 1) -> str:
    parts = [
        f"{count / passes:g} {kind}" for kind, count in sorted(counts.items(), key=lambda item: -item[1])
    ]
    return ", ".join(parts) if parts else "none"


def _seed(bucket: Bucket, count: int, config: Config) -> None:
    names = [*run_names(count - 1), "last.ckpt"]
    for start in range(0, len(names), _SEED_BATCH):
        config.log(f"bucket: writing objects {start + 1:,} to {min(start + _SEED_BATCH, len(names)):,}")
        bucket.put_many(
            {
                f"{PREFIX}/{name}": checkpoint_bytes(f"weights {start + index}".encode())
                for index, name in enumerate(names[start : start + _SEED_BATCH])
            }
        )


def _cold(config: Config, server: S3Server, url: str, env: dict[str, str]) -> tuple[list[Measured], str]:
    runs: list[Measured] = []
    counts: collections.Counter[str] = collections.Counter()
    repeats = min(config.repeats, 3)
    for repeat in range(repeats):
        config.log(f"bucket: prune --dry-run on {url}, run {repeat + 1}/{repeats}")
        _, before = _requests(server, 0)
        measured = run_measured([*DAEMON, "prune", url, "--dry-run"], environment=env)
        if measured.returncode != 0:
            raise RuntimeError(f"prune --dry-run exited {measured.returncode} on {url}")
        runs.append(measured)
        counts, _ = _requests(server, before)
    return runs, _described(counts)


def _unchanged(
    config: Config, server: S3Server, url: str, env: dict[str, str]
) -> tuple[list[float], str, str]:
    policy = write_policy(
        config.work_dir / "bucket" / "keep-all.yaml", save_top_k_checkpoints=-1, save_top_k_best=-1
    )
    log = config.work_dir / "bucket" / "watch.jsonl"
    daemon = DaemonProcess(
        ["watch", url, "--policy", str(policy), "--poll-interval", str(POLL_SECONDS)], log, environment=env
    )
    try:
        config.log(f"bucket: watch {url}: start-up pass, then {UNCHANGED_PASSES} passes over it unchanged")
        _, before_start = _requests(server, 0)
        daemon.wait_for("watch_started", timeout=600)
        startup, _ = _requests(server, before_start)
        daemon.wait_for("pass_completed", lambda record: record["trigger"] == "rescan", timeout=120)
        _, before = _requests(server, 0)
        rescans = len([record for record in daemon.events("pass_completed") if record["trigger"] == "rescan"])
        passes = daemon.wait_for(
            "pass_completed",
            lambda record: record["trigger"] == "rescan",
            timeout=120 + UNCHANGED_PASSES * POLL_SECONDS * 10,
            count=rescans + UNCHANGED_PASSES,
        )[rescans:]
        counts, _ = _requests(server, before)
        durations = [float(record["duration_ms"]) / 1000 for record in passes]
        daemon.stop()
    finally:
        daemon.close()
    return durations, _described(startup), _described(counts, UNCHANGED_PASSES)


def _trash_costs(server: S3Server, bucket: Bucket, env: dict[str, str], config: Config) -> list[list[str]]:
    """The requests one checkpoint object costs: deleted without a trash, moved into it, purged from
    it, restored from it (a prune over three objects that keeps two; its listing and the reads of the
    objects' tails, which any prune makes, are left out)."""
    config.log("bucket: what a trashed object costs")
    rows: list[list[str]] = []
    policies = {
        "none": write_policy(config.work_dir / "bucket" / "keep-2.yaml", save_top_k_checkpoints=2),
        "trash": config.work_dir / "bucket" / "keep-2-trash.yaml",
    }
    policies["trash"].write_text("save_top_k_checkpoints: 2\ntrash:\n  grace: 1h\n")
    names = [f"epoch=00-step={step:06d}-train.ckpt" for step in (100, 200, 300)]

    def run(*arguments: str) -> collections.Counter[str]:
        _, before = _requests(server, 0)
        measured = run_measured([*DAEMON, *arguments], environment=env)
        if measured.returncode != 0:
            raise RuntimeError(f"{' '.join(arguments)} exited {measured.returncode}")
        counts, _ = _requests(server, before)
        counts.pop("ListObjectsV2", None)
        return counts

    def seed(prefix: str) -> None:
        bucket.put_many({f"{prefix}/{name}": checkpoint_bytes(name.encode()) for name in names})

    seed("costs-delete")
    deleted = run("prune", f"s3://{BUCKET}/costs-delete", "--policy", str(policies["none"]))
    deleted["GetObject"] -= len(names)  # the tails' reads
    rows.append(["delete (no trash)", _described(+deleted)])
    url = f"s3://{BUCKET}/costs-trash"
    seed("costs-trash")
    trashed = run("prune", url, "--policy", str(policies["trash"]))
    trashed["GetObject"] -= len(names)
    rows.append(["move into the trash", _described(+trashed)])
    rows.append(["purge (`trash empty`)", _described(run("trash", "empty", url))])
    seed("costs-trash")
    run("prune", url, "--policy", str(policies["trash"]))
    rows.append(["restore", _described(run("restore", url, "--all"))])
    return rows


def measure(config: Config) -> Section:
    section = Section("9. A bucket prefix: one pass and its requests")
    count = config.bucket_objects
    work = fresh_directory(config.work_dir / "bucket")
    server = S3Server(work / "requests.log")
    server.start()
    try:
        env = environment(server.endpoint)
        bucket = Bucket(server.endpoint, name=BUCKET).create()
        _seed(bucket, count, config)
        url = f"s3://{BUCKET}/{PREFIX}"
        cold_runs, cold_requests = _cold(config, server, url, env)
        durations, startup_requests, unchanged_requests = _unchanged(config, server, url, env)
        trash_costs = _trash_costs(server, bucket, env, config)
        bucket.put(f"{PREFIX}/.ckpt-watcher.lease", b"{}")  # as during the daemon's passes
        listing = []
        for _ in range(3):
            started = time.perf_counter()
            bucket.raw_keys()
            listing.append(time.perf_counter() - started)
    finally:
        server.stop()
    pages = math.ceil((count + 1) / 1000)  # the lease object is listed too
    cold = median([run.seconds for run in cold_runs])
    section.body.append(
        f"`{count:,}` checkpoint objects under `{url}` (the one-shot benchmark's names, each a small "
        "complete zip archive of its own) on moto's S3 server on 127.0.0.1, reached through s3fs/botocore "
        "with `AWS_ENDPOINT_URL`. Requests are counted from the server's own request log. A *cold* pass "
        f"is `prune {url} --dry-run` as a child process (median of {len(cold_runs)}; it reads each object's "
        "tail once, with a ranged GET); an *unchanged* pass is one of `watch --poll-interval 2` with a "
        f"keep-everything policy after its start-up pass, over the same prefix ({UNCHANGED_PASSES} passes; "
        "time from the daemon's own `pass_completed`)."
    )
    section.body.append(
        markdown_table(
            ["pass", "objects", "time", "requests (per pass)", "peak RSS"],
            [
                [
                    "cold: `prune --dry-run` (spawn to exit)",
                    f"{count:,}",
                    seconds_text(cold),
                    cold_requests,
                    megabytes(median([float(run.max_rss_kb) for run in cold_runs])),
                ],
                ["watch: start-up pass (and the lease)", f"{count:,}", "", startup_requests, ""],
                [
                    "watch: unchanged prefix (median)",
                    f"{count:,}",
                    seconds_text(median(durations)),
                    unchanged_requests,
                    "",
                ],
                [
                    "of which: the server answering the listing (s3fs alone, median of 3)",
                    f"{count:,}",
                    seconds_text(median(listing)),
                    f"{pages} ListObjectsV2",
                    "",
                ],
            ],
        )
    )
    section.body.append(
        f"An unchanged prefix of {count:,} objects (and the lease object) costs {pages} ListObjectsV2 "
        "request(s) a pass (1,000 keys a page) and nothing else; the lease adds one PutObject every "
        "20 s (a third of its 60 s time to live), whatever the poll interval. A changed or new object "
        "costs one more ranged GET of its tail (two for an object larger than the 256 KiB tail read: "
        "its first bytes and its tail). Most of an unchanged pass is the server answering the listing "
        "(the last row: the same listing by s3fs alone)."
    )
    section.body.append(
        "With the trash on, a deletion is a server-side copy into the prefix's `.ckpt-trash/` and then "
        "the same conditional delete: the requests one checkpoint object (uploaded in one PUT; one "
        "HeadObject more for one uploaded in parts) costs, from the server's log, besides the listing "
        "and the read of its tail that every prune makes. On S3 the copy is also billed as storage "
        "until it is purged."
    )
    section.body.append(markdown_table(["one object", "requests"], trash_costs))
    met = unchanged_requests.split(", ")[0] == f"{pages:g} ListObjectsV2" and all(
        part.endswith(("ListObjectsV2", "PutObject")) for part in unchanged_requests.split(", ")
    )
    section.targets.append(
        Target(
            f"bucket: requests of a pass over an unchanged {count:,}-object prefix",
            f"list requests only ({pages}; and the lease's renewal every 20 s)",
            unchanged_requests,
            met,
        )
    )
    section.headline[f"bucket pass, {count:,} objects"] = (
        f"cold {seconds_text(cold)}, unchanged {seconds_text(median(durations))} ({unchanged_requests})"
    )
    return section
