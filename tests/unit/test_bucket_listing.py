"""Which directory checkpoint of a bucket has an upload in progress below it: one binary search of the
pass's sorted upload keys, held to the walk over every key that it replaces. Which keys make up a
directory checkpoint (folder markers, keys no path names), and when a leftover of a cut-short deletion
may be finished."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.bucket_delete import leftover_kept
from ckpt_watcher.bucket_listing import Listing, has_key_under, is_folder_marker, odd_key
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import ObjectInfo, ObjectStore

URL = StorageURL("s3", "bucket", "runs")


@pytest.mark.parametrize(
    ("keys", "key", "expected"),
    [
        ([], "runs/ckpt", False),
        (["runs/ckpt/shard-0"], "runs/ckpt", True),
        (["runs/ckpt"], "runs/ckpt", False),  # the key itself is no object below it
        (["runs/ckpt-2/shard-0"], "runs/ckpt", False),  # a sibling that shares the text
        (["runs/ckpt.0/shard", "runs/ckpt/a"], "runs/ckpt", True),  # "." sorts before "/"
        (["runs/ckpt-2/a", "runs/ckpt/a"], "runs/ckpt", True),  # "-" too
        (["runs/ckpt/a", "runs/ckpt0/a"], "runs/ckpt", True),  # "0" sorts after "/"
        (["runs/ckpt/"], "runs/ckpt", True),
        (["runs/a/b/c"], "runs/a", True),  # deeper below
        (["runs/a/b/c"], "runs/a/b", True),
        (["runs/a/b/c"], "runs/a/b/c", False),
        (["runs/é/x"], "runs/é", True),
    ],
)
def test_has_key_under(keys: list[str], key: str, expected: bool) -> None:
    assert has_key_under(sorted(keys), key) is expected


_KEY_TEXT = st.text(alphabet="ab/-.0é", max_size=8)


@given(keys=st.lists(_KEY_TEXT, max_size=30), key=_KEY_TEXT)
def test_has_key_under_is_the_walk_over_every_key(keys: list[str], key: str) -> None:
    assert has_key_under(sorted(keys), key) is any(upload.startswith(f"{key}/") for upload in keys)


class Uploads(ObjectStore):
    """A store that only answers which uploads are in progress, counting how often it is asked."""

    def __init__(self, keys: set[str]) -> None:
        self.url = URL
        self.keys = keys
        self.asked = 0

    def uploads_in_progress(self, prefix: str) -> set[str]:
        assert prefix == "runs"
        self.asked += 1
        return set(self.keys)


def test_the_uploads_are_asked_once_a_pass_and_searched_for_each_directory() -> None:
    store = Uploads({f"runs/abandoned-{number}/part" for number in range(1_000)} | {"runs/ckpt-7/shard"})
    storage = BucketStorage(URL, store)
    storage.begin_pass()
    assert storage.upload_under("runs/ckpt-7")
    assert not storage.upload_under("runs/ckpt-8")
    assert not storage.upload_under("runs/abandoned-1/part")
    assert store.asked == 1
    store.keys = set()  # the upload finished: the next pass asks again and sees none
    storage.begin_pass()
    assert not storage.upload_under("runs/ckpt-7")
    assert store.asked == 2


def _info(key: str, size: int = 1, tag: str = '"t"', mtime_ns: int = 10) -> ObjectInfo:
    return ObjectInfo(key, size, tag, mtime_ns)


@pytest.mark.parametrize(
    ("key", "size", "expected"),
    [
        ("runs/ckpt/", 0, True),  # the S3 console's "Create folder"
        ("runs/ckpt/zero/", 0, True),
        ("runs/ckpt/zero/", 5, False),  # data under a folder's name: odd, not a marker
        ("runs/ckpt//", 0, False),  # its folder has an empty component
        ("/", 0, False),
        ("runs/ckpt/zero", 0, False),
    ],
)
def test_is_folder_marker(key: str, size: int, expected: bool) -> None:
    assert is_folder_marker(_info(key, size)) is expected


@pytest.mark.parametrize(
    ("relatives", "expected"),
    [
        (["latest", "zero/rank0.pt"], None),
        (["", "zero/", "latest"], None),  # folder markers: part of the checkpoint
        (["latest", "zero//extra.pt"], "ck/zero//extra.pt"),
        (["latest", "zero/./x"], "ck/zero/./x"),
        (["zero/../x"], "ck/zero/../x"),
    ],
)
def test_odd_key(relatives: list[str], expected: str | None) -> None:
    objects = [
        (relative, _info(f"ck/{relative}", 0 if relative.endswith("/") or not relative else 1))
        for relative in relatives
    ]
    assert odd_key(objects) == expected


def test_a_checkpoints_objects_are_every_key_below_it_as_its_deletion_lists_them() -> None:
    """The plan's identity of a directory checkpoint and its deletion's must be made of the same keys:
    folder markers and keys no path names included, a sibling sharing its name's text excluded."""
    keys = [
        "runs/ck/",
        "runs/ck/latest",
        "runs/ck/zero/",
        "runs/ck/zero//x",
        "runs/ck-2/a",
        "runs/ck.0/a",
        "runs/ckx",
    ]
    listing = Listing.of(URL, [_info(key, 0 if key.endswith("/") else 1) for key in keys])

    assert [info.key for info in listing.objects_under("runs/ck")] == [
        "runs/ck/",
        "runs/ck/latest",
        "runs/ck/zero/",
        "runs/ck/zero//x",
    ]
    assert listing.unnamable == ["runs/ck/zero//x"]  # a folder marker names a folder: not reported
    assert [info.key for info in listing.objects_under("runs/none")] == []


