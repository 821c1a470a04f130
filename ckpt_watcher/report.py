"""Render a plan for people (the dry-run table) and for programs (one JSON document).

Every cell of a table and every string of a JSON document (keys too) goes through ``display_name``, so
a name cannot forge a row, steer a terminal or make the output invalid UTF-8; non-finite numbers are
carried in JSON as the text ``inf``/``-inf``/``nan``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ckpt_watcher.budget import FreeSpacePlan
from ckpt_watcher.delete import ApplyResult
from ckpt_watcher.durations import format_duration
from ckpt_watcher.locations import is_core_path_of_url
from ckpt_watcher.naming import Kind
from ckpt_watcher.plan import Action, Decision, GroupPlan, Plan, Summary
from ckpt_watcher.policy import POLICY_DESCRIPTIONS, LoadedPolicy
from ckpt_watcher.records import (
    TRASH_DIRECTORY_NAME,
    EntryType,
    display_name,
    is_plain_text,
    metric_for_json,
    path_prefix,
)
from ckpt_watcher.sizes import human_bytes
from ckpt_watcher.trash import TrashEntry, TrashListing, TrashSummary, iso_time
from ckpt_watcher.trash_moves import RestoreResult

if TYPE_CHECKING:
    from ckpt_watcher.contents import CheckpointContents  # inspect's results (contents: inspect only)

_COLUMNS = ("ACTION", "KIND", "EPOCH", "STEP", "METRIC", "SIZE", "NAME", "REASONS")
TRASH_ACTION = "trash"


@dataclass(frozen=True)
class TrashView:
    """What a plan's table and JSON show of the trash: the grace of each group whose deletions are
    moves into the trash (their action is ``trash``), and the trash's summary (None: there is none)."""

    graces: Mapping[Path, int] = field(default_factory=dict)
    summary: TrashSummary | None = None
    at_once: frozenset[Path] = frozenset()  # evicted for keep_free: deleted at once, never trashed

    @property
    def shown(self) -> bool:
        """True when there is a trash, or some group's policy has one."""
        return bool(self.graces) or self.summary is not None

    def actions_in(self, directory: Path) -> Callable[[Decision], str]:
        """The action shown for each decision of one group: ``trash`` for a deletion in a group with a
        trash (not one evicted for keep_free: deleted at once), else the decision's own. Whether the
        group has a trash is worked out once (a table or a JSON document asks it of every row)."""
        if directory not in self.graces:
            return _own_action
        at_once = self.at_once

        def action(decision: Decision) -> str:
            if decision.action is Action.DELETE:
                return Action.DELETE.value if at_once and decision.record.path in at_once else TRASH_ACTION
            return _ACTION_TEXT[decision.action]

        return action

    def trashed_in(self, plan: Plan) -> tuple[int, int]:
        """How many planned deletions (and their bytes) are moves into the trash."""
        deletions = [
            decision
            for group in plan.groups
            if group.directory in self.graces
            for decision in group.deletions
            if decision.record.path not in self.at_once
        ]
        return len(deletions), sum(decision.record.bytes for decision in deletions)


def render_table(
    plan: Plan,
    dry_run: bool,
    applied: ApplyResult | None = None,
    sources: Mapping[Path, tuple[str, ...]] | None = None,
    trash: TrashView | None = None,
    space: Sequence[FreeSpacePlan] = (),
) -> str:
    """The dry-run audit: a line per file system where a byte budget is in force, the trash (if there
    is one), one table per group (with the policy files that apply), then a summary."""
    buffer = io.StringIO()
    write_table(buffer, plan, dry_run, applied, sources, trash, space)
    return buffer.getvalue().removesuffix("\n")


