"""The one reader and YAML loader of every config file: bounds, regular files only, quiet messages."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ckpt_watcher.config_files import (
    CONFIG_QUIET_SECONDS,
    MAXIMUM_CONFIG_BYTES,
    REMEMBERED_QUIET_FILES,
    ConfigFileError,
    QuietFiles,
    parse_yaml,
    read_config_text,
    redact_quoted,
)
from ckpt_watcher.config_yaml import BoundedLoader, YamlLimitError
from ckpt_watcher.records import FileIdentity
from tests.support.quiet_clock import QuietClock

pytestmark = pytest.mark.timeout(60)


def test_a_file_of_exactly_the_limit_is_read_one_byte_more_is_not(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"#" * MAXIMUM_CONFIG_BYTES)
    assert len(read_config_text(path)) == MAXIMUM_CONFIG_BYTES
    path.write_bytes(b"#" * (MAXIMUM_CONFIG_BYTES + 1))
    with pytest.raises(ConfigFileError, match="more than a config file may have"):
        read_config_text(path)


def test_a_file_that_reports_no_size_is_still_bounded(tmp_path: Path) -> None:
    # /proc files say st_size 0 and still produce text; the read itself stops at the limit.
    assert "Name:" in read_config_text(Path("/proc/self/status"))
    with pytest.raises(ConfigFileError, match="more than a config file may have"):
        read_config_text(Path("/proc/self/status"), limit=10)


def test_confinement_follows_every_link_to_the_file_actually_opened(tmp_path: Path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "real.yaml").write_text("a: 1\n")
    (inside / "config.yaml").write_text("a: 2\n")
    (inside / "link.yaml").symlink_to(outside / "real.yaml")
    (inside / "sub").symlink_to(outside)

    assert read_config_text(inside / "config.yaml", confined_to=[inside]) == "a: 2\n"
    for path in (inside / "link.yaml", inside / "sub" / "real.yaml", outside / "real.yaml"):
        with pytest.raises(ConfigFileError, match="outside the directories it may be read from"):
            read_config_text(path, confined_to=[inside])
    assert read_config_text(inside / "link.yaml", confined_to=[inside, outside]) == "a: 1\n"


def test_the_value_bound_counts_aliases_as_often_as_they_are_used() -> None:
    text = "a: &a [1, 2, 3, 4]\nb: [*a, *a, *a]\n"
    assert parse_yaml(text).value["b"] == [[1, 2, 3, 4]] * 3
    loader = BoundedLoader(text, maximum_values=20)
    with pytest.raises(YamlLimitError, match="more than 20 values once aliases are expanded"):
        loader.get_single_node()
    loader.dispose()


def test_yaml_1_2_integers() -> None:
    assert parse_yaml("a: 0500\nb: 0x1f\nc: 0o17\nd: 1:30\ne: 1_000\n").value == {
        "a": 500,
        "b": 31,
        "c": 15,
        "d": "1:30",
        "e": "1_000",
    }


def test_an_empty_file_is_null_and_a_second_document_an_error() -> None:
    assert parse_yaml("").value is None
    with pytest.raises(ConfigFileError, match="line 2, column 1"):
        parse_yaml("a: 1\n---\nb: 2\n")


REDACTED: list[tuple[str, str]] = [
    ("found undefined alias 'password'", "found undefined alias '…'"),
    (
        "expected '<document start>', but found '<scalar>'",
        "expected '<document start>', but found '<scalar>'",
    ),
    ("could not find expected ':'", "could not find expected ':'"),
    ("found character '\\t' that cannot start any token", "found character '…' that cannot start any token"),
    (
        'a int value that cannot be read (invalid literal: "it\'s")',
        "a int value that cannot be read (invalid literal: '…')",
    ),
    (
        "could not determine a constructor for the tag '!secret'",
        "could not determine a constructor for the tag '…'",
    ),
    ("mapping values are not allowed here", "mapping values are not allowed here"),
]


@pytest.mark.parametrize(("message", "redacted"), REDACTED, ids=[message for message, _ in REDACTED])
def test_redact_quoted_keeps_pyyamls_own_words_only(message: str, redacted: str) -> None:
    assert redact_quoted(message) == redacted


# --- a config left alone long enough to read (QuietFiles) ------------------------------------------


def _identity_aged(path: Path, seconds: float) -> FileIdentity:
    """``path`` modified ``seconds`` ago (negative: in the future), as the daemon would look at it."""
    stamp = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(stamp, stamp))
    identity = FileIdentity.of_path(path)
    assert identity is not None
    return identity


@pytest.mark.parametrize(
    "age",
    [CONFIG_QUIET_SECONDS + 0.5, 3600.0, 0.0, CONFIG_QUIET_SECONDS / 2, -60],
    ids=["just-quiet", "old", "now", "half-way", "in-the-future"],
)
def test_a_changed_config_is_quiet_only_once_seen_unchanged_for_the_quiet_time_whatever_its_mtime(
    tmp_path: Path, quiet_clock: QuietClock, age: float
) -> None:
    """Its time is the writer's clock: one behind (another machine) dates a file still being written
    as long past. Only this process's clock counts, from the first look."""
    config = tmp_path / "train.yaml"
    config.write_text("ckpt_path: a.ckpt\n")
    identity = _identity_aged(config, age)
    files = QuietFiles()

    answers = [files.quiet(config, identity)]
    quiet_clock.now += CONFIG_QUIET_SECONDS / 2
    answers.append(files.quiet(config, identity))
    quiet_clock.now += CONFIG_QUIET_SECONDS / 2
    answers.append(files.quiet(config, identity))
    answers.append(files.quiet(config, identity))  # asked again: still quiet

    assert answers == [False, False, True, True]


