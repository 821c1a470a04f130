"""Reading protect_from training configs, and pins matched by file identity as well as by path."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ckpt_watcher.plan import Action, plan
from ckpt_watcher.policy import Policy
from ckpt_watcher.protection import (
    ConfigLabel,
    ProtectionError,
    ProtectionRegistry,
    identities_of,
    namesake,
    namesakes_from,
    read_config_protection,
)
from ckpt_watcher.records import CheckpointRecord, FileIdentity
from tests.support.factories import make_record, step_name, write_backdated
from tests.support.hostile_configs import FlakyConfigFiles, alias_bomb, deep_block, merge_bomb
from tests.support.hostile_trees import make_fifo
from tests.support.quiet_clock import QuietClock

pytestmark = pytest.mark.timeout(60)


def write_config(directory: Path, text: str, name: str = "train.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def keys_found(config: Path) -> list[str]:
    return [
        reference.key for reference in read_config_protection(config, "train.yaml", config.parent).references
    ]


# --- the whole document is searched (issue 10, item 21) -------------------------------------------

DEEP_KEYS: list[tuple[str, str, list[str]]] = [
    ("top", "ckpt_path: a.ckpt\n", ["ckpt_path"]),
    ("five-deep", "a: {b: {c: {d: {e: {ckpt_path: a.ckpt}}}}}\n", ["a.b.c.d.e.ckpt_path"]),
    ("thirty-deep", deep_block(30), [".".join(f"k{level}" for level in range(30)) + ".ckpt_path"]),
    (
        "in-a-list",
        "callbacks:\n  - name: x\n  - {pretrained_ckpt_path: b.ckpt}\n",
        ["callbacks[1].pretrained_ckpt_path"],
    ),
    ("dotted-deep", "a:\n  b:\n    c:\n      d:\n        e.ckpt_path: a.ckpt\n", ["a.b.c.d.e.ckpt_path"]),
    ("list-in-list", "x: [[{ckpt_path: a.ckpt}]]\n", ["x[0][0].ckpt_path"]),
]


@pytest.mark.parametrize(("text", "keys"), [(t, k) for _, t, k in DEEP_KEYS], ids=[i for i, *_ in DEEP_KEYS])
def test_resume_keys_are_found_at_any_depth(tmp_path: Path, text: str, keys: list[str]) -> None:
    assert keys_found(write_config(tmp_path, text)) == keys


def test_a_deep_reference_has_the_usual_reason(tmp_path: Path) -> None:
    config = write_config(tmp_path, "a: {b: {c: {d: {e: {ckpt_path: a.ckpt}}}}}\n")
    (reference,) = read_config_protection(config, "configs/train.yaml", tmp_path).references
    assert reference.reason == "resume source in configs/train.yaml (a.b.c.d.e.ckpt_path)"


# --- hostile configs: refused quickly and clearly (items 5, 7, 8) ---------------------------------

HOSTILE_CONFIGS: list[tuple[str, str, str]] = [
    ("alias-bomb", alias_bomb(levels=9, fanout=9), "values once aliases are expanded"),
    ("merge-bomb", merge_bomb(levels=25, fanout=3), "values once aliases are expanded"),
    ("recursive-alias", "a: &a {ckpt_path: x, again: *a}\n", "an alias inside the value it refers to"),
    ("deep-nesting", "x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than"),
    ("invalid-date", "ckpt_path: x\nwhen: 2024-13-45\n", "line 2, column 7"),
    ("bad-bool-tag", "flag: !!bool maybe\n", "line 1, column 7"),
    ("too-many-values", "".join(f"k{index}: {index}\n" for index in range(60_000)), "values"),
]


@pytest.mark.parametrize(
    ("text", "problem"), [(t, p) for _, t, p in HOSTILE_CONFIGS], ids=[i for i, *_ in HOSTILE_CONFIGS]
)
def test_hostile_yaml_is_a_clear_error(tmp_path: Path, text: str, problem: str) -> None:
    config = write_config(tmp_path, text)
    with pytest.raises(ProtectionError) as caught:
        read_config_protection(config, "train.yaml", tmp_path)
    assert problem in caught.value.message


@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "directory", "too-big"])
def test_a_config_that_is_not_a_small_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "train.yaml"
    if kind == "fifo":
        make_fifo(config)
    elif kind == "link-to-fifo":
        config.symlink_to(make_fifo(tmp_path / "pipe"))
    elif kind == "directory":
        config.mkdir()
    else:
        with config.open("wb") as sparse:
            sparse.truncate(2**31)
    with pytest.raises(ProtectionError) as caught:
        read_config_protection(config, "train.yaml", tmp_path)
    expected = {"directory": "is a directory", "too-big": "more than a config file may have"}
    assert expected.get(kind, "not a regular file (a FIFO)") in caught.value.message


def test_a_yaml_error_quotes_a_position_never_a_snippet(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[default]\naws_secret_access_key = AKIAEXAMPLESECRET42\n")
    with pytest.raises(ProtectionError) as caught:
        read_config_protection(config, "train.yaml", tmp_path)
    assert "line 2" in caught.value.message
    assert "AKIA" not in str(caught.value)


def test_a_wrong_value_is_described_not_printed(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ckpt_path: {nested: [1, 2, 3], secret: AKIAEXAMPLESECRET42}\n")
    protection = read_config_protection(config, "train.yaml", tmp_path)
    assert protection.references == ()
    assert protection.warnings == ("train.yaml: 'ckpt_path' should be a path, got a mapping; ignored",)


def test_a_confined_label_refuses_a_config_that_resolves_outside(tmp_path: Path) -> None:
    allowed = tmp_path / "ckpt"
    allowed.mkdir()
    outside = write_config(tmp_path, "ckpt_path: x\n", "outside.yaml")
    (allowed / "train.yaml").symlink_to(outside)
    registry = ProtectionRegistry(tmp_path)
    label = ConfigLabel("run/train.yaml", allowed_directories=(allowed,))

    with pytest.raises(ProtectionError) as caught:
        registry.refresh({allowed / "train.yaml": label}, strict=True)
    assert "outside" in caught.value.message

    with capture_logs() as logs:
        registry.refresh({allowed / "train.yaml": label})
    assert [log["event"] for log in logs] == ["protection_rejected"]


def test_an_unconfined_label_may_name_any_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ckpt_path: a.ckpt\n")
    registry = ProtectionRegistry(tmp_path)
    assert registry.refresh({config: "train.yaml"}, strict=True)
    assert tmp_path / "a.ckpt" in registry.pins()


# --- pins by identity (item 3) --------------------------------------------------------------------


def test_identities_of_existing_pins_follow_links(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run" / step_name(0, 100)
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    hard_link = tmp_path / "alias.ckpt"
    os.link(checkpoint, hard_link)
    soft_link = tmp_path / "soft.ckpt"
    soft_link.symlink_to(checkpoint)
    status = checkpoint.stat()

    identities = identities_of(
        {hard_link: "resume source", soft_link: "other", tmp_path / "missing.ckpt": "never"}
    )

    assert identities[(status.st_dev, status.st_ino)] == "resume source"
    # and each directory above a pinned file (where it really is), as the holder plan keeps
    run = checkpoint.parent.stat()
    assert identities[(run.st_dev, run.st_ino)] == f"holds {step_name(0, 100)}: other"
    top = tmp_path.stat()
    assert identities[(top.st_dev, top.st_ino)] == "holds alias.ckpt: resume source"
    assert all(reason.startswith("holds ") for reason in list(identities.values())[1:])


def _with_identity(record: CheckpointRecord, device: int, inode: int) -> CheckpointRecord:
    return dataclasses.replace(record, identity=FileIdentity(device, inode, record.bytes, 0))


def test_plan_keeps_a_record_pinned_by_identity_with_the_pins_reason() -> None:
    run = Path("/ckpt/run")
    records = [make_record(step_name(0, step), run) for step in range(100, 1100, 100)]
    oldest = _with_identity(records[0], 7, 4242)
    records[0] = oldest
    policy = Policy(save_top_k_checkpoints=2)

    without = plan(
        records, policy, {Path("/mnt/alias/run") / oldest.name: "resume source in t.yaml (ckpt_path)"}
    )
    with_identity = plan(
        records,
        policy,
        {Path("/mnt/alias/run") / oldest.name: "resume source in t.yaml (ckpt_path)"},
        pinned_identities={(7, 4242): "resume source in t.yaml (ckpt_path)"},
    )

    decision = {decision.record.name: decision for decision in without.decisions}[oldest.name]
    assert decision.action is Action.DELETE
    decision = {decision.record.name: decision for decision in with_identity.decisions}[oldest.name]
    assert decision.action is Action.KEEP
    assert decision.reasons == ("resume source in t.yaml (ckpt_path)",)


def test_a_pin_matched_by_path_and_identity_gives_its_reason_once() -> None:
    run = Path("/ckpt/run")
    records = [make_record(step_name(0, step), run) for step in range(100, 1100, 100)]
    records[0] = _with_identity(records[0], 7, 4242)
    reason = "protected by --protect run/x"

    result = plan(
        records,
        Policy(save_top_k_checkpoints=2),
        {records[0].path: reason},
        pinned_identities={(7, 4242): reason},
    )

    decision = {decision.record.name: decision for decision in result.decisions}[records[0].name]
    assert decision.reasons == (reason,)


def test_plan_without_identities_is_unchanged() -> None:
    run = Path("/ckpt/run")
    records = [make_record(step_name(0, step), run) for step in range(100, 1100, 100)]
    policy = Policy(save_top_k_checkpoints=2)
    assert plan(records, policy, {}) == plan(records, policy, {}, pinned_identities={})


def test_a_config_whose_read_failed_for_now_is_read_again_at_the_next_pass(tmp_path: Path) -> None:
    """A protect_from config whose read got a 503 was remembered as read (its identity): the unchanged
    file was never read again, and what it names was never protected. It is read again at each pass
    until it is read; the failure is logged once."""
    config = write_config(tmp_path, "ckpt_path: a.ckpt\n")
    files = FlakyConfigFiles(failures=2)
    registry = ProtectionRegistry(tmp_path, files=files)

    with capture_logs() as logs:
        for _ in range(3):
            registry.refresh({config: "train.yaml"})

    assert files.reads == 3
    assert tmp_path / "a.ckpt" in registry.pins()
    assert [log["event"] for log in logs if log["log_level"] == "error"] == ["protection_rejected"]


def test_a_config_refused_for_its_contents_is_not_read_again_until_it_changes(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ckpt_path: a.ckpt\n")
    files = FlakyConfigFiles(failures=1, transient=False)
    registry = ProtectionRegistry(tmp_path, files=files)

    with capture_logs() as logs:
        for _ in range(3):
            registry.refresh({config: "train.yaml"})

    assert files.reads == 1
    assert [log["event"] for log in logs] == ["protection_rejected"]


def test_an_edit_of_a_refused_config_that_is_still_refused_is_logged_again(tmp_path: Path) -> None:
    """Each edit gets its record, even with the same problem: only a retry of a read that failed for
    now is not logged again."""
    registry = ProtectionRegistry(tmp_path)
    config = tmp_path / "train.yaml"

    with capture_logs() as logs:
        for edit in range(2):
            config.write_text(f"[not a mapping, edit {edit}]\n")
            os.utime(config, ns=(edit * 10**9, edit * 10**9))
            registry.refresh({config: "train.yaml"})

    assert [log["event"] for log in logs] == ["protection_rejected"] * 2


# --- a config never read holds deletions ----------------------------------------------------------


def _holding_after(
    tmp_path: Path, contents: list[str | None], files: FlakyConfigFiles | None = None
) -> list[bool]:
    """For each state of the config in turn (its text; None: no such file), whether the registry
    holds deletions for it after a refresh."""
    registry = (
        ProtectionRegistry(tmp_path, files=files) if files is not None else ProtectionRegistry(tmp_path)
    )
    config = tmp_path / "train.yaml"
    holding = []
    for turn, text in enumerate(contents):
        if text is None:
            config.unlink(missing_ok=True)
        else:
            config.write_text(text)
            os.utime(config, ns=(turn * 10**9, turn * 10**9))  # each edit is seen as one
        with capture_logs():
            registry.refresh({config: "train.yaml"})
        holding.append(registry.holding() == {config: "train.yaml"})
    return holding


@pytest.mark.parametrize(
    ("contents", "held"),
    [
        (["ckpt_path: a.ckpt\n"], [False]),  # read: its pins protect
        (["ckpt_path: [\n"], [True]),  # there, never read: what it names is unknown
        (["[a list]\n"], [True]),  # there, not a mapping: likewise
        ([None], [False]),  # no such file: it protects nothing, and holds nothing
        ([None, "ckpt_path: [\n"], [False, True]),  # it appears, unreadable
        (["ckpt_path: [\n", "ckpt_path: a.ckpt\n"], [True, False]),  # fixed: released
        (["ckpt_path: a.ckpt\n", "ckpt_path: [\n"], [False, False]),  # read once: its pins stay
        (["ckpt_path: a.ckpt\n", None], [False, False]),  # read once, then gone: its pins stay
    ],
)
def test_a_config_holds_deletions_while_it_is_there_but_never_read(
    tmp_path: Path, contents: list[str | None], held: list[bool]
) -> None:
    assert _holding_after(tmp_path, contents) == held


def test_a_config_whose_first_read_failed_for_now_holds_until_a_read_works(tmp_path: Path) -> None:
    """A store's 503 on the first read: the config is there, so it holds; the next pass reads it."""
    files = FlakyConfigFiles(failures=1)
    assert _holding_after(tmp_path, ["ckpt_path: a.ckpt\n", "ckpt_path: a.ckpt\n"], files) == [True, False]


