"""Retention by bytes in a pass: the shell around ``budget.py`` (statvfs, what is remembered, the logs).

A pass plans one group at a time (it never holds the whole tree's records), so ``keep_free``, which
evicts across every group of a file system, works from what each group's last plan left behind: a
``GroupSpace`` per group, holding only its evictable kept checkpoints (with their identities), the
checkpoints being written and two sizes. After the pass has planned (and applied) its own groups:

1. the file system's free space is read (``statvfs``; a dry run adds what its plan's deletions would
   free: nothing for one moved into a trash on the same mount, which becomes a trash entry instead,
   for step 2 to take as the real run takes what it has just moved in: ``_dry_run_frees``);
2. ``budget.free_space_plan`` chooses, from those facts, the trash entries and checkpoints to take;
3. a chosen checkpoint in a group this pass did not plan is never deleted from memory: that group is
   scanned and planned again first (joining the pass), and the choice is made again, until every
   chosen checkpoint comes from a fresh plan. Its deletion then goes through ``delete.py``, which
   re-checks the file's identity (a file changed since it was planned is kept).

So only the groups that lose a checkpoint are rescanned, never the whole tree. ``budget_unmet`` is
logged when a budget becomes unmet (or its limit changes), ``budget_met`` when it holds again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from ckpt_watcher.budget import (
    FileSystemSpace,
    FreeSpacePlan,
    GroupSpace,
    Growing,
    Reclaimable,
    SizeVerdict,
    free_space_plan,
    freed_bytes,
    group_space,
    recently_modified,
    within_max_size,
)
from ckpt_watcher.filesystem import status_at, summarize_tree
from ckpt_watcher.groups import GroupIndex
from ckpt_watcher.plan import Action, Decision, GroupPlan
from ckpt_watcher.policy import Policy
from ckpt_watcher.records import TRASH_DIRECTORY_NAME, display_name
from ckpt_watcher.releases import Release, ReleaseLedger
from ckpt_watcher.sizes import human_bytes

if TYPE_CHECKING:
    from ckpt_watcher.trash_moves import PurgeResult

logger = structlog.get_logger("ckpt_watcher.space")

# While a checkpoint is being written on a file system with keep_free, its free space is read this
# often (a 1 GB/s writer fills 1 GB in that time); otherwise this often, for writers outside the tree.
CHECK_WHILE_WRITING = 1.0
CHECK_AT_REST = 5.0
SHOWN_REMAINING = 5


class Trash(Protocol):
    """Bytes that may go before any kept checkpoint (the trash helper's side of the contract)."""

    def reclaimable(self) -> Sequence[Reclaimable]: ...


@dataclass(frozen=True, slots=True)
class Eviction:
    """A checkpoint given up for space on ``file_system`` (a delete decision of its group, to apply
    like any plan's, once ``still_short`` says the space is still missing)."""

    directory: Path
    decision: Decision
    file_system: FreeSpacePlan


@dataclass
class SpaceKeeper:
    """Remembers each group's space facts between passes and keeps ``keep_free`` on each file system.

    One per ``Reconciler`` (so ``prune``'s lives for one pass). ``trash``: reclaimable bytes, taken first."""

    root: Path
    index: GroupIndex
    trash: Trash | None = None
    _facts: dict[Path, GroupSpace] = field(default_factory=dict)
    _pending: dict[int, int] = field(default_factory=dict)
    _pending_trash: list[Reclaimable] = field(default_factory=list)  # a dry run's deletions into the trash
    _fresh: set[Path] = field(default_factory=set)
    _unmet: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    _released: ReleaseLedger = field(default_factory=ReleaseLedger)  # deletions statvfs may not show yet
    _before: dict[Path, tuple[int, int]] = field(default_factory=dict)  # (device, free) before deleting
    _next_check: float | None = None
    _facts_needed: bool = True
    _releases_counted: bool = False  # keep_free is in force somewhere: deletions are releases

    # -- one group ---------------------------------------------------------------------------------

    def begin_pass(self, *, facts_needed: bool = True, keep_free: bool = False) -> None:
        """A new pass: no group is fresh yet, nothing is pending. Without ``facts_needed`` (a one-shot
        pass over a tree where no policy has a byte budget) no group's space facts are gathered: only
        a budget ever reads them, and for 100,000 checkpoints they cost ~0.2 s. With ``keep_free`` in
        this pass's policies, or in a group's known before, every group's deletions are releases (a
        group without keep_free frees space on a disk another group keeps free)."""
        self._pending.clear()
        self._pending_trash.clear()
        self._fresh.clear()
        self._facts_needed = facts_needed
        self._releases_counted = keep_free or any(facts.keep_free for facts in self._facts.values())

    def plan_group(
        self, group: Path, group_plan: GroupPlan | None, policy: Policy, *, dry_run: bool, now: float
    ) -> GroupPlan | None:
        """``max_size`` for a group just planned (evictions are part of its plan), then its facts."""
        verdict = None
        if group_plan is not None:
            group_plan, verdict = within_max_size(group_plan, policy)
        self._note_size(group, verdict)
        if not self._facts_needed:
            return group_plan
        try:
            device = os.stat(group).st_dev
        except OSError:
            self._facts.pop(group, None)
            return group_plan
        decisions = group_plan.decisions if group_plan is not None else ()
        if dry_run:
            freed = _dry_run_frees(self.root, group, decisions, policy, device, now, self._pending_trash)
            self._pending[device] = self._pending.get(device, 0) + freed
        previous = self._facts.get(group)
        self._facts[group] = group_space(group, decisions, policy, device=device, now=now, previous=previous)
        self._fresh.add(group)
        if not dry_run and self._releases_counted and not policy.trash.grace_seconds:
            _before_deleting(self._before, self._released, device, group, decisions)  # not trashed
        return group_plan

    def _note_size(self, group: Path, verdict: SizeVerdict | None) -> None:
        unmet = verdict.unmet_bytes if verdict is not None else 0
        limit = verdict.limit if verdict is not None else 0
        detail = _max_size_detail(verdict) if verdict is not None and unmet else ""
        self._note(("max_size", str(group)), unmet, limit, detail, directory=display_name(str(group)))

    # -- the free-space step -----------------------------------------------------------------------

    def relieve(
        self,
        replan: Callable[[Path], None],
        *,
        dry_run: bool,
        stop: Callable[[], bool] = lambda: False,
    ) -> tuple[list[FreeSpacePlan], list[Eviction]]:
        """Keep ``keep_free`` on every file system of the root: the plans (one per file system where a
        byte budget is in force, for the table, JSON and status) and the evictions to apply, one
        checkpoint each, the most expendable first (``evicting`` says one is applied).
        ``replan`` plans a group again, fresh, as part of the pass (updating its facts)."""
        plans: list[FreeSpacePlan] = []
        evictions: list[Eviction] = []
        reclaimable: list[Reclaimable] | None = None  # read once, only where a budget is in force
        self._before.clear()
        for device, groups in sorted(self._by_device().items()):
            if not any(group.budgeted for group in groups):
                self._unmet.pop(("keep_free", str(device)), None)  # no budget here (any more)
                continue
            if reclaimable is None:
                trashed = self.trash.reclaimable() if self.trash is not None else ()
                reclaimable = [*trashed, *self._pending_trash]
            fs_plan = self._fresh_plan(device, groups, reclaimable, replan, stop)
            if fs_plan is None:
                continue
            plans.append(fs_plan)
            self._note_free(fs_plan)
            _note_credit(fs_plan, self._released.credits.get(device, 0))
            evictions.extend(
                Eviction(decision.record.directory, decision, fs_plan)
                for decision in fs_plan.evicted_decisions()
            )
        _forget_gone_scopes(self._unmet, self.index)
        return plans, evictions

    def evicting(self, eviction: Eviction) -> None:
        """``eviction`` is applied (or shown, in a dry run): its checkpoint is no longer a candidate
        (if its deletion fails, the group's next plan says so)."""
        _drop_candidates(self._facts, eviction.directory, {eviction.decision.record.path})

    def still_short(self, eviction: Eviction) -> int:
        """Bytes its file system is short of now, read again (credited) just before ``eviction`` is
        applied: 0 once the space is there (another daemon on the same disk evicted for the same
        shortfall, a run was removed), and nothing more is evicted for it; -1 if it cannot be read now
        (the checkpoint stays: in doubt, keep)."""
        space = eviction.file_system.space
        free = _credited_free(self._released, space.device, space.path)
        if free is None:
            return -1
        self._before[eviction.directory] = (space.device, free)
        return eviction.file_system.short_now(free)

    def reclaim(
        self, plans: Sequence[FreeSpacePlan], purge: Callable[[list[str]], PurgeResult]
    ) -> PurgeResult:
        """``purge`` the trash entries ``plans`` take, each file system's free space read first: what
        the purge frees and ``statvfs`` does not show yet (btrfs) is a release, as for an eviction."""
        return _reclaimed(self._released, plans, purge)

    def released(self, directory: Path, freed: int) -> None:
        """``freed`` bytes were just deleted in ``directory``, its free space read just before (an
        eviction, a plan's deletions under keep_free): a release, unless the free space shows it."""
        device, before = self._before.pop(directory, (0, None))
        if freed and before is not None:
            _unless_shown(self._released, device, directory, Release(time.monotonic(), freed, before))

    def _fresh_plan(
        self,
        device: int,
        groups: list[GroupSpace],
        reclaimable: Sequence[Reclaimable],
        replan: Callable[[Path], None],
        stop: Callable[[], bool],
    ) -> FreeSpacePlan | None:
        """The file system's plan, with every checkpoint it evicts taken from a plan made this pass."""
        while True:
            space = self._read(device, groups)
            if space is None:
                return None
            fs_plan = free_space_plan(space, groups, reclaimable)
            stale = sorted({candidate.record.directory for candidate in fs_plan.evictions} - self._fresh)
            if not stale or stop():
                return fs_plan if not stale else dataclasses.replace(fs_plan, evictions=())
            for group in stale:
                self._fresh.add(group)  # planned again now, or gone: asked once per pass either way
                self._facts.pop(group, None)
                replan(group)
            groups = self._by_device().get(device, [])

    def _read(self, device: int, groups: list[GroupSpace]) -> FileSystemSpace | None:
        """``statvfs`` of the file system (through the root if it is on it, else its first group),
        credited with the releases it does not show yet (``releases.py``)."""
        paths = sorted(group.directory for group in groups)
        path = self.root if self.root in paths or not paths else paths[0]
        try:
            status = os.statvfs(path)
        except OSError:
            return None
        free = self._released.credited(device, _free(status), time.monotonic()) + self._pending.get(device, 0)
        return FileSystemSpace(device, path, status.f_blocks * status.f_frsize, free, status.f_frsize)

    def _by_device(self) -> dict[int, list[GroupSpace]]:
        """The remembered facts of every group still known and not blocked, by device."""
        by_device: dict[int, list[GroupSpace]] = {}
        for directory in list(self._facts):
            state = self.index.get(directory)
            if state is None:
                del self._facts[directory]
            elif not state.blocked:
                facts = self._facts[directory]
                by_device.setdefault(facts.device, []).append(facts)
        return by_device

    def _note_free(self, fs_plan: FreeSpacePlan) -> None:
        space = fs_plan.space
        detail = _free_detail(fs_plan) if fs_plan.unmet_bytes else ""
        self._note(
            ("keep_free", str(space.device)),
            fs_plan.unmet_bytes,
            fs_plan.keep_free_bytes,
            detail,
            path=display_name(str(space.path)),
        )

    # -- the daemon's checks between passes --------------------------------------------------------

    def schedule(self, now: float) -> None:
        """After a pass: when to look at the free space again (soon while a checkpoint is being
        written on a file system with keep_free); never when no keep_free is in force."""
        with_keep_free = [
            groups for groups in self._by_device().values() if any(group.keep_free for group in groups)
        ]
        if not with_keep_free:
            self._next_check = None
            return
        writing = any(group.growing for groups in with_keep_free for group in groups)
        self._next_check = now + (CHECK_WHILE_WRITING if writing else CHECK_AT_REST)

    def next_check(self) -> float | None:
        """When the next free-space check is due (monotonic), or None."""
        return self._next_check

    def pressure(self, now: float) -> bool:
        """If a check is due: re-read the growing checkpoints' sizes and the free space; True if
        ``keep_free`` now asks to take something (a pass should run), never while nothing may go."""
        if self._next_check is None or now < self._next_check:
            return False
        _refresh_growing(self._facts, time.time())
        self.schedule(now)
        reclaimable = self.trash.reclaimable() if self.trash is not None else ()
        for device, groups in self._by_device().items():
            space = self._read(device, groups)
            if space is None:
                continue
            fs_plan = free_space_plan(space, groups, reclaimable)
            if fs_plan.evictions or fs_plan.reclaimed:
                return True
        return False

    # -- budget_unmet / budget_met -----------------------------------------------------------------

    def unmet_bytes(self) -> int:
        """How far the worst byte budget is from being met (0: every budget holds)."""
        return max((unmet for _, unmet in self._unmet.values()), default=0)

    def _note(self, scope: tuple[str, str], unmet: int, limit: int, detail: str, **where: str) -> None:
        """Log a budget becoming unmet (or its limit changing while unmet), or being met again."""
        previous = self._unmet.get(scope)
        if unmet:
            if previous is None or previous[0] != limit:
                logger.warning(
                    "budget_unmet",
                    budget=scope[0],
                    **where,
                    unmet_bytes=unmet,
                    limit_bytes=limit,
                    detail=detail,
                )
            self._unmet[scope] = (limit, unmet)
        elif previous is not None:
            del self._unmet[scope]
            logger.info("budget_met", budget=scope[0], **where)


def _max_size_detail(verdict: SizeVerdict) -> str:
    """What a ``budget_unmet`` record of an unmet ``max_size`` says."""
    kept = verdict.kept_bytes - verdict.evicted_bytes
    return (
        f"its kept checkpoints take {human_bytes(kept)}, {human_bytes(verdict.unmet_bytes)} over max_size "
        f"{human_bytes(verdict.limit)} once everything that may go is evicted; "
        f"{_remaining_text(verdict.remaining)} may not be evicted"
    )


# -- releases statvfs may not show yet (releases.py) --------------------------------------------------


def _reclaimed(
    ledger: ReleaseLedger, plans: Sequence[FreeSpacePlan], purge: Callable[[list[str]], PurgeResult]
) -> PurgeResult:
    """Purge what ``plans`` reclaim from the trash; the bytes each file system's purged entries held
    are a release there (read before the purge), unless the free space read after it shows them."""
    reclaiming = [fs_plan for fs_plan in plans if fs_plan.reclaimed]
    before = {
        fs_plan.space.device: (
            fs_plan.space.path,
            _credited_free(ledger, fs_plan.space.device, fs_plan.space.path),
        )
        for fs_plan in reclaiming
    }
    result = purge([item.key for fs_plan in reclaiming for item in fs_plan.reclaimed])
    now = time.monotonic()
    for device, (path, free) in before.items():
        freed = sum(entry.bytes for entry in result.purged if entry.device == device)
        if freed and free is not None:
            _unless_shown(ledger, device, path, Release(now, freed, free))
    return result


def _dry_run_frees(
    root: Path,
    group: Path,
    decisions: Sequence[Decision],
    policy: Policy,
    device: int,
    now: float,
    trash: list[Reclaimable],
) -> int:
    """What ``group``'s deletions free, as the real run will apply them. Moved into the root's trash (a
    trash grace, the same mount) they free nothing: each becomes an entry ``keep_free`` may take back,
    added to ``trash`` after everything already there, in the order the real run moves them in (so a
    dry run shows the purge the real run makes). Deleted at once, what ``freed_bytes`` says."""
    if policy.trash.grace_seconds <= 0 or not _moved_to_trash(root, group):
        return freed_bytes(decisions)
    for decision in GroupPlan(group, tuple(decisions)).deletions:
        record = decision.record  # a microsecond apart: moved one after another, from ``now``
        trash.append(Reclaimable(record.relative_path, device, record.bytes, now + len(trash) * 1e-6))
    return 0


def _moved_to_trash(root: Path, group: Path) -> bool:
    """Whether a deletion in ``group`` would be moved into the root's trash: the group on the same mount
    as the trash (as the root, if there is no trash yet); else it is deleted at once (another file
    system or mount: ``trash_bypassed``). In doubt (either cannot be read) yes: it frees nothing."""
    trash = root / TRASH_DIRECTORY_NAME
    try:
        return _mount_of(group) == _mount_of(trash if os.path.lexists(trash) else root)
    except OSError:
        return True


def _mount_of(path: Path) -> tuple[int, int | None]:
    """The file system and mount ``path`` is on (the mount unknown on a kernel before statx's)."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        status = status_at(parent, path.name)
    finally:
        os.close(parent)
    return status.device, status.mount_id


def _free(status: os.statvfs_result) -> int:
    return status.f_bavail * status.f_frsize


def free_space(path: Path) -> int | None:
    """Bytes available to a writer that is not root on ``path``'s file system (df's Avail); None if
    it cannot be read."""
    try:
        status = os.statvfs(path)
    except (OSError, ValueError):
        return None
    return _free(status)


def _credited_free(ledger: ReleaseLedger, device: int, path: Path) -> int | None:
    """The free space on ``path``'s file system now, credited with its unseen releases; None if it
    cannot be read."""
    free = free_space(path)
    return None if free is None else ledger.credited(device, free, time.monotonic())


def _unless_shown(ledger: ReleaseLedger, device: int, directory: Path, release: Release) -> None:
    """``release`` is recorded unless the free space read again right after it shows at least half of
    it (tmpfs, ext4, XFS show it at once: a trainer writing later does not make it look unseen); btrfs
    shows it at its next commit, a file a reader keeps open when it is closed."""
    after = _credited_free(ledger, device, directory)
    if after is None or 2 * (after - release.free_before) < release.bytes:
        ledger.record(device, release)


def _before_deleting(
    before: dict[Path, tuple[int, int]],
    ledger: ReleaseLedger,
    device: int,
    group: Path,
    decisions: Sequence[Decision],
) -> None:
    """A group's plan is about to delete: the free space read first (``SpaceKeeper.released``)."""
    if any(decision.action is Action.DELETE for decision in decisions):
        free = _credited_free(ledger, device, group)
        if free is not None:
            before[group] = (device, free)