def write_table(
    out: TextIO,
    plan: Plan,
    dry_run: bool,
    applied: ApplyResult | None = None,
    sources: Mapping[Path, tuple[str, ...]] | None = None,
    trash: TrashView | None = None,
    space: Sequence[FreeSpacePlan] = (),
) -> None:
    """``render_table``'s text, written as it is made: each group's rows twice over (their widths,
    then the lines), a batch of lines at a time, so no group's rows are held at once."""
    trash = trash or TrashView()
    lines = [space_line(fs_plan, dry_run) for fs_plan in space]
    if trash.shown:
        lines.append(trash_line(trash.summary))
    if lines:
        out.write("\n".join(lines) + "\n\n")
    for group in plan.groups:
        directory = group.directory
        widths = _widths(group, trash)
        out.write(_group_header(directory, sources, trash) + "\n" + _line(_COLUMNS, widths) + "\n")
        row_format = _row_format(widths)
        action_of = trash.actions_in(directory)
        batch: list[str] = []
        for decision in group.decisions:
            batch.append(row_format(*_plain_row(decision, action_of(decision))).rstrip())
            if len(batch) == _ENTRIES_PER_WRITE:
                out.write("\n".join(batch) + "\n")
                batch = []
        out.write("".join(line + "\n" for line in batch) + "\n")
    out.write(summary_line(plan.summary, dry_run, applied, trash.trashed_in(plan)) + "\n")


_cell_bytes = functools.lru_cache(maxsize=1024)(human_bytes)  # a run's checkpoints are often one size


def _widths(group: GroupPlan, trash: TrashView) -> list[int]:
    """The width of each column but the last (the reasons, never padded) over a group's rows: the
    cells ``_plain_row`` makes, a batch of rows at a time, without joining any row's reasons."""
    widths = [len(column) for column in _COLUMNS[:-1]]
    action_of = trash.actions_in(group.directory)
    decisions = group.decisions
    for start in range(0, len(decisions), _ENTRIES_PER_WRITE):
        batch = [
            _padded_cells(decision, action_of(decision))
            for decision in decisions[start : start + _ENTRIES_PER_WRITE]
        ]
        for index, column in enumerate(zip(*batch, strict=True)):
            widths[index] = max(widths[index], *map(len, column))
    return widths


def _padded_cells(decision: Decision, action: str) -> tuple[str, ...]:
    """A row's cells but its reasons, as ``_plain_row`` shows them (a cell that is printable ASCII
    without '/' is shown as it is, whatever the reasons hold)."""
    record = decision.record
    cells = (
        action,
        record.kind.value,
        "" if record.epoch is None else str(record.epoch),
        "" if record.step is None else str(record.step),
        record.metric_text or "",
        _cell_bytes(record.bytes) if record.bytes else "",
        record.name,
    )
    if _shown_as_is("".join(cells)):
        return cells
    return tuple(display_name(cell) for cell in cells)


def _plain_row(decision: Decision, action: str) -> tuple[str, ...]:
    """One row's cells, each through ``display_name`` (``display_name`` shows plain text as it is, so
    the cells ``_padded_cells`` looks at all at once are the same as one at a time)."""
    return (*_padded_cells(decision, action), display_name("; ".join(decision.reasons)))


def _group_header(directory: Path, sources: Mapping[Path, tuple[str, ...]] | None, trash: TrashView) -> str:
    header = display_name(str(directory))
    if sources and directory in sources:
        header += f"  (policy: {display_name(' + '.join(sources[directory]))})"
    if directory in trash.graces:
        header += f"  (trash grace: {format_duration(trash.graces[directory])})"
    return header


def _row_format(widths: Sequence[int]) -> Callable[..., str]:
    """``_line`` of a row's cells as one ``str.format`` (its result then ``rstrip``ped): each cell
    but the last padded to its width, as ``ljust`` pads it."""
    padded = "  ".join(f"{{{index}:<{width}}}" for index, width in enumerate(widths))
    return ("  " + padded + "  {" + str(len(widths)) + "}").format


def _line(row: Sequence[str], widths: Sequence[int]) -> str:
    cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
    return ("  " + "  ".join(cells) + "  " + row[-1]).rstrip()


