"""The daemon's status line: one ``pass_completed`` record per pass (fields for programs), the same as
one readable sentence for people (``systemctl status``'s ``STATUS=``, and the log on a terminal).

The sentence is made from the record's own fields (``pass_sentence``), so the JSON line, the console
line and ``STATUS=`` cannot say different things. Its parts, most useful first: what is kept over all
directories, what the pass deleted and freed, the free space left on the root's file system, and the
byte budget in force at the root (``budget_in_force``; "none" until the policy sets one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.notify import Liveness
from ckpt_watcher.policy import Policy
from ckpt_watcher.reconcile import PassResult
from ckpt_watcher.sizes import human_bytes
from ckpt_watcher.space import free_space, space_status

if TYPE_CHECKING:
    from ckpt_watcher.session import Session
    from ckpt_watcher.terminal import PassProgress

logger = structlog.get_logger("ckpt_watcher.daemon")

# The byte-budget keys of a policy (issue 12), shown as written when the policy in force has them.
BUDGET_KEYS = ("max_size", "keep_free")
NO_BUDGET = "none"


@dataclass
class SinceStart:
    """What the daemon did since it started (``STATUS=``, ``watch_stopped``)."""

    deleted: int = 0
    bytes_freed: int = 0
    trashed: int = 0
    purged: int = 0

    def add(self, result: PassResult) -> None:
        """Count one pass. Bytes are freed by a deletion and by a purge of the trash, not by a move
        into the trash (the trash is on the same file system)."""
        self.deleted += result.deleted
        self.bytes_freed += result.bytes_freed + result.bytes_purged
        self.trashed += result.trashed
        self.purged += result.purged

    def text(self) -> str:
        """``since start: deleted 12 (48.0 GiB)``; with a trash ``since start: deleted 0 (8.0 GiB),
        trashed 3, purged 2`` (the bytes are what deletions and purges freed)."""
        text = f"since start: deleted {self.deleted} ({human_bytes(self.bytes_freed)})"
        text += f", trashed {self.trashed}" if self.trashed else ""
        return text + (f", purged {self.purged}" if self.purged else "")


def budget_in_force(policy: Policy) -> str:
    """The root policy's byte budget, ``max_size 500GiB, keep_free 10%``, or ``none``."""
    parts = []
    for key in BUDGET_KEYS:
        value = getattr(policy, key, None)
        if value is not None:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or NO_BUDGET


def free_bytes(root: Path | None) -> int | None:
    """Bytes available on the file system holding ``root`` (df's Avail); None if it cannot be told."""
    return None if root is None else free_space(root)


def pass_fields(result: PassResult, *, free: int | None, budget: str) -> dict[str, Any]:
    """The fields of a ``pass_completed`` record: this pass's counts, then what is kept over all
    directories, the free space and the budget (``trash_bytes`` only where there is a trash)."""
    summary = result.summary
    kept_overall = result.kept_overall
    fields: dict[str, Any] = {
        "trigger": result.trigger.value,
        "groups": result.scanned_groups,
        "kept": summary.kept,
        "deleted": result.deleted,
        "skipped": summary.skipped,
        "detected": result.detected,
        "failed": result.failed,
        "bytes_freed": result.bytes_freed,
        "trashed": result.trashed,
        "purged": result.purged,
        "interrupted": result.interrupted,
        "duration_ms": round(result.seconds * 1000, 1),
        "kept_overall": sum(kept_overall.checkpoints.values()),
        "bytes_kept_overall": sum(kept_overall.bytes.values()),
        "free_bytes": free,
        "budget": budget,
        "evicted": result.evicted,
        "budget_unmet_bytes": result.budget_unmet_bytes,
    }
    if result.trash_bytes is not None:
        fields["trash_bytes"] = result.trash_bytes
    if result.storage_error is not None:  # (a pin of a restored checkpoint could not be read, say)
        fields["stopped"] = result.storage_error
    return fields


