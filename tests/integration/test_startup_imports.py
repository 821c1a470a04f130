"""What a one-shot command imports: only what it uses (issue 16, start-up). ``prune`` of a directory
never loads the daemon's observers (watchdog), the metrics exporter (prometheus-client), object
storage (fsspec) or torch; with the embedded policy it validates nothing (pydantic) and parses no
YAML. No timing here: the time is bench/hundred_k.py's "prune on an empty directory" row."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import assert_clean_exit, imported_modules, run_cli

NEVER_FOR_PRUNE = ("watchdog", "prometheus_client", "fsspec", "s3fs", "torch", "ckpt_watcher.daemon")
ONLY_TO_READ_A_POLICY_FILE = ("pydantic", "yaml", "ckpt_watcher.policy_model", "ckpt_watcher.config_yaml")


def _top_level(imported: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported if name in names or name.split(".")[0] in names)


def _prune_imports(*arguments: str) -> set[str]:
    completed = run_cli("prune", *arguments, environment={"PYTHONPROFILEIMPORTTIME": "1"})
    assert_clean_exit(completed, allowed=(0,))
    imported = imported_modules(completed.stderr)
    assert "ckpt_watcher.reconcile" in imported, "the import profile was not read"
    return imported


@pytest.mark.parametrize("options", [["--dry-run"], ["--dry-run", "--json"], []], ids=" ".join)
def test_prune_with_the_embedded_policy_imports_only_what_it_uses(tmp_path: Path, options: list[str]) -> None:
    imported = _prune_imports(str(tmp_path), *options)

    assert _top_level(imported, NEVER_FOR_PRUNE) == []
    assert _top_level(imported, ONLY_TO_READ_A_POLICY_FILE) == []


def test_prune_with_a_policy_file_validates_it_and_still_loads_no_daemon(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\n")
    root = tmp_path / "run"
    root.mkdir()

    imported = _prune_imports(str(root), "--dry-run", "--policy", str(policy))

    assert _top_level(imported, NEVER_FOR_PRUNE) == []
    assert {"pydantic", "yaml", "ckpt_watcher.policy_model"} <= imported
