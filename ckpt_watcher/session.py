"""The armed root's life: arming it when it is there (with its first pass and READY=1), saying once
that it is missing, and disarming it when it is lost or the daemon stops.

A ``Session`` is one armed root with the reconcile core that remembers it; the daemon holds one or
none (``Arming.session``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from ckpt_watcher.place import Crew, Place, WatchedRoot
from ckpt_watcher.policy import Policy
from ckpt_watcher.reconcile import Reconciler, Trigger
from ckpt_watcher.status import PassReporter

logger = structlog.get_logger("ckpt_watcher.daemon")

ROOT_CHECK_INTERVAL = 1.0


@dataclass
class Session:
    """One armed root, the reconcile core that remembers it, and their deadlines."""

    root: WatchedRoot
    reconciler: Reconciler
    next_rescan: float
    next_root_check: float
    # Until then (monotonic) no pass runs but the retry at ``next_rescan``: the last could not read
    # what it must (place.Retries), and an event's or keep_free's pass would only fail the same way.
    held_until: float = 0.0
    # A full rescan asked for while held (a policy edit, an overflow): the retry is that pass (``full``).
    full_rescan_asked: bool = False

    def policy_in_force(self) -> Policy | None:
        """The policy at the root: the ``--policy`` file with the root's own ``.ckpt-watcher.yaml`` over
        it; None while an invalid override blocks it."""
        effective = self.reconciler.tree.for_directory(self.reconciler.root)
        return effective.policy if effective is not None else None


class Arming:
    """Arms the place's root when it is there, and disarms it."""

    def __init__(self, place: Place, crew: Crew, reporter: PassReporter) -> None:
        self.place = place
        self.crew = crew
        self.reporter = reporter
        self.session: Session | None = None
        self._ever_armed = False
        self._announced_missing = False

    def arm(self) -> Session | None:
        """Hold and watch the root if it is there, reconcile it whole, and report ready."""
        root = self.place.arm(self.crew)
        if root is None:
            return None
        options = self.crew.options
        now = time.monotonic()
        session = Session(
            root,
            self.place.reconciler(root, self.crew),
            now + options.rescan_seconds,
            now + ROOT_CHECK_INTERVAL,
        )
        self.session = session
        rearm, self._ever_armed, self._announced_missing = self._ever_armed, True, False
        self.reporter.report(session.reconciler.run(Trigger.REARM if rearm else Trigger.STARTUP), session)
        details = {
            "path": str(root.path),
            "observer": root.observer_kind,
            "policy_source": self.crew.policy.loaded.source_label,
            "settle_seconds": options.settle_seconds,
            "rescan_seconds": options.rescan_seconds,
        }
        if rearm:
            logger.info("watch_rearmed", **details)
        else:
            logger.info("watch_started", **details)
        self.reporter.ready(self.crew.liveness.status_text, armed=True)
        return session

    def announce_missing(self) -> None:
        """Say once (log and status) that the root is not there yet."""
        if self._announced_missing:
            return
        root = self.crew.options.root
        logger.warning("watch_path_missing", path=str(root), detail="waiting for it to appear")
        self._announced_missing = True
        self.reporter.ready(f"waiting for {root} to appear", armed=False)

    def lost(self) -> None:
        """The root was deleted, replaced or unmounted: disarm, and re-arm when it is back."""
        logger.warning(
            "watch_path_lost",
            path=str(self.crew.options.root),
            detail="deleted, replaced or unmounted; re-arming when it is back",
        )
        self.disarm()

    def disarm(self) -> None:
        """Stop watching the root and release it."""
        if self.session is not None:
            self.session.root.disarm()
            self.session = None
            self.crew.figures.set_root(None, "none")