def pass_sentence(fields: Mapping[str, Any]) -> str:
    """``kept 12 (48.0 GiB); event pass: deleted 2 (8.0 GiB), skipped 1; 1.2 TiB free; budget: none``."""
    parts = [
        f"kept {fields['kept_overall']} ({human_bytes(fields['bytes_kept_overall'])})",
        f"{fields['trigger']} pass: deleted {fields['deleted']} ({human_bytes(fields['bytes_freed'])})"
        + (f", trashed {fields['trashed']}" if fields.get("trashed") else "")
        + (f", purged {fields['purged']} from the trash" if fields.get("purged") else "")
        + (f", skipped {fields['skipped']}" if fields["skipped"] else "")
        + (f", {fields['failed']} failed (retried next pass)" if fields["failed"] else "")
        + (", interrupted" if fields["interrupted"] else "")
        + (", stopped: nothing more deleted until it is retried" if fields.get("stopped") else ""),
    ]
    if fields.get("free_bytes") is not None:
        parts.append(f"{human_bytes(fields['free_bytes'])} free")
    budget = f"budget: {fields['budget']}"
    if fields["budget"] != NO_BUDGET:
        unmet = fields["budget_unmet_bytes"]
        budget += f" (unmet by {human_bytes(unmet)})" if unmet else " (met)"
    parts.append(budget)
    if fields.get("trash_bytes") is not None:
        parts.append(f"{human_bytes(fields['trash_bytes'])} in the trash")
    return "; ".join(parts)


# The records shown as a sentence on a terminal, and how.
SENTENCES = {"pass_completed": pass_sentence}


def readable_records(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor for the console: a record with a sentence (``SENTENCES``) is shown as
    ``pass completed: <sentence>`` instead of its fields. JSON logs never use it."""
    sentence = SENTENCES.get(event_dict.get("event", ""))
    if sentence is None:
        return event_dict
    text = event_dict["event"].replace("_", " ") + ": " + sentence(event_dict)
    kept = {key: event_dict[key] for key in ("timestamp", "level") if key in event_dict}
    return {**kept, "event": text}


@dataclass
class PassReporter:
    """Reports each pass of the daemon: the metrics' figures, one ``pass_completed`` record (at info
    when the pass changed or found something, else at debug) and the same as ``STATUS=``."""

    liveness: Liveness
    figures: DaemonFigures
    progress: PassProgress | None
    main_policy: Callable[[], Policy]  # the ``--policy`` file's policy, as in force now
    accepts: Callable[[PassResult, Session | None], bool] = lambda result, session: True
    since_start: SinceStart = field(default_factory=SinceStart)
    _ready_sent: bool = False

    def report(self, result: PassResult, session: Session | None) -> None:
        """Report ``result``, a pass over ``session``'s root, unless the place refuses it (a bucket
        that could not be listed retries instead)."""
        if not self.accepts(result, session):
            return
        self.since_start.add(result)
        root = session.root if session is not None else None
        if root is not None:
            self.figures.set_root(root.path, root.observer_kind)
        self.figures.record_pass(result, finished_at=time.time())
        if self.progress is not None:
            self.progress.finish()
        in_force = session.policy_in_force() if session is not None else None
        fields = pass_fields(
            result,
            free=free_bytes(root.path if root is not None else None),
            budget=budget_in_force(in_force if in_force is not None else self.main_policy()),
        )
        changed = result.deleted or result.trashed or result.purged or result.failed
        eventful = changed or result.detected or result.trigger.covers_everything
        logger.log(logging.INFO if eventful else logging.DEBUG, "pass_completed", **fields)
        space = "".join(f"; {space_status(fs_plan)}" for fs_plan in result.space if fs_plan.keep_free)
        self.liveness.status(f"{pass_sentence(fields)}{space}; {self.since_start.text()}")

    def ready(self, status: str, *, armed: bool) -> None:
        """READY=1 once, at the first start-up (armed, or waiting); afterwards only the status (and
        READY=1 again whenever a root is armed)."""
        self.liveness.status(status, ready=not self._ready_sent or armed)
        self._ready_sent = True