def space_line(fs_plan: FreeSpacePlan, dry_run: bool) -> str:
    """``free space on /data: 31.2 GiB of 1.8 TiB ...; keep_free 50.0 GiB + next save 12.4 GiB (...)``
    and what keeping it takes."""
    space = fs_plan.space
    line = (
        f"free space on {display_name(str(space.path))}: {human_bytes(space.free_bytes)} of "
        f"{human_bytes(space.total_bytes)} (with this plan's other deletions done); "
    )
    next_save = f"next save {human_bytes(fs_plan.next_save.bytes)} ({display_name(fs_plan.next_save.basis)})"
    if fs_plan.keep_free is None:
        return line + next_save
    keep_free = human_bytes(fs_plan.keep_free_bytes)
    if fs_plan.keep_free.fraction is not None:
        keep_free = f"{fs_plan.keep_free.text} ({keep_free})"
    line += f"keep_free {keep_free} + {next_save}"
    if not fs_plan.short_bytes:
        return line + ": met"
    taken = []
    if fs_plan.reclaimed:
        count = len(fs_plan.reclaimed)
        taken.append(
            f"{count} trash {'entry' if count == 1 else 'entries'} ({human_bytes(fs_plan.reclaimed_bytes)})"
        )
    if fs_plan.evictions:
        count = len(fs_plan.evictions)
        taken.append(f"{count} checkpoint{'' if count == 1 else 's'} ({human_bytes(fs_plan.evicted_bytes)})")
    verb = "would take" if dry_run else "takes"
    line += f": {human_bytes(fs_plan.short_bytes)} short, {verb} {' and '.join(taken) or 'nothing'}"
    if fs_plan.unmet_bytes:
        line += f"; still {human_bytes(fs_plan.unmet_bytes)} short: the rest may not be evicted"
    return line


def trash_line(summary: TrashSummary | None) -> str:
    """``trash: 2 entries, 39.4 KiB; oldest: run/x.ckpt, trashed ..., purged after ...``."""
    if summary is None:
        return "trash: none yet"
    if not summary.entries:
        return "trash: empty"
    line = (
        f"trash: {summary.entries} entr{'y' if summary.entries == 1 else 'ies'}, {human_bytes(summary.bytes)}"
    )
    oldest = summary.oldest
    if oldest is not None:
        line += (
            f"; oldest: {display_name(oldest.original)}, trashed {iso_time(oldest.trashed_at)}, "
            f"purged after {iso_time(oldest.purge_at)}"
        )
    return line


def summary_line(
    summary: Summary, dry_run: bool, applied: ApplyResult | None = None, trashed: tuple[int, int] = (0, 0)
) -> str:
    """``kept 7, deleted 12 (1.2 GiB), skipped 3`` plus what actually happened; ``trashed`` is how many
    planned deletions (and bytes) go to the trash."""
    planned_deletions = summary.to_delete - trashed[0]
    if dry_run or applied is None:
        counts = [
            ("delete", planned_deletions, summary.bytes_to_delete - trashed[1]),
            ("trash", trashed[0], trashed[1]),
        ]
    else:
        counts = [("delete", len(applied.deleted), applied.bytes_freed)]
        counts.append(("trash", len(applied.trashed), applied.bytes_trashed))
    verbs = {
        "delete": "would delete" if dry_run else "deleted",
        "trash": "would trash" if dry_run else "trashed",
    }
    # "deleted" unless all that is planned goes to the trash; "trashed" when any of it does
    planned = {"delete": planned_deletions > 0 or trashed[0] == 0, "trash": trashed[0] > 0}
    shown = [(verbs[what], count, size) for what, count, size in counts if count or planned[what]]
    line = f"kept {summary.kept} ({human_bytes(summary.bytes_kept)}), " + ", ".join(
        f"{verb} {count} ({human_bytes(size)})" for verb, count, size in shown
    )
    line += f", skipped {summary.skipped}"
    if dry_run:
        return line + " -- dry run: nothing was deleted"
    done = len(applied.deleted) + len(applied.trashed) if applied is not None else summary.to_delete
    if applied is not None and (applied.failed or done != summary.to_delete):
        line += f" -- {summary.to_delete - done} planned deletion(s) not done, {len(applied.failed)} failed"
    return line


