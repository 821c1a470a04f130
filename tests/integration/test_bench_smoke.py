"""The benchmark scripts in bench/ still run: ``bench/run.py --smoke`` (tiny sizes, every section).

Not a benchmark: no figure is checked against a target here (a smoke run is far too small for that),
only that every section runs to the end and writes its tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SECTION_TITLES = (
    "## Machine",
    "## Targets",
    "## 1. One-shot scale",
    "## 2. Reaction latency",
    "## 3. Footprint at rest",
    "## 4. Interference with training",
    "## 5. Against the baseline",
    "## 6. Probes and metrics",
    "## 7. Space pressure",
    "## 8. The trash",
    "## 9. A bucket prefix",
    "## 10. 100,000 checkpoints against the floor",
)


def _bench(script: str, *arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``bench/SCRIPT`` with this interpreter; it must exit 0 (its stderr's end says why not)."""
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / script), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    return completed


@pytest.mark.slow
@pytest.mark.timeout(420)  # ~60 s alone; 110 to 150 s measured on this 2-core machine under load
def test_bench_smoke_run_writes_every_section(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    completed = _bench(
        "run.py", "--smoke", "--work-dir", str(tmp_path / "work"), "--output", str(output), timeout=400
    )
    text = output.read_text()
    assert completed.stdout.strip() == text.strip()
    for title in SECTION_TITLES:
        assert title in text, f"{title!r} missing from the smoke run's output"
    # Each measurement produced rows, not a bare header, and nothing went unexpectedly wrong.
    latency_rows = [line for line in text.splitlines() if "written over" in line]
    assert len(latency_rows) >= 4, latency_rows
    for row in latency_rows:  # every expected deletion came, and nothing else was deleted
        assert row.endswith("| 0 / 0 |"), row
    assert "prune: wrongly deleted" in text
    space = text[text.index("## 7. Space pressure") :]
    space_rows = [line for line in space.splitlines() if line.startswith("| ") and line.endswith(" MiB |")]
    if os.geteuid() == 0:  # the section mounts a tmpfs; elsewhere it says it was not measured
        assert len(space_rows) == 2, space
        for row in space_rows:  # every trial saw its eviction
            assert row.split(" | ")[-2] == "0", row
    assert "**yes**" not in text  # torch was not imported by prune or watch
    trash_rows = [line for line in text.splitlines() if line.startswith(("| file, ", "| directory, "))]
    assert len(trash_rows) == 3, trash_rows  # two file sizes and a directory checkpoint, each measured
    assert not (REPOSITORY / "BENCHMARKS-smoke.md").exists()


@pytest.mark.timeout(120)
def test_the_open_chain_study_runs_and_times_each_chain(tmp_path: Path) -> None:
    """``bench/open_chain.py`` (the race-free open against the floor; quoted in BENCHMARKS.md §10)."""
    completed = _bench(
        "open_chain.py", "--size", "smoke", "--rounds", "1", "--work-dir", str(tmp_path), timeout=110
    )
    figures = json.loads(completed.stdout)
    assert figures["files"] == 300  # the smoke tree: 299 checkpoints and last.ckpt
    assert figures["floor_ratio"] == 1.0
    for chain in ("handle", "direct", "floor"):
        assert figures[f"{chain}_seconds"] > 0, chain
