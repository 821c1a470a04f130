"""URLs of bucket roots and the core paths the reconcile core names objects by (pure string work)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watcher.locations import (
    LocationError,
    StorageURL,
    is_core_path_of_url,
    parse_location,
    shown_as_url,
    storage_url_of,
)
from ckpt_watcher.records import display_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket/prefix", StorageURL("s3", "bucket", "prefix")),
        ("s3://bucket/a/b/", StorageURL("s3", "bucket", "a/b")),
        ("s3://bucket", StorageURL("s3", "bucket", "")),
        ("s3://bucket/", StorageURL("s3", "bucket", "")),
        ("S3://bucket/x", StorageURL("s3", "bucket", "x")),
        ("gs://bucket/runs", StorageURL("gs", "bucket", "runs")),
        ("az://container/runs", StorageURL("az", "container", "runs")),
        # another name of the same store: held under one scheme, so a pin written either way matches
        ("s3a://bucket/runs", StorageURL("s3", "bucket", "runs")),
        ("S3A://bucket/runs", StorageURL("s3", "bucket", "runs")),
        ("gcs://bucket/runs", StorageURL("gs", "bucket", "runs")),
        ("abfs://container/runs", StorageURL("az", "container", "runs")),
        ("file:///tmp/checkpoints", Path("/tmp/checkpoints")),
        ("/tmp/checkpoints", Path("/tmp/checkpoints")),
        ("checkpoints", Path("checkpoints")),
        ("s3:relative", Path("s3:relative")),  # no "//": a plain (odd) path
    ],
)
def test_parse_location(text: str, expected: Path | StorageURL) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hdfs://namenode/x", "unsupported URL scheme 'hdfs'"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket/a//b", "empty, '.' or '..' component"),
        ("s3://bucket//a", "empty, '.' or '..' component"),
        ("s3://bucket/a/../b", "empty, '.' or '..' component"),
        ("s3://bucket/./b", "empty, '.' or '..' component"),
    ],
)
def test_parse_location_refuses_what_names_no_usable_root(text: str, message: str) -> None:
    with pytest.raises(LocationError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_location(text)


def test_core_paths_round_trip_and_show_as_urls() -> None:
    url = StorageURL("s3", "bucket", "runs/llada")
    assert url.core_path == Path("/s3:/bucket/runs/llada")
    assert url.text == "s3://bucket/runs/llada"
    path = url.path_of("runs/llada/stage1/last.ckpt")
    assert path == Path("/s3:/bucket/runs/llada/stage1/last.ckpt")
    assert url.key_of(path) == "runs/llada/stage1/last.ckpt"
    assert url.key_of(url.core_path) == "runs/llada"
    assert url.key_of(Path("/s3:/bucket/runs/llada2/x")) is None  # a sibling prefix is not below it
    assert url.key_of(Path("/s3:/other/runs/llada/x")) is None
    assert display_name(path) == "s3://bucket/runs/llada/stage1/last.ckpt"
    assert display_name(str(url.core_path)) == "s3://bucket/runs/llada"
    assert storage_url_of(path) == StorageURL("s3", "bucket", "runs/llada/stage1/last.ckpt")
    assert storage_url_of(Path("/tmp/x")) is None
    assert is_core_path_of_url(path)
    assert not is_core_path_of_url("/tmp/s3:/bucket")


def test_the_bucket_root_itself() -> None:
    url = StorageURL("s3", "bucket", "")
    assert url.core_path == Path("/s3:/bucket")
    assert url.path_of("x.ckpt") == Path("/s3:/bucket/x.ckpt")
    assert url.key_of(Path("/s3:/bucket/run/x.ckpt")) == "run/x.ckpt"
    assert url.below("run").text == "s3://bucket/run"


@pytest.mark.parametrize("key", ["a//b.ckpt", "a/./b.ckpt", "a/../b.ckpt", "/a.ckpt", "a/", "."])
def test_a_key_a_path_cannot_name_faithfully_gets_no_path(key: str) -> None:
    assert StorageURL("s3", "bucket", "").path_of(key) is None


_CHARACTERS = st.characters(exclude_characters="/\x00", exclude_categories=["Cs"])
_COMPONENT = st.text(alphabet=_CHARACTERS, min_size=1, max_size=12).filter(
    lambda part: part not in {".", ".."}
)


@given(prefix=st.lists(_COMPONENT, max_size=3), relative=st.lists(_COMPONENT, min_size=1, max_size=4))
def test_every_key_given_a_path_maps_back_to_itself(prefix: list[str], relative: list[str]) -> None:
    url = StorageURL("s3", "bucket", "/".join(prefix))
    key = "/".join([*prefix, *relative])
    path = url.path_of(key)
    assert path is not None
    assert url.key_of(path) == key


@given(text=st.text(max_size=40))
def test_display_of_any_text_is_idempotent(text: str) -> None:
    shown = display_name(text)
    assert display_name(shown) == shown
    assert shown_as_url(shown_as_url(text)) == shown_as_url(text)