def test_a_config_read_at_last_is_a_change_even_when_it_pins_nothing(tmp_path: Path) -> None:
    """So the daemon plans the groups it held at once (the next pass takes them all in), not only at
    their next event or rescan."""
    config = write_config(tmp_path, "ckpt_path: [\n")
    registry = ProtectionRegistry(tmp_path)
    with capture_logs():
        registry.refresh({config: "train.yaml"})
    config.write_text("ckpt_path: null\n")
    os.utime(config, ns=(10**9, 10**9))
    assert registry.refresh({config: "train.yaml"})
    assert registry.holding() == {}
    assert registry.pins() == {}


def test_a_held_config_that_is_deleted_is_a_change(tmp_path: Path) -> None:
    """It stops holding: the daemon's check between passes then runs a full pass that releases every
    group, not only the next event's."""
    config = write_config(tmp_path, "ckpt_path: [\n")
    registry = ProtectionRegistry(tmp_path)
    with capture_logs():
        registry.refresh({config: "train.yaml"})
        config.unlink()
        assert registry.refresh({config: "train.yaml"})
        assert not registry.refresh({config: "train.yaml"})  # (and then no more)
    assert registry.holding() == {}


def test_a_config_whose_path_failed_then_went_missing_stops_holding(tmp_path: Path) -> None:
    """The first read fails on the path itself (a component is a file: ENOTDIR; EACCES or ESTALE on
    a parent act alike), then the path works but names no file: it is read again at each pass, so
    the hold ends; it is not left holding because neither time had an identity to compare."""
    blocker = tmp_path / "configs"
    blocker.write_text("a file where a directory should be\n")
    config = blocker / "train.yaml"
    registry = ProtectionRegistry(tmp_path)
    with capture_logs():
        registry.refresh({config: "train.yaml"})
        assert registry.holding() == {config: "train.yaml"}
        blocker.unlink()
        blocker.mkdir()
        assert registry.refresh({config: "train.yaml"})
    assert registry.holding() == {}