def _note_credit(fs_plan: FreeSpacePlan, credited: int) -> None:
    """A plan made with unseen releases credited is logged, at info when they spare something (the
    free space read is short without them), else at debug."""
    space = fs_plan.space
    if not credited:
        return
    read = space.free_bytes - credited
    sparing = fs_plan.short_now(read) > fs_plan.short_bytes
    logger.log(
        logging.INFO if sparing else logging.DEBUG,
        "free_space_credited",
        path=display_name(str(space.path)),
        credited_bytes=credited,
        free_bytes=read,
    )


def space_status(fs_plan: FreeSpacePlan) -> str:
    """A file system for ``STATUS=``: ``31.2 GiB free on /data (keep_free 50.0 GiB + next save 12.4 GiB)``,
    the free space being what is left once this pass's evictions are done."""
    free = fs_plan.space.free_bytes + fs_plan.reclaimed_bytes + fs_plan.evicted_bytes
    return (
        f"{human_bytes(free)} free on {display_name(str(fs_plan.space.path))} (keep_free "
        f"{human_bytes(fs_plan.keep_free_bytes)} + next save {human_bytes(fs_plan.next_save.bytes)})"
    )


def _drop_candidates(facts_by_group: dict[Path, GroupSpace], directory: Path, paths: set[Path]) -> None:
    """Evicted checkpoints are no longer candidates (if a deletion fails, the next plan says so)."""
    facts = facts_by_group.get(directory)
    if facts is not None:
        kept = tuple(candidate for candidate in facts.candidates if candidate.record.path not in paths)
        facts_by_group[directory] = dataclasses.replace(facts, candidates=kept)


