"""Table-driven tests of the retention policy loader (``ckpt_watcher.policy``) and its CLI errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from ckpt_watcher.cli import main
from ckpt_watcher.naming import DEFAULT_BEST_TEMPLATE, DEFAULT_LAST_TEMPLATE, Kind
from ckpt_watcher.policy import (
    DEFAULT_POLICY,
    POLICY_DESCRIPTIONS,
    POLICY_KEYS,
    LoadedPolicy,
    NamingTemplates,
    Policy,
    PolicyError,
    TrashSettings,
    load_policy,
    suggest_key,
    validate_policy,
)
from tests.support.factories import step_name, write_checkpoint
from tests.support.hostile_configs import (
    alias_bomb,
    deep_block,
    deep_flow,
    merge_bomb,
    sequence_bomb,
)
from tests.support.hostile_trees import make_fifo

RETENTION_KEYS = (
    "save_top_k_checkpoints",
    "save_top_k_best",
    "save_every_n_epochs",
    "save_on_n_steps",
    "best_mode",
    "naming",
    "protect",
    "protect_from",
    "verify",
    "max_size",
    "keep_free",
    "keep_every_n_steps",
    "trash",
)


SIZE_HINT = (
    "a size is a whole number of bytes or a number and a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
    "e.g. 500GiB or 1.5TB"
)
FREE_HINT = SIZE_HINT + ", or a percentage of the file system's size, e.g. 10%"


def write_policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> LoadedPolicy:
    return load_policy(write_policy(tmp_path, text))


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_text(tmp_path, text)
    return caught.value.problems


# --- defaults ---------------------------------------------------------------------------------


def test_policy_keys_are_the_retention_keys() -> None:
    assert POLICY_KEYS == RETENTION_KEYS


def test_load_policy_none_gives_the_embedded_default() -> None:
    loaded = load_policy(None)
    assert loaded.policy == DEFAULT_POLICY
    assert loaded.policy == Policy()
    assert loaded.source is None
    assert loaded.source_label == "embedded default"
    assert dict(loaded.origins) == dict.fromkeys(RETENTION_KEYS, "default")
    assert loaded.warnings == ()


@pytest.mark.parametrize(
    ("key", "default"),
    [
        ("save_top_k_checkpoints", 5),
        ("save_top_k_best", 3),
        ("save_every_n_epochs", 0),
        ("save_on_n_steps", 500),
        ("best_mode", "min"),
        ("protect", ()),
        ("protect_from", ()),
        ("verify", "zip"),
        ("naming", NamingTemplates()),
        ("max_size", None),
        ("keep_free", None),
        ("keep_every_n_steps", 0),
    ],
)
def test_default_values(key: str, default: object) -> None:
    assert getattr(load_policy(None).policy, key) == default


def test_default_naming_classifies_default_names() -> None:
    naming = load_policy(None).policy.compiled_naming
    assert naming.classify(step_name(1, 500)).kind is Kind.STEP
    assert naming.classify("last.ckpt").kind is Kind.LAST


# --- valid values -----------------------------------------------------------------------------

VALID: list[tuple[str, str, object]] = [
    ("save_top_k_checkpoints: -1\n", "save_top_k_checkpoints", -1),
    ("save_top_k_checkpoints: 0\n", "save_top_k_checkpoints", 0),
    ("save_top_k_checkpoints: 10\n", "save_top_k_checkpoints", 10),
    ("save_top_k_checkpoints: 100000000000000000000\n", "save_top_k_checkpoints", 10**20),
    ("save_top_k_best: -1\n", "save_top_k_best", -1),
    ("save_top_k_best: 0\n", "save_top_k_best", 0),
    ("save_top_k_best: 7\n", "save_top_k_best", 7),
    ("save_every_n_epochs: 0\n", "save_every_n_epochs", 0),
    ("save_every_n_epochs: 3\n", "save_every_n_epochs", 3),
    ("save_on_n_steps: 0\n", "save_on_n_steps", 0),
    ("save_on_n_steps: 1000\n", "save_on_n_steps", 1000),
    ("best_mode: min\n", "best_mode", "min"),
    ("best_mode: max\n", "best_mode", "max"),
    ("best_mode: 'max'\n", "best_mode", "max"),
    ("protect: []\n", "protect", ()),
    ("protect: ['*-keep.ckpt', 'run1/**']\n", "protect", ("*-keep.ckpt", "run1/**")),
    ("protect:\n  - 'epoch=00-*'\n", "protect", ("epoch=00-*",)),
    ("naming: {}\n", "naming", NamingTemplates()),
    (
        "naming:\n  step: 'epoch={epoch}-step={step}'\n",
        "naming",
        NamingTemplates(step="epoch={epoch}-step={step}"),
    ),
    (
        "naming:\n  best: 'epoch={epoch}-val_loss={val_loss:.2f}'\n  last: final\n",
        "naming",
        NamingTemplates(best="epoch={epoch}-val_loss={val_loss:.2f}", last="final"),
    ),
    ("max_size: 1000\n", "max_size_bytes", 1000),
    ("max_size: 0\n", "max_size_bytes", 0),
    ("max_size: 500GiB\n", "max_size_bytes", 500 * 1024**3),
    ("max_size: '1.5TB'\n", "max_size_bytes", 1_500_000_000_000),
    ("max_size: 2 MiB\n", "max_size_bytes", 2 * 1024**2),
    ("max_size: 2 MiB\n", "max_size", "2 MiB"),
    ("max_size: null\n", "max_size_bytes", None),
    ("keep_free: 50GB\n", "keep_free", "50GB"),
    ("keep_free: 10%\n", "keep_free", "10%"),
    ("keep_free: 0\n", "keep_free", 0),
    ("keep_every_n_steps: 0\n", "keep_every_n_steps", 0),
    ("keep_every_n_steps: 1000\n", "keep_every_n_steps", 1000),
]


@pytest.mark.parametrize(("text", "key", "expected"), VALID, ids=[text.strip() for text, *_ in VALID])
def test_valid_values_are_read(tmp_path: Path, text: str, key: str, expected: object) -> None:
    loaded = load_text(tmp_path, text)
    assert getattr(loaded.policy, key) == expected
    assert loaded.warnings == ()


def test_origins_say_which_keys_came_from_the_file(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "save_top_k_best: 2\nbest_mode: max\nmodel: {dim: 4096}\n")
    loaded = load_policy(path)
    assert loaded.source == path
    assert loaded.source_label == str(path)
    assert dict(loaded.origins) == {
        "save_top_k_checkpoints": "default",
        "save_top_k_best": str(path),
        "save_every_n_epochs": "default",
        "save_on_n_steps": "default",
        "best_mode": str(path),
        "naming": "default",
        "protect": "default",
        "protect_from": "default",
        "verify": "default",
        "max_size": "default",
        "keep_free": "default",
        "keep_every_n_steps": "default",
        "trash": "default",
    }
    assert loaded.policy == Policy(save_top_k_best=2, best_mode="max")


def test_naming_override_changes_classification(tmp_path: Path) -> None:
    text = "naming:\n  step: 'epoch={epoch}-step={step}'\n"
    naming = load_text(tmp_path, text).policy.compiled_naming
    lightning_name = naming.classify("epoch=3-step=1500.ckpt")
    assert lightning_name.kind is Kind.STEP
    assert (lightning_name.epoch, lightning_name.step) == (3, 1500)
    assert naming.classify(step_name(3, 1500)).kind is Kind.UNKNOWN
    assert naming.best.template == DEFAULT_BEST_TEMPLATE
    assert naming.last.template == DEFAULT_LAST_TEMPLATE


LLADA8B_TRAINER_CONFIG = """\
# configs/trainer/llada8b.yaml
name: llada8b
seed: 1234
model:
  arch: llada
  dim: 4096
  n_layers: 32
  n_heads: 32
  vocab_size: 126464
  max_seq_len: 4096
  mask_token_id: 126336