def test_files_quiet_already_are_forgotten_past_the_bound_and_then_wait_once_more(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    """A volume of many runs changes many per-run files: what is remembered stays bounded, and a file
    forgotten waits the quiet time again (keeps more for a moment, never less)."""
    files = QuietFiles()
    identities = {}
    for number in range(REMEMBERED_QUIET_FILES):
        config = tmp_path / f"run{number}.yaml"
        config.write_text("save_top_k_best: 3\n")
        identities[config] = FileIdentity.of_path(config)
        files.quiet(config, identities[config])
    quiet_clock.pass_quiet_time()
    first = tmp_path / "run0.yaml"
    assert files.quiet(first, identities[first])
    newest = tmp_path / "newest.yaml"
    newest.write_text("save_top_k_best: 3\n")

    answers = [files.quiet(newest, FileIdentity.of_path(newest)), files.quiet(first, identities[first])]
    quiet_clock.pass_quiet_time()
    answers.append(files.quiet(first, identities[first]))

    assert answers == [False, False, True]


def test_no_file_is_quiet(tmp_path: Path) -> None:
    assert QuietFiles().quiet(tmp_path / "gone.yaml", None)


def test_with_missing_waits_a_file_is_quiet_once_missing_for_the_quiet_time(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    """A file replaced by unlink + create is missing for a moment: its absence is quiet only once it
    has lasted the quiet time by this process's clock; a file that is back meanwhile starts over."""
    config = tmp_path / "train.yaml"
    files = QuietFiles(missing_waits=True)

    answers = [files.quiet(config, None)]
    quiet_clock.now += CONFIG_QUIET_SECONDS / 2
    answers.append(files.quiet(config, None))
    config.write_text("ckpt_path: a.ckpt\n")  # back, just written
    answers.append(files.quiet(config, _identity_aged(config, 0.0)))
    config.unlink()  # missing again: the wait starts over
    answers.append(files.quiet(config, None))
    quiet_clock.now += CONFIG_QUIET_SECONDS / 2
    answers.append(files.quiet(config, None))
    quiet_clock.now += CONFIG_QUIET_SECONDS / 2
    answers.append(files.quiet(config, None))

    assert answers == [False, False, False, False, False, True]


def test_a_file_seen_unchanged_long_enough_is_quiet_whatever_its_time_says(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    """A modification time in the future (another machine's clock) delays a read by the quiet time of
    this process's own clock at most; a change meanwhile starts the wait again."""
    config = tmp_path / "train.yaml"
    config.write_text("ckpt_path: a.ckpt\n")
    files = QuietFiles()
    future = _identity_aged(config, -3600)

    answers = [files.quiet(config, future)]
    quiet_clock.now += CONFIG_QUIET_SECONDS / 2
    answers.append(files.quiet(config, future))
    config.write_text("ckpt_path: b.ckpt\n")  # changed again: the wait starts over
    changed = _identity_aged(config, -3600)
    answers.append(files.quiet(config, changed))
    quiet_clock.now += CONFIG_QUIET_SECONDS
    answers.append(files.quiet(config, changed))

    assert answers == [False, False, False, True]


def test_many_files_changing_at_once_are_swept_now_and_then_not_at_every_sighting(
    tmp_path: Path, quiet_clock: QuietClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound, with none of them quiet yet, a sweep at every new sighting made many per-run
    files changing within the same quiet time quadratic; a sweep waits until the map has doubled."""
    sweeps = []
    real_sweep = QuietFiles._forget_settled

    def counted(files: QuietFiles, now: float) -> None:
        sweeps.append(now)
        real_sweep(files, now)

    monkeypatch.setattr(QuietFiles, "_forget_settled", counted)
    config = tmp_path / "run.yaml"
    config.write_text("save_top_k_best: 3\n")
    identity = FileIdentity.of_path(config)
    files = QuietFiles()

    answers = {
        files.quiet(tmp_path / f"run{number}.yaml", identity) for number in range(3 * REMEMBERED_QUIET_FILES)
    }

    assert answers == {False}  # none quiet: each seen once
    assert len(sweeps) == 2  # at 4,096 and at 8,192 remembered, not at each of the 8,193 sightings past it