def plan_document(
    plan: Plan,
    loaded: LoadedPolicy,
    dry_run: bool,
    applied: ApplyResult | None = None,
    sources: Mapping[Path, tuple[str, ...]] | None = None,
    trash: TrashView | None = None,
    space: Sequence[FreeSpacePlan] = (),
    budget_unmet_bytes: int = 0,
) -> dict[str, Any]:
    """The ``--json`` document: the policy, the trash, every file system where a byte budget is in
    force, every group's entries with reasons, and the summary."""
    trash = trash or TrashView()
    outcomes: Mapping[int, str] = (
        {id(result.decision): result.outcome.value for result in applied.results} if applied else {}
    )
    groups = []
    for group in plan.groups:
        entry_of = _entry_maker(group.directory, trash, outcomes)
        entries = [entry_of(decision) for decision in group.decisions]
        groups.append({**_group_document(group.directory, loaded, sources, trash), "entries": entries})
    return {
        "policy": policy_document(loaded),
        "trash": trash_document(trash.summary),
        "space": [space_document(fs_plan) for fs_plan in space],
        "groups": groups,
        "summary": _plan_summary_document(plan, dry_run, applied, trash, budget_unmet_bytes),
    }


def write_plan_json(
    out: TextIO,
    plan: Plan,
    loaded: LoadedPolicy,
    dry_run: bool,
    applied: ApplyResult | None = None,
    sources: Mapping[Path, tuple[str, ...]] | None = None,
    trash: TrashView | None = None,
    space: Sequence[FreeSpacePlan] = (),
    budget_unmet_bytes: int = 0,
) -> None:
    """``plan_document``'s document (the same parsed JSON), written compact as it is made: a batch of
    entries at a time, so a plan of 100,000 checkpoints is never held a second time as a document or
    as one string. Strings are escaped as ``render_json`` escapes them."""
    trash = trash or TrashView()
    outcomes: Mapping[int, str] = (
        {id(result.decision): result.outcome.value for result in applied.results} if applied else {}
    )
    head = {
        "policy": policy_document(loaded),
        "trash": trash_document(trash.summary),
        "space": [space_document(fs_plan) for fs_plan in space],
    }
    out.write(_compact(head)[:-1] + ',"groups":[')
    for number, group in enumerate(plan.groups):
        _write_group(
            out, number, group, _group_document(group.directory, loaded, sources, trash), trash, outcomes
        )
    summary = _plan_summary_document(plan, dry_run, applied, trash, budget_unmet_bytes)
    out.write('],"summary":' + _compact(summary) + "}\n")


def _write_group(
    out: TextIO,
    number: int,
    group: GroupPlan,
    document: dict[str, Any],
    trash: TrashView,
    outcomes: Mapping[int, str],
) -> None:
    """One group of the ``--json`` document (its ``entries`` a batch at a time); ``number`` from 0."""
    out.write(("," if number else "") + _compact(document)[:-1] + ',"entries":[')
    decisions = group.decisions
    entry_text = _entry_text_maker(group.directory, trash, outcomes)
    for start in range(0, len(decisions), _ENTRIES_PER_WRITE):
        batch = [entry_text(decision) for decision in decisions[start : start + _ENTRIES_PER_WRITE]]
        out.write(("," if start else "") + ",".join(batch))
    out.write("]}")


class PlanJSONStream:
    """``write_plan_json``'s document (the same parsed JSON) for a dry run, written while the pass
    runs: each group as soon as it is planned (``group``), then the policy, the trash, the space and
    the summary (``finish``). The pass then holds one group's plan at a time, also for ``prune --json``.
    Only for a pass in which no group's plan can change after it is made (no ``keep_free``)."""

    def __init__(self, out: TextIO, loaded: LoadedPolicy) -> None:
        self._out = out
        self._loaded = loaded
        self._groups = 0
        self._evicted = 0
        self._trashed = (0, 0)

    def group(self, group: GroupPlan, sources: tuple[str, ...] | None, grace_seconds: int | None) -> None:
        """Write one group's plan (``sources``: the policy files in force there; ``grace_seconds``:
        its trash's, None when deletions are not moves into a trash)."""
        trash = TrashView({group.directory: grace_seconds} if grace_seconds else {})
        document = _group_document(
            group.directory, self._loaded, {group.directory: sources} if sources is not None else None, trash
        )
        if not self._groups:
            self._out.write('{"groups":[')
        _write_group(self._out, self._groups, group, document, trash, {})
        self._groups += 1
        self._evicted += sum(decision.evicted for decision in group.decisions)
        trashed = trash.trashed_in(Plan((group,)))
        self._trashed = (self._trashed[0] + trashed[0], self._trashed[1] + trashed[1])

    def finish(
        self,
        summary: Summary,
        trash: TrashSummary | None,
        space: Sequence[FreeSpacePlan],
        budget_unmet_bytes: int,
        stopped: str | None = None,
    ) -> None:
        """Write the rest of the document once every group is written (``stopped``: why the pass
        stopped before the groups after them, in the summary)."""
        if not self._groups:
            self._out.write('{"groups":[')
        document = {
            "policy": policy_document(self._loaded),
            "trash": trash_document(trash),
            "space": [space_document(fs_plan) for fs_plan in space],
            "summary": {
                **_counts_document(summary, True, None, self._trashed),
                "evicted": self._evicted,
                "budget_unmet_bytes": budget_unmet_bytes,
                **({"stopped": stopped} if stopped is not None else {}),
            },
        }
        self._out.write("]," + _compact(document)[1:] + "\n")