optimizer:
  name: adamw
  lr: 4.0e-4
  betas: [0.9, 0.95]
  weight_decay: 0.1
  eps: 1.0e-8
scheduler:
  name: warmup_stable_decay
  warmup_steps: 2000
  decay_fraction: 0.1
data:
  train: /data/pretrain/shards-*.arrow
  batch_size: 8
  num_workers: 16
trainer:
  accelerator: gpu
  devices: 8
  precision: bf16-mixed
  max_steps: 2000000
  save_top_k: 3
  every_n_train_steps: 500
logger:
  wandb:
    project: llada
    name: llada8b-run3
mode: pretrain

# retention (read by ckpt-watcher)
save_top_k_checkpoints: 4
save_top_k_best: 2
save_every_n_epochs: 1
save_on_n_steps: 1000
"""


def test_realistic_trainer_config_is_a_policy(tmp_path: Path) -> None:
    path = write_policy(tmp_path, LLADA8B_TRAINER_CONFIG, name="llada8b.yaml")
    loaded = load_policy(path)
    assert loaded.policy == Policy(
        save_top_k_checkpoints=4, save_top_k_best=2, save_every_n_epochs=1, save_on_n_steps=1000
    )
    # 'name', 'mode', 'model', 'seed' and nested keys are the trainer's own, not misspelt retention keys.
    assert loaded.warnings == ()
    assert {key for key, origin in loaded.origins.items() if origin == str(path)} == {
        "save_top_k_checkpoints",
        "save_top_k_best",
        "save_every_n_epochs",
        "save_on_n_steps",
    }
    assert loaded.origins["best_mode"] == "default"
    assert loaded.origins["naming"] == "default"


# --- invalid values: one problem each ---------------------------------------------------------

INVALID: list[tuple[str, str]] = [
    # integers are strict
    (
        "save_top_k_checkpoints: true",
        "At 'save_top_k_checkpoints': expected a whole number, got true (a boolean)",
    ),
    (
        "save_top_k_checkpoints: yes",
        "At 'save_top_k_checkpoints': expected a whole number, got true (a boolean)",
    ),
    ("save_top_k_best: false", "At 'save_top_k_best': expected a whole number, got false (a boolean)"),
    (
        "save_top_k_checkpoints: 2.5",
        "At 'save_top_k_checkpoints': expected a whole number, got 2.5 (a number with a fraction)",
    ),
    (
        "save_top_k_checkpoints: 2.0",
        "At 'save_top_k_checkpoints': expected a whole number, got 2.0 (a number with a fraction)",
    ),
    (
        "save_top_k_checkpoints: .inf",
        "At 'save_top_k_checkpoints': expected a whole number, got inf (a number with a fraction)",
    ),
    (
        "save_top_k_checkpoints: '5'",
        "At 'save_top_k_checkpoints': expected a whole number, got '5' (a string)",
    ),
    ('save_on_n_steps: "500"', "At 'save_on_n_steps': expected a whole number, got '500' (a string)"),
    ("save_on_n_steps: five", "At 'save_on_n_steps': expected a whole number, got 'five' (a string)"),
    ("save_top_k_checkpoints:", "At 'save_top_k_checkpoints': expected a whole number, got null"),
    ("save_top_k_checkpoints: ~", "At 'save_top_k_checkpoints': expected a whole number, got null"),
    ("save_every_n_epochs: [1]", "At 'save_every_n_epochs': expected a whole number, got a list"),
    ("save_every_n_epochs: {n: 1}", "At 'save_every_n_epochs': expected a whole number, got a mapping"),
    # ranges
    ("save_top_k_checkpoints: -2", "At 'save_top_k_checkpoints': must be at least -1, got -2 (an integer)"),
    ("save_top_k_best: -5", "At 'save_top_k_best': must be at least -1, got -5 (an integer)"),
    ("save_every_n_epochs: -1", "At 'save_every_n_epochs': must be at least 0, got -1 (an integer)"),
    ("save_on_n_steps: -1", "At 'save_on_n_steps': must be at least 0, got -1 (an integer)"),
    # best_mode
    ("best_mode: MIN", "At 'best_mode': must be one of 'min' or 'max', got 'MIN' (a string)"),
    ("best_mode: avg", "At 'best_mode': must be one of 'min' or 'max', got 'avg' (a string)"),
    ("best_mode: 1", "At 'best_mode': must be one of 'min' or 'max', got 1 (an integer)"),
    ("best_mode: true", "At 'best_mode': must be one of 'min' or 'max', got true (a boolean)"),
    ("best_mode:", "At 'best_mode': must be one of 'min' or 'max', got null"),
    # naming
    ("naming:", "At 'naming': expected a mapping, got null"),
    ("naming: epoch={epoch}", "At 'naming': expected a mapping, got 'epoch={epoch}' (a string)"),
    ("naming: [step]", "At 'naming': expected a mapping, got a list"),
    ("naming: {stpe: 'x{step}'}", "At 'naming.stpe': unknown key (the known ones are step, best and last)"),
    ("naming: {steps: 'x{step}'}", "At 'naming.steps': unknown key (the known ones are step, best and last)"),
    ("naming: {step: 5}", "At 'naming.step': expected a string, got 5 (an integer)"),
    ("naming: {step: null}", "At 'naming.step': expected a string, got null"),
    ("naming: {step: 'epoch={epoch}'}", "At 'naming.step': a step template must contain '{step}'"),
    (
        "naming: {step: 'step={step}.ckpt'}",
        "At 'naming.step': write the template without the '.ckpt' extension",
    ),
    ("naming: {step: '{step!r}'}", "At 'naming.step': '{step!r}': conversions are not supported"),
    ("naming: {step: '{step}-{step}'}", "At 'naming.step': '{step}' appears twice"),
    (
        "naming: {step: 'run/{step}'}",
        "At 'naming.step': a template names a file, so it cannot contain '/', '\\' or NUL",
    ),
    (
        "naming: {best: 'best_{step}'}",
        "At 'naming.best': a best template must contain exactly one metric field "
        "(such as '{val_loss:.4f}'), found 0",
    ),
    (
        "naming: {best: '{a:.2f}_{b:.2f}'}",
        "At 'naming.best': a best template must contain exactly one metric field "
        "(such as '{val_loss:.4f}'), found 2",
    ),
    ("naming: {best: '{loss:n}'}", "At 'naming.best': '{loss:n}': a metric is a float, use a float format"),
    ("naming: {last: 'last_{step}'}", "At 'naming.last': the last template takes no fields"),
    ("naming: {last: ''}", "At 'naming.last': a template must not be empty"),
    # protect
    ("protect: '*.ckpt'", "At 'protect': expected a list of glob patterns, got '*.ckpt' (a string)"),
    ("protect:", "At 'protect': expected a list of glob patterns, got null"),
    ("protect: {a: b}", "At 'protect': expected a list of glob patterns, got a mapping"),
    ("protect: [1]", "At 'protect.0': expected a string, got 1 (an integer)"),
    ("protect: ['ok', [a]]", "At 'protect.1': expected a string, got a list"),
    ("protect: ['']", "At 'protect.0': must not be empty"),
    ("protect: ['ok', '   ']", "At 'protect.1': must not be empty"),
    # sizes
    ("max_size: 500 gb", f"At 'max_size': got '500 gb' (a string): unknown unit; {SIZE_HINT}"),
    ("max_size: '500'", f"At 'max_size': got '500' (a string): not a number and a unit; {SIZE_HINT}"),
    ("max_size: 1.5B", f"At 'max_size': got '1.5B' (a string): a number of bytes must be whole; {SIZE_HINT}"),
    (
        "max_size: 1.5e9",  # YAML 1.2 reads this as a string, and it is not a number and a unit
        f"At 'max_size': got '1.5e9' (a string): not a number and a unit; {SIZE_HINT}",
    ),
    ("max_size: 2.5", f"At 'max_size': expected a size, got 2.5 (a number with a fraction); {SIZE_HINT}"),
    ("max_size: true", f"At 'max_size': expected a size, got true (a boolean); {SIZE_HINT}"),
    ("max_size: [1]", f"At 'max_size': expected a size, got a list; {SIZE_HINT}"),
    ("max_size: -1", "At 'max_size': must be at least 0, got -1 (an integer)"),
    ("max_size: 10%", f"At 'max_size': got '10%' (a string): not a number and a unit; {SIZE_HINT}"),
    ("max_size: 10 PiB", f"At 'max_size': got '10 PiB' (a string): unknown unit; {SIZE_HINT}"),
    (
        "keep_free: 100%",
        f"At 'keep_free': got '100%' (a string): a percentage must be below 100%; {FREE_HINT}",
    ),
    ("keep_free: '%5'", f"At 'keep_free': got '%5' (a string): not a percentage; {FREE_HINT}"),
    ("keep_free: -5%", f"At 'keep_free': got '-5%' (a string): not a percentage; {FREE_HINT}"),
    ("keep_free: 1.5", f"At 'keep_free': expected a size, got 1.5 (a number with a fraction); {FREE_HINT}"),
    ("keep_every_n_steps: -1", "At 'keep_every_n_steps': must be at least 0, got -1 (an integer)"),
    (
        "keep_every_n_steps: 2.5",
        "At 'keep_every_n_steps': expected a whole number, got 2.5 (a number with a fraction)",
    ),
]


@pytest.mark.parametrize(("text", "problem"), INVALID, ids=[text for text, _ in INVALID])
def test_invalid_value_is_one_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write_policy(tmp_path, text + "\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.problems == [problem]
    assert caught.value.source == str(path)
    assert str(caught.value) == f"invalid policy {path}:\n  {problem}"


def test_several_bad_fields_give_one_problem_each_in_one_error(tmp_path: Path) -> None:
    text = (
        "model: {dim: 4096}\n"
        "save_top_k_checkpoints: true\n"
        "save_top_k_best: 2.5\n"
        "save_every_n_epochs: -1\n"
        "save_on_n_steps: '500'\n"
        "best_mode: average\n"
        "naming: {step: 'epoch={epoch}', last: 'last_{step}', extra: x}\n"
        "protect: '*.ckpt'\n"
    )
    problems = problems_of(tmp_path, text)
    assert problems == [
        "At 'save_top_k_checkpoints': expected a whole number, got true (a boolean)",
        "At 'save_top_k_best': expected a whole number, got 2.5 (a number with a fraction)",
        "At 'save_every_n_epochs': must be at least 0, got -1 (an integer)",
        "At 'save_on_n_steps': expected a whole number, got '500' (a string)",
        "At 'best_mode': must be one of 'min' or 'max', got 'average' (a string)",
        "At 'naming.step': a step template must contain '{step}'",
        "At 'naming.last': the last template takes no fields",
        "At 'naming.extra': unknown key (the known ones are step, best and last)",
        "At 'protect': expected a list of glob patterns, got '*.ckpt' (a string)",
    ]


def test_two_bad_protect_entries_are_two_problems(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "protect: [1, 2]\n") == [
        "At 'protect.0': expected a string, got 1 (an integer)",
        "At 'protect.1': expected a string, got 2 (an integer)",
    ]


def test_wrong_type_and_empty_protect_pattern_are_both_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "protect: [1, '']\n")
    assert len(problems) == 2


def test_every_problem_has_the_at_key_format(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "save_top_k_best: x\nnaming: {best: 'b_{step}'}\nprotect: [3]\n")
    assert len(problems) == 3
    assert all(problem.startswith("At '") and "': " in problem for problem in problems)


# --- not a usable policy file at all ----------------------------------------------------------

NOT_A_MAPPING: list[tuple[str, str]] = [
    ("", "null"),
    ("# only a comment\n", "null"),
    ("~\n", "null"),
    ("---\n", "null"),
    ("- save_top_k_best: 3\n", "a list"),
    ("[1, 2]\n", "a list"),
    ("42\n", "42 (an integer)"),
    ("save_top_k_best\n", "'save_top_k_best' (a string)"),
    ("true\n", "true (a boolean)"),
]


@pytest.mark.parametrize(("text", "described"), NOT_A_MAPPING, ids=[repr(text) for text, _ in NOT_A_MAPPING])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, described: str) -> None:
    assert problems_of(tmp_path, text) == [f"At '<top level>': expected a mapping of keys, got {described}"]


YAML_SYNTAX_ERRORS: list[tuple[str, str, str]] = [
    ("unclosed-flow-list", "save_top_k_best: [1\n", "line 2"),
    ("bad-indentation", "model:\n  dim: 1\n    heads: 2\n", "line 3"),
    ("tab-indentation", "save_top_k_best: 3\n\tprotect: []\n", "line 2"),
    ("unclosed-quote", "best_mode: 'min\n", ""),
    ("python-tag", "save_top_k_best: !!python/object:os.system 1\n", "line 1"),
    ("unknown-tag-object", "save_top_k_best: !!python/name:os.system\n", "line 1"),
    ("two-documents", "save_top_k_best: 3\n---\nsave_top_k_best: 4\n", "line 2"),
    ("unhashable-key", "? [a, b]\n: 1\nsave_top_k_best: 3\n", "line 1"),
    ("control-character", "save_top_k_best: \x07\n", ""),
    ("undefined-alias", "save_top_k_best: *nothing\n", "line 1"),
]


@pytest.mark.parametrize(
    ("text", "where"),
    [(text, where) for _, text, where in YAML_SYNTAX_ERRORS],
    ids=[case for case, *_ in YAML_SYNTAX_ERRORS],
)
def test_yaml_syntax_error_is_a_policy_error(tmp_path: Path, text: str, where: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith("At '<file>': YAML syntax error")
    assert where in problems[0]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.problems == ["At '<file>': no such file"]
    assert str(path) in str(caught.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.mkdir()
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.problems == ["At '<file>': is a directory, not a YAML file"]


@pytest.mark.parametrize(
    "data",
    [
        b"save_top_k_best: 3\n# caf\xe9 in latin-1\n",
        b"save_top_k_best: \xff\xfe3\n",
        "save_top_k_best: 3\n".encode("utf-16"),
    ],
    ids=["latin-1-comment", "invalid-bytes", "utf-16"],
)
def test_non_utf8_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(data)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("At '<file>': not UTF-8 text (")


def test_utf8_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"\xef\xbb\xbfsave_top_k_best: 4\n")
    assert load_policy(path).policy.save_top_k_best == 4


@pytest.mark.parametrize(
    "text",
    [
        "model: {dim: 4096}\noptimizer: {lr: 0.001}\n",
        "name: llada8b\n",
        "save_top_k: 3\nevery_n_train_steps: 500\n",
        "{}\n",
    ],
)
def test_file_setting_no_retention_key_is_an_error(tmp_path: Path, text: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith("At '<top level>': sets none of the retention keys (")
    for key in RETENTION_KEYS:
        assert key in problems[0]


def test_misspelt_only_retention_key_is_an_error(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "save_top_k_bset: 3\n")
    assert len(problems) == 2
    assert problems[0].startswith("At '<top level>': sets none of the retention keys")
    assert problems[1] == "At 'save_top_k_bset': unknown key, did you mean 'save_top_k_best'? It is ignored."


YAML_1_2_NUMBERS: list[tuple[str, str, int]] = [
    ("save_on_n_steps: 0500\n", "save_on_n_steps", 500),  # YAML 1.1 would read octal 320
    ("save_top_k_checkpoints: 0x10\n", "save_top_k_checkpoints", 16),
    ("save_top_k_checkpoints: 0o10\n", "save_top_k_checkpoints", 8),
    ("save_top_k_best: -1\n", "save_top_k_best", -1),
    ("save_top_k_best: +2\n", "save_top_k_best", 2),
]


@pytest.mark.parametrize(("text", "key", "value"), YAML_1_2_NUMBERS)
def test_integers_are_read_as_yaml_1_2(tmp_path: Path, text: str, key: str, value: int) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert getattr(load_policy(path).policy, key) == value


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "save_every_n_epochs: 1:30\n",
            "At 'save_every_n_epochs': expected a whole number, got '1:30' (a string)",
        ),
        ("save_on_n_steps: 1_000\n", "At 'save_on_n_steps': expected a whole number, got '1_000' (a string)"),
    ],
)
def test_yaml_1_1_number_forms_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    assert problems_of(tmp_path, text) == [problem]


def test_a_retention_key_set_twice_is_an_error(tmp_path: Path) -> None:
    text = "save_top_k_best: 3\nmodel: x\nsave_top_k_best: 7\nnaming:\n  last: a\n  last: b\n"
    assert sorted(problems_of(tmp_path, text)) == [
        "At 'naming.last': set more than once (lines 5, 6); keep one",
        "At 'save_top_k_best': set more than once (lines 1, 3); keep one",
    ]


def test_unrelated_keys_set_twice_are_the_trainers_business(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("model: a\nmodel: b\nsave_top_k_best: 2\n")
    assert load_policy(path).policy.save_top_k_best == 2


@pytest.mark.parametrize("key", ["project", "best_model"])
def test_common_trainer_keys_near_a_retention_key_are_not_flagged(tmp_path: Path, key: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"{key}: x\nsave_top_k_best: 2\n")
    assert load_policy(path).warnings == ()


# --- did you mean -----------------------------------------------------------------------------

MISSPELT: list[tuple[str, str]] = [
    ("save_top_k_bset", "save_top_k_best"),
    ("save_top_k_bes", "save_top_k_best"),
    ("save_top_k_checkpoint", "save_top_k_checkpoints"),
    ("save_top_k_chekpoints", "save_top_k_checkpoints"),
    ("save_every_n_epoch", "save_every_n_epochs"),
    ("save_every_nepochs", "save_every_n_epochs"),
    ("save_on_n_step", "save_on_n_steps"),
    ("save_on_nsteps", "save_on_n_steps"),
    ("Save_top_k_best", "save_top_k_best"),
    ("best_mod", "best_mode"),
    ("bestmode", "best_mode"),
    ("best-mode", "best_mode"),
    ("nameing", "naming"),
    ("namign", "naming"),
    ("protects", "protect"),
    ("portect", "protect"),
]


@pytest.mark.parametrize(("typo", "meant"), MISSPELT)
def test_misspelt_key_is_a_did_you_mean_warning(tmp_path: Path, typo: str, meant: str) -> None:
    assert suggest_key(typo) == meant
    loaded = load_text(tmp_path, f"save_top_k_checkpoints: 4\n{typo}: 1\n")
    assert loaded.warnings == (f"At '{typo}': unknown key, did you mean '{meant}'? It is ignored.",)
    assert loaded.policy.save_top_k_checkpoints == 4


NOT_MISSPELT = [
    "name",
    "names",
    "mode",
    "model",
    "seed",
    "data",
    "trainer",
    "save_top_k",
    "every_n_epochs",
    "best_model_path",
    "protected",
    "max_steps",
    "n",
    "",
    *RETENTION_KEYS,
]


@pytest.mark.parametrize("key", NOT_MISSPELT)
def test_trainer_keys_are_not_flagged(key: str) -> None:
    assert suggest_key(key) is None


def test_name_key_is_not_taken_for_naming(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "name: llada8b\nmode: pretrain\nsave_top_k_best: 2\n")
    assert loaded.warnings == ()


@pytest.mark.parametrize(
    "document",
    [
        {1: "x", "save_top_k_best": 2},
        {None: "x", "save_top_k_best": 2},
        {True: "x", "save_top_k_best": 2},
        {(1, 2): "x", "save_top_k_best": 2},
    ],
)
def test_non_string_keys_are_ignored(document: dict[Any, Any]) -> None:
    loaded = validate_policy(document, "config.yaml")
    assert loaded.policy.save_top_k_best == 2
    assert loaded.warnings == ()


def test_policy_error_render() -> None:
    error = PolicyError("cfg.yaml", ["At 'a': one", "At 'b.c': two"])
    assert error.render() == "invalid policy cfg.yaml:\n  At 'a': one\n  At 'b.c': two"
    assert str(error) == error.render()
    assert error.problems == ["At 'a': one", "At 'b.c': two"]


# --- CLI exit behaviour -----------------------------------------------------------------------


@pytest.fixture
def reset_logging() -> Iterator[None]:
    """main() points structlog at the captured stderr; undo that so later tests do not write to it."""
    yield
    structlog.reset_defaults()


BAD_POLICY_TEXT = "save_top_k_checkpoints: 1\nsave_top_k_best: true\nsave_on_n_steps: -3\nbest_mode: avg\n"
BAD_POLICY_PROBLEMS = [
    "At 'save_top_k_best': expected a whole number, got true (a boolean)",
    "At 'save_on_n_steps': must be at least 0, got -3 (an integer)",
    "At 'best_mode': must be one of 'min' or 'max', got 'avg' (a string)",
]


@pytest.mark.usefixtures("reset_logging")
def test_cli_policy_bad_file_exits_2_with_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_policy(tmp_path, BAD_POLICY_TEXT)
    assert main(["policy", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"invalid policy {bad}:" in captured.err
    for problem in BAD_POLICY_PROBLEMS:
        assert f"  {problem}\n" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("save_top_k_best: [1\n", "At '<file>': YAML syntax error at line 2"),
        ("- 1\n", "At '<top level>': expected a mapping of keys, got a list"),
        ("", "At '<top level>': expected a mapping of keys, got null"),
        (None, "At '<file>': no such file"),
        (b"save_top_k_best: \xff\n", "At '<file>': not UTF-8 text"),
        ("model: {dim: 1}\n", "At '<top level>': sets none of the retention keys"),
    ],
    ids=["yaml-syntax", "list", "empty", "missing", "non-utf8", "no-retention-keys"],
)
@pytest.mark.usefixtures("reset_logging")
def test_cli_policy_unusable_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes | None, problem: str
) -> None:
    path = tmp_path / "policy.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["policy", str(path)]) == 2
    captured = capsys.readouterr()
    assert problem in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.usefixtures("reset_logging")
def test_cli_policy_without_file_prints_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "# effective policy from embedded default"
    for line in (
        "save_top_k_checkpoints: 5  # default",
        "save_top_k_best: 3  # default",
        "save_every_n_epochs: 0  # default",
        "save_on_n_steps: 500  # default",
        'best_mode: "min"  # default',
        "naming:  # default",
        '  step: "epoch={epoch:02d}-step={step:06d}-train"',
        '  best: "best_{date}_epoch={epoch:02d}_step={step:06d}_loss={loss:.4f}"',
        '  last: "last"',
        "protect: []  # default",
    ):
        assert line in lines
    assert "Traceback" not in captured.err


@pytest.mark.usefixtures("reset_logging")
def test_cli_policy_good_file_shows_origins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(tmp_path, LLADA8B_TRAINER_CONFIG, name="llada8b.yaml")
    assert main(["policy", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# effective policy from {path}"
    assert f"save_top_k_checkpoints: 4  # from {path}" in lines
    assert "save_top_k_best: 2  # from " + str(path) in lines
    assert 'best_mode: "min"  # default' in lines


@pytest.mark.usefixtures("reset_logging")
def test_cli_policy_warns_about_a_misspelt_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(tmp_path, "save_top_k_best: 2\nsave_top_k_bset: 9\n")
    assert main(["policy", str(path)]) == 0
    captured = capsys.readouterr()
    assert "did you mean 'save_top_k_best'" in captured.err
    assert "save_top_k_best: 2  # from" in captured.out


def make_run(tmp_path: Path) -> list[Path]:
    run = tmp_path / "ckpts" / "run1"
    return [write_checkpoint(run / step_name(0, step)) for step in (100, 200, 300, 400)] + [
        write_checkpoint(run / "last.ckpt")
    ]


@pytest.mark.usefixtures("reset_logging")
def test_cli_prune_with_bad_policy_exits_2_and_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_run(tmp_path)
    # The valid 'save_top_k_checkpoints: 1' would delete three of the four step checkpoints if applied.
    bad = write_policy(tmp_path, BAD_POLICY_TEXT)
    assert main(["prune", str(tmp_path / "ckpts"), "--policy", str(bad)]) == 2
    captured = capsys.readouterr()
    for problem in BAD_POLICY_PROBLEMS:
        assert problem in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert all(path.exists() for path in files)


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.usefixtures("reset_logging")
def test_cli_prune_with_missing_policy_exits_2_and_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: bool
) -> None:
    files = make_run(tmp_path)
    argv = ["prune", str(tmp_path / "ckpts"), "--policy", str(tmp_path / "missing.yaml")]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 2
    assert "At '<file>': no such file" in capsys.readouterr().err
    assert all(path.exists() for path in files)


@pytest.mark.usefixtures("reset_logging")
def test_cli_prune_with_the_same_policy_fixed_does_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Control for the test above: the files it creates are ones a valid policy would delete."""
    files = make_run(tmp_path)
    good = write_policy(tmp_path, "save_top_k_checkpoints: 1\nsave_on_n_steps: 0\n")
    assert main(["prune", str(tmp_path / "ckpts"), "--policy", str(good)]) == 0
    capsys.readouterr()
    assert [path.exists() for path in files] == [False, False, False, True, True]


