"""GroupIndex without a disk: which group a path belongs to, the subtree a change touches, the memory."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ckpt_watcher.groups import GroupIndex
from ckpt_watcher.links import Link, LinkLister
from ckpt_watcher.naming import DEFAULT_NAMING, Naming
from ckpt_watcher.plan import LinkInto
from ckpt_watcher.reconcile import _forget_unwalked
from ckpt_watcher.records import DELETING_PREFIX
from ckpt_watcher.scan import ScanProblem

ROOT = Path("/ckpt")
HUGGING_FACE = Naming.from_templates(step="checkpoint-{step}")


def _index(naming: Naming = DEFAULT_NAMING) -> GroupIndex:
    return GroupIndex(ROOT, lambda directory: naming)


GROUP_OF = [
    # (path, naming, group)
    (ROOT / "run" / "epoch=00-step=000100-train.ckpt", DEFAULT_NAMING, ROOT / "run"),
    (ROOT / "epoch=00-step=000100-train.ckpt", DEFAULT_NAMING, ROOT),
    (ROOT / "a" / "b" / "c" / "notes.txt", DEFAULT_NAMING, ROOT / "a" / "b" / "c"),
    # inside a directory checkpoint: the group holding the checkpoint
    (ROOT / "run" / "epoch=00-step=000100-train.ckpt" / "latest", DEFAULT_NAMING, ROOT / "run"),
    (ROOT / "run" / "epoch=00-step=000100-train.ckpt" / "zero" / "shard", DEFAULT_NAMING, ROOT / "run"),
    (ROOT / "run" / "checkpoint-400" / "trainer_state.json", HUGGING_FACE, ROOT / "run"),
    (ROOT / "run" / "checkpoint-400", HUGGING_FACE, ROOT / "run"),
    (ROOT / "run" / "checkpoints" / "x", HUGGING_FACE, ROOT / "run" / "checkpoints"),  # not a step name
    # inside the leftover of a removal (renamed before it is emptied): the group it was deleted from
    (
        ROOT / "run" / f"{DELETING_PREFIX}i7-epoch=00-step=000100-train.ckpt" / "a" / "b",
        DEFAULT_NAMING,
        ROOT / "run",
    ),
    (ROOT / "run" / f"{DELETING_PREFIX}i7-checkpoint-400" / "zero" / "x", HUGGING_FACE, ROOT / "run"),
    (ROOT, DEFAULT_NAMING, None),
    # the trash (and a trash at any depth: another root's) is never a group, nor inside one
    (ROOT / ".ckpt-trash", DEFAULT_NAMING, None),
    (ROOT / ".ckpt-trash" / "files" / "run" / "epoch=00-step=000100-train.ckpt@x", DEFAULT_NAMING, None),
    (ROOT / ".ckpt-trash" / "info" / "x.json", DEFAULT_NAMING, None),
    (ROOT / "run" / ".ckpt-trash" / "files" / "epoch=00-step=000100-train.ckpt", DEFAULT_NAMING, None),
    (Path("/elsewhere/run/x.ckpt"), DEFAULT_NAMING, None),
    (Path("/ckpt-other/x.ckpt"), DEFAULT_NAMING, None),
]


@pytest.mark.parametrize(("path", "naming", "group"), GROUP_OF)
def test_a_path_belongs_to_the_group_that_holds_it(path: Path, naming: Naming, group: Path | None) -> None:
    assert _index(naming).group_of(path) == group


def test_below_visits_only_the_subtree() -> None:
    index = _index()
    for name in ("a", "a/x", "a/x/deep", "b", "b/y"):
        index.state(ROOT / name)

    assert set(index.below(ROOT / "a")) == {ROOT / "a", ROOT / "a" / "x", ROOT / "a" / "x" / "deep"}
    assert set(index.below(ROOT / "new")) == set()
    assert set(index.below(ROOT)) == set(index)


def test_a_group_known_before_its_parent_is_still_found_below_it() -> None:
    index = _index()
    index.state(ROOT / "a" / "x" / "deep")

    assert list(index.below(ROOT / "a")) == [ROOT / "a" / "x" / "deep"]


def test_forgetting_a_directory_forgets_its_subtree_and_its_memory() -> None:
    index = _index()
    for name in ("a", "a/x", "b"):
        index.state(ROOT / name)
    index.set_protect_from(ROOT / "a" / "x", {Path("/configs/train.yaml"): "train.yaml"})
    index.set_link_targets(ROOT / "a" / "x", {ROOT / "b" / "target.ckpt": "target of a/x/last.ckpt"})
    index.recheck(ROOT / "a" / "x", 10.0)

    index.forget(ROOT / "a")

    assert set(index) == {ROOT / "b"}
    assert index.configs() == {}
    assert index.link_targets_outside(set()) == {}
    assert index.next_recheck() is None
    assert set(index.below(ROOT)) == {ROOT / "b"}


def test_a_full_walk_keeps_the_groups_below_a_directory_it_could_not_list() -> None:
    """``a`` is there but cannot be listed: a/x, a/x/deep are not reached, yet not gone, so they stay
    with their configs and link targets; below ``b`` (a listing that failed as not a directory: gone)
    and anything else the walk did not reach, they are forgotten."""
    index = _index()
    for name in ("a", "a/x", "a/x/deep", "b", "b/y", "c"):
        index.state(ROOT / name)
    index.set_protect_from(ROOT / "a" / "x", {Path("/configs/train.yaml"): "train.yaml"})
    index.set_link_targets(ROOT / "a" / "x", {ROOT / "c" / "target.ckpt": "target of a/x/last.ckpt"})
    problems = [
        ScanProblem(ROOT / "a", "cannot list directory: Permission denied", unlisted=True),
        ScanProblem(ROOT / "b", "cannot list directory: Not a directory"),
    ]

    _forget_unwalked(index, {ROOT, ROOT / "a", ROOT / "b"}, problems)

    assert set(index) == {ROOT / "a", ROOT / "a" / "x", ROOT / "a" / "x" / "deep", ROOT / "b"}
    assert index.configs() == {Path("/configs/train.yaml"): "train.yaml"}
    assert index.link_targets_outside({ROOT / "c"}) == {ROOT / "c" / "target.ckpt": "target of a/x/last.ckpt"}

    _forget_unwalked(index, {ROOT, ROOT / "a", ROOT / "b"}, [])  # listed again (a/x gone since)
    assert set(index) == {ROOT / "a", ROOT / "b"}
    assert index.configs() == {}


def test_configs_are_the_union_of_every_groups_and_follow_changes() -> None:
    index = _index()
    train = {Path("/configs/train.yaml"): "train.yaml"}
    finetune = {Path("/configs/finetune.yaml"): "finetune.yaml"}
    index.set_protect_from(ROOT / "a", train)
    index.set_protect_from(ROOT / "b", {**train, **finetune})
    assert index.configs() == {**train, **finetune}

    index.set_protect_from(ROOT / "b", {})
    assert index.configs() == train


def test_link_targets_of_the_groups_outside_a_pass() -> None:
    index = _index()
    index.set_link_targets(ROOT / "a", {ROOT / "b" / "old.ckpt": "target of a/last.ckpt"})
    index.set_link_targets(ROOT / "b", {ROOT / "b" / "new.ckpt": "target of b/last.ckpt"})

    assert index.link_targets_outside({ROOT / "b"}) == {ROOT / "b" / "old.ckpt": "target of a/last.ckpt"}
    index.set_link_targets(ROOT / "a", {})
    assert index.link_targets_outside({ROOT / "b"}) == {}


def test_rechecks_keep_the_earliest_time_and_are_taken_once_due() -> None:
    index = _index()
    index.state(ROOT / "a")
    index.state(ROOT / "b")
    index.recheck(ROOT / "a", 5.0)
    index.recheck(ROOT / "a", 3.0)
    index.recheck(ROOT / "a", 4.0)
    index.recheck(ROOT / "b", 9.0)
    index.recheck(ROOT / "unknown", 1.0)  # a group not known: nothing to look at again

    assert index.next_recheck() == 3.0
    assert index.take_due_rechecks(4.0) == {ROOT / "a"}
    assert index.take_due_rechecks(4.0) == set()
    assert index.next_recheck() == 9.0


DEEP = 1200


class CountingNaming:
    """A naming lookup that counts its calls, and can set ``stop`` at the given call."""

    def __init__(self, stop: threading.Event | None = None, stop_at: int = 0) -> None:
        self.calls = 0
        self._stop = stop
        self._stop_at = stop_at

    def __call__(self, directory: Path) -> Naming:
        self.calls += 1
        if self._stop is not None and self.calls >= self._stop_at:
            self._stop.set()
        return DEFAULT_NAMING


def _events_of_removing(*tops: Path, depth: int = DEEP) -> list[str]:
    """The file paths inotify reports while a directory ``depth`` levels deep is emptied."""
    files = []
    for top in tops:
        directory = str(top / "nested")
        for _ in range(depth):
            files.append(f"{directory}/f0")
            directory += "/d"
    return files


def test_the_events_of_removing_a_deep_checkpoint_cost_a_lookup_per_group_not_per_ancestor() -> None:
    """The daemon's own removal of a directory checkpoint 1,200 levels deep: each event's path is as
    deep as its file, and finding its group looked up the naming of every ancestor (720,000 lookups
    per 1,200 events, minutes of the worker's time before it honoured SIGTERM)."""
    naming = CountingNaming()
    index = GroupIndex(ROOT, naming)
    run = ROOT / "run"
    files = _events_of_removing(
        run / "epoch=00-step=000100-train.ckpt", run / f"{DELETING_PREFIX}i7-epoch=00-step=000100-train.ckpt"
    )

    assert index.touched(files, [], []) == {run}
    assert naming.calls <= 3  # the root's and run's naming, once each: nothing per event or per level


def test_a_burst_of_events_in_a_deep_plain_tree_costs_a_lookup_per_directory() -> None:
    naming = CountingNaming()
    index = GroupIndex(ROOT, naming)
    directories = [str(ROOT / "deep") + "/d" * level for level in range(DEEP)]
    files = [f"{directory}/epoch=00-step=000100-train.ckpt" for directory in directories]

    assert index.touched(files, [], []) == {Path(directory) for directory in directories}
    assert naming.calls <= len(directories) + 1


def test_a_stop_is_honoured_between_two_events() -> None:
    stop = threading.Event()
    naming = CountingNaming(stop, stop_at=10)
    index = GroupIndex(ROOT, naming)
    files = [str(ROOT / f"run-{index}" / "epoch=00-step=000100-train.ckpt") for index in range(1000)]

    touched = index.touched(files, [], [], stop=stop)

    assert stop.is_set()
    assert naming.calls == 10  # the event in hand is finished, no other is begun
    assert len(touched) <= 10


def _lister(links: dict[Path, list[Link]]) -> LinkLister:
    """A storage's ``list_links`` over ``links`` (a group with none listed: no links)."""

    def lister(group: Path, root: Path, naming: Naming) -> list[Link] | None:
        return links.get(group, [])

    return lister


def _last(group: Path, target: Path) -> Link:
    return Link("last.ckpt", str((group / "last.ckpt").relative_to(ROOT)), True, target)


def test_a_link_into_another_group_is_listed_again_by_a_pass_that_plans_only_that_group() -> None:
    """run1/last.ckpt -> ../latest/x, ``latest`` a directory link re-pointed from run2 to run3: run1
    sees no event, yet what its link protects moved. A pass planning run3 alone used run1's remembered
    target (run2/x), and deleted run3/x. A group whose links reach beyond it is listed again by every
    pass."""
    run1, run2, run3 = ROOT / "run1", ROOT / "run2", ROOT / "run3"
    index = GroupIndex(ROOT, lambda _: DEFAULT_NAMING)
    listing = {run1: [_last(run1, run2 / "x.ckpt")]}
    every = dict.fromkeys((run1, run2, run3), DEFAULT_NAMING)
    assert run2 / "x.ckpt" in index.link_pins(every, _lister(listing)).for_group(run2)

    listing[run1] = [_last(run1, run3 / "x.ckpt")]  # ``latest`` re-pointed: no event in run1
    pins = index.link_pins({run3: DEFAULT_NAMING}, _lister(listing))

    assert pins.for_group(run3) == {run3 / "x.ckpt": "target of run1/last.ckpt"}


def test_a_link_within_its_own_group_is_not_listed_again_by_other_passes() -> None:
    run1, run2 = ROOT / "run1", ROOT / "run2"
    index = GroupIndex(ROOT, lambda _: DEFAULT_NAMING)
    listed: list[Path] = []

    def lister(group: Path, root: Path, naming: Naming) -> list[Link] | None:
        listed.append(group)
        return [_last(run1, run1 / "x.ckpt")] if group == run1 else []

    index.link_pins({run1: DEFAULT_NAMING, run2: DEFAULT_NAMING}, lister)
    listed.clear()
    index.link_pins({run2: DEFAULT_NAMING}, lister)

    assert listed == [run2]  # Lightning's own links cost a pass over another group nothing


def test_a_cross_group_last_link_missing_for_a_moment_protects_its_target_in_other_passes() -> None:
    """run1/last.ckpt -> ../run2/x is replaced by unlink + symlink; a listing of run1 falls between the
    two, and a pass over run2 alone follows, within the second the missing link keeps protecting."""
    run1, run2 = ROOT / "run1", ROOT / "run2"
    index = GroupIndex(ROOT, lambda _: DEFAULT_NAMING)
    listing = {run1: [_last(run1, run2 / "x.ckpt")]}
    index.link_pins({run1: DEFAULT_NAMING, run2: DEFAULT_NAMING}, _lister(listing))
    listing[run1] = []  # unlinked: the next listing of run1 misses it
    index.link_pins({run1: DEFAULT_NAMING}, _lister(listing))

    pins = index.link_pins({run2: DEFAULT_NAMING}, _lister(listing))

    assert run2 / "x.ckpt" in pins.for_group(run2)


def test_a_last_link_down_into_a_subdirectory_reaches_a_pass_that_plans_only_the_subdirectory() -> None:
    """Lightning's ``filename="best/best_{epoch}"`` with ``save_last="link"``: run/last.ckpt ->
    best/x. A pass planning run/best alone (the event of the new save) gets the link, listed again,
    for the ``save_last="link"`` rules there; a link into a sibling run or to a file beside it does not
    count (only its target is kept, as any link's)."""
    run, best, other = ROOT / "run", ROOT / "run" / "best", ROOT / "other"
    index = GroupIndex(ROOT, lambda _: DEFAULT_NAMING)
    down = Link("last.ckpt", "run/last.ckpt", True, best / "x.ckpt", made_ns=7)
    sideways = Link("last.ckpt", "other/last.ckpt", True, run / "y.ckpt")
    not_last = Link("latest.ckpt", "run/latest.ckpt", False, best / "x.ckpt")
    listing = {run: [down, not_last], other: [sideways]}
    every = dict.fromkeys((run, best, other), DEFAULT_NAMING)
    index.link_pins(every, _lister(listing))

    pins = index.link_pins({best: DEFAULT_NAMING}, _lister(listing))

    assert pins.links_into(best) == [LinkInto("run/last.ckpt", best / "x.ckpt", 7)]
    assert pins.links_into(run) == []  # other/last.ckpt -> run/y is not a link down
