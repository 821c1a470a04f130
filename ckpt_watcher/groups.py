"""What the reconcile core remembers about each directory (group) between passes, indexed by path.

The index is a tree of the directories below the root, so what a change costs is in proportion to the
subtree it touches: a burst of 4,000 new run directories beside 4,000 known ones is 4,000 small
steps, never 4,000 x 4,000 comparisons. Everything held per group is bounded by its entries.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_watcher.compact import PackedHashes
from ckpt_watcher.links import Link, LinkLister, LinkPins, link_reasons, list_links
from ckpt_watcher.naming import Kind, Naming
from ckpt_watcher.records import DELETING_PREFIX, TRASH_DIRECTORY_NAME, FileIdentity
from ckpt_watcher.scan import (
    CompletenessCache,
    NamingLookup,
    ScanProblem,
    is_group_directory,
    walk_directories,
)

# A last.ckpt symlink missing from one listing is trusted gone only when a listing this much later
# still misses it (Lightning replaces the link by unlink + symlink).
LINK_RECHECK_SECONDS = 1.0


@dataclass
class LastLink:
    """A ``last`` symlink as last seen: its target, since when a listing has missed it, and when it was
    made (its own mtime, None if unknown): while it is missed, the plan still reads it as there."""

    target: Path
    missing_since: float | None = None
    made_ns: int | None = None


@dataclass(slots=True)
class Tally:
    """Checkpoints and their bytes by kind (``step``, ``best``, ``last``): what a group keeps, what a
    pass deleted. Only kinds with a checkpoint have an entry."""

    checkpoints: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, size: int) -> None:
        """Count one checkpoint of ``kind`` holding ``size`` bytes."""
        self.checkpoints[kind] = self.checkpoints.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + size

    def merge(self, other: Tally, sign: int = 1) -> None:
        """Add ``other`` to this tally (``sign=-1``: take it away)."""
        for kind, count in other.checkpoints.items():
            remaining = self.checkpoints.get(kind, 0) + sign * count
            remaining_bytes = self.bytes.get(kind, 0) + sign * other.bytes.get(kind, 0)
            if remaining:
                self.checkpoints[kind], self.bytes[kind] = remaining, remaining_bytes
            else:
                self.checkpoints.pop(kind, None)
                self.bytes.pop(kind, None)

    def copy(self) -> Tally:
        """An independent copy."""
        return Tally(dict(self.checkpoints), dict(self.bytes))


@dataclass
class GroupState:
    """One directory's memory: verdicts by file identity, what was seen, its links and configs, and
    what its last plan kept (``kept``, summed over every group by the index)."""

    cache: CompletenessCache = field(default_factory=CompletenessCache)
    seen: PackedHashes = field(default_factory=PackedHashes)  # hash((name, complete)) of each one seen
    suspicious: set[str] = field(default_factory=set)
    link_targets: dict[Path, str] = field(default_factory=dict)
    last_links: dict[str, LastLink] = field(default_factory=dict)
    protect_from: Mapping[Path, str] = field(default_factory=dict)
    blocked: bool = False  # nothing is planned here (an invalid per-run policy, or held)
    held: bool = False  # a protect_from config its policy names exists but was never read
    kept: Tally | None = None  # None: nothing kept (most directories of a large tree hold no checkpoint)
    # Its links reach beyond it (``reaches_beyond``): listed again in every pass, also one that plans
    # other groups, as what they protect can change with no event here.
    links_reach_beyond: bool = False
    # The identities of the incomplete last checkpoints warned about (``last_checkpoint_incomplete``).
    warned_incomplete_last: tuple[FileIdentity, ...] = ()


def reaches_beyond(group: Path, links: Iterable[Link]) -> bool:
    """Whether any of ``group``'s links protects something outside it: a target in another group (maybe
    through another link, a ``latest`` directory link re-pointed with no event here), outside the root
    (kept by identity) or not there at all. Lightning's own links stay in their directory."""
    return any(link.target.parent != group or link.identity is not None or link.dangles for link in links)


