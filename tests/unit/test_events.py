"""EventRouter and Inbox with hand-built watchdog events: which event becomes which work, and batching."""

from __future__ import annotations

import logging
import threading

import pytest
from structlog.testing import LogCapture
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from ckpt_watcher.events import Batch, EventRouter, Inbox, OverflowListener

RUN = "/ckpt/run"
CHECKPOINT = f"{RUN}/epoch=00-step=000100-train.ckpt"
TEMPORARY = f"{RUN}/tmp123"
CONFIGS = "/etc/ckpt-watcher"
POLICY = f"{CONFIGS}/policy.yaml"


def _batch(*events: FileSystemEvent, polling: bool = False) -> Batch:
    inbox = Inbox()
    router = EventRouter(inbox, polling=polling, config_files=frozenset({POLICY}))
    for event in events:
        router.dispatch(event)
    return inbox.take(0)


ROUTES = [
    # (event, polling, files, closed, trees, reload)
    (FileClosedEvent(CHECKPOINT), False, {CHECKPOINT}, {CHECKPOINT}, set(), False),
    (FileCreatedEvent(CHECKPOINT), False, {CHECKPOINT}, set(), set(), False),
    (FileDeletedEvent(CHECKPOINT), False, {CHECKPOINT}, set(), set(), False),
    (FileModifiedEvent(CHECKPOINT), False, set(), set(), set(), False),  # a write in progress
    (FileModifiedEvent(CHECKPOINT), True, {CHECKPOINT}, set(), set(), False),  # polling: a change seen
    (FileMovedEvent(TEMPORARY, CHECKPOINT), False, {TEMPORARY, CHECKPOINT}, {CHECKPOINT}, set(), False),
    (FileMovedEvent("", CHECKPOINT), False, {CHECKPOINT}, {CHECKPOINT}, set(), False),  # moved in
    (FileMovedEvent(CHECKPOINT, ""), False, {CHECKPOINT}, set(), set(), False),  # moved out of the tree
    (FileOpenedEvent(CHECKPOINT), False, set(), set(), set(), False),  # our own reads
    (FileClosedNoWriteEvent(CHECKPOINT), False, set(), set(), set(), False),
    (DirCreatedEvent(f"{RUN}/new"), False, set(), set(), {f"{RUN}/new"}, False),
    (DirDeletedEvent(f"{RUN}/old"), False, set(), set(), {f"{RUN}/old"}, False),
    (DirMovedEvent(f"{RUN}/a", f"{RUN}/b"), False, set(), set(), {f"{RUN}/a", f"{RUN}/b"}, False),
    (DirModifiedEvent(RUN), False, set(), set(), set(), False),  # its files' own events say what changed
    (DirModifiedEvent(RUN), True, set(), set(), set(), False),
    (FileClosedEvent(f"{RUN}/.ckpt-watcher.yaml"), False, set(), set(), {RUN}, False),  # a per-run policy
    (FileClosedEvent(POLICY), False, {POLICY}, {POLICY}, set(), True),
    (FileMovedEvent(f"{CONFIGS}/.tmp", POLICY), False, {f"{CONFIGS}/.tmp", POLICY}, {POLICY}, set(), True),
    (DirMovedEvent(f"{CONFIGS}/..data_tmp", f"{CONFIGS}/..data"), False, set(), set(),
     {f"{CONFIGS}/..data_tmp", f"{CONFIGS}/..data"}, True),  # a ConfigMap update
]  # fmt: skip


@pytest.mark.parametrize(("event", "polling", "files", "closed", "trees", "reload"), ROUTES)
def test_each_event_becomes_the_work_it_means(
    event: FileSystemEvent, polling: bool, files: set[str], closed: set[str], trees: set[str], reload: bool
) -> None:
    batch = _batch(event, polling=polling)

    assert batch.files == files
    assert batch.closed == closed
    assert batch.trees == trees
    assert batch.reload is reload
    assert not batch.full_rescan


def test_a_handler_failure_is_logged_and_never_reaches_the_observer(captured: LogCapture) -> None:
    class BrokenInbox(Inbox):
        def add_file(self, path: str, *, closed: bool = False) -> None:
            raise RuntimeError("the inbox is broken")

    EventRouter(BrokenInbox(), polling=False, config_files=frozenset()).dispatch(FileClosedEvent(CHECKPOINT))

    assert [(entry["event"], entry["event_type"]) for entry in captured.entries] == [
        ("event_handler_failed", "closed")
    ]


def test_a_burst_is_taken_as_one_batch() -> None:
    inbox = Inbox()
    for step in range(50):
        inbox.add_file(f"{RUN}/{step}", closed=step % 2 == 0)
    inbox.add_tree(f"{RUN}/new")
    inbox.add_unwatched(f"{RUN}/unwatched")

    batch = inbox.take(5.0)

    assert len(batch.files) == 50
    assert len(batch.closed) == 25
    assert batch.trees == {f"{RUN}/new"}
    assert batch.unwatched == {f"{RUN}/unwatched"}
    assert not inbox.take(0)


def test_reload_requests_keep_the_strongest() -> None:
    inbox = Inbox()
    inbox.request_reload(forced=True)
    inbox.request_reload()

    batch = inbox.take(0)

    assert batch.reload
    assert batch.forced_reload


def test_wake_returns_an_empty_batch_at_once() -> None:
    inbox = Inbox()
    taken: list[Batch] = []
    worker = threading.Thread(target=lambda: taken.append(inbox.take(60.0)))
    worker.start()

    inbox.wake()
    worker.join(timeout=10)

    assert not worker.is_alive()
    assert taken == [Batch()]


def test_events_lost_ask_for_a_full_rescan_and_nothing_else(captured: LogCapture) -> None:
    """watchdog's event after an overflow, queued once the watches are mended; the overflow's log
    record (below) already said it, so the event is not said again."""
    batch = _batch(EventsLostEvent(RUN, is_directory=True))

    assert batch.full_rescan
    assert (batch.files, batch.trees) == (set(), set())
    assert captured.entries == []


def test_an_inotify_overflow_record_is_said_once_and_asks_for_nothing(captured: LogCapture) -> None:
    """The rescan is the EventsLostEvent's (above), queued once the watches are mended."""
    listener = OverflowListener()
    listener.attach()
    try:
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed")
        logging.getLogger("watchdog.observers.inotify").warning("something else")
    finally:
        listener.detach()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed")  # detached

    assert [entry["event"] for entry in captured.entries] == ["event_queue_overflow"]