def test_a_config_that_is_a_dangling_symlink_holds(tmp_path: Path) -> None:
    """A link whose target is not there (yet: a mount not up) is meant to be there: in doubt, keep."""
    config = tmp_path / "train.yaml"
    config.symlink_to(tmp_path / "mounted" / "train.yaml")
    registry = ProtectionRegistry(tmp_path)
    with capture_logs() as logs:
        registry.refresh({config: "train.yaml"})
    assert registry.holding() == {config: "train.yaml"}
    assert "a symlink to a file that is not there" in logs[0]["error"]
    (tmp_path / "mounted").mkdir()
    (tmp_path / "mounted" / "train.yaml").write_text("ckpt_path: a.ckpt\n")
    with capture_logs():
        assert registry.refresh({config: "train.yaml"})
    assert registry.holding() == {}
    assert tmp_path / "a.ckpt" in registry.pins()


# --- a config re-saved in place, read while it is being written -----------------------------------


def test_a_config_being_rewritten_only_adds_pins_until_it_is_quiet(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    """A training config re-saved in place (open "w", then write) is empty, then partial, for a
    moment: read then, its resume source was unpinned and deleted by the next pass. Until the edit has
    been seen unchanged for the quiet time (its mtime does not count: a writer whose clock is behind
    dates it long past), the pins read before stay and what the partial file names is added."""
    config = write_config(tmp_path, "model: {lr: 0.1}\nckpt_path: a.ckpt\n")
    registry = ProtectionRegistry(tmp_path)
    registry.refresh({config: "train.yaml"})
    assert set(registry.pins()) == {tmp_path / "a.ckpt"}

    write_backdated(config, "")  # truncated by the writer, not yet written
    changed_empty = registry.refresh({config: "train.yaml"})
    write_backdated(config, "model: {lr: 0.1}\npretrained_ckpt_path: b.ckpt\n")  # half-way: a new key
    changed_partial = registry.refresh({config: "train.yaml"})
    pins_while_written = set(registry.pins())
    quiet_clock.pass_quiet_time()  # done, and left alone since
    with capture_logs() as logs:
        registry.refresh({config: "train.yaml"})

    assert (changed_empty, changed_partial) == (False, True)
    assert pins_while_written == {tmp_path / "a.ckpt", tmp_path / "b.ckpt"}
    assert set(registry.pins()) == {tmp_path / "b.ckpt"}
    assert [log["event"] for log in logs if log["event"] != "protection_warning"] == ["protection_reloaded"]


def test_a_one_shot_prune_reads_a_config_as_it_is(tmp_path: Path) -> None:
    config = write_backdated(tmp_path / "train.yaml", "ckpt_path: a.ckpt\n")
    registry = ProtectionRegistry(tmp_path)
    registry.refresh({config: "train.yaml"}, strict=True)
    config.write_text("ckpt_path: b.ckpt\n")  # just written: prune does not wait for it
    registry.refresh({config: "train.yaml"}, strict=True)
    assert set(registry.pins()) == {tmp_path / "b.ckpt"}


def test_a_config_first_read_is_read_as_it_is(tmp_path: Path) -> None:
    """Only a re-read waits: a config read for the first time has no pins to keep meanwhile (one
    being written at the daemon's start is a known limit, README)."""
    config = write_config(tmp_path, "ckpt_path: a.ckpt\n")
    registry = ProtectionRegistry(tmp_path)
    assert registry.refresh({config: "train.yaml"})
    assert set(registry.pins()) == {tmp_path / "a.ckpt"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${paths.ckpt_dir}/epoch=00-step=000300-train.ckpt", "epoch=00-step=000300-train.ckpt"),
        ("${oc.env:CKPT_ROOT}/run/best.ckpt", "best.ckpt"),
        ("checkpoints/run/last.ckpt", "last.ckpt"),
        ("s3://bucket/run/epoch=01-step=000100-train.ckpt", "epoch=01-step=000100-train.ckpt"),
        ("checkpoint-500/", "checkpoint-500"),  # a directory checkpoint
        ("${paths.ckpt_dir}/${name}.ckpt", None),  # the name itself is interpolated: unknown
        ("run/epoch=${epoch}-train.ckpt", None),
        ("${paths.last}", None),
        ("..", None),
        ("~", None),
        ("/", None),
    ],
)
def test_the_namesake_of_a_resume_value_is_its_written_out_file_name(
    value: str, expected: str | None
) -> None:
    assert namesake(value) == expected