class GroupIndex:
    """The groups below one root: which group a changed path belongs to, and each group's state,
    indexed by directory with each directory's children; plus the union of their ``protect_from``
    configs and the groups holding symlinks (kept up to date, never recomputed)."""

    def __init__(self, root: Path, naming_for: NamingLookup) -> None:
        self.root = root
        self._naming_for = naming_for
        self._states: dict[Path, GroupState] = {}
        self._children: dict[Path, set[Path]] = {}
        self._config_users: dict[Path, Mapping[Path, str]] = {}
        self._configs: dict[Path, str] | None = None
        self._linked: set[Path] = set()
        self._rechecks: dict[Path, float] = {}
        self._kept = Tally()

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[Path]:
        return iter(list(self._states))

    def __contains__(self, directory: object) -> bool:
        return directory in self._states

    def get(self, directory: Path) -> GroupState | None:
        """The state of a known group, or None."""
        return self._states.get(directory)

    def state(self, directory: Path) -> GroupState:
        """The state of ``directory``, created (and linked into the tree) on first use."""
        state = self._states.get(directory)
        if state is None:
            state = self._states[directory] = GroupState()
            self._link_into_tree(directory)
        return state

    def _link_into_tree(self, directory: Path) -> None:
        """Record ``directory`` as a child of its parent, and so on up to the first known node."""
        while directory != self.root and self.root in directory.parents:
            siblings = self._children.setdefault(directory.parent, set())
            if directory in siblings:
                return
            siblings.add(directory)
            directory = directory.parent

    def below(self, top: Path) -> Iterator[Path]:
        """``top`` and every known group below it, depth first (only the subtree is visited)."""
        pending = [top]
        while pending:
            directory = pending.pop()
            if directory in self._states:
                yield directory
            pending.extend(self._children.get(directory, ()))

    def forget(self, top: Path) -> None:
        """Drop ``top`` and everything known below it (the directory vanished or was replaced)."""
        doomed: list[Path] = []
        pending = [top]
        while pending:
            directory = pending.pop()
            doomed.append(directory)
            pending.extend(self._children.pop(directory, ()))
        for directory in doomed:
            state = self._states.pop(directory, None)
            if state is not None and state.kept is not None:
                self._kept.merge(state.kept, sign=-1)
            if self._config_users.pop(directory, None) is not None:
                self._configs = None
            self._linked.discard(directory)
            self._rechecks.pop(directory, None)
        siblings = self._children.get(top.parent)
        if siblings is not None:
            siblings.discard(top)

    def set_protect_from(self, directory: Path, configs: Mapping[Path, str]) -> None:
        """The protect_from configs that apply in ``directory`` now."""
        state = self.state(directory)
        if state.protect_from == configs:
            return
        state.protect_from = configs
        if configs:
            self._config_users[directory] = configs
        else:
            self._config_users.pop(directory, None)
        self._configs = None

    def configs(self) -> dict[Path, str]:
        """Every protect_from config some known group uses, path -> label (recomputed only on change)."""
        if self._configs is None:
            union: dict[Path, str] = {}
            for mapping in self._config_users.values():
                for config, label in mapping.items():
                    union.setdefault(config, label)
            self._configs = union
        return dict(self._configs)

    def set_kept(self, directory: Path, kept: Tally) -> None:
        """What ``directory``'s latest plan keeps (it replaces what its previous plan kept)."""
        state = self.state(directory)
        if state.kept is not None:
            self._kept.merge(state.kept, sign=-1)
        self._kept.merge(kept)
        state.kept = kept if kept.checkpoints else None

    def kept(self) -> Tally:
        """What the latest plan of every known group keeps, summed (kept up to date, never recomputed):
        after an event pass, the groups it planned count as planned now, the others as last planned."""
        return self._kept.copy()

    def set_link_targets(self, directory: Path, targets: dict[Path, str]) -> None:
        """The resolved targets of the symlinks ``directory`` held at its last scan."""
        self.state(directory).link_targets = targets
        if targets:
            self._linked.add(directory)
        else:
            self._linked.discard(directory)

    def last_link_pins(
        self, group: Path, links: Iterable[Link], now: float
    ) -> tuple[dict[Path, str], list[Link]]:
        """Remember ``group``'s ``last`` links as listed at ``now`` (``remember_last_links``); the pins
        and the links as last seen of those missing from this listing, re-checked when they are due."""
        state = self.state(group)
        state.last_links, pins, missing, recheck_at = remember_last_links(
            state.last_links, os.path.relpath(group, self.root), links, now
        )
        if recheck_at is not None:
            self.recheck(group, recheck_at)
        return pins, missing

    def link_pins(self, namings: Mapping[Path, Naming], lister: LinkLister = list_links) -> LinkPins:
        """List the symlinks of every group of a pass (``namings``: each group's naming; ``lister``:
        the storage's ``list_links``) before any is planned: the targets links point into each group,
        from this listing or, for the groups outside the pass, as remembered."""
        pins = LinkPins()
        now = time.monotonic()
        beyond = [group for group in self._linked - namings.keys() if self._states[group].links_reach_beyond]
        listed = {**namings, **{group: self._naming_for(group) for group in beyond}}
        for group, naming in listed.items():
            self.list_group_links(pins, group, naming, lister, now)
        pins.add(self.link_targets_outside(set(listed)))
        return pins

    def list_group_links(
        self, pins: LinkPins, group: Path, naming: Naming, lister: LinkLister, now: float
    ) -> None:
        """List ``group``'s symlinks into ``pins`` (``link_pins``; also for a group a pass adds, as
        keep_free's re-plan of one outside it)."""
        links = lister(group, self.root, naming)
        if links is None:  # cannot be listed now: what its links protected at its last listing stays
            pins.add(self._states[group].link_targets if group in self._states else {}, owner=group)
            return
        targets, (missing, missed) = link_reasons(links), self.last_link_pins(group, links, now)
        self.set_link_targets(group, {**missing, **targets})  # (a pass that does not list it: these)
        self.state(group).links_reach_beyond = bool(missing) or reaches_beyond(group, links)
        pins.add(targets, owner=group)
        pins.add(missing)
        pins.add_beyond_paths(group, [*links, *missed])
        pins.add_listed(group, [*links, *missed])

    def link_targets_outside(self, groups: set[Path]) -> dict[Path, str]:
        """Link targets remembered for the groups that are not in ``groups`` (not scanned this pass)."""
        targets: dict[Path, str] = {}
        for directory in self._linked:
            if directory not in groups:
                for target, reason in self._states[directory].link_targets.items():
                    targets.setdefault(target, reason)
        return targets

    def recheck(self, directory: Path, at: float) -> None:
        """Look at ``directory`` again at monotonic time ``at`` (or earlier, if already due earlier)."""
        if directory in self._states:
            current = self._rechecks.get(directory)
            self._rechecks[directory] = at if current is None else min(current, at)

    def next_recheck(self) -> float | None:
        """When the earliest re-check is due, or None."""
        return min(self._rechecks.values(), default=None)

    def take_due_rechecks(self, now: float) -> set[Path]:
        """The groups whose re-check is due at ``now``; they are no longer pending."""
        due = {directory for directory, at in self._rechecks.items() if at <= now}
        for directory in due:
            del self._rechecks[directory]
        return due

    def clear_rechecks(self) -> None:
        """A full pass looks at everything anyway."""
        self._rechecks.clear()

    # -- what a change touches --------------------------------------------------------------------

    def group_of(self, path: Path) -> Path | None:
        """The group ``path`` belongs to: its directory, or the one holding the directory checkpoint
        (or the leftover of a removal) it is inside (``run/checkpoint-400/x`` belongs to ``run``);
        None for the root, outside it, or in a trash (``.ckpt-trash`` at any depth)."""
        group = GroupFinder(self.root, self._naming_for).group_of(os.fspath(path))
        return Path(group) if group is not None else None

    def touched(
        self,
        files: Iterable[str],
        trees: Iterable[str],
        problems: list[ScanProblem],
        *,
        stop: threading.Event | None = None,
    ) -> set[Path]:
        """The groups to plan again for these changed files and directories: new directories are
        walked, what vanished is forgotten. The work is in proportion to what changed: each directory
        an event names is classified once, however deep it is and however many events name it.
        ``stop`` ends it between two events (with what it found so far)."""
        finder = GroupFinder(self.root, self._naming_for)
        found: set[str] = set()
        for path in files:
            if stop is not None and stop.is_set():
                break
            if (group := finder.group_of(os.path.normpath(path))) is not None:
                found.add(group)
        for tree in trees:
            if stop is not None and stop.is_set():
                break
            found.update(self._touched_tree(finder, os.path.normpath(tree), problems))
        return {Path(group) for group in found}

    def _touched_tree(self, finder: GroupFinder, top: str, problems: list[ScanProblem]) -> set[str]:
        """The groups a directory that appeared, moved or vanished touches: its parent group, and, if
        it is a group itself, every group below it now; the groups known below it that are gone are
        forgotten."""
        parent = finder.group_of(top)
        if parent is None:
            return set()
        if parent != os.path.dirname(top):
            return {parent}  # inside a directory checkpoint or a leftover: no group is there or below
        for known in list(self.below(Path(top))):
            if is_group_directory(known) is False:  # (None: cannot be looked at now, which is not gone)
                self.forget(known)
        if not self._is_own_group(Path(top), Path(parent)):
            return {parent}
        return {parent, *map(os.fspath, walk_directories(Path(top), self._naming_for, problems))}

    def _is_own_group(self, directory: Path, parent: Path) -> bool:
        """True if ``directory`` is a plain directory (a group), not a checkpoint or inside one."""
        if directory.parent != parent or directory.name.startswith(DELETING_PREFIX):
            return False
        if not os.path.isdir(directory) or os.path.islink(directory):
            return False
        return self._naming_for(parent).classify(directory.name, directory=True).kind is Kind.UNKNOWN