_ENTRIES_PER_WRITE = 1024


_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode  # compact: the C encoder


def _compact(value: Any) -> str:
    """``value`` as compact JSON, every string escaped as ``render_json`` does."""
    return _ENCODE(json_ready(value))


def _entry_ready(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry whose strings ``display_name`` would leave as they are marked so (``json_ready`` then
    returns it at once); else escaped. Path and name are escaped already; kind, type, action and a
    metric's text are words of ours; only the metric's name and the reasons are looked at."""
    if _entry_shown_as_is(entry["metric_name"], entry["reasons"]):
        return entry
    return dict(json_ready(entry))


def _entry_shown_as_is(metric_name: str | None, reasons: Sequence[str]) -> bool:
    """True when an entry's metric name and reasons (the strings of it that are not escaped already
    nor words of ours) are all shown as they are."""
    return _shown_as_is("".join(reasons) if metric_name is None else "".join([metric_name, *reasons]))


def _shown_as_is(text: str) -> bool:
    """True when ``display_name`` shows each piece of ``text`` as it is: printable ASCII without a
    backslash, and no '/' (which a core path, shown as its URL, would start with). Many cells are
    looked at at once this way, the usual case, instead of one ``display_name`` each."""
    return "/" not in text and is_plain_text(text)


_KIND_TEXT = {kind: kind.value for kind in Kind}  # an enum's .value is a Python-level property
_TYPE_TEXT = {entry_type: entry_type.value for entry_type in EntryType}
_ACTION_TEXT = {action: action.value for action in Action}


def _own_action(decision: Decision) -> str:
    """A decision's own action, as shown (a group without a trash)."""
    return _ACTION_TEXT[decision.action]


def _entry_maker(
    directory: Path, trash: TrashView, outcomes: Mapping[int, str]
) -> Callable[[Decision], dict[str, Any]]:
    """The maker of a group's entries in the ``--json`` document: what is the same for every entry of
    the group (its directory's text, whether its deletions go to the trash) is worked out once."""
    prefix = path_prefix(directory)
    action_of = trash.actions_in(directory)

    def entry_of(decision: Decision) -> dict[str, Any]:
        record = decision.record
        name = record.name
        entry: dict[str, Any] = {
            # record.path is directory / name (a plan groups by directory); joined here as text
            "path": display_name(prefix + name),
            "name": display_name(name),
            "kind": _KIND_TEXT[record.kind],
            "type": _TYPE_TEXT[record.entry_type],
            "epoch": record.epoch,
            "step": record.step,
            "metric_name": record.metric_name,
            "metric": metric_for_json(record),
            "version": record.version,
            "bytes": record.bytes,
            "action": action_of(decision),
            "reasons": list(decision.reasons),
        }
        if decision.evicted:
            entry["evicted"] = True
        if id(decision) in outcomes:
            entry["outcome"] = outcomes[id(decision)]
        return entry

    return entry_of


_STRING = json.encoder.encode_basestring_ascii  # a string as _ENCODE writes it (ensure_ascii)
# An entry as _ENCODE writes its dict: the keys in _entry_maker's order; ints as int.__repr__ and
# finite floats as float.__repr__ (what the encoder calls); strings already through _STRING.
_ENTRY_TEXT = (
    '{"path":%s,"name":%s,"kind":"%s","type":"%s","epoch":%s,"step":%s,"metric_name":%s,"metric":%s,'
    '"version":%s,"bytes":%s,"action":"%s","reasons":[%s]%s%s}'
)


