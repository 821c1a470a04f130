"""README's "Observing it" is the code's: its metric table and scrape excerpt name exactly what the
exporter serves, and its example alert rules pass ``promtool check rules`` and fire when they should
(``promtool test rules``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from ckpt_watcher.exporter import FiguresCollector
from ckpt_watcher.metrics import DaemonFigures
from ckpt_watcher.reconcile import PassResult, Trigger

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Observing it")
    return text[start : text.index("\n## ", start + 1)]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.DOTALL)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing (.ci/run installs Debian's prometheus package)")
    return found


def _every_family() -> set[str]:
    """The families the exporter serves when every optional one is there (a root, a trash, a pass)."""
    figures = DaemonFigures()
    figures.set_root(README.parent, "inotify")
    figures.record_pass(PassResult(Trigger.STARTUP, trash_bytes=1), finished_at=1.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(figures))
    return {family.name for family in text_string_to_metric_families(generate_latest(registry).decode())}


def test_the_metric_table_lists_exactly_the_metrics_served() -> None:
    table = re.findall(r"^\| (`ckpt_watcher_[^|]*) \|", _section(), flags=re.MULTILINE)
    documented = {name for cell in table for name in re.findall(r"`(ckpt_watcher_\w+)`", cell)}
    served = {f"{name}_total" if f"{name}_total" in documented else name for name in _every_family()}

    assert documented == served


def test_the_scrape_excerpt_parses_and_names_only_metrics_that_are_served() -> None:
    [excerpt] = [block for block in _blocks("text") if block.startswith("# TYPE")]
    families = {family.name for family in text_string_to_metric_families(excerpt)}

    assert families <= _every_family()
    assert len(families) >= 12


def _rules(tmp_path: Path) -> Path:
    [rules] = [block for block in _blocks("yaml") if block.startswith("groups:")]
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return path


def test_the_example_alert_rules_pass_promtool_check_rules(tmp_path: Path) -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(_rules(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def test_the_example_alert_rules_fire_for_a_stall_a_hung_first_pass_an_unmet_budget_and_failing_deletions(
    tmp_path: Path,
) -> None:
    _rules(tmp_path)
    tests = tmp_path / "tests.yaml"
    tests.write_text(
        textwrap.dedent(
            """\
            rule_files: [rules.yaml]
            evaluation_interval: 1m
            tests:
              - interval: 1m
                input_series:
                  - series: 'ckpt_watcher_last_pass_timestamp_seconds{instance="stuck:9464"}'
                    values: '0x30'
                  - series: 'ckpt_watcher_last_pass_timestamp_seconds{instance="fine:9464"}'
                    values: '0+60x30'
                  - series: 'ckpt_watcher_start_timestamp_seconds{instance="fine:9464"}'
                    values: '0x30'
                  - series: 'ckpt_watcher_start_timestamp_seconds{instance="stuck:9464"}'
                    values: '0x30'
                  - series: 'ckpt_watcher_start_timestamp_seconds{instance="hung:9464"}'
                    values: '0x30'
                  - series: 'ckpt_watcher_budget_unmet_bytes{instance="full:9464"}'
                    values: '0 0 1073741824x25'
                  - series: 'ckpt_watcher_budget_unmet_bytes{instance="fine:9464"}'
                    values: '0x30'
                  - series: 'ckpt_watcher_delete_failures_total{instance="denied:9464"}'
                    values: '0+1x50'
                  - series: 'ckpt_watcher_delete_failures_total{instance="blip:9464"}'
                    values: '0 1x50'
                  - series: 'ckpt_watcher_delete_failures_total{instance="fine:9464"}'
                    values: '0x50'
                alert_rule_test:
                  - eval_time: 19m
                    alertname: CheckpointWatcherStalled
                    exp_alerts: []
                  - eval_time: 22m
                    alertname: CheckpointWatcherStalled
                    exp_alerts:
                      - exp_labels: {severity: warning, instance: "stuck:9464"}
                        exp_annotations:
                          summary: "ckpt-watcher on stuck:9464 has completed no pass for over 15 minutes"
                      - exp_labels: {severity: warning, instance: "hung:9464"}
                        exp_annotations:
                          summary: "ckpt-watcher on hung:9464 has completed no pass for over 15 minutes"
                  - eval_time: 15m
                    alertname: CheckpointBudgetUnmet
                    exp_alerts: []
                  - eval_time: 18m
                    alertname: CheckpointBudgetUnmet
                    exp_alerts:
                      - exp_labels: {severity: warning, instance: "full:9464"}
                        exp_annotations:
                          summary: "ckpt-watcher on full:9464 cannot meet its byte budget: 1GiB short"
                  - eval_time: 25m
                    alertname: CheckpointDeletionsFailing
                    exp_alerts: []
                  - eval_time: 40m
                    alertname: CheckpointDeletionsFailing
                    exp_alerts:
                      - exp_labels: {severity: warning, instance: "denied:9464"}
                        exp_annotations:
                          summary: "ckpt-watcher on denied:9464 keeps failing to delete checkpoints"
            """
        )
    )

    result = subprocess.run(
        [_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