def remember_last_links(
    remembered: Mapping[str, LastLink], group: str, links: Iterable[Link], now: float
) -> tuple[dict[str, LastLink], dict[Path, str], list[Link], float | None]:
    """A group's ``last`` links as listed at ``now`` (``group``: its path from the root), after those
    ``remembered``: what to remember now, pins for the targets of those missing from this listing,
    those links as last seen, and when to look again (None: nothing missing).

    A link missing from one listing keeps its target pinned, and the plan reads it as still there
    (the ``save_last="link"`` rules keep the save it is about to name), until a listing
    LINK_RECHECK_SECONDS later still misses it: Lightning removes ``last.ckpt`` before it links it
    again, so one listing between the two never takes that protection away."""
    current = {link.name: link for link in links if link.is_last}
    kept: dict[str, LastLink] = {}
    pins: dict[Path, str] = {}
    missing: list[Link] = []
    recheck_at: float | None = None
    for name, link in remembered.items():
        missing_since = link.missing_since if link.missing_since is not None else now
        if name in current or now - missing_since >= LINK_RECHECK_SECONDS:
            continue
        relative = os.path.normpath(os.path.join(group, name))
        pins[link.target] = f"target of {relative} (missing from this listing; re-checked)"
        kept[name] = LastLink(link.target, missing_since, link.made_ns)
        missing.append(Link(name, relative, True, link.target, made_ns=link.made_ns))
        due = missing_since + LINK_RECHECK_SECONDS
        recheck_at = due if recheck_at is None else min(recheck_at, due)
    for name, listed in current.items():
        kept[name] = LastLink(listed.target, made_ns=listed.made_ns)
    return kept, pins, missing, recheck_at