def _entry_text_maker(
    directory: Path, trash: TrashView, outcomes: Mapping[int, str]
) -> Callable[[Decision], str]:
    """The maker of the JSON text of a group's entries: ``_ENCODE(_entry_ready(entry))`` of the entry
    ``_entry_maker`` makes, the same text, written directly when nothing in it needs escaping (no dict
    per entry, no encoder walk: half the time of a 100,000-entry group); else made that way."""
    entry_of = _entry_maker(directory, trash, outcomes)
    prefix = path_prefix(directory)
    action_of = trash.actions_in(directory)
    # display_name escapes character by character and shows a core path as its URL: under a plain
    # prefix that is not a core path, a path is shown as that prefix and its shown name.
    shown_prefix = prefix if is_plain_text(prefix) and not is_core_path_of_url(prefix) else None

    def entry_text(decision: Decision) -> str:
        record = decision.record
        reasons = decision.reasons
        metric_name = record.metric_name
        if shown_prefix is None or not _entry_shown_as_is(metric_name, reasons):
            return _ENCODE(_entry_ready(entry_of(decision)))  # as _entry_ready says: escaped first
        name = display_name(record.name)
        metric = metric_for_json(record)
        outcome = outcomes.get(id(decision))
        return _ENTRY_TEXT % (
            _STRING(shown_prefix + name),
            _STRING(name),
            _KIND_TEXT[record.kind],
            _TYPE_TEXT[record.entry_type],
            "null" if record.epoch is None else int.__repr__(record.epoch),
            "null" if record.step is None else int.__repr__(record.step),
            "null" if metric_name is None else _STRING(metric_name),
            "null"
            if metric is None
            else (_STRING(metric) if type(metric) is str else float.__repr__(metric)),
            int.__repr__(record.version),
            int.__repr__(record.bytes),
            action_of(decision),
            ",".join(map(_STRING, reasons)),
            ',"evicted":true' if decision.evicted else "",
            "" if outcome is None else ',"outcome":' + _STRING(outcome),
        )

    return entry_text


def _group_document(
    directory: Path, loaded: LoadedPolicy, sources: Mapping[Path, tuple[str, ...]] | None, trash: TrashView
) -> dict[str, Any]:
    """A group in the ``--json`` document, without its entries."""
    return {
        "directory": display_name(str(directory)),
        "policy_sources": list((sources or {}).get(directory, (loaded.source_label,))),
        "trash_grace_seconds": trash.graces.get(directory),
    }


def _plan_summary_document(
    plan: Plan, dry_run: bool, applied: ApplyResult | None, trash: TrashView, budget_unmet_bytes: int
) -> dict[str, Any]:
    return {
        **_summary_document(plan, dry_run, applied, trash),
        "evicted": sum(decision.evicted for decision in plan.decisions),
        "budget_unmet_bytes": budget_unmet_bytes,
    }


def _summary_document(
    plan: Plan, dry_run: bool, applied: ApplyResult | None, trash: TrashView
) -> dict[str, Any]:
    return _counts_document(plan.summary, dry_run, applied, trash.trashed_in(plan))


def _counts_document(
    summary: Summary, dry_run: bool, applied: ApplyResult | None, trashed: tuple[int, int]
) -> dict[str, Any]:
    document_summary: dict[str, Any] = {
        "kept": summary.kept,
        "deleted": summary.to_delete if dry_run or applied is None else len(applied.deleted),
        "skipped": summary.skipped,
        "bytes_kept": summary.bytes_kept,
        "bytes_deleted": summary.bytes_to_delete if dry_run or applied is None else applied.bytes_freed,
        "dry_run": dry_run,
    }
    if dry_run or applied is None:
        document_summary["deleted"] -= trashed[0]
        document_summary["bytes_deleted"] -= trashed[1]
        document_summary.update(trashed=trashed[0], bytes_trashed=trashed[1])
    else:
        document_summary.update(trashed=len(applied.trashed), bytes_trashed=applied.bytes_trashed)
    if applied is not None:
        document_summary["failed"] = len(applied.failed)
    return document_summary