def _kept(named: dict[str, str], present: list[ObjectInfo]) -> str | None:
    return leftover_kept("ck", _info("ck/.ckpt-watcher-deleting", mtime_ns=100), named, present)


def test_a_leftover_is_finished_only_if_all_of_it_is_what_its_manifest_names() -> None:
    named = {"ck/a": '"1"', "ck/b": '"2"'}
    assert (
        _kept(named, [_info("ck/a", tag='"1"', mtime_ns=90), _info("ck/b", tag='"2"', mtime_ns=100)]) is None
    )
    assert _kept(named, []) is None
    # the same bytes (so ETag) written after the manifest: a writer at work
    later = _kept(named, [_info("ck/a", tag='"1"', mtime_ns=101)])
    assert later is not None
    assert later.startswith("1 object(s) in it not named by its deletion manifest or written after it")
    assert _kept(named, [_info("ck/a", tag='"9"', mtime_ns=90)]) is not None  # another ETag
    assert _kept(named, [_info("ck/c", tag='"3"', mtime_ns=90)]) is not None  # not named
    marker = _kept({**named, "ck/latest": '"m"'}, [_info("ck/latest", tag='"m"', mtime_ns=90)])
    assert marker == "its marker, which a deletion deletes before anything else, is still there"


def test_the_trash_of_a_prefix_below_is_no_part_of_the_tree() -> None:
    """A watcher of ``runs/stage1`` keeps its trash in ``runs/stage1/.ckpt-trash``: for the root
    ``runs`` that is neither its own trash nor groups to prune (the walk on disk skips a ``.ckpt-trash``
    directory at any depth); a checkpoint file named like the trash is still a file."""
    keys = [
        "runs/.ckpt-trash/info/a.json",
        "runs/stage1/.ckpt-trash/files/stage1/epoch=00-step=000100-train.ckpt@k",
        "runs/stage1/.ckpt-trash/info/k.json",
        "runs/stage1/epoch=00-step=000200-train.ckpt",
        "runs/stage1/.ckpt-trash",
    ]
    listing = Listing.of(URL, [_info(key) for key in keys])

    assert [info.key for info in listing.trash] == ["runs/.ckpt-trash/info/a.json"]
    stage1 = URL.core_path / "stage1"
    assert sorted(listing.files[stage1]) == [".ckpt-trash", "epoch=00-step=000200-train.ckpt"]
    assert listing.subdirectories[stage1] == set()
    assert all(".ckpt-trash" not in path.parts for path in listing.files if path != URL.core_path)