# --- hostile policy files: bounded, and every failure a policy error (issue 10, items 5, 7, 8) -----

# The whole class: any error a value's constructor raises, not only the ones PyYAML wraps itself.
UNCONSTRUCTIBLE: list[tuple[str, str, str]] = [
    ("invalid-date", "save_top_k_best: 3\nstarted: 2024-13-45\n", "line 2, column 10: a timestamp value"),
    ("day-out-of-range", "save_top_k_best: 3\nstarted: 2024-02-30\n", "line 2, column 10: a timestamp value"),
    (
        "timestamp-tag-on-text",
        'save_top_k_best: 3\nat: !!timestamp "noon"\n',
        "line 2, column 5: a timestamp",
    ),
    ("int-tag-on-text", 'save_top_k_best: !!int "three"\n', "line 1, column 18: a int value"),
    ("float-tag-on-text", 'save_top_k_best: 3\nlr: !!float "fast"\n', "line 2, column 5: a float value"),
    ("bool-tag-on-text", "save_top_k_best: 3\nflag: !!bool maybe\n", "line 2, column 7: a bool value"),
    ("huge-int", f"save_top_k_best: 3\nseed: !!int {'9' * 5000}\n", "line 2, column 7: a int value"),
    ("bad-base64", 'save_top_k_best: 3\nblob: !!binary "abc"\n', "line 2, column 7"),
]


