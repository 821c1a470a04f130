"""Symlinks and what they protect, across groups: listed before a pass plans any group.

``last.ckpt -> ../other-run/epoch=...ckpt`` protects a checkpoint of another group. The planner sees
one group at a time (so a pass never holds the whole tree in memory), so the symlinks of every group
in the pass are listed first, cheaply (a directory listing and a ``realpath`` per link; no file is
opened), and each group is planned with the targets that links elsewhere point into it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ckpt_watcher.filesystem import PathResolver
from ckpt_watcher.lock import LOCK_FILE_NAME
from ckpt_watcher.naming import Kind, Naming
from ckpt_watcher.plan import LinkInto
from ckpt_watcher.records import DELETING_PREFIX, TRASH_DIRECTORY_NAME


@dataclass(frozen=True, slots=True)
class Link:
    """One symlink of a group: its name, its path relative to the root, whether it is a ``last``
    checkpoint, and its resolved target."""

    name: str
    relative_path: str
    is_last: bool
    target: Path
    # (device, inode) of what the link reaches, taken only when its target resolves outside the root:
    # the same file can be one of the root's checkpoints reached through another path (a bind mount of
    # the root, or the trainer's own mount path of the volume in a sidecar), kept by identity then.
    identity: tuple[int, int] | None = None
    dangles: bool = False  # its target is outside the root and not there from here
    made_ns: int | None = None  # a ``last`` link's own mtime (when it was made), None if unknown


# What lists a group's links (``list_links``, or a storage's): None if the group cannot be listed now.
LinkLister = Callable[[Path, Path, Naming], list[Link] | None]


def list_links(directory: Path, root: Path, naming: Naming) -> list[Link] | None:
    """The symlinks in ``directory`` (the names a scan would make records of), resolved now; None if
    the directory is there but cannot be listed (what its links protect is then unknown)."""
    names: list[str] = []
    try:
        with os.scandir(directory) as entries:
            names = [
                entry.name
                for entry in entries
                if entry.is_symlink()
                and entry.name not in (LOCK_FILE_NAME, TRASH_DIRECTORY_NAME)
                and not entry.name.startswith(DELETING_PREFIX)
            ]
    except FileNotFoundError:
        return []  # gone: no link protects anything from it
    except OSError:
        return None  # unreadable (EACCES, EIO): the scan says so
    prefix = os.path.relpath(directory, root)
    resolver = PathResolver()  # a chain of links, each listed, is resolved once
    links: list[Link] = []
    for name in names:
        target = resolver.resolve(directory / name)
        identity: tuple[int, int] | None = None
        dangles = False
        if target != root and root not in target.parents:
            try:
                status = os.stat(directory / name)  # follows the link: what it reaches now (opens nothing)
            except (OSError, ValueError):
                dangles = True
            else:
                identity = (status.st_dev, status.st_ino)
        is_last = naming.classify(name).kind is Kind.LAST
        links.append(
            Link(
                name=name,
                relative_path=name if prefix == "." else os.path.join(prefix, name),
                is_last=is_last,
                target=target,
                identity=identity,
                dangles=dangles,
                made_ns=_made_ns(directory / name) if is_last else None,
            )
        )
    return links


def _made_ns(path: Path) -> int | None:
    """When the link at ``path`` was made (its own mtime, read with lstat), None if it is gone."""
    try:
        return os.lstat(path).st_mtime_ns
    except OSError:
        return None


def links_down(group: Path, links: Iterable[Link]) -> list[LinkInto]:
    """``group``'s ``last`` links whose target is in a directory below it (Lightning's ``dirpath`` with
    ``filename="best/..."``): the group of the target is planned with them (``plan.LinkInto``), so
    the checkpoint the link is about to move to is kept there. A link into a sibling or another run
    is not Lightning's own pattern (its current target is kept as any link's is)."""
    return [
        LinkInto(link.relative_path, link.target, link.made_ns)
        for link in links
        if link.is_last and group in link.target.parent.parents
    ]


def _by_precedence(links: Iterable[Link]) -> list[Link]:
    """``last`` links first, then by path: the first link naming a target gives its reason."""
    return sorted(links, key=lambda link: (not link.is_last, link.relative_path))


def link_reasons(links: Iterable[Link]) -> dict[Path, str]:
    """Each target with the reason it is kept, ``target of run/last.ckpt``: the rule of
    ``plan.symlink_targets`` (a ``last`` link names a shared target, else the first link by path)."""
    reasons: dict[Path, str] = {}
    for link in _by_precedence(links):
        reasons.setdefault(link.target, f"target of {link.relative_path}")
    return reasons


def link_identities(links: Iterable[Link]) -> dict[tuple[int, int], str]:
    """The identities of targets outside the root, each with the reason ``link_reasons`` gives its
    target: ``plan`` keeps the checkpoint that is that file, whatever path the link took to it."""
    identities: dict[tuple[int, int], str] = {}
    for link in _by_precedence(links):
        if link.identity is not None:
            identities.setdefault(link.identity, f"target of {link.relative_path}")
    return identities


def dangling_namesakes(directory: Path, links: Iterable[Link]) -> dict[Path, str]:
    """For each link whose target is outside the root and not there from here, the entry of the
    link's own directory with the target's name. A trainer in another mount namespace writes
    ``last.ckpt -> /ckpts/run/epoch=...ckpt``, which dangles where the volume is mounted elsewhere;
    the file beside the link with that name is most likely what it means, so it is kept (in doubt)."""
    namesakes: dict[Path, str] = {}
    for link in _by_precedence(links):
        if link.dangles and link.target.name not in ("", link.name):
            namesakes.setdefault(
                directory / link.target.name,
                f"named like the target of {link.relative_path}, which is outside the root and not "
                "found from here (kept in doubt)",
            )
    return namesakes


class LinkPins:
    """Pins from links, indexed by every directory above their target, so each group gets those that
    point into it (a target inside a directory checkpoint keeps that checkpoint: ``plan``), with every
    group whose links point there: another group's link still protects a target when the owner's own
    link moved on during the pass."""

    def __init__(self) -> None:
        self._by_directory: dict[Path, dict[Path, dict[Path | None, str]]] = defaultdict(dict)
        self.identities: dict[tuple[int, int], str] = {}  # targets outside the root (link_identities)
        self._down: dict[Path, list[LinkInto]] = defaultdict(list)  # links_down, by target directory
        self._listed: dict[Path, list[LinkInto]] = {}  # each group's own ``last`` links, as listed

    def links_into(self, group: Path) -> list[LinkInto]:
        """The ``last`` links of directories above ``group`` that point into it (``plan``'s
        ``links_into``): the ``save_last="link"`` rules keep what they are about to move to."""
        return list(self._down.get(group, ()))

    def listed_links(self, group: Path) -> list[LinkInto]:
        """``group``'s own ``last`` links into its directory as this pass listed them before its scan
        (``plan``'s ``listed_links``): one the scan then misses was removed a moment ago (Lightning
        removes ``last.ckpt`` before it links it again), and the plan reads it as still there."""
        return self._listed.get(group, [])

    def add_listed(self, group: Path, links: Iterable[Link]) -> None:
        """Note ``group``'s own ``last`` links (those into its own directory) as listed."""
        own = [
            LinkInto(link.name, link.target, link.made_ns)
            for link in links
            if link.is_last and link.target.parent == group
        ]
        if own:
            self._listed[group] = own

    def add_beyond_paths(self, group: Path, links: list[Link]) -> None:
        """What ``group``'s links protect that no path under the root names: targets outside the root,
        by identity (``link_identities``), the namesakes of dangling ones (``dangling_namesakes``),
        and what its ``last`` links down into a directory below it are about to name (``links_down``,
        for the plan of that directory: ``links_into``)."""
        self.add(dangling_namesakes(group, links))
        for identity, reason in link_identities(links).items():
            self.identities.setdefault(identity, reason)
        for link in links_down(group, links):
            self._down[link.target.parent].append(link)

    def add(self, targets: Mapping[Path, str], *, owner: Path | None = None) -> None:
        """Targets with their reasons; ``owner`` is the group holding the links (None: pin anywhere)."""
        for target, reason in targets.items():
            for directory in target.parents:
                self._by_directory[directory].setdefault(target, {}).setdefault(owner, reason)

    def for_group(self, group: Path) -> dict[Path, str]:
        """The pins for planning ``group``: targets in it or below it that a link names, its own links
        too (the planner finds them among its records as they are at its scan, unless one was removed
        between this listing and that scan: Lightning removes ``last.ckpt`` before it links it again).
        A link elsewhere gives the reason when there is one."""
        pins: dict[Path, str] = {}
        for target, owners in self._by_directory.get(group, {}).items():
            reasons = [reason for owner, reason in owners.items() if owner != group]
            pins[target] = reasons[0] if reasons else next(iter(owners.values()))
        return pins
