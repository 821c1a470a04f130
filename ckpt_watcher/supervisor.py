"""The daemon's main thread: runs the worker in its own thread and turns signals into requests.

The handled signals are blocked in every thread and collected with ``sigtimedwait``, so no handler
ever runs inside a lock, and SIGTERM works the same when this process is PID 1 in a container.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Protocol

import structlog

from ckpt_watcher.notify import Notifier

logger = structlog.get_logger("ckpt_watcher.daemon")

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
HANDLED_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}
SIGNAL_POLL_SECONDS = 0.2


class Supervised(Protocol):
    """What ``supervise`` needs of a worker (a test stands in a hung one)."""

    notifier: Notifier
    exit_code: int

    def run(self) -> int: ...
    def request_stop(self) -> None: ...
    def request_reload(self) -> None: ...


def supervise(watcher: Supervised) -> int:
    """Run ``watcher.run`` in a worker thread until it returns; return its exit code.

    SIGHUP asks for a policy reload. The first SIGTERM/SIGINT asks the worker to stop (at the next
    deletion); a second one exits at once, whatever the worker is doing.
    """
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    worker = threading.Thread(target=watcher.run, name="ckpt-watcher-worker")
    try:
        worker.start()
        stopping = False
        while worker.is_alive():
            received = signal.sigtimedwait(HANDLED_SIGNALS, SIGNAL_POLL_SECONDS)
            # CPython 3.11's sigtimedwait, interrupted (SIGSTOP then SIGCONT: job control, a debugger
            # attaching) once its timeout has passed, returns a struct of garbage rather than None.
            if received is None or received.si_signo not in HANDLED_SIGNALS:
                continue
            name = signal.Signals(received.si_signo).name
            if received.si_signo == signal.SIGHUP:
                logger.info("reload_requested", signal=name)
                watcher.request_reload()
            elif stopping:
                logger.warning("forced_exit", signal=name, detail="second stop signal; exiting at once")
                os._exit(128 + received.si_signo)
            else:
                stopping = True
                logger.info("stop_requested", signal=name)
                watcher.notifier.stopping()
                watcher.request_stop()
        worker.join()
    except BaseException:
        # No signal would reach the worker any more: ask it to stop rather than run on unstoppable.
        if worker.is_alive():
            watcher.request_stop()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return watcher.exit_code