class GroupFinder:
    """Which group a path belongs to, remembering the answer for each directory it met (for one batch
    of events: a per-run policy may change the naming later), so a burst of events deep in one tree
    classifies each directory once instead of every ancestor of every path.

    The group of a path is the group of its directory: the root is one; a directory inside a directory
    checkpoint or a removal's leftover is in the same group as its parent; one whose own name is a
    checkpoint (or leftover) name belongs to its parent; a trash and all in it is in no group; any
    other directory is a group.
    """

    def __init__(self, root: Path, naming_for: NamingLookup) -> None:
        self._root = os.fspath(root)
        self._naming_for = naming_for
        self._group: dict[str, str | None] = {self._root: self._root}

    def group_of(self, path: str) -> str | None:
        """The group of ``path`` (absolute, normalized); None for the root itself or outside it."""
        if path == self._root or os.path.basename(path) == TRASH_DIRECTORY_NAME:
            return None
        return self._of_directory(os.path.dirname(path))

    def _of_directory(self, directory: str) -> str | None:
        unknown = []
        ancestor = directory
        while ancestor not in self._group:
            parent = os.path.dirname(ancestor)
            if parent == ancestor:  # the file system's root, and the watched root was not on the way
                self._group[ancestor] = None
                break
            unknown.append(ancestor)
            ancestor = parent
        for current in reversed(unknown):  # from the top down: each one's parent is known
            parent = os.path.dirname(current)
            above = self._group[parent]
            if above is None or above != parent:  # outside the root, or inside a checkpoint
                self._group[current] = above
            elif os.path.basename(current) == TRASH_DIRECTORY_NAME:  # a trash is never a group
                self._group[current] = None
            elif self._is_checkpoint_or_leftover(parent, os.path.basename(current)):
                self._group[current] = parent
            else:
                self._group[current] = current
        return self._group[directory]

    def _is_checkpoint_or_leftover(self, parent: str, name: str) -> bool:
        if name.startswith(DELETING_PREFIX):
            return True
        return self._naming_for(Path(parent)).classify(name, directory=True).kind is not Kind.UNKNOWN