def test_only_references_found_nowhere_keep_their_namesakes(tmp_path: Path) -> None:
    present = tmp_path / step_name(0, 100)
    present.write_bytes(b"weights")
    config = write_config(
        tmp_path,
        f"ckpt_path: {present}\npretrained_ckpt_path: ${{paths.ckpt_dir}}/{step_name(0, 200)}\n",
    )
    protection = read_config_protection(config, "train.yaml", tmp_path)

    assert [reference.found for reference in protection.references] == [True, False]
    assert namesakes_from([protection]) == {
        step_name(0, 200): "named like the fine-tuning source in train.yaml (pretrained_ckpt_path), which is "
        "not found as written (kept in doubt)"
    }


def test_a_pinned_name_keeps_that_checkpoint_in_every_group() -> None:
    name = step_name(0, 100)
    records = [
        make_record(name, Path("/ckpt/a")),
        make_record(step_name(0, 200), Path("/ckpt/a")),
        make_record(name, Path("/ckpt/b")),
        make_record(step_name(0, 200), Path("/ckpt/b")),
    ]
    decisions = plan(records, Policy(save_top_k_checkpoints=1), pinned_names={name: "in doubt"}).decisions
    assert {(decision.record.relative_path, decision.action) for decision in decisions} == {
        ("a/" + name, Action.KEEP),
        ("a/" + step_name(0, 200), Action.KEEP),
        ("b/" + name, Action.KEEP),
        ("b/" + step_name(0, 200), Action.KEEP),
    }
    assert all(d.reasons == ("in doubt",) for d in decisions if d.record.name == name)