@pytest.mark.parametrize(
    ("text", "where"), [(t, w) for _, t, w in UNCONSTRUCTIBLE], ids=[case for case, *_ in UNCONSTRUCTIBLE]
)
def test_a_value_yaml_cannot_construct_is_a_policy_error(tmp_path: Path, text: str, where: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith(f"At '<file>': YAML syntax error at {where}")


HOSTILE_YAML: list[tuple[str, str, str]] = [
    ("billion-laughs", sequence_bomb(levels=9, fanout=9), "more than 50000 values once aliases are expanded"),
    ("mapping-bomb-in-a-trainer-key", "save_top_k_best: 3\n" + alias_bomb(), "more than 50000 values"),
    ("merge-key-bomb", "save_top_k_best: 3\n" + merge_bomb(levels=25, fanout=3), "more than 50000 values"),
    ("recursive-alias", "save_top_k_best: 3\nloop: &a [1, *a]\n", "line 2, column 14: an alias inside"),
    ("nested-100000-deep", deep_flow(100_000), "line 1, column 81: nested deeper than 64 levels"),
    ("block-nested-200-deep", "save_top_k_best: 3\n" + deep_block(200), "nested deeper than 64 levels"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "problem"), [(t, p) for _, t, p in HOSTILE_YAML], ids=[case for case, *_ in HOSTILE_YAML]
)
def test_hostile_yaml_is_refused_with_a_clear_error(tmp_path: Path, text: str, problem: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith("At '<file>': YAML refused at line ")
    assert problem in problems[0]


def test_nesting_and_aliases_within_the_bounds_are_fine(tmp_path: Path) -> None:
    text = "defaults: &d {lr: 0.1, layers: [1, 2, 3]}\nmodel: {<<: *d, deep: " + "[" * 60 + "]" * 60 + "}\n"
    assert load_text(tmp_path, text + "save_top_k_best: 4\n").policy.save_top_k_best == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "socket"])
