"""Table-driven tests of checkpoint name classification (``ckpt_watcher.naming``)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ckpt_watcher.naming import (
    DEFAULT_BEST_TEMPLATE,
    DEFAULT_LAST_TEMPLATE,
    DEFAULT_NAMING,
    DEFAULT_STEP_TEMPLATE,
    Kind,
    Naming,
    ParsedName,
    TemplateError,
    compile_template,
)
from tests.support.factories import best_name, step_name

NAN = float("nan")
INF = float("inf")


def assert_parsed(actual: ParsedName, expected: ParsedName) -> None:
    """Compare two parsed names field by field, treating NaN as equal to NaN and -0.0 as distinct."""
    assert dataclasses.replace(actual, metric=None) == dataclasses.replace(expected, metric=None)
    if expected.metric is None:
        assert actual.metric is None
        return
    assert actual.metric is not None
    if math.isnan(expected.metric):
        assert math.isnan(actual.metric)
    else:
        assert actual.metric == expected.metric
        assert math.copysign(1.0, actual.metric) == math.copysign(1.0, expected.metric)


def step(epoch: int | None, step_: int, version: int = 0) -> ParsedName:
    return ParsedName(kind=Kind.STEP, epoch=epoch, step=step_, version=version)


def best(
    epoch: int,
    step_: int,
    metric: float,
    text: str,
    date: str = "20261128",
    version: int = 0,
    metric_name: str = "loss",
) -> ParsedName:
    return ParsedName(
        kind=Kind.BEST,
        epoch=epoch,
        step=step_,
        date=date,
        metric_name=metric_name,
        metric=metric,
        metric_text=text,
        version=version,
    )


def last(version: int = 0) -> ParsedName:
    return ParsedName(kind=Kind.LAST, version=version)


# --- the default templates --------------------------------------------------------------------


def test_default_templates_are_the_documented_ones() -> None:
    assert DEFAULT_STEP_TEMPLATE == "epoch={epoch:02d}-step={step:06d}-train"
    assert DEFAULT_BEST_TEMPLATE == "best_{date}_epoch={epoch:02d}_step={step:06d}_loss={loss:.4f}"
    assert DEFAULT_LAST_TEMPLATE == "last"
    assert Naming.from_templates() == DEFAULT_NAMING


DEFAULT_RECOGNISED: list[tuple[str, ParsedName]] = [
    # step checkpoints
    ("epoch=03-step=001500-train.ckpt", step(3, 1500)),
    ("epoch=00-step=000000-train.ckpt", step(0, 0)),
    ("epoch=99-step=999999-train.ckpt", step(99, 999_999)),
    # a format width is a minimum
    ("epoch=03-step=1000000-train.ckpt", step(3, 1_000_000)),
    ("epoch=03-step=1234567-train.ckpt", step(3, 1_234_567)),
    ("epoch=100-step=001500-train.ckpt", step(100, 1500)),
    ("epoch=1234-step=123456789012-train.ckpt", step(1234, 123_456_789_012)),
    # Lightning's collision suffix
    ("epoch=00-step=000500-train-v1.ckpt", step(0, 500, version=1)),
    ("epoch=00-step=000500-train-v2.ckpt", step(0, 500, version=2)),
    ("epoch=00-step=000500-train-v10.ckpt", step(0, 500, version=10)),
    ("epoch=03-step=1000000-train-v3.ckpt", step(3, 1_000_000, version=3)),
    # best checkpoints
    ("best_20261128_epoch=03_step=001500_loss=0.1234.ckpt", best(3, 1500, 0.1234, "0.1234")),
    ("best_20261128_epoch=03_step=001500_loss=12.5000.ckpt", best(3, 1500, 12.5, "12.5000")),
    ("best_20261128_epoch=03_step=001500_loss=-1.2500.ckpt", best(3, 1500, -1.25, "-1.2500")),
    ("best_20261128_epoch=03_step=001500_loss=-0.0000.ckpt", best(3, 1500, -0.0, "-0.0000")),
    ("best_20261128_epoch=03_step=001500_loss=0.0000.ckpt", best(3, 1500, 0.0, "0.0000")),
    ("best_20261128_epoch=03_step=001500_loss=nan.ckpt", best(3, 1500, NAN, "nan")),
    ("best_20261128_epoch=03_step=001500_loss=inf.ckpt", best(3, 1500, INF, "inf")),
    ("best_20261128_epoch=03_step=001500_loss=-inf.ckpt", best(3, 1500, -INF, "-inf")),
    ("best_20280229_epoch=03_step=001500_loss=0.1234.ckpt", best(3, 1500, 0.1234, "0.1234", date="20280229")),
    ("best_20261231_epoch=03_step=001500_loss=0.1234.ckpt", best(3, 1500, 0.1234, "0.1234", date="20261231")),
    ("best_20261128_epoch=03_step=1000000_loss=0.1234.ckpt", best(3, 1_000_000, 0.1234, "0.1234")),
    ("best_20261128_epoch=03_step=001500_loss=0.1234-v1.ckpt", best(3, 1500, 0.1234, "0.1234", version=1)),
    ("best_20261128_epoch=03_step=001500_loss=nan-v2.ckpt", best(3, 1500, NAN, "nan", version=2)),
    # last
    ("last.ckpt", last()),
    ("last-v1.ckpt", last(version=1)),
    ("last-v2.ckpt", last(version=2)),
    ("last-v17.ckpt", last(version=17)),
]


@pytest.mark.parametrize(
    ("name", "expected"), DEFAULT_RECOGNISED, ids=[name for name, _ in DEFAULT_RECOGNISED]
)
def test_default_naming_recognises(name: str, expected: ParsedName) -> None:
    assert_parsed(DEFAULT_NAMING.classify(name), expected)


@pytest.mark.parametrize(
    ("epoch", "step_", "version"),
    [(0, 0, 0), (3, 1500, 0), (3, 1500, 1), (12, 999_999, 0), (12, 1_000_000, 0), (123, 45_678_901, 4)],
)
def test_factory_step_names_round_trip(epoch: int, step_: int, version: int) -> None:
    assert_parsed(DEFAULT_NAMING.classify(step_name(epoch, step_, version)), step(epoch, step_, version))


@pytest.mark.parametrize(
    ("loss", "text"),
    [
        (0.1234, "0.1234"),
        (0.12344, "0.1234"),
        (-0.00001, "-0.0000"),
        (-0.0, "-0.0000"),
        (1e6, "1000000.0000"),
        (NAN, "nan"),
        (INF, "inf"),
        (-INF, "-inf"),
    ],
)
@pytest.mark.parametrize("version", [0, 1])
def test_factory_best_names_round_trip_whatever_format_produces(loss: float, text: str, version: int) -> None:
    name = best_name(7, 3500, loss, date="20270101", version=version)
    parsed = DEFAULT_NAMING.classify(name)
    assert_parsed(parsed, best(7, 3500, float(text), text, date="20270101", version=version))


NEAR_MISSES: list[tuple[str, str]] = [
    # partial / temporary files
    ("tmp-suffix", "epoch=03-step=001500-train.ckpt.tmp"),
    ("partial-suffix", "epoch=03-step=001500-train.ckpt.partial"),
    ("partial-extension", "epoch=03-step=001500-train.partial"),
    ("tmp-prefix", ".epoch=03-step=001500-train.ckpt"),
    ("double-extension", "epoch=03-step=001500-train.ckpt.ckpt"),
    # case
    ("capital-Epoch", "Epoch=03-step=001500-train.ckpt"),
    ("capital-Step", "epoch=03-Step=001500-train.ckpt"),
    ("capital-Train", "epoch=03-step=001500-Train.ckpt"),
    ("upper-extension", "epoch=03-step=001500-train.CKPT"),
    ("mixed-extension", "epoch=03-step=001500-train.Ckpt"),
    ("capital-Last", "Last.ckpt"),
    ("capital-Best", "Best_20261128_epoch=03_step=001500_loss=0.1234.ckpt"),
    # extension
    ("no-extension", "epoch=03-step=001500-train"),
    ("no-dot", "epoch=03-step=001500-trainckpt"),
    ("short-extension", "epoch=03-step=001500-train.ckp"),
    ("other-extension", "epoch=03-step=001500-train.pt"),
    ("extension-only", ".ckpt"),
    ("empty", ""),
    # whitespace
    ("leading-space", " epoch=03-step=001500-train.ckpt"),
    ("trailing-space", "epoch=03-step=001500-train.ckpt "),
    ("space-before-extension", "epoch=03-step=001500-train .ckpt"),
    ("space-in-digits", "epoch=03-step=001 500-train.ckpt"),
    ("trailing-newline", "epoch=03-step=001500-train.ckpt\n"),
    ("newline-before-extension", "epoch=03-step=001500-train\n.ckpt"),
    ("last-trailing-space", "last.ckpt "),
    ("last-leading-space", " last.ckpt"),
    # non-UTF-8 bytes as os.listdir gives them (surrogateescape)
    ("surrogate-before-extension", "epoch=03-step=001500-train\udcff.ckpt"),
    ("surrogate-in-step-digits", "epoch=03-step=00\udcff1500-train.ckpt"),
    ("surrogate-in-epoch-digits", "epoch=0\udce93-step=001500-train.ckpt"),
    ("surrogate-in-date", "best_2026\udcff1128_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("surrogate-in-metric", "best_20261128_epoch=03_step=001500_loss=0.12\udcff34.ckpt"),
    ("surrogate-last", "last\udcff.ckpt"),
    # Unicode digits
    ("arabic-indic-step", "epoch=03-step=\u0660\u0660\u0661\u0665\u0660\u0660-train.ckpt"),
    ("arabic-indic-epoch", "epoch=\u0660\u0663-step=001500-train.ckpt"),
    ("arabic-indic-one-digit", "epoch=03-step=00150\u0660-train.ckpt"),
    ("devanagari-step", "epoch=03-step=\u0966\u0966\u0967\u096b\u0966\u0966-train.ckpt"),
    ("fullwidth-step", "epoch=03-step=\uff10\uff10\uff11\uff15\uff10\uff10-train.ckpt"),
    (
        "arabic-indic-date",
        "best_\u0662\u0660\u0662\u0666\u0661\u0661\u0662\u0668_epoch=03_step=001500_loss=0.1234.ckpt",
    ),
    ("arabic-indic-metric", "best_20261128_epoch=03_step=001500_loss=\u0660.1234.ckpt"),
    ("arabic-indic-version", "epoch=03-step=001500-train-v\u0661.ckpt"),
    # widths the template could never produce
    ("step-too-short", "epoch=03-step=15-train.ckpt"),
    ("step-five-digits", "epoch=03-step=01500-train.ckpt"),
    ("epoch-too-short", "epoch=3-step=001500-train.ckpt"),
    ("step-extra-leading-zero", "epoch=03-step=0001500-train.ckpt"),
    ("overflow-with-leading-zero", "epoch=03-step=01000000-train.ckpt"),
    ("epoch-extra-leading-zero", "epoch=003-step=001500-train.ckpt"),
    # signs and other integer spellings
    ("negative-step", "epoch=03-step=-01500-train.ckpt"),
    ("negative-step-padded", "epoch=03-step=-001500-train.ckpt"),
    ("negative-epoch", "epoch=-1-step=001500-train.ckpt"),
    ("plus-step", "epoch=03-step=+01500-train.ckpt"),
    ("plus-step-padded", "epoch=03-step=+001500-train.ckpt"),
    ("plus-epoch", "epoch=+3-step=001500-train.ckpt"),
    ("underscore-in-step", "epoch=03-step=001_500-train.ckpt"),
    ("hex-step", "epoch=03-step=0x05dc-train.ckpt"),
    ("float-step", "epoch=03-step=1500.0-train.ckpt"),
    ("empty-step", "epoch=03-step=-train.ckpt"),
    # dates
    ("month-13", "best_20261301_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("month-00", "best_20260001_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("day-00", "best_20261100_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("feb-30", "best_20260230_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("feb-29-non-leap", "best_20260229_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("nov-31", "best_20261131_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("year-0000", "best_00000101_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("date-7-digits", "best_2026112_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("date-9-digits", "best_202611281_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("date-with-dashes", "best_2026-11-28_epoch=03_step=001500_loss=0.1234.ckpt"),
    ("date-missing", "best__epoch=03_step=001500_loss=0.1234.ckpt"),
    # metrics Python's format(x, ".4f") never produces
    ("metric-plus", "best_20261128_epoch=03_step=001500_loss=+0.1234.ckpt"),
    ("metric-3-decimals", "best_20261128_epoch=03_step=001500_loss=0.123.ckpt"),
    ("metric-5-decimals", "best_20261128_epoch=03_step=001500_loss=0.12345.ckpt"),
    ("metric-no-leading-zero", "best_20261128_epoch=03_step=001500_loss=.1234.ckpt"),
    ("metric-exponent", "best_20261128_epoch=03_step=001500_loss=1e-4.ckpt"),
    ("metric-exponent-fixed", "best_20261128_epoch=03_step=001500_loss=0.1234e0.ckpt"),
    ("metric-leading-zero", "best_20261128_epoch=03_step=001500_loss=00.1234.ckpt"),
    ("metric-NaN", "best_20261128_epoch=03_step=001500_loss=NaN.ckpt"),
    ("metric-NAN", "best_20261128_epoch=03_step=001500_loss=NAN.ckpt"),
    ("metric-INF", "best_20261128_epoch=03_step=001500_loss=INF.ckpt"),
    ("metric-minus-nan", "best_20261128_epoch=03_step=001500_loss=-nan.ckpt"),
    ("metric-plus-inf", "best_20261128_epoch=03_step=001500_loss=+inf.ckpt"),
    ("metric-infinity", "best_20261128_epoch=03_step=001500_loss=infinity.ckpt"),
    ("metric-empty", "best_20261128_epoch=03_step=001500_loss=.ckpt"),
    ("metric-wrong-name", "best_20261128_epoch=03_step=001500_val_loss=0.1234.ckpt"),
    # version suffixes that are not Lightning's
    ("version-v0", "epoch=00-step=000500-train-v0.ckpt"),
    ("version-leading-zero", "epoch=00-step=000500-train-v01.ckpt"),
    ("version-empty", "epoch=00-step=000500-train-v.ckpt"),
    ("version-capital-V", "epoch=00-step=000500-train-V1.ckpt"),
    ("version-underscore", "epoch=00-step=000500-train_v1.ckpt"),
    ("version-no-v", "epoch=00-step=000500-train-1.ckpt"),
    ("version-twice", "epoch=00-step=000500-train-v1-v2.ckpt"),
    ("version-negative", "epoch=00-step=000500-train-v-1.ckpt"),
    ("last-v0", "last-v0.ckpt"),
    ("last-v01", "last-v01.ckpt"),
    ("last-underscore-v1", "last_v1.ckpt"),
    ("best-v0", "best_20261128_epoch=03_step=001500_loss=0.1234-v0.ckpt"),
    # other shapes
    ("last-with-suffix", "last.ckpt.tmp"),
    ("last-prefixed", "my_last.ckpt"),
    ("last-with-step", "last-step=000500.ckpt"),
    ("step-without-train", "epoch=03-step=001500.ckpt"),
    ("step-missing-epoch", "step=001500-train.ckpt"),
    ("lightning-default-name", "epoch=3-step=1500.ckpt"),
    ("directory-like", "run/epoch=03-step=001500-train.ckpt"),
]


@pytest.mark.parametrize("name", [name for _, name in NEAR_MISSES], ids=[case for case, _ in NEAR_MISSES])
def test_near_miss_names_are_unknown(name: str) -> None:
    parsed = DEFAULT_NAMING.classify(name)
    assert parsed.kind is Kind.UNKNOWN
    assert parsed == ParsedName(kind=Kind.UNKNOWN)


# --- ordering ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_training_order",
    [
        [step_name(3, 999_998), step_name(3, 999_999), step_name(3, 1_000_000), step_name(3, 1_000_001)],
        [step_name(3, 999_999), step_name(3, 1_000_000), step_name(3, 9_999_999), step_name(3, 10_000_000)],
        [step_name(99, 5_000), step_name(100, 5_100)],
    ],
)
def test_parsed_numbers_order_correctly_where_names_do_not(in_training_order: list[str]) -> None:
    # Sorting by name puts step=1000000 before step=999999 (and epoch=100 before epoch=99).
    by_name = sorted(in_training_order)
    assert by_name != in_training_order
    parsed = {name: DEFAULT_NAMING.classify(name) for name in in_training_order}
    assert all(result.kind is Kind.STEP for result in parsed.values())

    def by_numbers(name: str) -> tuple[int, int]:
        result = parsed[name]
        assert result.epoch is not None
        assert result.step is not None
        return (result.epoch, result.step)

    assert sorted(by_name, key=by_numbers) == in_training_order


def test_overflow_step_parses_as_the_next_step() -> None:
    before = DEFAULT_NAMING.classify("epoch=03-step=999999-train.ckpt")
    after = DEFAULT_NAMING.classify("epoch=03-step=1000000-train.ckpt")
    assert before.step == 999_999
    assert after.step == 1_000_000
    assert sorted(["epoch=03-step=999999-train.ckpt", "epoch=03-step=1000000-train.ckpt"])[0] == (
        "epoch=03-step=1000000-train.ckpt"
    )


# --- custom templates -------------------------------------------------------------------------

CUSTOM: list[tuple[str, dict[str, str], str, ParsedName]] = [
    (
        "lightning-default",
        {"step": "epoch={epoch}-step={step}"},
        "epoch=0-step=500.ckpt",
        step(0, 500),
    ),
    (
        "lightning-default-big",
        {"step": "epoch={epoch}-step={step}"},
        "epoch=12-step=1234567.ckpt",
        step(12, 1_234_567),
    ),
    (
        "lightning-default-version",
        {"step": "epoch={epoch}-step={step}"},
        "epoch=0-step=500-v1.ckpt",
        step(0, 500, version=1),
    ),
    (
        "step-only",
        {"step": "step_{step:08d}"},
        "step_00001500.ckpt",
        step(None, 1500),
    ),
    (
        "step-with-date",
        {"step": "{date}-step={step}"},
        "20261128-step=10.ckpt",
        ParsedName(kind=Kind.STEP, step=10, date="20261128"),
    ),
    (
        "best-val-loss-2f",
        {"best": "epoch={epoch}-val_loss={val_loss:.2f}"},
        "epoch=3-val_loss=0.25.ckpt",
        ParsedName(kind=Kind.BEST, epoch=3, metric_name="val_loss", metric=0.25, metric_text="0.25"),
    ),
    (
        "best-val-loss-2f-negative",
        {"best": "epoch={epoch}-val_loss={val_loss:.2f}"},
        "epoch=3-val_loss=-0.25-v2.ckpt",
        ParsedName(
            kind=Kind.BEST, epoch=3, metric_name="val_loss", metric=-0.25, metric_text="-0.25", version=2
        ),
    ),
    (
        "best-no-field-names",
        {"best": "{epoch}-{step}-{val_acc:.3f}"},
        "3-1500-0.912.ckpt",
        ParsedName(
            kind=Kind.BEST, epoch=3, step=1500, metric_name="val_acc", metric=0.912, metric_text="0.912"
        ),
    ),
    (
        "best-exponent",
        {"best": "val_loss={val_loss:.2e}"},
        "val_loss=1.50e-05.ckpt",
        ParsedName(kind=Kind.BEST, metric_name="val_loss", metric=1.5e-05, metric_text="1.50e-05"),
    ),
    (
        "best-general",
        {"best": "val_loss={val_loss:g}"},
        "val_loss=1e-05.ckpt",
        ParsedName(kind=Kind.BEST, metric_name="val_loss", metric=1e-05, metric_text="1e-05"),
    ),
    (
        "best-upper-general-inf",
        {"best": "val_loss={val_loss:G}"},
        "val_loss=INF.ckpt",
        ParsedName(kind=Kind.BEST, metric_name="val_loss", metric=INF, metric_text="INF"),
    ),
    (
        "best-no-spec",
        {"best": "val_loss={val_loss}"},
        "val_loss=0.5.ckpt",
        ParsedName(kind=Kind.BEST, metric_name="val_loss", metric=0.5, metric_text="0.5"),
    ),
    (
        "best-zero-padded",
        {"best": "loss={loss:08.4f}"},
        "loss=000.5000.ckpt",
        ParsedName(kind=Kind.BEST, metric_name="loss", metric=0.5, metric_text="000.5000"),
    ),
    (
        "last-custom",
        {"last": "last_model"},
        "last_model.ckpt",
        last(),
    ),
    (
        "last-custom-version",
        {"last": "last_model"},
        "last_model-v3.ckpt",
        last(version=3),
    ),
    (
        "literal-braces",
        {"step": "run{{a}}-{step}"},
        "run{a}-7.ckpt",
        step(None, 7),
    ),
    (
        "regex-metacharacters",
        {"step": "run.(x)+[y]-{step}"},
        "run.(x)+[y]-7.ckpt",
        step(None, 7),
    ),
]


@pytest.mark.parametrize(
    ("templates", "name", "expected"),
    [(templates, name, expected) for _, templates, name, expected in CUSTOM],
    ids=[case for case, *_ in CUSTOM],
)
def test_custom_templates_recognise(templates: dict[str, str], name: str, expected: ParsedName) -> None:
    naming = Naming.from_templates(**templates)
    assert_parsed(naming.classify(name), expected)


CUSTOM_MISSES: list[tuple[str, dict[str, str], str]] = [
    ("lightning-default-padded", {"step": "epoch={epoch}-step={step}"}, "epoch=00-step=500.ckpt"),
    ("lightning-default-old-name", {"step": "epoch={epoch}-step={step}"}, "epoch=03-step=001500-train.ckpt"),
    ("two-decimals-got-four", {"best": "val_loss={val_loss:.2f}"}, "val_loss=0.2500.ckpt"),
    ("regex-metacharacters-literal", {"step": "run.(x)+[y]-{step}"}, "runA(x)+[y]-7.ckpt"),
    ("custom-last-default-name", {"last": "last_model"}, "last.ckpt"),
    ("custom-date-invalid", {"step": "{date}-step={step}"}, "20261301-step=10.ckpt"),
]


@pytest.mark.parametrize(
    ("templates", "name"),
    [(templates, name) for _, templates, name in CUSTOM_MISSES],
    ids=[case for case, *_ in CUSTOM_MISSES],
)
def test_custom_templates_reject(templates: dict[str, str], name: str) -> None:
    assert Naming.from_templates(**templates).classify(name) == ParsedName(kind=Kind.UNKNOWN)


@pytest.mark.parametrize(
    ("templates", "name", "kinds"),
    [
        ({"step": "run_{step}", "best": "run_{loss:.0f}"}, "run_5.ckpt", "best and step"),
        ({"step": "run_{step}", "last": "run_5"}, "run_5.ckpt", "last and step"),
        ({"best": "ckpt_{loss:.0f}", "last": "ckpt_1"}, "ckpt_1-v2.ckpt", "last and best"),
    ],
)
def test_name_matching_two_templates_is_ambiguous(templates: dict[str, str], name: str, kinds: str) -> None:
    parsed = Naming.from_templates(**templates).classify(name)
    assert parsed.kind is Kind.UNKNOWN
    assert parsed.note is not None
    assert "ambiguous" in parsed.note
    assert kinds in parsed.note
    assert parsed.epoch is None
    assert parsed.step is None


def test_default_templates_are_never_ambiguous_on_their_own_names() -> None:
    for name in (step_name(3, 1500), best_name(3, 1500, 0.5), "last.ckpt"):
        assert DEFAULT_NAMING.classify(name).note is None


# --- bad templates ----------------------------------------------------------------------------

BAD_TEMPLATES: list[tuple[str, Kind, str, str]] = [
    # any kind
    ("empty", Kind.STEP, "", "must not be empty"),
    ("slash", Kind.STEP, "run/{step}", "cannot contain"),
    ("backslash", Kind.STEP, "run\\{step}", "cannot contain"),
    ("nul", Kind.STEP, "run\0{step}", "cannot contain"),
    ("ends-with-ckpt", Kind.STEP, "step={step}.ckpt", "without the '.ckpt' extension"),
    ("unbalanced-open", Kind.STEP, "step={step", "not a valid format string"),
    ("single-close", Kind.STEP, "step}={step}", "not a valid format string"),
    ("empty-field", Kind.STEP, "{step}-{}", "not a plain field name"),
    ("positional-field", Kind.STEP, "{step}-{0}", "not a plain field name"),
    ("attribute-field", Kind.STEP, "{step.real}", "not a plain field name"),
    ("index-field", Kind.STEP, "{step[0]}", "not a plain field name"),
    ("private-field", Kind.BEST, "{_loss:.2f}", "not a plain field name"),
    ("hyphenated-field", Kind.BEST, "{val-loss:.2f}", "not a plain field name"),
    ("conversion-r", Kind.STEP, "{step!r}", "conversions are not supported"),
    ("conversion-s", Kind.STEP, "{step!s}", "conversions are not supported"),
    ("conversion-on-metric", Kind.BEST, "{loss!r:.4f}", "conversions are not supported"),
    ("duplicate-step", Kind.STEP, "{step}-{step}", "appears twice"),
    ("duplicate-step-other-spec", Kind.STEP, "{step:06d}-{step}", "appears twice"),
    ("duplicate-metric", Kind.BEST, "{loss:.4f}-{loss:.2f}", "appears twice"),
    ("nested-spec", Kind.STEP, "{step:{width}}", ""),
    # step
    ("step-without-step", Kind.STEP, "epoch={epoch}", "must contain '{step}'"),
    ("step-no-fields", Kind.STEP, "checkpoint", "must contain '{step}'"),
    ("step-with-metric", Kind.STEP, "{step}-{loss:.2f}", "may contain only"),
    ("step-hex-spec", Kind.STEP, "{step:x}", "integer field takes a 'd' format"),
    ("step-float-spec", Kind.STEP, "{step:.2f}", "integer field takes a 'd' format"),
    ("step-string-spec", Kind.STEP, "{step:s}", ""),
    ("step-precision", Kind.STEP, "{step:.2d}", ""),
    ("step-comma", Kind.STEP, "{step:,d}", "plain format"),
    ("step-underscore", Kind.STEP, "{step:_d}", "plain format"),
    ("step-plus", Kind.STEP, "{step:+d}", "plain format"),
    ("step-space-sign", Kind.STEP, "{step: d}", "plain format"),
    ("step-alternate", Kind.STEP, "{step:#d}", "plain format"),
    ("step-left-align", Kind.STEP, "{step:<6d}", "plain format"),
    ("step-fill-align", Kind.STEP, "{step:0>6d}", "plain format"),
    ("step-percent", Kind.STEP, "{step:%}", ""),
    # a width or precision is that many characters made (a planted per-run file: gigabytes)
    ("step-huge-width", Kind.STEP, "{step:01200000000d}", "at most 255"),
    ("step-width-256", Kind.STEP, "{step:0256d}", "at most 255"),
    ("step-width-past-int-limit", Kind.STEP, "{step:0" + "9" * 5000 + "d}", "at most 255"),
    ("best-huge-precision", Kind.BEST, "{loss:.1200000000f}", "at most 255"),
    ("best-huge-width-and-precision", Kind.BEST, "{loss:099999.4f}", "at most 255"),
    ("epoch-hex-spec", Kind.STEP, "{epoch:x}-{step}", "integer field takes a 'd' format"),
    ("date-with-spec", Kind.STEP, "{date:%Y%m%d}-{step}", "takes no format spec"),
    # best
    ("best-zero-metrics", Kind.BEST, "best_{epoch}_{step}", "exactly one metric field"),
    ("best-no-fields", Kind.BEST, "best", "exactly one metric field"),
    ("best-two-metrics", Kind.BEST, "{val_loss:.4f}_{val_acc:.2f}", "exactly one metric field"),
    ("best-metric-d-spec", Kind.BEST, "{loss:d}", ""),
    ("best-metric-s-spec", Kind.BEST, "{loss:s}", ""),
    ("best-metric-x-spec", Kind.BEST, "{loss:x}", ""),
    ("best-metric-n-spec", Kind.BEST, "{loss:n}", "use a float format"),
    ("best-metric-percent", Kind.BEST, "{loss:.2%}", ""),
    ("best-metric-comma", Kind.BEST, "{loss:,.2f}", "plain format"),
    ("best-metric-plus", Kind.BEST, "{loss:+.4f}", "plain format"),
    ("best-ends-with-ckpt", Kind.BEST, "{loss:.4f}.ckpt", "extension"),
    # last
    ("last-with-step", Kind.LAST, "last_{step}", "takes no fields"),
    ("last-with-date", Kind.LAST, "last-{date}", "takes no fields"),
    ("last-with-metric", Kind.LAST, "last-{loss:.2f}", "takes no fields"),
    ("last-empty", Kind.LAST, "", "must not be empty"),
    ("last-ends-with-ckpt", Kind.LAST, "last.ckpt", "extension"),
    ("last-in-directory", Kind.LAST, "ckpts/last", "cannot contain"),
    # kind
    ("unknown-kind", Kind.UNKNOWN, "{step}", "no template for kind"),
]


@pytest.mark.parametrize(
    ("kind", "template", "message"),
    [(kind, template, message) for _, kind, template, message in BAD_TEMPLATES],
    ids=[case for case, *_ in BAD_TEMPLATES],
)
def test_bad_templates_raise_template_error(kind: Kind, template: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        compile_template(kind, template)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("kind", "template"),
    [(kind, template) for _, kind, template, _ in BAD_TEMPLATES if kind is not Kind.UNKNOWN],
    ids=[case for case, kind, *_ in BAD_TEMPLATES if kind is not Kind.UNKNOWN],
)
def test_naming_from_templates_rejects_a_bad_template(kind: Kind, template: str) -> None:
    with pytest.raises(TemplateError):
        Naming.from_templates(**{kind.value: template})


def test_the_longest_width_and_precision_are_accepted() -> None:
    """255 is the bound (a file name's length): up to it a template compiles, and parses its own."""
    compile_template(Kind.BEST, "s={step:0255d}_l={loss:.255f}")
    template = compile_template(Kind.BEST, "s={step:0255d}_l={loss:.200f}")
    name = f"s={format(7, '0255d')}_l={format(0.5, '.200f')}.ckpt"
    parsed = template.parse(name)
    assert parsed is not None
    assert (parsed.step, parsed.metric) == (7, 0.5)


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


GOOD_TEMPLATES: list[tuple[Kind, str]] = [
    (Kind.STEP, DEFAULT_STEP_TEMPLATE),
    (Kind.STEP, "epoch={epoch}-step={step}"),
    (Kind.STEP, "{step}"),
    (Kind.STEP, "{step:06}"),
    (Kind.STEP, "{date}_{epoch:03d}_{step:d}"),
    (Kind.BEST, DEFAULT_BEST_TEMPLATE),
    (Kind.BEST, "{val_loss:.2f}"),
    (Kind.BEST, "{val_loss}"),
    (Kind.BEST, "{acc:.3e}-{epoch}"),
    (Kind.BEST, "{MetricName:.4F}"),
    (Kind.LAST, "last"),
    (Kind.LAST, "final-weights"),
    (Kind.LAST, "last{{braces}}"),
]


@pytest.mark.parametrize(("kind", "template"), GOOD_TEMPLATES)
def test_good_templates_compile(kind: Kind, template: str) -> None:
    compiled = compile_template(kind, template)
    assert compiled.kind is kind
    assert compiled.template == template


@pytest.mark.parametrize(
    ("template", "metric_name"),
    [(DEFAULT_BEST_TEMPLATE, "loss"), ("{val_loss:.2f}", "val_loss"), ("e{epoch}-{acc:g}", "acc")],
)
def test_best_template_records_its_metric_name(template: str, metric_name: str) -> None:
    assert compile_template(Kind.BEST, template).metric_name == metric_name


# --- templates refused rather than half-supported ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "template"),
    [(Kind.STEP, "step={step:6d}"), (Kind.BEST, "loss={loss:8.4f}")],
)
def test_space_padded_width_is_refused(kind: Kind, template: str) -> None:
    """format(500, '6d') pads with blanks; such a template is refused rather than half-supported."""
    with pytest.raises(TemplateError, match="zero-padded"):
        compile_template(kind, template)


def test_adjacent_fields_are_refused() -> None:
    """'01000500' could be epoch 1 step 500 or epoch 10 step 500...: adjacent fields are refused."""
    with pytest.raises(TemplateError, match="separated"):
        Naming.from_templates(step="{epoch:02d}{step:06d}")