def _forget_gone_scopes(unmet: dict[tuple[str, str], tuple[int, int]], index: GroupIndex) -> None:
    """Budgets of groups no longer known are neither met nor unmet: forgotten silently."""
    for scope in [scope for scope in unmet if scope[0] == "max_size"]:
        if index.get(Path(scope[1])) is None:
            del unmet[scope]


def _free_detail(fs_plan: FreeSpacePlan) -> str:
    """What ``budget_unmet`` says of a file system short of ``keep_free``."""
    taken = fs_plan.reclaimed_bytes + fs_plan.evicted_bytes
    asked = f"keep_free {human_bytes(fs_plan.keep_free_bytes)}"
    return (
        f"{human_bytes(fs_plan.space.free_bytes)} free, {asked} + next save "
        f"{human_bytes(fs_plan.next_save.bytes)} ({fs_plan.next_save.basis}): "
        f"{human_bytes(fs_plan.short_bytes)} short; everything that may go frees "
        f"{human_bytes(taken)}; the rest is kept for resuming or pinned (last.ckpt and its "
        "target, the newest checkpoint of each group, the rank-1 bests, pins and resume sources)"
    )


def _refresh_growing(facts_by_group: dict[Path, GroupSpace], now: float) -> None:
    """Each checkpoint being written, as large as it is now (gone or replaced: no longer written)."""
    for directory, facts in list(facts_by_group.items()):
        if facts.growing:
            now_sized = (item for item in map(grown, facts.growing) if item is not None)
            growing = tuple(item for item in now_sized if recently_modified(item.mtime_ns, now))
            facts_by_group[directory] = dataclasses.replace(facts, growing=growing)


def _remaining_text(remaining: Sequence[str]) -> str:
    shown = ", ".join(remaining[:SHOWN_REMAINING])
    more = len(remaining) - SHOWN_REMAINING
    return shown + (f" and {more} more" if more > 0 else "") if remaining else "nothing else"


def grown(item: Growing) -> Growing | None:
    """``item`` with its size now; None if it is gone or another file took its name.

    A directory checkpoint's size is its files' bytes and its time their newest mtime (its own
    ``st_size`` and ``st_mtime`` say nothing of a shard still being appended to)."""
    try:
        status = os.stat(item.path, follow_symlinks=False)
    except OSError:
        return None
    if status.st_ino != item.inode:
        return None
    if stat.S_ISDIR(status.st_mode):
        try:
            summary = summarize_tree(str(item.path), follow_symlinks=False)
        except OSError:  # vanished or moved about while walked: as it was until the next check
            return item
        return dataclasses.replace(item, written=summary.bytes, mtime_ns=summary.newest_mtime_ns)
    return dataclasses.replace(item, written=status.st_size, mtime_ns=status.st_mtime_ns)