def test_a_policy_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "policy.yaml"
    if kind == "fifo":
        make_fifo(path)
    elif kind == "link-to-fifo":
        path.symlink_to(make_fifo(tmp_path / "pipe"))
    else:
        import socket

        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    expected = "a socket" if kind == "socket" else "a FIFO"
    assert caught.value.problems == [f"At '<file>': not a regular file ({expected}); refused"]


def test_a_policy_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "save_top_k_best: 3\n" + "# padding\n" * 110_000)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    assert problem.startswith("At '<file>': ")
    assert "more than a config file may have (1048576 bytes); refused" in problem


def test_a_policy_through_a_configmap_symlink_chain_is_read(tmp_path: Path) -> None:
    data = tmp_path / "..2026_11_28_10_00_00.000000001"
    data.mkdir()
    (data / "policy.yaml").write_text("save_top_k_best: 6\n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    assert load_policy(tmp_path / "policy.yaml").policy.save_top_k_best == 6


UNQUOTED: list[tuple[str, str]] = [
    (
        "save_top_k_checkpoints: AKIASECRET\n",
        "At 'save_top_k_checkpoints': expected a whole number, got a string",
    ),
    ("best_mode: AKIASECRET\n", "At 'best_mode': must be one of 'min' or 'max', got a string"),
    ("AKIASECRET\n", "At '<top level>': expected a mapping of keys, got a string"),
    ("protect: AKIASECRET\n", "At 'protect': expected a list of glob patterns, got a string"),
    ("naming: {step: 'AKIASECRET{step}{epoch}'}\n", "At 'naming.step': '…' and '…' must be separated"),
    (
        "[x]\nAKIASECRET = 1\n",
        "At '<file>': YAML syntax error at line 2, column 1: "
        "expected '<document start>', but found '<scalar>'",
    ),
    (
        "save_top_k_best: *AKIASECRET\n",
        "At '<file>': YAML syntax error at line 1, column 18: found undefined",
    ),
    (
        "save_top_k_best: !!int AKIASECRET\n",
        "At '<file>': YAML syntax error at line 1, column 18: a int value",
    ),
    ("max_size: 5 AKIASECRET\n", "At 'max_size': got a string: unknown unit; a size is"),
    ("keep_free: AKIASECRET%\n", "At 'keep_free': got a string: not a percentage; a size is"),
]


@pytest.mark.parametrize(("text", "problem"), UNQUOTED, ids=[problem for _, problem in UNQUOTED])
def test_unquoted_messages_give_positions_not_contents(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(write_policy(tmp_path, text), quote_contents=False)
    (reported,) = caught.value.problems
    assert reported.startswith(problem)
    assert "AKIASECRET" not in reported


def test_the_policy_named_on_the_command_line_is_quoted_as_before(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "best_mode: avg\n") == [
        "At 'best_mode': must be one of 'min' or 'max', got 'avg' (a string)"
    ]


# The embedded default is built without pydantic (start-up of a one-shot prune); these prove it is
# what validating an empty document gives, and that the plain values mirror the validation models.

EQUIVALENT_DOCUMENTS: list[dict[str, Any]] = [
    {},
    {"save_top_k_checkpoints": -1, "best_mode": "max", "protect": ["*-release.ckpt"], "verify": "crc"},
    {
        "naming": {"step": "{epoch}-{step}"},
        "trash": {"grace": " 24h "},
        "max_size": " 1GiB ",
        "keep_free": "10%",
    },
    {
        "protect_from": ("train.yaml",),
        "keep_every_n_steps": 500,
        "save_every_n_epochs": 2,
        "trash": {"grace": 0},
    },
]


def test_the_embedded_default_is_the_validated_empty_policy() -> None:
    assert DEFAULT_POLICY == Policy() == Policy.model_validate({})
    assert hash(DEFAULT_POLICY) == hash(Policy())
    assert DEFAULT_POLICY.naming == NamingTemplates()


@pytest.mark.parametrize("document", EQUIVALENT_DOCUMENTS)
def test_a_policy_holds_and_dumps_what_its_validation_model_does(document: dict[str, Any]) -> None:
    from ckpt_watcher import policy_model

    model = policy_model.Policy.model_validate(document)
    policy = Policy.model_validate(document)

    assert policy.model_dump() == model.model_dump()
    assert policy.model_dump(mode="json") == model.model_dump(mode="json")
    assert list(policy.model_dump()) == list(model.model_dump())  # the same key order
    assert Policy(**document) == policy
    assert (
        policy.model_copy(update={"verify": "zip"}).model_dump()
        == model.model_copy(update={"verify": "zip"}).model_dump()
    )


def test_parts_and_policies_may_be_given_as_values_too() -> None:
    trash = TrashSettings(grace="1h")
    naming = NamingTemplates(step="{epoch}-{step}")

    policy = Policy(save_top_k_checkpoints=1, trash=trash, naming=naming)

    assert policy == Policy.model_validate(
        {"save_top_k_checkpoints": 1, "trash": {"grace": "1h"}, "naming": {"step": "{epoch}-{step}"}}
    )
    assert policy.trash.enabled
    assert Policy.model_validate(policy) == policy


def test_the_plain_values_have_the_validation_models_keys_and_descriptions() -> None:
    from ckpt_watcher import policy_model

    assert tuple(policy_model.Policy.model_fields) == POLICY_KEYS
    assert list(NamingTemplates().model_dump()) == list(policy_model.NamingTemplates.model_fields)
    descriptions = {key: field.description for key, field in policy_model.Policy.model_fields.items()}
    assert descriptions == POLICY_DESCRIPTIONS