def space_document(fs_plan: FreeSpacePlan) -> dict[str, Any]:
    """One file system in ``--json``: its free space, what keep_free asks, the next save, what it takes."""
    space = fs_plan.space
    return {
        "path": display_name(str(space.path)),
        "device": space.device,
        "total_bytes": space.total_bytes,
        "free_bytes": space.free_bytes,
        "keep_free": fs_plan.keep_free.text if fs_plan.keep_free is not None else None,
        "keep_free_bytes": fs_plan.keep_free_bytes,
        "next_save_bytes": fs_plan.next_save.bytes,
        "next_save_basis": fs_plan.next_save.basis,
        "short_bytes": fs_plan.short_bytes,
        "evicted": len(fs_plan.evictions),
        "evicted_bytes": fs_plan.evicted_bytes,
        "reclaimed": [item.key for item in fs_plan.reclaimed],
        "reclaimed_bytes": fs_plan.reclaimed_bytes,
        "unmet_bytes": fs_plan.unmet_bytes,
    }


def trash_document(summary: TrashSummary | None) -> dict[str, Any] | None:
    """The trash in a plan's JSON: entries, bytes and the oldest entry; None when there is none."""
    if summary is None:
        return None
    oldest = trash_entry_document(summary.oldest) if summary.oldest is not None else None
    return {"entries": summary.entries, "bytes": summary.bytes, "oldest": oldest}


def trash_entry_document(entry: TrashEntry, root: Path | None = None) -> dict[str, Any]:
    """One trash entry as JSON (``trash list --json``, the plan's oldest entry)."""
    document: dict[str, Any] = {
        "key": entry.key,
        "original": entry.original,
        "type": "directory" if entry.is_directory else "file",
        "bytes": entry.bytes,
        "trashed_at": iso_time(entry.trashed_at),
        "purge_at": iso_time(entry.purge_at),
        "grace": format_duration(entry.grace_seconds),
        "reasons": list(entry.reasons),
    }
    if root is not None:
        document["path"] = str(root / entry.original)
        document["trash_path"] = str(root / TRASH_DIRECTORY_NAME / entry.trash_path)
    return document


def policy_document(loaded: LoadedPolicy) -> dict[str, Any]:
    """The effective policy with its source, as JSON-ready data."""
    values = loaded.policy.model_dump(mode="json")
    return {"source": loaded.source_label, **values}


def render_json(document: Mapping[str, Any] | list[dict[str, Any]]) -> str:
    """Stable, indented, standard JSON: every string escaped, non-finite numbers as text."""
    return json.dumps(json_ready(document), indent=2, allow_nan=False)


