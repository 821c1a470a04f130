"""Render a plan for people (the dry-run table) and for programs (one JSON document)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpt_watcher.contents import CheckpointContents
from ckpt_watcher.delete import ApplyResult
from ckpt_watcher.plan import Decision, Plan, Summary
from ckpt_watcher.policy import POLICY_DESCRIPTIONS, LoadedPolicy
from ckpt_watcher.records import display_name, metric_for_json

_COLUMNS = ("ACTION", "KIND", "EPOCH", "STEP", "METRIC", "SIZE", "NAME", "REASONS")


def human_bytes(count: int) -> str:
    """``1.5 GiB``-style sizes."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _row(decision: Decision) -> tuple[str, ...]:
    record = decision.record
    return (
        decision.action.value,
        record.kind.value,
        "" if record.epoch is None else str(record.epoch),
        "" if record.step is None else str(record.step),
        record.metric_text or "",
        human_bytes(record.bytes) if record.bytes else "",
        display_name(record.name),
        "; ".join(decision.reasons),
    )


def render_table(
    plan: Plan,
    dry_run: bool,
    applied: ApplyResult | None = None,
    sources: Mapping[Path, tuple[str, ...]] | None = None,
) -> str:
    """The dry-run audit: one table per group (with the policy files that apply), then a summary."""
    lines: list[str] = []
    for group in plan.groups:
        rows = [_row(decision) for decision in group.decisions]
        widths = [
            max(len(column), *(len(row[index]) for row in rows)) for index, column in enumerate(_COLUMNS[:-1])
        ]
        header = display_name(str(group.directory))
        if sources and group.directory in sources:
            header += f"  (policy: {' + '.join(sources[group.directory])})"
        lines.append(header)
        for row in [_COLUMNS, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
            lines.append(("  " + "  ".join(cells) + "  " + row[-1]).rstrip())
        lines.append("")
    lines.append(summary_line(plan.summary, dry_run, applied))
    return "\n".join(lines)


def summary_line(summary: Summary, dry_run: bool, applied: ApplyResult | None = None) -> str:
    """``kept 7, deleted 12 (1.2 GiB), skipped 3`` plus what actually happened."""
    verb = "would delete" if dry_run else "deleted"
    deleted = summary.deleted if dry_run or applied is None else len(applied.deleted)
    freed = summary.bytes_deleted if dry_run or applied is None else applied.bytes_freed
    line = (
        f"kept {summary.kept} ({human_bytes(summary.bytes_kept)}), "
        f"{verb} {deleted} ({human_bytes(freed)}), skipped {summary.skipped}"
    )
    if dry_run:
        return line + " -- dry run: nothing was deleted"
    if applied is not None and (applied.failed or len(applied.deleted) != summary.deleted):
        not_deleted = summary.deleted - len(applied.deleted)
        line += f" -- {not_deleted} planned deletion(s) not done, {len(applied.failed)} failed"
    return line


def plan_document(
    plan: Plan,
    loaded: LoadedPolicy,
    dry_run: bool,
    applied: ApplyResult | None = None,
    sources: Mapping[Path, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """The ``--json`` document: the policy, every group's entries with reasons, and the summary."""
    outcomes: Mapping[int, str] = (
        {id(result.decision): result.outcome.value for result in applied.results} if applied else {}
    )
    groups = []
    for group in plan.groups:
        entries = []
        for decision in group.decisions:
            record = decision.record
            entry: dict[str, Any] = {
                "path": display_name(str(record.path)),
                "name": display_name(record.name),
                "kind": record.kind.value,
                "type": record.entry_type.value,
                "epoch": record.epoch,
                "step": record.step,
                "metric_name": record.metric_name,
                "metric": metric_for_json(record),
                "version": record.version,
                "bytes": record.bytes,
                "action": decision.action.value,
                "reasons": list(decision.reasons),
            }
            if id(decision) in outcomes:
                entry["outcome"] = outcomes[id(decision)]
            entries.append(entry)
        groups.append(
            {
                "directory": display_name(str(group.directory)),
                "policy_sources": list((sources or {}).get(group.directory, (loaded.source_label,))),
                "entries": entries,
            }
        )
    summary = plan.summary
    document_summary: dict[str, Any] = {
        "kept": summary.kept,
        "deleted": summary.deleted if dry_run or applied is None else len(applied.deleted),
        "skipped": summary.skipped,
        "bytes_kept": summary.bytes_kept,
        "bytes_deleted": summary.bytes_deleted if dry_run or applied is None else applied.bytes_freed,
        "dry_run": dry_run,
    }
    if applied is not None:
        document_summary["failed"] = len(applied.failed)
    return {
        "policy": policy_document(loaded),
        "groups": groups,
        "summary": document_summary,
    }


def policy_document(loaded: LoadedPolicy) -> dict[str, Any]:
    """The effective policy with its source, as JSON-ready data."""
    values = loaded.policy.model_dump(mode="json")
    return {"source": loaded.source_label, **values}


def render_json(document: Mapping[str, Any] | list[dict[str, Any]]) -> str:
    """Stable, indented JSON."""
    return json.dumps(document, indent=2, allow_nan=False)


def render_policy(loaded: LoadedPolicy) -> str:
    """The effective policy as YAML: each key after a comment saying what it means, each value
    commented with where it came from."""
    lines = [f"# effective policy from {loaded.source_label}"]
    values = loaded.policy.model_dump(mode="json")
    for key, value in values.items():
        lines.append(f"# {POLICY_DESCRIPTIONS.get(key, '')}".rstrip())
        origin = loaded.origins.get(key, "default")
        comment = "default" if origin == "default" else f"from {origin}"
        if isinstance(value, dict):
            lines.append(f"{key}:  # {comment}")
            lines.extend(f"  {sub_key}: {json.dumps(sub_value)}" for sub_key, sub_value in value.items())
        elif isinstance(value, list):
            lines.append(f"{key}: {json.dumps(value)}  # {comment}")
        else:
            lines.append(f"{key}: {json.dumps(value)}  # {comment}")
    return "\n".join(lines)


def contents_document(contents: CheckpointContents) -> dict[str, Any]:
    """One ``inspect --json`` object."""
    document = dataclasses.asdict(contents)
    document["path"] = display_name(str(contents.path))
    return document


_CONTENTS_COLUMNS = (
    "NAME",
    "EPOCH",
    "STEP",
    "RESUME",
    "TENSORS",
    "TENSOR BYTES",
    "DTYPES",
    "SIZE",
    "LIGHTNING",
    "STATUS",
)


def render_contents_table(results: list[CheckpointContents]) -> str:
    """``inspect``: one row per checkpoint, then per checkpoint its callbacks and warnings."""
    rows: list[tuple[str, ...]] = [_CONTENTS_COLUMNS]
    for result in results:
        if result.error is not None:
            blank = ("",) * 6
            rows.append((display_name(result.path.name), *blank, human_bytes(result.bytes), "", "error"))
            continue
        resume = {True: "yes", False: "weights only", None: "?"}[result.resumable]
        rows.append(
            (
                display_name(result.path.name),
                "" if result.epoch is None else str(result.epoch),
                "" if result.global_step is None else str(result.global_step),
                resume if result.loaded else "?",
                str(result.tensor_count),
                human_bytes(result.tensor_bytes),
                ",".join(result.dtypes) if result.dtypes else "",
                human_bytes(result.bytes),
                result.lightning_version or "",
                "warning" if result.warnings else "ok",
            )
        )
    widths = [max(len(row[index]) for row in rows) for index in range(len(_CONTENTS_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for result in results:
        details = _contents_details(result)
        if details:
            lines.append("")
            lines.append(f"{display_name(str(result.path))}:")
            lines.extend(f"  {detail}" for detail in details)
    return "\n".join(lines)


def _contents_details(result: CheckpointContents) -> list[str]:
    details: list[str] = []
    if result.error is not None:
        details.append(f"error: {result.error}")
        return details
    for state in result.model_checkpoints:
        score = "none" if state.best_model_score is None else f"{state.best_model_score:.6g}"
        details.append(
            f"ModelCheckpoint monitor={state.monitor} mode={state.mode} best_model_score={score} "
            f"best_model_path={state.best_model_path} best_k_models={len(state.best_k_models)}"
        )
    if result.unsafe_globals:
        details.append(f"objects the safe loader refuses: {', '.join(result.unsafe_globals)}")
    details.extend(f"warning: {warning}" for warning in result.warnings)
    return details
