"""Which directory checkpoint of a bucket has an upload in progress below it: one binary search of the
pass's sorted upload keys, held to the walk over every key that it replaces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watcher.bucket import BucketStorage
from ckpt_watcher.bucket_listing import has_key_under
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.object_store import ObjectStore

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