def json_ready(value: Any) -> Any:
    """``value`` with every string (keys too) escaped, every non-finite float as ``inf``/``-inf``/``nan``.

    Containers in which nothing changes are returned as they are (a large plan is not copied).
    """
    kind = type(value)
    if kind in _JSON_AS_IS:
        return value
    if isinstance(value, str):
        return display_name(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        if all(_json_key(key) is key and json_ready(item) is item for key, item in value.items()):
            return value
        return {_json_key(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        if all(json_ready(item) is item for item in value):
            return value
        return [json_ready(item) for item in value]
    return value


_JSON_AS_IS = frozenset({int, bool, type(None)})


def _json_key(key: Any) -> Any:
    """A key json.dumps accepts as it is (None, bool, int, finite float), else escaped text."""
    if type(key) is str:
        return display_name(key)
    if key is None or isinstance(key, bool | int) or (isinstance(key, float) and math.isfinite(key)):
        return key
    return display_name(key if isinstance(key, str) else repr(key))


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
        cells = (
            result.path.name,
            "" if result.epoch is None else str(result.epoch),
            "" if result.global_step is None else str(result.global_step),
            resume if result.loaded else "?",
            str(result.tensor_count),
            human_bytes(result.tensor_bytes),
            ",".join(result.dtypes) if result.dtypes else "",
            human_bytes(result.bytes),
            "" if result.lightning_version is None else format_value(result.lightning_version),
            "warning" if result.warnings else "ok",
        )
        rows.append(tuple(display_name(cell) for cell in cells))
    widths = [max(len(row[index]) for row in rows) for index in range(len(_CONTENTS_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for result in results:
        details = _contents_details(result)
        if details:
            lines.append("")
            lines.append(f"{display_name(str(result.path))}:")
            lines.extend(f"  {display_name(detail)}" for detail in details)
    return "\n".join(lines)


def format_value(value: Any, missing: str = "none") -> str:
    """An ``inspect`` field for the table: ``missing`` for None, numbers as ``%.6g`` (``inf``, ``nan``
    too), described values as ``tensor(float32, shape [2, 3])`` or ``<type>``."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        tensor = value.get("tensor")
        if isinstance(tensor, Mapping):
            shape = ", ".join(str(size) for size in tensor.get("shape", []))
            return f"tensor({tensor.get('dtype')}, shape [{shape}])"
        return f"<{value.get('type', 'unknown')}>"
    return str(value)


def _contents_details(result: CheckpointContents) -> list[str]:
    details: list[str] = []
    if result.error is not None:
        details.append(f"error: {result.error}")
        return details
    for state in result.model_checkpoints:
        details.append(
            f"ModelCheckpoint monitor={format_value(state.monitor, 'None')} "
            f"mode={format_value(state.mode, 'None')} "
            f"best_model_score={format_value(state.best_model_score)} "
            f"best_model_path={format_value(state.best_model_path, 'None')} "
            f"best_k_models={len(state.best_k_models)}"
        )
    if result.unsafe_globals:
        details.append(f"objects the safe loader refuses: {', '.join(result.unsafe_globals)}")
    details.extend(f"warning: {warning}" for warning in result.warnings)
    return details


_TRASH_COLUMNS = ("TRASHED", "PURGED AFTER", "SIZE", "TYPE", "PATH", "WHY")


def render_trash_table(listing: TrashListing) -> str:
    """``trash list``: one row per entry, oldest first, then the total."""
    if not listing.entries:
        return "the trash is empty"
    rows: list[tuple[str, ...]] = [_TRASH_COLUMNS]
    for entry in listing.entries:
        cells = (
            iso_time(entry.trashed_at),
            iso_time(entry.purge_at),
            human_bytes(entry.bytes),
            "directory" if entry.is_directory else "file",
            entry.original,
            "; ".join(entry.reasons),
        )
        rows.append(tuple(display_name(cell) for cell in cells))
    widths = [max(len(row[index]) for row in rows) for index in range(len(_TRASH_COLUMNS) - 1)]
    lines = [
        (
            "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
            + "  "
            + row[-1]
        ).rstrip()
        for row in rows
    ]
    count = len(listing.entries)
    lines.append("")
    lines.append(f"{count} entr{'y' if count == 1 else 'ies'}, {human_bytes(listing.bytes)}")
    return "\n".join(lines)


def trash_list_document(root: Path, listing: TrashListing | None) -> dict[str, Any]:
    """``trash list --json``: every entry (its original and trash paths, when, size, why, when it is
    purged), the total, and the metadata files that could not be read."""
    entries = listing.entries if listing is not None else []
    return {
        "trash": str(root / TRASH_DIRECTORY_NAME),
        "exists": listing is not None,
        "entries": [trash_entry_document(entry, root) for entry in entries],
        "bytes": sum(entry.bytes for entry in entries),
        "problems": [
            {"file": name, "error": problem} for name, problem in (listing.problems if listing else [])
        ],
    }


def render_restore_results(results: list[RestoreResult]) -> str:
    """``restore``: one line per entry asked for, restored (and until when it is pinned) or refused."""
    lines = []
    for result in results:
        entry = result.entry
        if result.restored:
            until = result.pinned_until
            pinned = (
                f"pinned until {iso_time(until)}"
                if until is not None and entry.grace_seconds
                else "not pinned"
            )
            lines.append(
                f"restored  {display_name(entry.original)}  (trashed {iso_time(entry.trashed_at)}; {pinned})"
            )
        else:
            lines.append(f"refused   {display_name(entry.original)}  ({display_name(result.problem or '?')})")
    return "\n".join(lines)
